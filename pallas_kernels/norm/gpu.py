"""The residual add and RMSNorm on CUDA GPUs: a Pallas kernel through the Triton lowering.

One program per row: it loads the row and its residual delta, writes their sum, takes the mean of
the squares in float32 and writes the normalised row times the weight, rounding where the
reference rounds. XLA runs the same as three kernels (the add, the reduction, the scaling) because
a reduction and a consumer of its broadcast result do not fuse; in a decode step, with a few rows,
each of them costs a kernel's latency rather than its bytes.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# "auto" takes the kernel up to this many rows. 0 until the kernel has run on a GPU: it was written
# and tested in interpret mode on 2026-11-30 with no device time left; the intended setting is 64
# (decode steps), leaving prefill to XLA's fusions, whose times are measured (docs/PERFORMANCE.md).
MAX_ROWS = 0
# Rows of the kernel's benchmark and tests of the "auto" choice: decode steps up to batch 64.
DECODE_ROWS = 64
NUM_WARPS = 4
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def fits(x, weight) -> bool:
    """Whether the kernel takes these operands: bf16 or float32, a power-of-two row length."""
    K = x.shape[-1]
    return jnp.dtype(x.dtype) in DTYPES and weight.dtype == x.dtype and K & (K - 1) == 0


def _kernel(*refs, eps, add):
    if add:
        x_ref, delta_ref, weight_ref, sum_ref, out_ref = refs
        # Added in float32 and rounded to bf16, as XLA and torch do: the correctly rounded sum.
        x = (x_ref[...].astype(jnp.float32) + delta_ref[...].astype(jnp.float32)).astype(x_ref.dtype)
        sum_ref[...] = x
    else:
        x_ref, weight_ref, out_ref = refs
        x = x_ref[...]
    x32 = x.astype(jnp.float32)
    mean = jnp.sum(x32 * x32) / x32.shape[0]
    normalized = (x32 * jax.lax.rsqrt(mean + eps)).astype(x_ref.dtype)
    out = weight_ref[...].astype(jnp.float32) * normalized.astype(jnp.float32)
    out_ref[...] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x, delta, weight, *, eps, interpret=False):
    """x, delta: [..., K] (delta may be None); weight: [K] -> (x + delta, its RMSNorm times weight)
    (api.add_rms_norm)."""
    shape, K = x.shape, x.shape[-1]
    rows = x.reshape(-1, K)
    row = pl.BlockSpec((None, K), lambda r: (r, 0))
    add = delta is not None
    operands = (rows, delta.reshape(-1, K)) if add else (rows,)
    outs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, add=add),
        grid=(rows.shape[0],),
        in_specs=[row] * len(operands) + [pl.BlockSpec((K,), lambda r: (0,))],
        out_specs=[row] * (2 if add else 1),
        out_shape=[jax.ShapeDtypeStruct(rows.shape, x.dtype)] * (2 if add else 1),
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(*operands, weight)
    total, normed = outs if add else (x, outs[0])
    return total.reshape(shape), normed.reshape(shape)
