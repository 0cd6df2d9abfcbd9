"""A full-size model sharded over the local GPUs: random bf16 weights made in place, prefill and
decode through generate()'s own steps, the expert-parallel MoE's ways back compared, and the
batch-inference job (`ring_jax.job`) run end to end on the model.

    python -m benchmarks.sharded [--config configs/ring-flash-linear-2.0.json] [--mesh expert=2]
        [--prefill 4096] [--decode-batch 1 16] [--context 4096]
        [--comm-tokens 1 16 256 4096] [--job-batches 2 --job-batch-size 16 --job-prompt-len 1024]

Each parameter is drawn directly in its sharded layout (one small jitted fill per distinct shape,
a block of noise tiled over the array: no device ever holds more than its shard, and it takes
seconds, not a compile of the whole init).

The MoE's pairs' outputs come back over `expert` by psum (few tokens) or by reduce-scatter,
combine and all-gather (many; `ring_jax.layers.moe`). The comm table times, per MoE layer at N
tokens, the whole layer (router to shared expert) both ways, and the collectives with the combine
alone: both ways and a ragged all-to-all (each pair's output sent to the device that combines its
token, then the all-gather; GPU only: XLA:CPU has no ragged-all-to-all). The prefill and decode
tables' communication share is the collectives of the way the model takes, timed alone, over the
step time.

The job table runs `ring_jax.job` on the model (a folder with its config.json and a small tokenizer;
prompts of random token ids): a one-batch run that compiles, then the timed run.
"""

import argparse
import functools
import json
import math
import os
import shutil
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import ring_jax  # noqa: E402,F401  (sets XLA's rounding flag before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.generate import (PEAK_FLOPS, decode_bytes, prefill_flops, run_decode, run_prefill,  # noqa: E402
                                 weight_counts)
from benchmarks.timing import bench_jax, copy_bandwidth  # noqa: E402
from ring_jax import RingConfig, RingModel, job  # noqa: E402
from ring_jax.cache import cache_length  # noqa: E402
from ring_jax.batching import prefill_steps  # noqa: E402
from ring_jax.layers import moe  # noqa: E402
from ring_jax.sharding import make_mesh, param_shardings, parse_mesh  # noqa: E402

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


