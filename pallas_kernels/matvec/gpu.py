"""Few-row matmul on CUDA GPUs: a Pallas kernel through the Triton lowering.

Memory-bound: the product reads each weight once, and a decode step's matrices are small (8 MB
for 2048 x 2048 bf16), so the whole chip must stream them at once. Every program therefore takes
a single [block_k, block_n] tile of one matrix (16 KB) and no loop: the grid is
(groups, N / block_n, K / block_k), hundreds to thousands of programs. Each writes its float32
partial sums [M, block_n] for its K slice to out[k slice, group]; the K slices are summed in
float32 afterwards (in XLA: one more small reduction, or fused into the caller's next
operation). The partials are written and read back: 8 M BLOCK_N / TILE_BYTES of the weight bytes
whatever their dtype, 3% at M = 1.

FP8 weights (`pallas_kernels.backend.FP8`: K-major [E, N, K] stacks with scales [E, N]): a program
reads a [block_n, block_k] tile (block_k = 256 of the 1-byte values), converts it to float32 and
reduces over K, so the kernel only learns to read K-major tiles; the per-column scale multiplies
the summed partials afterwards, in the same XLA reduction. A stack of 2-4 GiB (Ring-mini's linear
layers' experts' down, 4.03 GB) would overflow the lowering's 32-bit offsets
(`backend.triton_offsets_overflow`), so then the kernel reads every stack as uint16 pairs of
neighbouring K values (`backend.as_pairs`, the same bytes): each pair's low byte (K position 2j)
meets x's even columns and its high byte its odd ones. Pairs cost more instructions per byte (each
product's time in docs/PERFORMANCE.md, "FP8 end to end"), hence only there.

Each row of x is multiplied with the tile and reduced over K inside the program (a static loop
over the M rows: Triton tensors must have power-of-two shapes, M need not). With a norm, every
program reads its rows whole (K values from L2, for the statistics) and normalises its K slice
itself: a decode step's RMSNorm would otherwise be two launches of its own before the product. Output group p reads
matrix ids[p] of the stacks taken as one and the rows x[p // (P / X)]: several stacks (the routed
experts and the shared expert) run in one launch without being concatenated.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import FP8, as_pairs, e4m3, matrix_shape, power_of_two, triton_offsets_overflow
from pallas_kernels.matvec import reference

# "auto" takes the kernel for one row per group only: from 2 rows XLA's GEMM was the faster in a
# Ring-mini decode step (docs/PERFORMANCE.md).
MAX_ROWS = 1
# The fastest tile and warps of a sweep in the same model (docs/PERFORMANCE.md): 16 KB tiles of 64
# columns, 4 warps.
BLOCK_N = 64
TILE_BYTES = 16 * 1024
NUM_WARPS = 4


# Larger bf16 or float32 matrices (an LM head) stream well through XLA's own GEMM. FP8 matrices take
# the kernel at any size: XLA has no product of bf16 rows and FP8 weights, and would convert the
# whole matrix to bf16 every call (a write and a read of twice its FP8 bytes).
MAX_WEIGHT_ELEMENTS = 64 * 1024 * 1024
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _stacks(w) -> tuple:
    return w if isinstance(w, tuple) else (w,)


def block_k(w_dtype) -> int:
    return TILE_BYTES // (BLOCK_N * jnp.dtype(w_dtype).itemsize)


def fits(x, w, norm_weight=None, scale=None) -> bool:
    """Whether the kernel computes these operands: bf16 or float32, or FP8 weights with their
    scale (scale not None), K and N whole tiles, and stacks of one K, N and dtype; with a norm, K
    a power of two (whole rows are one Triton vector) and the norm weight of x's dtype."""
    stacks = _stacks(w)
    K, N = matrix_shape(stacks[0])
    dtype = jnp.dtype(stacks[0].dtype)
    same = all(s.shape[-2:] == stacks[0].shape[-2:] and jnp.dtype(s.dtype) == dtype for s in stacks)
    weights_ok = dtype in DTYPES if scale is None else dtype == FP8
    norm_ok = norm_weight is None or (power_of_two(K) and jnp.dtype(norm_weight.dtype) == jnp.dtype(x.dtype))
    return (same and norm_ok and jnp.dtype(x.dtype) in DTYPES and weights_ok
            and K % block_k(dtype) == 0 and N % BLOCK_N == 0)


def supports(x, w, norm_weight=None, scale=None) -> bool:
    """Whether "auto" takes the kernel: it `fits`, at most MAX_ROWS rows per group and a matrix of
    at most MAX_WEIGHT_ELEMENTS unless FP8 (with scale)."""
    K, N = matrix_shape(_stacks(w)[0])
    return (fits(x, w, norm_weight, scale) and x.shape[-2] <= MAX_ROWS
            and (K * N <= MAX_WEIGHT_ELEMENTS or scale is not None))


