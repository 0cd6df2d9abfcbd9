"""Row gather on CUDA GPUs: a Pallas kernel through the Triton lowering.

The MoE dispatch of a prefill step copies each (token, expert) pair's token row into expert order
before the grouped matmuls: [tokens x top_k, hidden] rows, 1.07 GB written (and as much read) at
32k tokens of Ring-mini. This kernel moves them faster than XLA's gather (the tokens' rows are
read top_k times, partly from L2); docs/PERFORMANCE.md has the figures.

Grid (N / ROWS, H / block): each program copies ROWS rows of one column block (BLOCK_H columns,
or the largest power of two dividing H below that), each row from the place its index names. A
pure copy: the output's bits are the input's. 1-byte rows (FP8) move as uint16 pairs, always (one
path, tested at every size): 2-4 GiB of them in bytes would overflow the Triton lowering's 32-bit
offsets (`backend.triton_offsets_overflow`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import as_pairs

# The fastest of 1-16 rows per program, 512-2048 columns and 2-8 warps at 262144 rows x 2048 on
# an H200.
ROWS = 8
BLOCK_H = 512
NUM_WARPS = 4
MIN_BLOCK_H = 32


def block_h(H: int) -> int:
    return math.gcd(H, BLOCK_H)


def fits(x, idx) -> bool:
    """Whether the kernel takes these operands: x [R, H], R > 0, with H a multiple of MIN_BLOCK_H
    (of 2 MIN_BLOCK_H for 1-byte rows) and idx [N] integer with N a positive multiple of ROWS."""
    units = 2 if x.ndim == 2 and _paired(x.dtype) else 1
    return (x.ndim == 2 and idx.ndim == 1 and x.shape[0] > 0 and x.shape[1] % units == 0
            and block_h(x.shape[1] // units) >= MIN_BLOCK_H
            and idx.shape[0] > 0 and idx.shape[0] % ROWS == 0 and jnp.issubdtype(idx.dtype, jnp.integer))


def _paired(dtype) -> bool:
    """Whether rows of `dtype` move as uint16 pairs: 1-byte numbers (not bool, which has no bitcast)."""
    return jnp.dtype(dtype).itemsize == 1 and jnp.dtype(dtype) != jnp.dtype(bool)


def _kernel(idx_ref, x_ref, out_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    bh = out_ref.shape[1]
    for r in range(ROWS):
        out_ref[r, :] = x_ref[idx_ref[i * ROWS + r], pl.ds(j * bh, bh)]


@functools.partial(jax.jit, static_argnames=("interpret",))
def take_rows(x, idx, *, interpret=False):
    """x: [R, H]; idx: [N] int32, each in [0, R) -> [N, H]: out[n] = x[idx[n]] (api.take_rows)."""
    if _paired(x.dtype):
        R, H = x.shape
        rows = take_rows(as_pairs(x), idx, interpret=interpret)
        return jax.lax.bitcast_convert_type(rows, x.dtype).reshape(idx.shape[0], H)
    N, H = idx.shape[0], x.shape[1]
    bh = block_h(H)
    return pl.pallas_call(
        _kernel,
        grid=(N // ROWS, H // bh),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((ROWS, bh), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((N, H), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="take_rows",
    )(idx.astype(jnp.int32), x)
