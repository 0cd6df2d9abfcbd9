"""MoE expert products on one GPU: grouped matmul peers and our paths, measured in one process.

    python -m benchmarks.moe [--quick] [--only gmm swiglu gather quantize decode layer]

Table 1, grouped matmul [M, K] x [G, K, N] with G = 256 groups, equal or Zipf-skewed sizes, at the
Ring-mini and Ring-flash expert shapes: a dense matmul of the same FLOPs (the ceiling), XLA's
`jax.lax.ragged_dot` (a masked dense product on GPU: only small M), JAX's Mosaic GPU
`ragged_dot_mgpu` (128/128/64, 4 stages), and `pallas_kernels.gmm(backend="auto")` (our Mosaic GPU
kernel on Hopper); and a row of `pallas_kernels.gmm` with FP8 weights (float8_e4m3fn [G, N, K] and
per-column scales: on Hopper the kernel reads the FP8 tiles, converts them in SMEM and multiplies by
the scales in its epilogue; the bf16-time-over-FP8-time ratio is printed), and of FP8 weights and
rows (both on the FP8 tensor cores), timed with the rows' quantization and without it (a model
quantizes each token once, before the dispatch gathers its top-8 rows). Then the gate_up product
with SwiGLU: our gmm followed by XLA's SwiGLU, against SwiGLU in the kernel's epilogue, and the
same with FP8 weights, at prefill sizes.
Table 2, the decode-sized expert step of one MoE layer (tokens x top-8 pairs, gate_up then down)
two ways: sorted by expert through `pallas_kernels.gmm`, and each pair reading its expert by id
through `pallas_kernels.matvec` (what a decode step of up to 64 pairs runs on one GPU), against the
bytes of the chosen experts' weights; times are the GPU kernels' own (`timing.device_ms`, from a
trace). The dispatch's row gather at prefill sizes (tokens x top-8 rows of the hidden size in
expert order): XLA's gather against `pallas_kernels.take_rows` (the kernel on Hopper), in bytes
read and written per second (the tokens' rows are read top-8 times, partly from L2, so this can
pass the copy bandwidth). The FP8 rows' quantization at prefill sizes: XLA's against
`pallas_kernels.quantize_rows` (the kernel on Hopper), against the copy bandwidth. Table 3, a whole
Ring-mini MoE layer (router, dispatch, experts, combine, shared expert) in tokens per second.
Times in milliseconds. Tables 1 and 2, the SwiGLU, gather and quantization tables: the GPU
kernels' own time per call, summed over a trace of 20 calls after warm-up (no per-call host round
trip, which would blur every row under a millisecond). Table 3: median wall-clock time of 20
jitted calls.
"""

import argparse
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from benchmarks.timing import bench_jax, copy_bandwidth, device_ms

SHAPES = {"mini gate_up": (2048, 1024), "mini down": (512, 2048),
          "flash gate_up": (4096, 2048), "flash down": (1024, 4096)}