def _rows(x_ref, norm_ref, index_ref, columns, *, rows, eps, keepdims=False):
    """For each slice of `columns` (`pl.ds` of x_ref's columns), the program's columns of each row:
    float32 [size] each ([1, size] with keepdims), [slice][row]; with a norm, RMS-normalised with
    the reference's roundings (`reference.rms_norm`) from the whole row's statistics. Strided
    columns need keepdims: JAX's interpreter takes a strided slice only beside other slices."""
    f32 = jnp.float32

    def load(ref, i, c):
        return (ref[pl.ds(i, 1), c] if keepdims else ref[i, c]).astype(f32)

    if norm_ref is None:
        return [[load(x_ref, m, c) for m in range(rows)] for c in columns]

    def rnd(v):                                              # one rounding to the activation dtype
        return v.astype(x_ref.dtype).astype(f32)

    inv = []
    for m in range(rows):
        row = x_ref[m, :].astype(f32)
        inv.append(jax.lax.rsqrt(jnp.sum(row * row) / row.shape[0] + eps))
    out = []
    for c in columns:
        weight = load(norm_ref, index_ref[0], c)
        out.append([rnd(rnd(load(x_ref, m, c) * inv[m]) * weight) for m in range(rows)])
    return out


def _kernel(ids_ref, x_ref, *refs, rows, bk, bn, sizes, eps, fp8, pairs):
    norm_ref, index_ref = refs[:2] if eps is not None else (None, None)
    *w_refs, out_ref = refs[2:] if eps is not None else refs
    p, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = ids_ref[p]
    first = 0 if norm_ref is None else s * bk                # x_ref holds the K slice, or whole rows
    if pairs:                                                # x's even and odd columns
        even, odd = _rows(x_ref, norm_ref, index_ref, [pl.ds(first + j, bk // 2, stride=2) for j in (0, 1)],
                          rows=rows, eps=eps, keepdims=True)
    else:
        (x,) = _rows(x_ref, norm_ref, index_ref, [pl.ds(first, bk)], rows=rows, eps=eps)

    def product(w_ref, i):
        if pairs:                                # uint16 pairs [N, K / 2]: the tile's rows run along K
            tile = w_ref[i, pl.ds(n * bn, bn), pl.ds(s * (bk // 2), bk // 2)]                 # [bn, bk / 2]
            low, high = e4m3(tile & 0xFF), e4m3(tile >> 8)
            for m in range(rows):
                out_ref[m, :] = jnp.sum(even[m] * low + odd[m] * high, axis=1)
        elif fp8:                                        # FP8 [N, K]: the tile's rows run along K
            tile = w_ref[i, pl.ds(n * bn, bn), pl.ds(s * bk, bk)].astype(jnp.float32)          # [bn, bk]
            for m in range(rows):
                out_ref[m, :] = jnp.sum(x[m][None, :] * tile, axis=1)
        else:
            tile = w_ref[i, pl.ds(s * bk, bk), pl.ds(n * bn, bn)].astype(jnp.float32)          # [bk, bn]
            for m in range(rows):
                out_ref[m, :] = jnp.sum(x[m][:, None] * tile, axis=0)

    if len(w_refs) == 1:
        product(w_refs[0], e)
        return
    start = 0
    for w_ref, size in zip(w_refs, sizes):                   # the stack that holds matrix e
        pl.when((e >= start) & (e < start + size))(functools.partial(product, w_ref, e - start))
        start += size


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def matvec(x, w, ids, norm_weight=None, norm_index=None, *, scale=None, eps=None, interpret=False):
    """x: [X, M, K]; w: [E, K, N] or a tuple of such stacks, or FP8 [E, N, K] stacks with scale
    [E, N] float32 (a tuple like w); ids: [P] int32; norm_weight: None or [L, K] with norm_index
    [] int32 -> [P, M, N] float32 (api.matvec)."""
    stacks = _stacks(w)
    X, M, K = x.shape
    P, N = ids.shape[0], matrix_shape(stacks[0])[1]
    share = P // X
    bk, bn = block_k(stacks[0].dtype), BLOCK_N
    S = K // bk
    fp8 = jnp.dtype(stacks[0].dtype) == FP8
    pairs = fp8 and any(map(triton_offsets_overflow, stacks))
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    if norm_weight is None:
        x_spec, norm, eps = pl.BlockSpec((None, M, bk), lambda p, n, s: (p // share, 0, s)), [], None
    else:                                                        # whole rows, for the statistics
        x_spec = pl.BlockSpec((None, M, K), lambda p, n, s: (p // share, 0, 0))
        norm = [norm_weight, jnp.reshape(jnp.asarray(norm_index, jnp.int32), (1,))]
    partial = pl.pallas_call(
        functools.partial(_kernel, rows=M, bk=bk, bn=bn, sizes=tuple(s.shape[0] for s in stacks), eps=eps, fp8=fp8,
                          pairs=pairs),
        grid=(P, N // bn, S),
        in_specs=[anywhere, x_spec] + [anywhere] * (len(norm) + len(stacks)),   # ids, norm, stacks: whole
        out_specs=pl.BlockSpec((None, None, M, bn), lambda p, n, s: (s, p, 0, n)),
        out_shape=jax.ShapeDtypeStruct((S, P, M, N), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="matvec",
    )(ids, x, *norm, *(map(as_pairs, stacks) if pairs else stacks))
    out = jnp.sum(partial, axis=0)
    return out if scale is None else out * reference.gather(scale, ids)[:, None, :]
