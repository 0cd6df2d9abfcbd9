"""Grouped matmul on Hopper GPUs: a persistent, warp-specialized Pallas Mosaic GPU kernel.

Work items. The rows of lhs are cut into tiles of `tile_m` rows. A tile that holds rows of several
groups is one work item per group (megablox style: groups are not padded to tile multiples), and
the rows past sum(group_sizes) form one more range whose items write zeros. `work_items` builds the
table [4, W] (group, m tile, first row, end row) in jnp, W = cdiv(M, tile_m) + 2 (G + 1) is the
static bound, and the counts of the groups' items and of all. Each item times each block of
`2 * tile_n` columns is one unit of work; the units are spread over the SMs in order (n minor, so an
lhs tile is reused from L2 by the column blocks that run at the same time), the groups' first, then
the zeros'.

Per unit. Three warpgroups: one issues the TMA loads of [tile_m, 64] lhs and [64, 2 tile_n] rhs
blocks into a ring of SMEM slots (`stages`, or the largest divisor of the K steps below it); two
compute warpgroups each accumulate one [tile_m, tile_n] half in registers with wgmma over K. The
epilogue writes only the item's rows: TMA stores of 2^i rows for the set bits of the row count (a
row range of any length from boxes of static shapes), from an untiled SMEM copy of the
accumulator, in column strips of 64. An SM's units are one sequence of pipelines over the same
ring: the memory warpgroup loads the next unit's first blocks while the compute warpgroups finish
this one and store it, so no unit waits for its first loads (a unit alone on its SM is a pipeline
of its own).

SwiGLU epilogue (`swiglu=True`, rhs [G, K, 2 I] holding gate then up columns, output [M, I]). A
unit is a tile times one block of tile_n output columns; the memory warpgroup loads that block's
gate and up columns, and each compute warpgroup accumulates half of the tile's rows against both,
so silu(gate) * up is formed in registers and the [M, 2 I] product is never written (less time
than the product followed by XLA's SwiGLU at the Ring shapes: docs/PERFORMANCE.md).

Cost at the Ring-mini prefill shape (M = 131072, K = 2048, N = 1024, 256 equal groups): 0.55 TFLOP,
and 0.54 GB of lhs, 1.07 GB of rhs and 0.27 GB of output at least once each (0.44 ms at 4.31 TB/s;
0.79 ms at 700 TFLOP/s): compute-bound. Decode shapes (a few rows per group) read each chosen
group's [K, N] once per column block and are bound by those bytes.

FP8 weights (rhs float8_e4m3fn [G, N, K], K-major, with `scale` [G, N] float32 column scales): the
memory warpgroup loads [2 tile_n, 64] FP8 blocks (half the bytes of bf16); each compute warpgroup
converts its [tile_n, 64] tiles to bf16 in an SMEM buffer of its own (exact; through float32, as
Hopper converts e4m3 only to f16 directly) and multiplies them as transposed wgmma operands. It
copies its group's scales of its columns to SMEM while the pipeline runs and multiplies the
float32 accumulator by them before rounding (and before SwiGLU). With FP8 lhs too (row scales
`lhs_scale`), the pipeline steps over K by 128 one-byte values, the tiles go to the FP8 tensor
cores as they are, and the rows' scales join the columns' in the epilogue. bf16 weights given
K-major (`k_major`: the input gradient's product with the forward's weights) take the same
transposed-operand path without a conversion.

Numerics: bf16 operands, float32 accumulation, one rounding to the output dtype (bf16 or f32);
with SwiGLU the roundings of `reference.swiglu` after a bf16 product. FP8 lhs: Hopper's FP8 MMA
accumulates with less than float32's precision (the GPU tests bound it).

Interpret mode (`interpret=True`) runs the kernel in JAX's Mosaic GPU interpreter on any device,
over INTERPRET_SMS simulated SMs (the CPU tests).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.backend import FP8, gpu_interpreter, sm_count

# FP8 tile rows converted at a time: [64, 64] float32 values are 32 registers a thread, beside the
# accumulator's 128.
CONVERT_ROWS = 64
# SMs simulated in interpret mode: the units spread over more than one (each adds three simulated threads).
INTERPRET_SMS = 2


def work_items(group_sizes, m: int, tile_m: int):
    """group_sizes [G] int32 -> (items [4, W] int32: group, tile row, first row, end row; counts
    [2] int32: the items of the G groups, and of all).

    Group g's rows [first_g, end_g) are covered by tiles of tile_m rows that start at first_g
    rounded down to a multiple of 8 (TMA moves whole 8-row tiles of the swizzled operands); each
    item computes its tile and stores rows [max(first_g, tile row), min(end_g, tile row + tile_m)).
    Group G stands for the rows past sum(group_sizes), which are written as zeros: its items come
    after the groups'. Items past counts[1] are unused; W = cdiv(m, tile_m) + 2 (G + 1) bounds it.
    """
    G = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])                   # [G + 1] ranges
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    aligned = starts // 8 * 8
    n_tiles = jnp.where(ends > starts, (ends - aligned + tile_m - 1) // tile_m, 0)
    item_end = jnp.cumsum(n_tiles)
    w = jnp.arange(pl.cdiv(m, tile_m) + 2 * (G + 1), dtype=jnp.int32)
    # All-pairs comparison: one fused kernel (the default binary search is a loop of launches).
    group = jnp.minimum(jnp.searchsorted(item_end, w, side="right", method="compare_all"), G).astype(jnp.int32)
    row = aligned[group] + (w - item_end[group] + n_tiles[group]) * tile_m
    first = jnp.maximum(starts[group], row)
    end = jnp.minimum(ends[group], row + tile_m)
    live = w < item_end[-1]
    items = jnp.stack([group] + [jnp.where(live, x, 0) for x in (row, first, end)])
    return items, item_end[-2:]


def _store_rows(value, o_smem, o_gmem, offset, count):
    """Rows [offset, offset + count) of value [wg_rows, tile_n] (a warpgroup's rows of the tile) ->
    the same rows of o_gmem, through an untiled [wg_rows, epi_n] SMEM strip and TMA boxes of 2^i
    rows for the set bits of count."""
    rows, cols = o_smem.shape
    for j in range(value.shape[1] // cols):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        o_smem[...] = value[:, j * cols:(j + 1) * cols]
        plgpu.commit_smem()
        done, box = offset, rows
        while box:
            @pl.when(count & box != 0)
            def _():
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(done, box)],
                                        o_gmem.at[pl.ds(done, box), pl.ds(j * cols, cols)])
            done, box = done + (count & box), box // 2


def _silu_times_up(gate, up, dtype):
    """silu(gate) * up from the float32 products gate, up [rows, cols], rounded as the unfused ops
    round: each product to dtype, silu in float32 (x * (1 / (1 + exp(-x))), XLA's expansion) to
    dtype; the float32 product of two dtype values is rounded once by the caller's store."""
    gate, up = (x.astype(dtype).astype(jnp.float32) for x in (gate, up))
    act = gate * (1.0 / (1.0 + jnp.exp(-gate)))
    return act.astype(dtype).astype(jnp.float32) * up


def _kernel(items_gmem, count_gmem, offset_gmem, lhs_gmem, rhs_gmem, *refs, tile_m, tile_n, stages, swiglu,
            k_major):
    fp8 = rhs_gmem.dtype == FP8          # K-major [G', N, K] tiles with column scales
    fp8_lhs = lhs_gmem.dtype == FP8      # and FP8 lhs with row scales: FP8 tensor cores
    convert = fp8 and not fp8_lhs        # bf16 lhs: the FP8 tiles become bf16 in SMEM, per warpgroup
    scale_gmem, lhs_scale_gmem = (refs[0], refs[1] if fp8_lhs else None) if fp8 else (None, None)
    out_gmem = refs[-1]
    K = lhs_gmem.shape[1]
    N = rhs_gmem.shape[1 if k_major else 2]
    dtype = out_gmem.dtype
    epi_n = 128 // dtype.itemsize  # one 128-byte swizzle row
    tile_k = _tile_k(lhs_gmem.dtype)
    if swiglu:  # a compute warpgroup: half of the tile's rows x tile_n gate and tile_n up columns
        n_blocks, wg_rows, rhs_n = N // 2 // tile_n, tile_m // 2, (tile_n, tile_n)
    else:  # a compute warpgroup: all of the tile's rows x one half of 2 tile_n columns
        n_blocks, wg_rows, rhs_n = N // (2 * tile_n), tile_m, (2 * tile_n,)
    n_scales = len(rhs_n) + fp8_lhs  # scale vectors a compute warpgroup copies per unit

    steps = K // tile_k
    # Pipelines in a sequence (`pipeline_state`) go round the SMEM ring a whole number of times.
    depth = max(d for d in range(1, min(stages, steps) + 1) if steps % d == 0)

    def pipeline(body, context, state=None):
        spec = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM, transforms=_swizzled(lhs_gmem.dtype))
        if k_major:  # rows of tile_k values: FP8 converted to bf16, a 64-byte swizzle; else 128 bytes
            row_bytes = tile_k * jnp.dtype(rhs_gmem.dtype).itemsize
            rhs_specs = [plgpu.BlockSpec((n, tile_k), lambda k: (0, k), memory_space=plgpu.SMEM,
                                         transforms=_swizzled(rhs_gmem.dtype, row_bytes)) for n in rhs_n]
        else:
            rhs_specs = [spec((tile_k, n), lambda k: (k, 0)) for n in rhs_n]
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=40, max_concurrent_steps=depth,
            in_specs=[spec((tile_m, tile_k), lambda k: (0, k))] + rhs_specs,
            wg_axis="wg", num_compute_wgs=2, compute_context=context, pipeline_state=state)

    ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the bodies
    scratch = {}
    if fp8:
        scratch.update(scale_smem=plgpu.SMEM((2, len(rhs_n), tile_n), jnp.float32),
                       scale_bar=plgpu.Barrier(num_arrivals=1, num_barriers=2 * n_scales))
    if fp8_lhs:
        scratch.update(row_scale_smem=plgpu.SMEM((2, wg_rows), jnp.float32))
    if convert:
        scratch.update(conv_smem=plgpu.SMEM((2, len(rhs_n), tile_n, tile_k), jnp.bfloat16,
                                            transforms=_swizzled(jnp.bfloat16)))

    @functools.partial(pl.run_scoped,
                       allocs=pipeline(ignore, ignore).get_allocations(lhs_gmem, *[rhs_gmem.at[0]] * len(rhs_n)),
                       o_smem=plgpu.SMEM((2, wg_rows, epi_n), dtype), **scratch, collective_axes="wg")
    def _scope(allocs, o_smem, scale_smem=None, scale_bar=None, row_scale_smem=None, conv_smem=None):
        wg = lax.axis_index("wg")

        def unit(index, state=None, alone=None):
            """Unit `index`: its product through a pipeline in `state`, its place in this SM's
            sequence of pipelines, or the only one on its SM (`alone`); without them zeros for rows
            past the groups."""
            item, n_block = jnp.divmod(index, n_blocks)
            group, row, first, end = (items_gmem[i, item] for i in range(4))
            row = pl.multiple_of(row, 8)
            base = row + wg * wg_rows if swiglu else row  # this warpgroup's first tile row
            col = n_block * tile_n if swiglu else n_block * 2 * tile_n + wg * tile_n
            out = out_gmem.at[pl.ds(pl.multiple_of(base, 8), wg_rows), pl.ds(col, tile_n)]
            start = jnp.clip(first - base, 0, wg_rows)
            count = jnp.maximum(jnp.clip(end - base, 0, wg_rows) - start, 0)

            def store(value):
                _store_rows(value.astype(dtype), o_smem.at[wg], out, start, count)

            def context(run):
                def scoped(*accs):
                    if fp8:  # this unit's column (and row) scales arrive while the pipeline runs
                        copies = [(scales.at[pl.ds(c, tile_n)], scale_smem.at[wg, i]) for i, c in enumerate(scale_cols)]
                        if fp8_lhs:
                            copies.append((lhs_scale_gmem.at[pl.ds(pl.multiple_of(base, 8), wg_rows)],
                                           row_scale_smem.at[wg]))
                        for i, (src, dst) in enumerate(copies):
                            plgpu.copy_gmem_to_smem(src, dst, scale_bar.at[wg * n_scales + i])
                    run(accs if swiglu else accs[0])
                    values = [acc[...] for acc in accs]
                    if fp8:
                        for i in range(n_scales):
                            plgpu.barrier_wait(scale_bar.at[wg * n_scales + i])
                        values = [v * lax.broadcast_in_dim(scale_smem[wg, i], v.shape, (1,))
                                  for i, v in enumerate(values)]
                    if fp8_lhs:
                        values = [v * lax.broadcast_in_dim(row_scale_smem[wg], v.shape, (0,)) for v in values]
                    store(_silu_times_up(*values, dtype) if swiglu else values[0])
                pl.run_scoped(scoped, *[plgpu.ACC((wg_rows, tile_n), jnp.float32)] * len(rhs_n))

            def mma(_, a_smem, *b_smem_and_acc):
                *b_smem, acc = b_smem_and_acc
                if k_major:  # this warpgroup's K-major [tile_n, tile_k] tiles: transposed operands
                    mine = b_smem if swiglu else [b_smem[0].at[pl.ds(pl.multiple_of(wg * tile_n, 8), tile_n)]]
                    if convert:
                        mine = [_to_bf16(b, conv_smem.at[wg, i]) for i, b in enumerate(mine)]
                        plgpu.commit_smem()
                    b_smem = [plgpu.transpose_ref(b, (1, 0)) for b in mine]
                if swiglu:  # this warpgroup's rows times the gate block, then the up block
                    a = a_smem.at[pl.ds(pl.multiple_of(wg * wg_rows, 8), wg_rows)]
                    for b, c in zip(b_smem, acc):
                        plgpu.wgmma(c, a, b)
                else:
                    plgpu.wgmma(acc, a_smem, b_smem[0] if k_major else b_smem[0].at[:, pl.ds(wg * tile_n, tile_n)])
                plgpu.wgmma_wait(0)
                return acc

            if alone is None:
                @pl.when(wg < 2)
                def _():
                    store(jnp.zeros((wg_rows, tile_n), jnp.float32))
                return
            stacked = group + offset_gmem[0]
            rhs = rhs_gmem.at[stacked]
            if swiglu:
                scale_cols = [half + n_block * tile_n for half in (0, N // 2)]
                widths = [(c, tile_n) for c in scale_cols]
            else:
                scale_cols = [col]
                widths = [(n_block * 2 * tile_n, 2 * tile_n)]
            blocks = [rhs.at[pl.ds(*w)] if k_major else rhs.at[:, pl.ds(*w)] for w in widths]
            scales = scale_gmem.at[stacked] if fp8 else None

            def run(state):
                pipeline(mma, context, state)(lhs_gmem.at[pl.ds(row, tile_m)], *blocks, allocations=allocs)
            pl.when(alone)(lambda: run(None))
            pl.when(~alone)(lambda: run(state))

        # An SM's products: one sequence of pipelines (START, STEADY..., STOP; module docstring).
        products = count_gmem[0] * n_blocks

        @plgpu.nd_loop((products,), collective_axes="sm")
        def _products(info):
            i, n = info.local_index, info.num_local_steps
            state = jnp.where(i == 0, plgpu.PipelinePipeline.START,
                              jnp.where(i == n - 1, plgpu.PipelinePipeline.STOP, plgpu.PipelinePipeline.STEADY))
            unit(info.index[0], state, alone=n == 1)

        @plgpu.nd_loop(((count_gmem[1] - count_gmem[0]) * n_blocks,), collective_axes="sm")
        def _zeros(info):
            unit(products + info.index[0])

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _to_bf16(b, conv):
    """FP8 tile b [tile_n, tile_k] -> conv, the same values in bf16 (exact; through float32, as
    Hopper converts e4m3 only to f16 directly), CONVERT_ROWS rows at a time."""
    for r in range(0, b.shape[0], CONVERT_ROWS):
        rows = pl.ds(r, CONVERT_ROWS)
        conv.at[rows][...] = b.at[rows][...].astype(jnp.float32).astype(conv.dtype)
    return conv


def _tile_k(lhs_dtype) -> int:
    """K per pipeline step: one 128-byte swizzle row of lhs (64 bf16 or 128 FP8 values)."""
    return 128 // jnp.dtype(lhs_dtype).itemsize


def _swizzled(dtype, row_bytes: int = 128):
    """SMEM transforms of a TMA/wgmma tile whose rows are row_bytes long: 8-row tiles, swizzled."""
    return plgpu.TilingTransform((8, row_bytes // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(row_bytes)


def supports(lhs, rhs, out_dtype, tile_n: int = 128, swiglu: bool = False, k_major: bool = False) -> bool:
    """Whether `gmm` takes these operands (arrays or ShapeDtypeStructs): bf16 lhs with bf16 rhs
    [G, K, N] (k_major: [G, N, K]) or FP8 rhs [G, N, K], or FP8 lhs with FP8 rhs; K a multiple of
    128 bytes of lhs (64 bf16, 128 FP8 values), N % (2 tile_n) == 0, bf16/f32 out (bf16 with
    swiglu)."""
    fp8, fp8_lhs = (jnp.dtype(x.dtype) == FP8 for x in (rhs, lhs))
    K, N = rhs.shape[1:][::-1] if fp8 or k_major else rhs.shape[1:]
    return ((lhs.dtype == jnp.bfloat16 or (fp8_lhs and fp8)) and (fp8 or rhs.dtype == jnp.bfloat16)
            and lhs.shape[1] == K and K % _tile_k(lhs.dtype) == 0 and N % (2 * tile_n) == 0
            and jnp.dtype(out_dtype) in (jnp.bfloat16, jnp.float32)
            and (not swiglu or jnp.dtype(out_dtype) == jnp.bfloat16))


# Jitted so that a program lowers the kernel once for all its call sites of one shape (a model's
# layers): lowering a Mosaic GPU kernel takes a good part of a second.
@functools.partial(jax.jit, static_argnames=("preferred_element_type", "swiglu", "k_major", "tile_m", "tile_n",
                                             "stages", "interpret"))
def gmm(lhs, rhs, group_sizes, *, group_offset=0, scale=None, lhs_scale=None, preferred_element_type=None,
        swiglu=False, k_major=False, tile_m=128, tile_n=128, stages=4, interpret=False):
    """lhs [M, K] bf16, rhs [>= group_offset + G, K, N] bf16, group_sizes [G] int32 -> [M, N]:
    `reference.gmm` of the groups rhs[group_offset:][:G] (read in place); swiglu=True -> [M, N / 2]:
    `reference.swiglu` of it, in the kernel's epilogue (bf16 out). k_major: bf16 rhs given as
    [>= group_offset + G, N, K], the groups' transposes (the layout FP8 weights have; an input
    gradient's product with the forward's weights).

    FP8 weights: rhs float8_e4m3fn [>= group_offset + G, N, K] (K-major) and scale, their
    [>= group_offset + G, N] float32 column scales, read like rhs: `reference.gmm` with scale (each
    compute warpgroup converts its [tile_n, 64] tiles to bf16 in SMEM, exactly, and multiplies them
    as transposed operands, which JAX 0.10's interpreter reads only through the tests' shim).
    FP8 lhs too: lhs float8_e4m3fn [M, K] with lhs_scale [M] float32 row scales, multiplied on the
    FP8 tensor cores (`reference.gmm` with lhs_scale; bf16 or f32 out).
    tile_m in {64, 128} rows per work item (128 with swiglu); each compute warpgroup owns tile_n
    columns (swiglu: tile_n gate and tile_n up columns of half the rows).
    interpret: run in JAX's Mosaic GPU interpreter (any device).
    """
    M, K = lhs.shape
    fp8, fp8_lhs = (jnp.dtype(x.dtype) == FP8 for x in (rhs, lhs))
    k_major = k_major or fp8
    N = rhs.shape[1 if k_major else 2]
    out_dtype = jnp.dtype(preferred_element_type or (jnp.bfloat16 if fp8_lhs else lhs.dtype))
    if not supports(lhs, rhs, out_dtype, tile_n, swiglu, k_major):
        raise NotImplementedError(f"gpu gmm takes bf16 lhs and bf16 [G, K, N] or FP8 [G, N, K] rhs, or FP8 lhs and FP8 "
                                  f"rhs, with K a multiple of 128 bytes of lhs and N % {2 * tile_n} == 0 (swiglu: "
                                  f"bf16 out), got {lhs.dtype} {lhs.shape} x {rhs.dtype} {rhs.shape} -> {out_dtype}")
    if fp8 != (scale is not None):
        raise ValueError(f"gpu gmm: scale goes with FP8 (float8_e4m3fn) rhs and only with it; got {rhs.dtype} rhs, "
                         f"scale {None if scale is None else scale.shape}")
    if fp8 and (scale.shape != (rhs.shape[0], N) or scale.dtype != jnp.float32):
        raise ValueError(f"gpu gmm: scale must be float32 {(rhs.shape[0], N)} (rhs's groups and columns), got "
                         f"{scale.dtype} {scale.shape}")
    if fp8_lhs != (lhs_scale is not None) or (fp8_lhs and (lhs_scale.shape != (M,) or lhs_scale.dtype != jnp.float32)):
        given = None if lhs_scale is None else (lhs_scale.dtype, lhs_scale.shape)
        raise ValueError(f"gpu gmm: FP8 lhs goes with lhs_scale, its float32 [{M}] row scales, and only with it; got "
                         f"{lhs.dtype} lhs, lhs_scale {given}")
    if swiglu and tile_m != 128:
        raise ValueError(f"swiglu splits a tile's rows over two warpgroups of 64: tile_m must be 128, got {tile_m}")
    if M % 8:  # TMA boxes need whole 8-row tiles of the global array
        lhs = jnp.pad(lhs, ((0, 8 - M % 8), (0, 0)))
        lhs_scale = None if lhs_scale is None else jnp.pad(lhs_scale, (0, 8 - M % 8))
    items, count = work_items(group_sizes, lhs.shape[0], tile_m)
    sms = INTERPRET_SMS if interpret else sm_count()
    kernel = plgpu.kernel(
        functools.partial(_kernel, tile_m=tile_m, tile_n=tile_n, stages=stages, swiglu=swiglu,
                          k_major=k_major),
        out_type=jax.ShapeDtypeStruct((lhs.shape[0], N // 2 if swiglu else N), out_dtype),
        grid=(sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=gpu_interpreter() if interpret else None)
    offset = jnp.reshape(jnp.asarray(group_offset, jnp.int32), (1,))
    scales = [x for x in (scale, lhs_scale) if x is not None]
    return kernel(items, count, offset, lhs, rhs, *scales)[:M]