def group_sizes(M, G, skew, seed=0):
    """Equal sizes, or Zipf(1.2)-like: expert e gets weight 1 / (rank_e + 1)^1.2, shuffled."""
    if not skew:
        sizes = np.full(G, M // G)
        sizes[: M - sizes.sum()] += 1
        return sizes
    w = 1.0 / np.arange(1, G + 1) ** 1.2
    w = np.random.default_rng(seed).permutation(w / w.sum())
    sizes = np.floor(w * M).astype(int)
    sizes[np.argmax(sizes)] += M - sizes.sum()
    return sizes


def gmm_table(Ms):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    from pallas_kernels import backend

    print("| shape | M | sizes | dense same FLOPs | XLA ragged_dot | ragged_dot_mgpu | ours (auto) |")
    print("|---|---|---|---|---|---|---|")
    key = jax.random.PRNGKey(0)
    G = 256
    mgpu = jax.jit(lambda a, b, c: ragged_dot_mgpu.ragged_dot(
        a, b, group_sizes=c, block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1))
    ours = jax.jit(pallas_kernels.gmm)
    ours_fp8 = jax.jit(lambda a, b, s, c: pallas_kernels.gmm(a, b, c, scale=s))
    ours_w8a8 = with_fp8_rows(pallas_kernels.gmm)
    ours_w8a8_xla = with_fp8_rows(pallas_kernels.gmm, quantize="reference")
    ours_w8a8_kernel = jax.jit(lambda a, b, s, r, c: pallas_kernels.gmm(a, b, c, scale=s, lhs_scale=r))
    rows_fp8 = jax.jit(backend.quantize_rows)
    xla = jax.jit(lambda a, b, c: jax.lax.ragged_dot(a, b, c))
    dense = jax.jit(lambda a, b: a @ b[0])
    for name, (K, N) in SHAPES.items():
        rhs = (jax.random.normal(key, (G, K, N), jnp.float32) / 30).astype(jnp.bfloat16)
        values, scale = backend.quantize_rows(jnp.swapaxes(rhs, 1, 2))
        for M in Ms:
            lhs = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.float32).astype(jnp.bfloat16)
            fl = 2 * M * K * N

            def timed(f, *args):
                return device_ms(f, *args) or bench_jax(f, *args)

            def cell(ms):
                return f"{ms:.3f} ms ({fl / ms / 1e9:.0f} TF/s)"
            for skew in (False, True):
                sizes = jnp.asarray(group_sizes(M, G, skew), jnp.int32)
                cells = [cell(timed(dense, lhs, rhs))]
                cells.append(cell(timed(xla, lhs, rhs, sizes)) if M <= 4096 else "(dense expansion: OOM)")
                try:
                    cells.append(cell(timed(mgpu, lhs, rhs, sizes)) if M >= 128 else "n/a (M < block)")
                except Exception as e:  # noqa: BLE001 - a peer's failure is a table cell, not a crash
                    cells.append(f"failed: {type(e).__name__}")
                ours_ms = timed(ours, lhs, rhs, sizes)
                cells.append(cell(ours_ms))
                print(f"| {name} | {M} | {'zipf' if skew else 'equal'} | " + " | ".join(cells) + " |", flush=True)
                if not skew:
                    equal, bf16_ms = sizes, ours_ms
            fp8_ms = timed(ours_fp8, lhs, values, scale, equal)
            print(f"| {name}, FP8 weights (ours, auto) | {M} | equal | - | - | - | {cell(fp8_ms)}, "
                  f"{bf16_ms / fp8_ms:.2f}x bf16 |", flush=True)
            w8a8_ms = timed(ours_w8a8, lhs, values, scale, equal)
            print(f"| {name}, FP8 weights and rows (ours, auto, the rows' quantization included) | {M} | equal | - "
                  f"| - | - | {cell(w8a8_ms)}, {bf16_ms / w8a8_ms:.2f}x bf16 |", flush=True)
            xla_ms = timed(ours_w8a8_xla, lhs, values, scale, equal)
            print(f"| {name}, FP8 weights and rows (ours, auto, the rows quantized by XLA in the call) | {M} | equal "
                  f"| - | - | - | {cell(xla_ms)}, {bf16_ms / xla_ms:.2f}x bf16 |", flush=True)
            rows, row_scale = rows_fp8(lhs)
            kernel_ms = timed(ours_w8a8_kernel, rows, values, scale, row_scale, equal)
            print(f"| {name}, FP8 weights and rows (ours, auto, the rows quantized beforehand) | {M} | equal | - "
                  f"| - | - | {cell(kernel_ms)}, {bf16_ms / kernel_ms:.2f}x bf16 |", flush=True)


def with_fp8_rows(entry, quantize="auto"):
    """entry (`pallas_kernels.gmm` or `gmm_swiglu`) as a jitted f(lhs, FP8 values, scale, sizes)
    that quantizes lhs per row first (`pallas_kernels.quantize_rows` with backend=quantize: "auto"
    as the model does, "reference" for XLA's), timed with it."""
    def run(lhs, values, scale, sizes):
        rows, row_scale = pallas_kernels.quantize_rows(lhs, backend=quantize)
        return entry(rows, values, sizes, scale=scale, lhs_scale=row_scale)
    return jax.jit(run)


