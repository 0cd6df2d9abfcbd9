"""Per-row FP8 quantization on CUDA GPUs: a Pallas kernel through the Triton lowering.

`backend.quantize_rows` in one pass over the rows: each program reads a block of whole rows once,
takes each row's largest magnitude, and writes the rows' e4m3 values and float32 scales: one read
of the rows, where XLA's program reads them twice (a reduction, then a fusion that converts;
docs/PERFORMANCE.md, "The FP8 rows' quantization"). The MoE's FP8-rows path quantizes each token
before the dispatch and the SwiGLU output, [tokens x top_k, I], before the down product.

Grid (cdiv(M, rows),), rows = BLOCK_ELEMENTS / K. The Triton lowering does not mask a block that
passes the array's end, so the last program masks its rows itself.

The bits are `backend.quantize_rows`'s on the host (numpy's): `backend.row_scale` of each row's
maximum, its reciprocal correctly rounded (`rcp.rn.f32`: the Triton lowering's own float32
division is the approximate `div.full.f32`), the values rounded to the nearest e4m3 value, ties to
even. XLA's program for `backend.quantize_rows` on a Hopper GPU misrounds, rarely, at one point:
the midpoint 3.5 x 2^-9 of the subnormals 3 x 2^-9 and 4 x 2^-9 goes to 3 x 2^-9, and the float32
value just under it to 4 x 2^-9 (XLA's conversion alone rounds both right, so its fused program is
where it goes wrong; docs/PERFORMANCE.md, "The FP8 rows' quantization"). A row holding a NaN
differs from numpy's too (Triton's maximum skips it, numpy's returns it).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import FP8, power_of_two, reciprocal, row_scale, triton_offsets_overflow

# A program's rows x K, held in registers as float32: 32 a thread. The fastest block and warps of a
# sweep (docs/PERFORMANCE.md, "The step and down's tiles, swept").
BLOCK_ELEMENTS = 8192
NUM_WARPS = 8
MIN_K = 128                  # FP8 rows go to the grouped matmul, which takes K % 128 == 0


def fits(x) -> bool:
    """Whether the kernel takes x: [M, K] bf16 or float32 with M > 0, K a power of two from MIN_K
    to BLOCK_ELEMENTS, and M x K outside (2^31, 2^32], where the FP8 values' 32-bit offsets in the
    Triton lowering would overflow (`backend.triton_offsets_overflow`)."""
    return (x.ndim == 2 and x.shape[0] > 0 and jnp.dtype(x.dtype) in (jnp.bfloat16, jnp.float32)
            and power_of_two(x.shape[1]) and MIN_K <= x.shape[1] <= BLOCK_ELEMENTS
            and not triton_offsets_overflow(jax.ShapeDtypeStruct(x.shape, FP8)))


def _kernel(x_ref, values_ref, scale_ref, *, M: int, interpret: bool):
    rows, K = x_ref.shape
    valid = pl.program_id(0) * rows + jnp.arange(rows) < M                         # [rows]
    in_rows = jnp.broadcast_to(valid[:, None], (rows, K))
    x = pltriton.load(x_ref, mask=in_rows, other=0).astype(jnp.float32)          # [rows, K]
    scale = row_scale(jnp.max(jnp.abs(x), axis=1), jnp)
    pltriton.store(values_ref, (x * reciprocal(scale, interpret)[:, None]).astype(FP8), mask=in_rows)
    pltriton.store(scale_ref, scale, mask=valid)


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_rows(x, *, interpret=False):
    """x [M, K] -> (values [M, K] float8_e4m3fn, scale [M] float32): `backend.quantize_rows`
    (api.quantize_rows)."""
    M, K = x.shape
    rows = BLOCK_ELEMENTS // K
    values, scale = pl.pallas_call(
        functools.partial(_kernel, M=M, interpret=interpret),
        grid=(pl.cdiv(M, rows),),
        in_specs=[pl.BlockSpec((rows, K), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((rows, K), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((M, K), FP8), jax.ShapeDtypeStruct((M,), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="quantize_rows",
    )(x)
    return values, scale
