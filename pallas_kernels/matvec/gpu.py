"""Few-row matmul on CUDA GPUs: a Pallas kernel through the Triton lowering.

Memory-bound: the product reads each weight once, and a decode step's matrices are small (8 MB
for 2048 x 2048 bf16), so the whole chip must stream them at once. Every program therefore takes
a single [block_k, block_n] tile of one matrix (16 KB) and no loop: the grid is
(groups, N / block_n, K / block_k), hundreds to thousands of programs. Each writes its float32
partial sums [M, block_n] for its K slice to out[k slice, group]; the K slices are summed in
float32 afterwards (in XLA: one more small reduction, or fused into the caller's next
operation). The partials are written and read back: 4 M / block_k of the weight bytes for bf16
weights, 3% at M = 1.

Each row of x is multiplied with the tile and reduced over K inside the program (a static loop
over the M rows: Triton tensors must have power-of-two shapes, M need not). Output group p reads
matrix ids[p] of the stacks taken as one and the rows x[p // (P / X)]: several stacks (the routed
experts and the shared expert) run in one launch without being concatenated.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# "auto" takes the kernel for one row per group only: on an H200 XLA's GEMM was faster from 2 rows
# on (a 5-layer Ring-mini decode step at batch 8; docs/PERFORMANCE.md).
MAX_ROWS = 1
# The fastest tile and warps in the same model: 16 KB tiles of 64 columns and 4 warps (against 32 KB
# tiles, 128 columns, 8 warps or 8 KB tiles).
BLOCK_N = 64
TILE_BYTES = 16 * 1024
NUM_WARPS = 4


# Larger matrices (an LM head) stream well through XLA's own GEMM.
MAX_WEIGHT_ELEMENTS = 64 * 1024 * 1024
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _stacks(w) -> tuple:
    return w if isinstance(w, tuple) else (w,)


def block_k(w_dtype) -> int:
    return TILE_BYTES // (BLOCK_N * jnp.dtype(w_dtype).itemsize)


def fits(x, w) -> bool:
    """Whether the kernel computes these operands: bf16 or float32, K and N whole tiles, and
    stacks of one K, N and dtype."""
    stacks = _stacks(w)
    K, N = stacks[0].shape[-2:]
    dtype = jnp.dtype(stacks[0].dtype)
    same = all(s.shape[-2:] == (K, N) and jnp.dtype(s.dtype) == dtype for s in stacks)
    return (same and jnp.dtype(x.dtype) in DTYPES and dtype in DTYPES
            and K % block_k(dtype) == 0 and N % BLOCK_N == 0)


def supports(x, w) -> bool:
    """Whether "auto" takes the kernel: it `fits`, at most MAX_ROWS rows per group and a matrix of
    at most MAX_WEIGHT_ELEMENTS."""
    K, N = _stacks(w)[0].shape[-2:]
    return fits(x, w) and x.shape[-2] <= MAX_ROWS and K * N <= MAX_WEIGHT_ELEMENTS


def _kernel(ids_ref, x_ref, *refs, rows, bk, bn, sizes):
    *w_refs, out_ref = refs
    p, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[p]
    x = [x_ref[m, :].astype(jnp.float32) for m in range(rows)]                              # [bk] each

    def product(w_ref, i):
        tile = w_ref[i, pl.ds(s * bk, bk), pl.ds(n * bn, bn)].astype(jnp.float32)          # [bk, bn]
        for m in range(rows):
            out_ref[m, :] = jnp.sum(x[m][:, None] * tile, axis=0)

    if len(w_refs) == 1:
        product(w_refs[0], e)
        return
    first = 0
    for w_ref, size in zip(w_refs, sizes):                   # the stack that holds matrix e
        pl.when((e >= first) & (e < first + size))(functools.partial(product, w_ref, e - first))
        first += size


@functools.partial(jax.jit, static_argnames=("interpret",))
def matvec(x, w, ids, *, interpret=False):
    """x: [X, M, K]; w: [E, K, N] or a tuple of such stacks; ids: [P] int32 -> [P, M, N] float32
    (api.matvec)."""
    stacks = _stacks(w)
    X, M, K = x.shape
    P, N = ids.shape[0], stacks[0].shape[2]
    share = P // X
    bk, bn = block_k(stacks[0].dtype), BLOCK_N
    S = K // bk
    partial = pl.pallas_call(
        functools.partial(_kernel, rows=M, bk=bk, bn=bn, sizes=tuple(s.shape[0] for s in stacks)),
        grid=(P, N // bn, S),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),                                  # ids: whole, read by p
            pl.BlockSpec((None, M, bk), lambda p, n, s: (p // share, 0, s)),
        ] + [pl.BlockSpec(memory_space=pl.ANY)] * len(stacks),                  # stacks: whole, by ids
        out_specs=pl.BlockSpec((None, None, M, bn), lambda p, n, s: (s, p, 0, n)),
        out_shape=jax.ShapeDtypeStruct((S, P, M, N), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="matvec",
    )(ids, x, *stacks)
    return jnp.sum(partial, axis=0)