def swiglu_table(Ms):
    """The gate_up product and SwiGLU: our gmm then XLA's SwiGLU, against SwiGLU in the kernel's
    epilogue (`pallas_kernels.gmm_swiglu`, which skips writing and re-reading the [M, 2 I] product)."""
    from pallas_kernels.backend import quantize_rows
    from pallas_kernels.moe import gmm_gpu, reference

    print("\n| gate_up + SwiGLU | M | sizes | gmm, then XLA SwiGLU | SwiGLU in the epilogue | saved | "
          "FP8 weights, SwiGLU in the epilogue | bf16 / FP8 | FP8 weights and rows (quantized in the call) | "
          "bf16 / that |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    key = jax.random.PRNGKey(1)
    unfused = jax.jit(lambda a, b, c: reference.swiglu(gmm_gpu.gmm(a, b, c)))
    fused = jax.jit(lambda a, b, c: gmm_gpu.gmm(a, b, c, swiglu=True))
    fused_fp8 = jax.jit(lambda a, b, s, c: gmm_gpu.gmm(a, b, c, scale=s, swiglu=True))
    fused_w8a8 = with_fp8_rows(pallas_kernels.gmm_swiglu)
    for name in ("mini gate_up", "flash gate_up"):
        K, N = SHAPES[name]
        rhs = (jax.random.normal(key, (256, K, N), jnp.float32) / 30).astype(jnp.bfloat16)
        values, scale = quantize_rows(jnp.swapaxes(rhs, 1, 2))
        for M in Ms:
            lhs = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.float32).astype(jnp.bfloat16)
            for skew in (False, True):
                sizes = jnp.asarray(group_sizes(M, 256, skew), jnp.int32)
                a, b = (device_ms(f, lhs, rhs, sizes) or bench_jax(f, lhs, rhs, sizes) for f in (unfused, fused))
                c, d = (device_ms(f, lhs, values, scale, sizes) or bench_jax(f, lhs, values, scale, sizes)
                        for f in (fused_fp8, fused_w8a8))
                print(f"| {name} | {M} | {'zipf' if skew else 'equal'} | {a:.3f} ms | {b:.3f} ms | {1 - b / a:.0%} | "
                      f"{c:.3f} ms | {b / c:.2f}x | {d:.3f} ms | {b / d:.2f}x |", flush=True)


