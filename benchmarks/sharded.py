"""A full-size model sharded over the local GPUs: random bf16 weights made in place, prefill and
decode through generate()'s own steps, and the expert-parallel all-reduce timed alone.

    python benchmarks/sharded.py [--config configs/ring-flash-linear-2.0.json] [--mesh expert=2]
                                 [--prefill 4096] [--decode-batch 1 16] [--context 4096]

Each parameter is drawn directly in its sharded layout (one small jitted fill per distinct shape,
a block of noise tiled over the array: no device ever holds more than its shard, and it takes
seconds, not a compile of the whole init). The communication share is the time of the MoE layers'
all-reduces (one per MoE layer: the pairs' outputs [tokens, top_k, hidden] in bf16, summed over
`expert`) measured alone at the step's shape, over the step time.
"""

import argparse
import functools
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ring_jax  # noqa: E402,F401  (sets XLA's rounding flag before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.generate import decode_bytes, prefill_flops, run_decode, run_prefill, weight_counts  # noqa: E402
from benchmarks.timing import bench_jax, copy_bandwidth  # noqa: E402
from ring_jax import RingConfig, RingModel  # noqa: E402
from ring_jax.cache import cache_length  # noqa: E402
from ring_jax.generate import _bucket  # noqa: E402
from ring_jax.sharding import make_mesh, param_shardings, parse_mesh  # noqa: E402

PEAK_FLOPS = 989e12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 1 << 20          # noise elements drawn per parameter; tiled over the rest


@functools.lru_cache(maxsize=None)
def _filler(shape, dtype, sharding):
    """A jitted fill of one parameter layout: noise / sqrt(fan_in) for matrices, ones for vectors."""
    size = math.prod(shape)

    def fill(key):
        if len(shape) == 1:
            return jnp.ones(shape, dtype)
        noise = jax.random.normal(key, (min(size, BLOCK),), jnp.float32) / math.sqrt(shape[-2])
        return jnp.tile(noise, -(-size // BLOCK))[:size].reshape(shape).astype(dtype)

    return jax.jit(fill, out_shardings=sharding)


def random_sharded_model(config, mesh):
    abstract = nnx.eval_shape(lambda: RingModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = param_shardings(state, mesh)
    leaves, treedef = jax.tree.flatten(state)
    targets = jax.tree.leaves(shardings)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    filled = [_filler(x.shape, x.dtype, s)(k) for x, s, k in zip(leaves, targets, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled))


def allreduce_ms(mesh, tokens, config):
    """ms of one MoE layer's all-reduce over `expert` at `tokens` tokens (bf16 [N, k, hidden])."""
    if mesh.shape["expert"] == 1:
        return 0.0
    shape = (tokens, config.num_experts_per_tok, config.hidden_size)
    x = jax.device_put(jnp.ones(shape, jnp.bfloat16), NamedSharding(mesh, P()))
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "expert"), mesh=mesh, in_specs=P(), out_specs=P(),
                                 check_vma=False))
    return bench_jax(psum, x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-flash-linear-2.0.json"))
    parser.add_argument("--mesh", default="", help="e.g. expert=2 (default: experts over every device)")
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096])
    parser.add_argument("--decode-batch", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4096)
    args = parser.parse_args(argv)

    sizes = parse_mesh(args.mesh) if args.mesh else {"data": 1, "expert": None, "tensor": 1}
    mesh = make_mesh(sizes["data"], sizes["expert"], sizes["tensor"])
    config = RingConfig.from_hf(args.config)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"mesh {dict(mesh.shape)}, config {os.path.basename(args.config)}", flush=True)
    bw = copy_bandwidth()
    t = time.perf_counter()
    model = random_sharded_model(config, mesh)
    jax.block_until_ready(nnx.state(model))
    counts = weight_counts(config, model)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    used = [(d.memory_stats() or {}).get("bytes_in_use", 0) / 2**30 for d in jax.devices()]
    print(f"random model: {total / 1e9:.1f}B params in {time.perf_counter() - t:.1f} s; per device "
          f"{', '.join(f'{u:.1f}' for u in used)} GiB; copy bandwidth {bw / 1e12:.2f} TB/s per device", flush=True)
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_decoder_layers))

    print("\n| prefill tokens | first call s (compile incl.) | s | tokens/s | MFU (of all devices) | all-reduce share |")
    print("|---|---|---|---|---|---|")
    cache_len = cache_length(max((_bucket(T, args.chunk) for T in args.prefill), default=0) + 1)
    for T in args.prefill:
        first, second = run_prefill(model, T, args.chunk, cache_len)
        flops = prefill_flops(config, counts, T)
        comm = n_moe * (T // min(T, args.chunk)) * allreduce_ms(mesh, min(T, args.chunk), config) * 1e-3
        print(f"| {T} | {first:.1f} | {second:.3f} | {T / second:,.0f} | "
              f"{flops / second / (PEAK_FLOPS * mesh.size):.1%} | {comm / second:.0%} |", flush=True)

    print("\n| decode batch | context | first 8 steps s (compile incl.) | ms/step | tokens/s | "
          "roofline tokens/s (bytes over all devices) | % | all-reduce share |")
    print("|---|---|---|---|---|---|---|---|")
    for B in args.decode_batch:
        first, second = run_decode(model, B, args.context, args.steps)
        step = second / args.steps
        roof = B / (decode_bytes(config, counts, B, args.context + 8 + args.steps) / (bw * mesh.size))
        comm = n_moe * allreduce_ms(mesh, B, config) * 1e-3
        print(f"| {B} | {args.context} | {first:.1f} | {step * 1e3:.2f} | {B / step:,.0f} | {roof:,.0f} | "
              f"{B / step / roof:.0%} | {comm / step:.0%} |", flush=True)

    peak = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30 for d in jax.devices()]
    print(f"\npeak memory per device: {', '.join(f'{p:.1f}' for p in peak)} GiB")


if __name__ == "__main__":
    main()