def random_sharded(make, mesh):
    """The module make(rngs) with random bf16-scale weights drawn in their sharded layout."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    leaves, treedef = jax.tree.flatten(state)
    targets = jax.tree.leaves(param_shardings(state, mesh))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    filled = [_filler(x.shape, x.dtype, s)(k) for x, s, k in zip(leaves, targets, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled))


# ---------------------------------------------------------------------------- communication
def _pairs_owners(config, n, N):
    """Uniform random top-k routing of N tokens: counts [n, n], counts[i, j] = the pairs whose
    expert is on device i and whose token is in token shard j (shards of ceil(N / n) tokens)."""
    E, k = config.num_experts, config.num_experts_per_tok
    ids = np.argsort(np.random.default_rng(N).random((N, E)), axis=1)[:, :k]
    shard = np.broadcast_to(np.arange(N)[:, None] // -(-N // n), ids.shape)
    counts = np.zeros((n, n), np.int32)
    np.add.at(counts, (ids // (E // n), shard), 1)
    return counts


def collectives_ms(mesh, config, N, way):
    """ms of one MoE layer's way back at N tokens per block, with the float32 combine: "psum",
    "scatter" (reduce-scatter, combine, all-gather) or "all-to-all" (ragged all-to-all of the pairs'
    outputs to their token's shard, combine, all-gather). 0 when the experts are not split."""
    n = mesh.shape["expert"]
    if n == 1:
        return 0.0
    k, H = config.num_experts_per_tok, config.hidden_size
    rows = -(-N // n)
    shard_map = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    weights = jnp.full((N, k), 1 / k, jnp.float32)
    if way == "psum":
        f = shard_map(lambda out: moe.combine(jax.lax.psum(out, "expert"), weights), in_specs=P(), out_specs=P())
        shape, spec = (N, k, H), P()
    elif way == "scatter":
        f = shard_map(lambda out: moe.scattered_combine(out, weights, "expert"), in_specs=P(), out_specs=P())
        shape, spec = (N, k, H), P()
    else:
        counts = _pairs_owners(config, n, N)
        sends = jnp.asarray(counts)                                             # [from, to]
        starts = jnp.asarray(np.cumsum(counts, axis=1) - counts)               # where in the sender's rows
        lands = jnp.asarray(np.cumsum(counts, axis=0) - counts)                # where in the receiver's rows
        receives = jnp.asarray(counts.T)

        def back(out):
            i = jax.lax.axis_index("expert")
            got = jax.lax.ragged_all_to_all(out[0], jnp.zeros((rows * k, H), out.dtype), starts[i], sends[i],
                                            lands[i], receives[i], axis_name="expert")
            combined = moe.combine(got.reshape(rows, k, H), weights[:rows])
            return jax.lax.all_gather(combined, "expert", axis=0, tiled=True)[:N]

        f = shard_map(back, in_specs=P("expert"), out_specs=P())
        shape, spec = (n, N * k, H), P("expert")
    x = jax.jit(lambda: jnp.ones(shape, jnp.bfloat16), out_shardings=NamedSharding(mesh, spec))()
    return bench_jax(jax.jit(f), x)


def model_way_ms(mesh, config, N):
    """ms of the collectives the model takes at N tokens per block (moe.SCATTER_MIN_TOKENS)."""
    return collectives_ms(mesh, config, N, "psum" if N < moe.SCATTER_MIN_TOKENS else "scatter")


def layer_ms(layer, mesh, N, scatter_min):
    """ms of the whole sharded MoE layer on [1, N, hidden] with moe.SCATTER_MIN_TOKENS = scatter_min."""
    default, moe.SCATTER_MIN_TOKENS = moe.SCATTER_MIN_TOKENS, scatter_min
    try:
        graphdef, state = nnx.split(layer)
        x = jax.jit(lambda: jax.random.normal(jax.random.key(N), (1, N, layer.gate.kernel.shape[0]), jnp.bfloat16),
                    out_shardings=NamedSharding(mesh, P()))()
        with jax.set_mesh(mesh):
            return bench_jax(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state, x)
    finally:
        moe.SCATTER_MIN_TOKENS = default


def comm_table(config, mesh, tokens):
    n = mesh.shape["expert"]
    k, H = config.num_experts_per_tok, config.hidden_size
    layer = random_sharded(lambda rngs: moe.MoE(config, dtype=jnp.bfloat16, rngs=rngs), mesh)
    ragged = jax.default_backend() != "cpu"
    print(f"\n| MoE layer, expert={n} | tokens | layer ms, psum | layer ms, scatter | psum ms | MB/device | "
          f"scatter ms | MB/device | ragged all-to-all ms | MB/device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for N in tokens:
        pair_bytes = N * k * H * 2
        mb = {"psum": 2 * (n - 1) / n * pair_bytes, "scatter": (n - 1) / n * (pair_bytes + N * H * 2),
              "all-to-all": (n - 1) / n ** 2 * pair_bytes + (n - 1) / n * N * H * 2}
        times = {way: collectives_ms(mesh, config, N, way) for way in ("psum", "scatter")}
        times["all-to-all"] = collectives_ms(mesh, config, N, "all-to-all") if ragged else float("nan")
        cells = " | ".join(f"{times[w]:.3f} | {mb[w] / 1e6:.2f}" for w in ("psum", "scatter", "all-to-all"))
        print(f"| {config.hidden_size} hidden | {N} | {layer_ms(layer, mesh, N, 1 << 30):.3f} | "
              f"{layer_ms(layer, mesh, N, 0):.3f} | {cells} |", flush=True)
    del layer


# ------------------------------------------------------------------------------------- the job
def job_table(model, config_path, args):
    """ring_jax.job on `model`: a one-batch run (compiles), then --job-batches batches, timed."""
    config = model.config
    B, L, M = args.job_batch_size, args.job_prompt_len, args.job_new_tokens
    rng = np.random.default_rng(0)
    print(f"\n| job run | prompts | batch | prompt tokens (lengths in ({L // 2}, {L}]) | generated tokens | s | "
          f"prompts/s | generated tokens/s | all tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, "model")
        os.makedirs(folder)
        shutil.copy(config_path, os.path.join(folder, "config.json"))
        from ring_jax.io.random_checkpoint import write_small_tokenizer
        write_small_tokenizer(folder, config.vocab_size)
        for name, batches in (("compile (1 batch)", 1), ("timed", args.job_batches)):
            source, output = os.path.join(work, f"{batches}.jsonl"), os.path.join(work, f"{batches}.out.jsonl")
            lengths = rng.integers(L // 2 + 1, L + 1, batches * B)
            with open(source, "w") as f:
                for i, T in enumerate(lengths):
                    f.write(json.dumps({"id": i, "input_ids": rng.integers(0, config.vocab_size, T).tolist()}) + "\n")
            argv = ["--model", folder, "--input", source, "--output", output, "--batch-size", str(B),
                    "--sort-window", "1", "--max-new-tokens", str(M), "--compilation-cache", "off"
                    ] + (["--mesh", args.mesh] if args.mesh else [])   # "compile" must compile
            t = time.perf_counter()
            status = job.run(job.parse_args(argv), load=lambda path, dtype, mesh, quantize: model)
            seconds = time.perf_counter() - t
            with open(output) as f:
                records = [json.loads(line) for line in f]
            assert status == 0 and len(records) == len(lengths) and all("output_ids" in r for r in records)
            generated = sum(r["num_tokens"] for r in records)
            print(f"| {name} | {len(records)} | {B} | {int(lengths.sum())} | {generated} | {seconds:.2f} | "
                  f"{len(records) / seconds:.2f} | {generated / seconds:,.0f} | "
                  f"{(generated + lengths.sum()) / seconds:,.0f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-flash-linear-2.0.json"))
    parser.add_argument("--mesh", default="", help="e.g. expert=2 (default: experts over every device)")
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096])
    parser.add_argument("--decode-batch", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--comm-tokens", type=int, nargs="*", default=[], help="token counts of the comm table")
    parser.add_argument("--job-batches", type=int, default=0, help="timed job batches (0: no job table)")
    parser.add_argument("--job-batch-size", type=int, default=16)
    parser.add_argument("--job-prompt-len", type=int, default=1024)
    parser.add_argument("--job-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    sizes = parse_mesh(args.mesh) if args.mesh else {"data": 1, "expert": None, "tensor": 1}
    mesh = make_mesh(sizes["data"], sizes["expert"], sizes["tensor"])
    config = RingConfig.from_hf(args.config)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"mesh {dict(mesh.shape)}, config {os.path.basename(args.config)}", flush=True)
    bw = copy_bandwidth()
    if args.comm_tokens:
        comm_table(config, mesh, args.comm_tokens)
    t = time.perf_counter()
    model = random_sharded(lambda rngs: RingModel(config, dtype=jnp.bfloat16, rngs=rngs), mesh)
    jax.block_until_ready(nnx.state(model))
    counts = weight_counts(config, model)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    used = [(d.memory_stats() or {}).get("bytes_in_use", 0) / 2**30 for d in jax.devices()]
    print(f"\nrandom model: {total / 1e9:.1f}B params in {time.perf_counter() - t:.1f} s; per device "
          f"{', '.join(f'{u:.1f}' for u in used)} GiB; copy bandwidth {bw / 1e12:.2f} TB/s per device", flush=True)
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_decoder_layers))

    if args.prefill:
        print("\n| prefill tokens | first call s (compile incl.) | s (median of 3) | tokens/s | MFU (of all devices) | MoE comm share |")
        print("|---|---|---|---|---|---|")
    cache_len = cache_length(max((sum(prefill_steps(T, args.chunk)) for T in args.prefill), default=0) + 1)
    for T in args.prefill:
        first, _, median, _ = run_prefill(model, T, args.chunk, cache_len)
        flops = prefill_flops(config, counts, T)
        comm = n_moe * len(prefill_steps(T, args.chunk)) * model_way_ms(mesh, config, min(T, args.chunk)) * 1e-3  # batch 1
        print(f"| {T} | {first:.1f} | {median:.3f} | {T / median:,.0f} | "
              f"{flops / median / (PEAK_FLOPS * mesh.size):.1%} | {comm / median:.0%} |", flush=True)

    if args.decode_batch:
        print("\n| decode batch | context | first 8 steps s (compile incl.) | ms/step | tokens/s | "
              "roofline tokens/s (bytes over all devices) | % | MoE comm share |")
        print("|---|---|---|---|---|---|---|---|")
    for B in args.decode_batch:
        first, second, _ = run_decode(model, B, args.context, args.steps)
        step = second / args.steps
        roof = B / (decode_bytes(config, counts, B, args.context + 8 + args.steps) / (bw * mesh.size))
        comm = n_moe * model_way_ms(mesh, config, -(-B // mesh.shape["data"])) * 1e-3
        print(f"| {B} | {args.context} | {first:.1f} | {step * 1e3:.2f} | {B / step:,.0f} | {roof:,.0f} | "
              f"{B / step / roof:.0%} | {comm / step:.0%} |", flush=True)

    if args.job_batches:
        job_table(model, args.config, args)

    peak = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30 for d in jax.devices()]
    print(f"\npeak memory per device: {', '.join(f'{p:.1f}' for p in peak)} GiB")


if __name__ == "__main__":
    main()
