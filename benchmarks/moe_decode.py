"""One decode token's MoE block as one kernel (`pallas_kernels.moe_decode`) against the launches it
replaces: the router's matvec (with the norm), the sigmoid, the selection kernel, the routed and
shared experts' gate_up and down matvecs and the glue between them, as the model runs a batch-1
MoE layer without it. FP8 experts, random weights, every layer's stacks (read in place by index).

    python -m benchmarks.moe_decode [--config configs/ring-mini-linear-2.0.json] [--layers 4] [--chain 19]
                                    [--programs 0 66] [--tiles 8/16/8 8/16/16]

Timed as GPU time per layer over a chain of `--chain` layers in one program (each layer's input
the last one's output plus the block's), from a profiler trace: the fixed cost of each launch is
what the fused kernel saves, so a block timed alone would hide it. The bytes are the chosen
experts', the shared expert's and the router's; the floor is their time at the copy bandwidth.
Without a GPU: wall clock in interpret mode, the kernel's phases as three kernels (a smoke run).
"""

import argparse
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import ring_jax  # noqa: E402,F401  (sets XLA's rounding flag before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402
from benchmarks.timing import bench_jax, copy_bandwidth, device_ms  # noqa: E402
from pallas_kernels.backend import FP8  # noqa: E402
from pallas_kernels.moe.reference import swiglu  # noqa: E402
from pallas_kernels.moe_decode import gpu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_weights(config, layers: int):
    """Every layer's norm, router, bias and FP8 expert stacks (routed: layers x E matrices; shared:
    one per layer), drawn on the device: random bytes (NaNs cleared) with scales of 1 / sqrt(K)."""
    K, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
    keys = iter(jax.random.split(jax.random.key(0), 12))

    def fp8(shape):
        return jax.lax.bitcast_convert_type(jax.random.bits(next(keys), shape, jnp.uint8) & 0xBF, FP8)

    def scale(shape, fan_in):
        return jax.random.uniform(next(keys), shape, jnp.float32, 0.5, 1.5) / np.sqrt(4 * fan_in)

    norm = (1 + 0.1 * jax.random.normal(next(keys), (layers, K))).astype(jnp.bfloat16)
    router = (jax.random.normal(next(keys), (layers, K, E)) / np.sqrt(K)).astype(jnp.bfloat16)
    bias = 0.01 * jax.random.normal(next(keys), (layers, E), jnp.float32)
    gate_up = (fp8((layers * E, 2 * I, K)), fp8((layers, 2 * I, K)))
    gate_up_scale = (scale((layers * E, 2 * I), K), scale((layers, 2 * I), K))
    down = (fp8((layers * E, K, I)), fp8((layers, K, I)))
    down_scale = (scale((layers * E, K), I), scale((layers, K), I))
    return norm, router, bias, gate_up, gate_up_scale, down, down_scale


def unfused(settings, x, norm, router, bias, gate_up, gate_up_scale, down, down_scale, index):
    """The block as the model runs it without the fused kernel (`ring_jax.layers.moe`, the shared
    expert joined to the routed pairs' matvec calls) -> (out [1, K], ids [top_k])."""
    k = settings["top_k"]
    normed = dict(norm_weight=norm, norm_index=index[0], norm_eps=settings["eps"])
    logits = pallas_kernels.matvec(x[None], router, index[1][None], **normed)[0]                       # [1, E]
    ids, w = pallas_kernels.select_experts(jax.nn.sigmoid(logits), bias, bias_index=index[2], top_k=k,
                                           n_group=settings["n_group"], topk_group=settings["topk_group"],
                                           scaling=settings["scaling"])
    pairs = jnp.concatenate([ids[0] + index[3], (gate_up[0].shape[0] + index[4])[None]])
    y = pallas_kernels.matvec(x[None], gate_up, pairs, scale=gate_up_scale, **normed).astype(x.dtype)
    y = pallas_kernels.matvec(swiglu(y), down, pairs, scale=down_scale).astype(x.dtype)[:, 0]
    out = jnp.sum(y[:k].astype(jnp.float32) * w[0][:, None], axis=0).astype(x.dtype) + y[k]
    return out[None], ids[0]


def chained(block, layers: int, chain: int, E: int):
    """A jitted chain of `chain` blocks over the layers in turn, each adding its output to x."""
    @jax.jit
    def run(x, *weights):
        for i in range(chain):
            layer = i % layers
            out = block(x, *weights, jnp.asarray([layer, layer, layer, layer * E, layer], jnp.int32))[0]
            x = (x.astype(jnp.float32) + out.astype(jnp.float32)).astype(x.dtype)
        return x
    return run


