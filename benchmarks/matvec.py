"""Decode-step matmuls (a few rows times a weight matrix): the matvec kernel against XLA.

    python -m benchmarks.matvec [--config configs/ring-mini-linear-2.0.json] [--rows 1 8]
                                [--weights bfloat16 float8_e4m3fn]

Each weight matrix of one decode step of the model (the projections, the router in float32, the
shared and dense MLPs, 8 routed experts' matrices picked by id, and the LM head for reference),
multiplied by `rows` rows, with bf16 weights and with FP8 weights (`pallas_kernels.backend.FP8`:
float8_e4m3fn [N, K] values and a float32 scale per output column; XLA's way converts the values
to the rows' dtype, multiplies, and scales the float32 sums). Both ways return float32 sums. Each
is timed as R products on R distinct matrices (up to 32, to pass 256 MB in all where they can, so
that the 50 MB L2 serves little of them) inside one jitted call; the time is the GPU kernels' own time per product
(`timing.device_ms`: from a profiler trace of 20 calls, divided by R, the kernel's partial-sum
reduction and scaling included), as they run back to back inside a decode step. Without a GPU,
wall-clock medians (a smoke run). Bytes: the weights each product reads (FP8: the 1-byte values
and their 4-byte scales); the roofline is the copy bandwidth measured in the same run.
"""

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import bench_jax, copy_bandwidth, device_ms
from pallas_kernels.backend import quantize_rows
from pallas_kernels.matvec import gpu, reference
from ring_jax import RingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = ("bfloat16", "float8_e4m3fn")


def shapes(config):
    """(name, x dtype, K, N, experts in the stack, groups per product) of one decode step."""
    h, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
    Hkv = config.num_key_value_heads
    out = [("linear qkv", "bfloat16", h, 3 * H * D, 1, 1),
           ("softmax qkv", "bfloat16", h, (H + 2 * Hkv) * D, 1, 1),
           ("g_proj", "bfloat16", h, H * D, 1, 1),
           ("dense / o_proj", "bfloat16", H * D, h, 1, 1),
           ("router (f32 x)", "float32", h, config.num_experts, 1, 1),
           ("dense MLP gate_up", "bfloat16", h, 2 * config.intermediate_size, 1, 1),
           ("dense MLP down", "bfloat16", config.intermediate_size, h, 1, 1)]
    if config.shared_expert_intermediate_size:
        Is = config.shared_expert_intermediate_size
        out += [("shared gate_up", "bfloat16", h, 2 * Is, 1, 1), ("shared down", "bfloat16", Is, h, 1, 1)]
    E, k, I = config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size
    out += [(f"{k} experts gate_up", "bfloat16", h, 2 * I, E, k), (f"{k} experts down", "bfloat16", I, h, E, k),
            ("LM head", "bfloat16", h, config.vocab_size, 1, 1)]
    return out


def weights(key, count: int, K: int, N: int, dtype: str):
    """count random matrices: (bf16 [count, K, N], None), or FP8 [count, N, K] with their scales
    [count, N] (`pallas_kernels.backend.quantize_rows`)."""
    if dtype == "bfloat16":
        return jax.random.normal(key, (count, K, N), jnp.float32).astype(jnp.bfloat16), None
    return tuple(quantize_rows(jax.random.normal(key, (count, N, K), jnp.float32)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 8], help="rows per product (decode batch)")
    parser.add_argument("--weights", nargs="*", choices=WEIGHTS, default=list(WEIGHTS), help="weight dtypes")
    args = parser.parse_args(argv)
    config = RingConfig.from_hf(args.config)
    bandwidth = copy_bandwidth()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s",
          flush=True)
    print("\n| product | weights | rows | K x N | MB read | XLA us | XLA TB/s | kernel us | kernel TB/s "
          "| XLA / kernel | % of copy bw | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for M in args.rows:
        for name, x_dtype, K, N, E, groups in shapes(config):
            for w_dtype in args.weights:
                print(product_row(name, x_dtype, w_dtype, M, K, N, E, groups, rng, bandwidth), flush=True)


def product_row(name, x_dtype, w_dtype, M, K, N, E, groups, rng, bandwidth) -> str:
    """One row of the table: the product timed both ways on R distinct matrices."""
    fp8 = w_dtype != "bfloat16"
    nbytes = groups * N * (K + 4 if fp8 else 2 * K)
    R = int(min(32, max(1, -(-256e6 // nbytes)))) if E == 1 else 32
    key = jax.random.key(K * N + M)
    ws, scale = weights(key, max(E, R) if E > 1 else R, K, N, w_dtype)
    x = jax.random.normal(jax.random.fold_in(key, 1), (1, M, K), jnp.float32).astype(x_dtype)
    ids = jnp.asarray(np.stack([rng.choice(ws.shape[0], groups, replace=False) if E > 1 else [r]
                                for r in range(R)]), jnp.int32)                       # [R, groups]
    kernel_ok = gpu.supports(x[:, :1], ws, scale=scale) or name == "LM head"     # any rows, for the table

    def xla(x, ws, scale, ids):
        precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None

        def product(r):
            picked = ws[ids[r]] if E > 1 else ws[r:r + 1]
            if scale is None:
                return jnp.einsum("mk,gkn->gmn", x[0], picked, precision=precision, preferred_element_type=jnp.float32)
            sums = jnp.einsum("mk,gnk->gmn", x[0], picked.astype(x.dtype), precision=precision,
                              preferred_element_type=jnp.float32)
            return sums * (scale[ids[r]] if E > 1 else scale[r:r + 1])[:, None, :]
        return [product(r) for r in range(R)]

    def kernel(x, ws, scale, ids):
        return [gpu.matvec(x, ws, ids[r], scale=scale) for r in range(R)]

    def per_product_us(f):
        return (device_ms(f, x, ws, scale, ids) or bench_jax(f, x, ws, scale, ids)) * 1e3 / R

    xla_us = per_product_us(jax.jit(xla))
    row = f"| {name} | {'fp8' if fp8 else 'bf16'} | {M} | {K} x {N}{f' x {groups}' if groups > 1 else ''} | " \
          f"{nbytes / 1e6:.1f} | {xla_us:.2f} | {nbytes / xla_us / 1e6:.2f} |"
    if not (kernel_ok and jax.devices()[0].platform == "gpu"):
        return row + " - | - | - | - | - |"
    got = jax.jit(kernel)(x, ws, scale, ids)[0]
    want = reference.matvec(x.astype(jnp.float32), ws if fp8 else ws.astype(jnp.float32), ids[0], scale=scale)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    us = per_product_us(jax.jit(kernel))
    return row + f" {us:.2f} | {nbytes / us / 1e6:.2f} | {xla_us / us:.2f}x | " \
                 f"{100 * nbytes / us / 1e6 / (bandwidth / 1e12):.0f}% | {err:.1e} |"


if __name__ == "__main__":
    main()
