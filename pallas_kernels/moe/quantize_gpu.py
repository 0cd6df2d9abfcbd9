"""Per-row FP8 quantization on CUDA GPUs: a Pallas kernel through the Triton lowering.

`backend.quantize_rows` in one pass over the rows: each program reads a block of whole rows once,
takes each row's largest magnitude, and writes the rows' e4m3 values and float32 scales. (XLA's
program for it, a reduction and then the values, ran at a third to a half of the copy bandwidth in
the grouped-matmul benchmark.) The MoE's FP8-rows path quantizes each token before the dispatch
and the SwiGLU output, [tokens x top_k, I], before the down product.

The bits are `backend.quantize_rows`'s: the scale is the maximum times float32(1 / 448), its
reciprocal an IEEE division (`div.rn.f32`: the Triton lowering's own float32 division is
approximate), the values rounded to the nearest e4m3 value (Hopper's convert, which saturates at
448 where XLA's gives NaN from 464 on: a row's values reach 448 times 1 + a few float32 ulps).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import FP8, FP8_MAX, power_of_two, triton_offsets_overflow

BLOCK_ELEMENTS = 8192        # a program's rows x K, in registers as float32
MAX_K = 16384
NUM_WARPS = 4


def fits(x) -> bool:
    """Whether the kernel takes x: [M, K] bf16 or float32, M > 0, K a power of two from 16 to
    MAX_K, and the FP8 values addressable by the Triton lowering (`backend.triton_offsets_overflow`)."""
    return (x.ndim == 2 and x.shape[0] > 0 and jnp.dtype(x.dtype) in (jnp.bfloat16, jnp.float32)
            and power_of_two(x.shape[1]) and 16 <= x.shape[1] <= MAX_K
            and not triton_offsets_overflow(jax.ShapeDtypeStruct(x.shape, FP8)))


def _reciprocal(x, interpret: bool):
    """1 / x, float32, correctly rounded (the interpreter's division is)."""
    if interpret:
        return np.float32(1) / x
    [inverse] = pltriton.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[jnp.ones_like(x), x],
                                                constraints="=f,f,f", pack=1,
                                                result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return inverse


def _kernel(x_ref, values_ref, scale_ref, *, interpret):
    x = x_ref[...].astype(jnp.float32)                              # [rows, K]
    amax = jnp.max(jnp.abs(x), axis=1)
    scale = jnp.where(amax > 0, amax * np.float32(1 / FP8_MAX), np.float32(1))
    values_ref[...] = (x * _reciprocal(scale, interpret)[:, None]).astype(FP8)
    scale_ref[...] = scale


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_rows(x, *, interpret=False):
    """x [M, K] -> (values [M, K] float8_e4m3fn, scale [M] float32): `backend.quantize_rows`
    (api.quantize_rows)."""
    M, K = x.shape
    rows = max(BLOCK_ELEMENTS // K, 1)
    return pl.pallas_call(
        functools.partial(_kernel, interpret=interpret),
        grid=(pl.cdiv(M, rows),),
        in_specs=[pl.BlockSpec((rows, K), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((rows, K), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((M, K), FP8), jax.ShapeDtypeStruct((M,), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="quantize_rows",
    )(x)