def tiles(text: str):
    """"N/D/W" -> the fused kernel's `Tiles`."""
    try:
        return gpu.Tiles(*map(int, text.split("/")))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"tiles are three integers N/D/W (e.g. 8/16/8), got {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--layers", type=int, default=4,
                        help="layers in the stacks (Ring-mini's 15 linear MoE layers make a 4.03 GB down stack, "
                             "read as uint16 pairs: docs/PERFORMANCE.md on their memory)")
    parser.add_argument("--chain", type=int, default=19, help="blocks per timed program (Ring-mini's MoE layers: 19)")
    parser.add_argument("--programs", type=int, nargs="+", default=[0],
                        help="the fused kernel's programs (0: one per SM)")
    parser.add_argument("--tiles", type=tiles, nargs="+", default=[gpu.TILES], metavar="N/D/W",
                        help="the fused kernel's items and warps: gate (and up) rows per gate_up item / output "
                             "columns per down item / warps per program, powers of two, N dividing the expert width, "
                             "D the hidden size, W at most 32 (default: the kernel's own, "
                             f"{'/'.join(map(str, gpu.TILES))})")
    args = parser.parse_args(argv)
    config = ring_jax.RingConfig.from_hf(args.config)
    on_gpu = jax.devices()[0].platform == "gpu"
    K, I, E, k = config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok
    settings = dict(eps=config.rms_norm_eps, top_k=k, n_group=config.n_group, topk_group=config.topk_group,
                    scaling=config.routed_scaling_factor)
    unfit = [t for t in args.tiles if not gpu.fits(K, I, E, jnp.bfloat16, k, config.n_group, t)]
    if unfit:
        parser.error(f"--tiles {' '.join('/'.join(map(str, t)) for t in unfit)} do not fit hidden {K} and expert "
                     f"width {I} (powers of two, N dividing the width, D the hidden size, W at most 32)")
    weights = random_weights(config, args.layers)
    x = jax.random.normal(jax.random.key(1), (1, K)).astype(jnp.bfloat16)
    moved = (k + 1) * 3 * I * K + K * E * 2                 # the chosen and shared FP8 experts, the bf16 router
    bandwidth = copy_bandwidth()
    print(f"device: {jax.devices()[0].device_kind}; {os.path.basename(args.config)}: hidden {K}, {E} experts of "
          f"width {I}, top-{k}; stacks of {args.layers} layers (down {weights[5][0].nbytes / 1e9:.2f} GB); "
          f"copy {bandwidth / 1e12:.2f} TB/s; {moved / 1e6:.1f} MB per block, floor "
          f"{moved / bandwidth * 1e6:.1f} us; " + ("GPU time from a trace" if on_gpu else
                                                    "wall clock, interpret mode (smoke run)"))
    print("| block | programs | tiles (rows / columns / warps) | us per layer | of the floor | ids as unfused | "
          "largest difference / largest value |")
    print("|---|---|---|---|---|---|---|")
    index = jnp.asarray([0, 0, 0, 0, 0], jnp.int32)
    want = jax.jit(functools.partial(unfused, settings))(x, *weights, index)

    def fused(programs, shape):
        kw = dict(programs=programs or None) if on_gpu else dict(split=True, programs=programs or 2, interpret=True)
        return lambda *a: gpu.moe_decode(*a, **settings, **kw, tiles=shape)

    blocks = [("unfused (the model's matvec path)", "", "", functools.partial(unfused, settings))]
    blocks += [("fused (`pallas_kernels.moe_decode`)", p or "one per SM", "/".join(map(str, t)), fused(p, t))
               for p in args.programs for t in args.tiles]
    for name, programs, tile_text, block in blocks:
        got = jax.jit(block)(x, *weights, index)
        same = bool(np.array_equal(got[1], want[1]))
        diff = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - want[0].astype(jnp.float32)))
                     / jnp.max(jnp.abs(want[0].astype(jnp.float32))))
        run = chained(block, args.layers, args.chain, E)
        seconds = device_ms(run, x, *weights) / 1e3 if on_gpu else (bench_jax(run, x, *weights, n=2) / 1e3)
        us = seconds / args.chain * 1e6
        print(f"| {name} | {programs} | {tile_text} | {us:.2f} | {moved / bandwidth * 1e6 / us:.0%} | {same} | "
              f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