def gather_table():
    print("\n| hidden | tokens x top-8 rows | bytes read + written | XLA gather ms | TB/s | take_rows ms | TB/s | same bits |")
    print("|---|---|---|---|---|---|---|---|")
    xla = jax.jit(lambda x, i: x[i])
    kernel = jax.jit(pallas_kernels.take_rows)
    for hidden in (2048, 4096):
        for tokens in (4096, 32768):
            x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, hidden), jnp.float32).astype(jnp.bfloat16)
            idx = jnp.asarray(np.random.default_rng(tokens).permutation(tokens * 8) // 8, jnp.int32)
            nbytes = 2 * idx.shape[0] * hidden * 2
            same = bool(jnp.all(xla(x, idx) == kernel(x, idx)))
            a, b = (device_ms(f, x, idx) or bench_jax(f, x, idx) for f in (xla, kernel))
            print(f"| {hidden} | {idx.shape[0]} | {nbytes / 1e9:.2f} GB | {a:.3f} | {nbytes / a / 1e9:.2f} | {b:.3f} | "
                  f"{nbytes / b / 1e9:.2f} | {same} |", flush=True)


def quantize_table(hbm):
    """FP8 rows (`fp8_activations="grouped"`): XLA's quantization against the kernel of
    `pallas_kernels.quantize_rows` (on Hopper; the reference elsewhere), at a 32k prefill chunk's
    rows (the tokens; the SwiGLU output, tokens x top-8 rows of the expert width); bytes: bf16
    read, FP8 and scales written; "values off": how many of each one's FP8 values differ from
    numpy's (`pallas_kernels.backend.quantize_rows` on the host)."""
    from pallas_kernels.backend import platform, quantize_rows

    print("\n| rows | M | K | bytes read + written | XLA ms | % copy | kernel ms | % copy | values off: XLA | kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    xla = jax.jit(functools.partial(pallas_kernels.quantize_rows, backend="reference"))
    kernel = jax.jit(functools.partial(pallas_kernels.quantize_rows,
                                       backend="gpu" if platform() == "hopper" else "reference"))
    for name, M, K in (("tokens, mini", 32768, 2048), ("SwiGLU output, mini", 262144, 512),
                       ("tokens, flash", 32768, 4096), ("SwiGLU output, flash", 262144, 1024)):
        x = jax.random.normal(jax.random.PRNGKey(M + K), (M, K), jnp.float32).astype(jnp.bfloat16)
        nbytes = M * K * 3 + M * 4
        want = quantize_rows(np.asarray(x.astype(jnp.float32)))[0].view(np.uint8)
        off = [int(np.sum(np.asarray(f(x)[0]).view(np.uint8) != want)) for f in (xla, kernel)]
        a, b = (device_ms(f, x) or bench_jax(f, x) for f in (xla, kernel))
        print(f"| {name} | {M} | {K} | {nbytes / 1e9:.2f} GB | {a:.3f} | {nbytes / (a * 1e-3) / hbm:.0%} | "
              f"{b:.3f} | {nbytes / (b * 1e-3) / hbm:.0%} | {off[0]} | {off[1]} |", flush=True)


def decode_table(hbm):
    from flax import nnx

    from ring_jax.layers.moe import Experts, gathered_outputs, grouped_outputs

    print("\n| model | tokens | pairs | chosen experts' bytes | sorted + gmm kernel ms | % copy | matvec by ids ms "
          "| % copy |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (hidden, I) in {"mini": (2048, 512), "flash": (4096, 1024)}.items():
        experts = nnx.eval_shape(lambda: Experts(256, hidden, I, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        key = jax.random.PRNGKey(1)
        gate_up = (jax.random.normal(key, (256, hidden, 2 * I), jnp.float32) / 40).astype(jnp.bfloat16)
        down = (jax.random.normal(key, (256, I, hidden), jnp.float32) / 20).astype(jnp.bfloat16)
        experts.gate_up_proj.set_value(gate_up)
        experts.down_proj.set_value(down)
        state = nnx.state(experts)
        paths = [jax.jit(lambda s, t, i, f=f: f(t, i, s["gate_up_proj"][...], s["down_proj"][...]))
                 for f in (grouped_outputs, gathered_outputs)]
        for tokens in (1, 8):
            x = jax.random.normal(key, (tokens, hidden), jnp.float32).astype(jnp.bfloat16)
            ids = jnp.asarray(np.stack([np.random.default_rng(t).choice(256, 8, replace=False) for t in range(tokens)]), jnp.int32)
            nbytes = len(np.unique(np.asarray(ids))) * 3 * hidden * I * 2
            cells = []
            for path in paths:
                ms = device_ms(path, state, x, ids) or bench_jax(path, state, x, ids)
                cells += [f"{ms:.4f}", f"{100 * nbytes / (ms * 1e-3) / hbm:.0f}%"]
            print(f"| {name} | {tokens} | {tokens * 8} | {nbytes / 1e6:.1f} MB | " + " | ".join(cells) + " |", flush=True)


def layer_table():
    from flax import nnx

    from ring_jax.config import RingConfig
    from ring_jax.layers.moe import MoE

    config = RingConfig.from_hf(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             "configs", "ring-mini-linear-2.0.json"))
    layer = MoE(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    step = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    print("\n| Ring-mini MoE layer | tokens | ms | tokens/s | expert TFLOP/s |")
    print("|---|---|---|---|---|")
    for tokens in (1, 8, 64, 512, 4096, 16384):
        x = jax.random.normal(jax.random.PRNGKey(tokens), (1, tokens, config.hidden_size)).astype(jnp.bfloat16)
        ms = bench_jax(step, state, x)
        flops = tokens * (config.num_experts_per_tok + 1) * 6 * config.hidden_size * config.moe_intermediate_size
        print(f"| router + dispatch + experts + combine + shared | {tokens} | {ms:.3f} | {tokens / ms * 1e3:,.0f} | "
              f"{flops / ms / 1e9:.0f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="M in {4096, 131072} only")
    tables = ("gmm", "swiglu", "gather", "quantize", "decode", "layer")
    p.add_argument("--only", nargs="+", choices=tables, default=tables, help="the tables to run (default: all)")
    args = p.parse_args()
    hbm = copy_bandwidth()
    print(f"# {jax.devices()[0].device_kind} | jax {jax.__version__} | copy bandwidth {hbm / 1e12:.2f} TB/s")
    if "gmm" in args.only:
        gmm_table([4096, 131072] if args.quick else [8, 64, 512, 4096, 16384, 131072])
    if "swiglu" in args.only:
        swiglu_table([32768, 131072])
    if "gather" in args.only:
        gather_table()
    if "quantize" in args.only:
        quantize_table(hbm)
    if "decode" in args.only:
        decode_table(hbm)
    if "layer" in args.only:
        layer_table()


if __name__ == "__main__":
    main()
