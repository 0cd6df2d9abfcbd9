"""Grouped matmul on TPU: a Pallas Mosaic TPU kernel in the megablox style.

The math is `reference.gmm` (`jax.lax.ragged_dot`): rows [start_g, end_g) of lhs [M, K] times
rhs[g] [K, N], and rows past sum(group_sizes) are zeros. Accumulation is float32; float32 operands
are multiplied at precision HIGHEST; the result is rounded once to the output dtype.

Layout. lhs [M, K], rhs [G, K, N] and out [M, N] are read and written in place, as [tm, tk],
[tk, tn] and [tm, tn] blocks; nothing is padded or copied in HBM. A tile larger than its dimension
becomes the full dimension (always a legal block); otherwise tm must be a multiple of 8 (16 for
bf16, 32 for 8-bit dtypes, the strictest of lhs and out), and tk, tn multiples of 128. Partial
last blocks (M, K or N not a multiple of the tile) read undefined values past the edge: rows past M
never reach the output (they are outside every group, see the store mask), columns past N are
dropped on write, and on the last k step the columns of lhs and rows of rhs past K are zeroed
(both, so that an undefined inf or NaN cannot leak through 0 * x).

Work items (`work_items`, plain jnp inside the jit). The rows are cut into G + 1 ranges: the G
groups, then the "tail" [sum, M). Groups are not padded to tile multiples: a range that touches m
tiles i..j is one work item per tile, so a tile holding rows of several ranges is visited once per
range, by consecutive items (ranges are in row order). Empty ranges have no items. Each item is a
column of an int32 table [6, W] handed to the kernel by scalar prefetch (SMEM):

    KIND   COMPUTE (a group's rows), ZERO (tail rows: written as zeros) or SKIP (surplus step)
    TILE   the m tile of out the item writes
    GROUP, SRC_TILE   the rhs group and lhs m tile the item reads
    LO, HI            the rows [LO, HI) of the item's range (the store keeps those in its tile)

W = cdiv(M, tm) + G is static: the items of all ranges number at most cdiv(M, tm) plus one per
border between two non-empty ranges (at most G borders among G + 1 ranges). Steps past the last
item are SKIP: they keep the last item's out tile, so nothing is written back twice.
ZERO and SKIP items read the blocks of the last COMPUTE item at the last k step, which are already
in VMEM: they cost no DMA. The table takes 24 W bytes of SMEM, 32 W as Mosaic pads its 6 rows to 8
(40 KiB at M = 131072, tm = 128, G = 256: W = 1280).

Grid (cdiv(N, tn), W, cdiv(K, tk)): n tiles "parallel" (split across TensorCores on megacore
chips), items and k steps "arbitrary" (in order). Per item: the f32 accumulator [tm, tn] (VMEM
scratch) is zeroed at k = 0, accumulates lhs[tile, k] @ rhs[group, k, n] over k for COMPUTE items,
and at the last k step the rows [LO, HI) of the out block are replaced by it (masked
read-modify-write: out = where(row in [LO, HI), acc, out); a ZERO item's acc is all zeros). The
out block index only changes between items of different tiles, so the block stays in VMEM while
consecutive items fill their rows; the ranges partition [0, M), so every row < M of the block is
written by exactly one item before the block goes back to HBM, and the rows past M are dropped.

VMEM at the default tiling (128, 128, 128): lhs, rhs and out blocks double-buffered plus the
accumulator: 3 x 2 x 32 KiB + 64 KiB = 256 KiB in bf16, 448 KiB in float32, far below the scoped
VMEM limit (16 MiB on v5e, 32 MiB on v6e); tilings up to about (512, 1024, 1024) in bf16 still fit.

Cost per grid step: 2 tm tk tn FLOPs (4.2 MFLOP at 128^3) for (tm tk + tk tn) x itemsize bytes read
(64 KiB in bf16): 2 tm tn / ((tm + tn) itemsize) = 64 FLOP/byte at the default tiling, below the
ridge point of v5e (~240) and v5p (~170), so the default tiling is HBM-bound; prefill-sized groups
want larger tm and tn (e.g. (512, 1024, 1024): 341 FLOP/byte). Over the call: lhs is read once per
n tile, each item reads its group's [K, tn] slab once per n tile (so at most W K N rhs elements in
all), and out is written once.

Proven in TPU interpret mode only (tests/test_gmm_tpu.py, on CPU), plus lowering to Mosaic TPU
without running it; no TPU was available.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_LANES = 128

# Rows of the work-item table.
KIND, TILE, GROUP, SRC_TILE, LO, HI = range(6)
# Item kinds.
COMPUTE, ZERO, SKIP = 0, 1, 2


def work_items(group_sizes, m: int, tm: int):
    """group_sizes [G] int32 -> (items [6, W] int32, count [] int32 of live items).

    W = cdiv(m, tm) + G. Ranges 0..G-1 are the groups, range G the rows [sum, m). The rows of
    `items` (KIND, TILE, GROUP, SRC_TILE, LO, HI) are described in the module docstring.
    """
    G = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = jnp.concatenate([ends - sizes, ends[-1:]])                        # [G + 1]
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    first_tile = starts // tm
    n_tiles = jnp.where(ends > starts, (ends - 1) // tm - first_tile + 1, 0)
    item_end = jnp.cumsum(n_tiles)                                             # [G + 1]
    count, n_compute = item_end[-1], item_end[G - 1]

    def locate(w):
        """(range, m tile) of live item w."""
        r = jnp.searchsorted(item_end, w, side="right").astype(jnp.int32)
        return r, first_tile[r] + w - (item_end[r] - n_tiles[r])

    w = jnp.arange(pl.cdiv(m, tm) + G, dtype=jnp.int32)
    r, tile = locate(jnp.minimum(w, count - 1))        # SKIP items repeat the last live item
    # Dead (ZERO, SKIP) items read the last COMPUTE item's blocks (any valid block if none).
    src_range, src_tile = locate(jnp.clip(jnp.minimum(w, n_compute - 1), 0, None))
    kind = jnp.where(w >= count, SKIP, jnp.where(r == G, ZERO, COMPUTE))
    group = jnp.where(kind == COMPUTE, r, jnp.minimum(src_range, G - 1))
    src_tile = jnp.where(kind == COMPUTE, tile, src_tile)
    items = jnp.stack([kind, tile, group, src_tile, starts[r], ends[r]]).astype(jnp.int32)
    return items, count


def _dot(lhs, rhs):
    """[tm, tk] @ [tk, tn] -> [tm, tn] float32; HIGHEST for float32 operands."""
    precision = lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    return lax.dot_general(lhs, rhs, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _keep_below(x, limit, axis):
    """x with its entries at index >= limit along `axis` set to 0 (a select: they may be NaN)."""
    idx = lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.where(idx < limit, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _gmm_kernel(items_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, k_rem):
    """Grid step (n tile, item w, k step). lhs_ref [tm, tk], rhs_ref [tk, tn], out_ref and the
    float32 acc_ref [tm, tn]. k_rem: valid columns of the last k block, 0 when tk divides K."""
    w, k, last_k = pl.program_id(1), pl.program_id(2), pl.num_programs(2) - 1
    kind = items_ref[KIND, w]

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def accumulate(lhs, rhs):
        acc_ref[...] += _dot(lhs, rhs)

    if k_rem:
        pl.when((kind == COMPUTE) & (k < last_k))(lambda: accumulate(lhs_ref[...], rhs_ref[...]))
        pl.when((kind == COMPUTE) & (k == last_k))(lambda: accumulate(
            _keep_below(lhs_ref[...], k_rem, 1), _keep_below(rhs_ref[...], k_rem, 0)))
    else:
        pl.when(kind == COMPUTE)(lambda: accumulate(lhs_ref[...], rhs_ref[...]))

    @pl.when((k == last_k) & (kind != SKIP))
    def _store():
        tm = out_ref.shape[0]
        rows = items_ref[TILE, w] * tm + lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
        mine = (rows >= items_ref[LO, w]) & (rows < items_ref[HI, w])
        out_ref[...] = jnp.where(mine, acc_ref[...], out_ref[...].astype(jnp.float32)
                                 ).astype(out_ref.dtype)


def _sublanes(dtype) -> int:
    """Rows of a native (sublane, 128) tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit dtypes."""
    return 8 * 4 // jnp.dtype(dtype).itemsize


def _tile(name: str, tile: int, dim: int, multiple: int) -> int:
    """The block size along one dimension: the full dimension if tile >= dim, else a legal tile."""
    if tile >= dim:
        return dim
    if tile <= 0 or tile % multiple:
        raise ValueError(f"tiling: {name}={tile} must be a positive multiple of {multiple} "
                         f"(or >= the dimension, {dim})")
    return tile


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "tiling", "interpret"))
def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, tiling=(128, 128, 128),
        interpret=False):
    """Row group g of lhs times rhs[g]: the semantics of `jax.lax.ragged_dot`.

    lhs: [M, K]; rhs: [G, K, N] (same dtype, bf16 or f32); group_sizes: [G] int32 with sum <= M
    (rows past the sum come back as zeros). tiling: (tm, tk, tn) block sizes (see the module
    docstring for the legal values). interpret: False, True or a `pltpu.InterpretParams`.
    Returns [M, N] in preferred_element_type (default lhs.dtype), accumulated in float32.
    """
    (M, K), (G, K_rhs, N) = lhs.shape, rhs.shape
    if K_rhs != K or group_sizes.shape != (G,):
        raise ValueError(f"shapes lhs {lhs.shape}, rhs {rhs.shape}, group_sizes "
                         f"{group_sizes.shape}: want [M, K], [G, K, N], [G]")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"dtypes lhs {lhs.dtype} and rhs {rhs.dtype} must match")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if M == 0 or N == 0:
        return jnp.zeros((M, N), out_dtype)

    tm = _tile("tm", tiling[0], M, max(_sublanes(lhs.dtype), _sublanes(out_dtype)))
    tk = _tile("tk", tiling[1], K, _LANES)
    tn = _tile("tn", tiling[2], N, _LANES)
    items, _ = work_items(group_sizes, M, tm)
    W, k_tiles, n_tiles = items.shape[1], pl.cdiv(K, tk), pl.cdiv(N, tn)

    def k_read(k, items, w):
        return jnp.where(items[KIND, w] == COMPUTE, k, k_tiles - 1)

    lhs_spec = pl.BlockSpec((tm, tk), lambda n, w, k, items: (items[SRC_TILE, w],
                                                              k_read(k, items, w)))
    rhs_spec = pl.BlockSpec((None, tk, tn), lambda n, w, k, items: (items[GROUP, w],
                                                                    k_read(k, items, w), n))
    out_spec = pl.BlockSpec((tm, tn), lambda n, w, k, items: (items[TILE, w], n))

    itemsize = lhs.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * M * K * N, transcendentals=0,
        bytes_accessed=(n_tiles * M * K + W * K * N) * itemsize + M * N * out_dtype.itemsize)
    k_rem = K % tk
    return pl.pallas_call(
        functools.partial(_gmm_kernel, k_rem=k_rem),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(n_tiles, W, k_tiles),
            in_specs=[lhs_spec, rhs_spec],
            out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(items, lhs, rhs)
