"""One token's MoE block on CUDA GPUs in one launch: a persistent Pallas Triton kernel.

A batch-1 decode step's MoE block is a chain of small dependent kernels (the router's product,
its sums and sigmoids, the selection, the experts' gate_up, their SwiGLU, down, the combine), each
a launch of a few microseconds that moves little. Here one program per streaming multiprocessor
runs them all, in phases separated by grid barriers (`_barrier`: an atomic count that every program
adds to and waits on; the programs must all be resident at once, which one per SM and nothing
else running guarantees):

1. the router: each program normalises the row itself (`_normed`, the reference's roundings) and
   sums [block_k, block_e] tiles of the router's matrix into float32 partial logits [K / block_k, E];
2. each program sums the partials (in one order: every program gets the same bits), takes their
   sigmoids and selects the experts (`pallas_kernels.router.gpu.choose`, the selection kernel's
   own code); then (pair, column block) items: block_n columns of a pair's gate and the same
   columns of its up, each a whole-K product, so that the program applies the scales, rounds and
   takes the SwiGLU itself; pair top_k is the shared expert;
3. output column blocks: every pair's down product for them, rounded as the reference rounds,
   combined with the weights in float32 and added to the shared expert's.

The weights are FP8 (`pallas_kernels.backend.FP8`, K-major [E, N, K] with per-row scales): a
program's item is then whole rows of contiguous bytes. A stack of 2-4 GiB (Ring-mini's linear
layers' down, 4.03 GB) is read as uint16 pairs (`pallas_kernels.backend.as_pairs`). In interpret
mode the phases run as three kernels (`split`), as the interpreter runs programs one after another
and a barrier would wait forever; on a GPU `split` runs them the same way (the GPU test compares
both).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import as_pairs, e4m3, power_of_two, reciprocal, sm_count, triton_offsets_overflow
from pallas_kernels.router.gpu import choose

ROUTER_TILE_BYTES = 16 * 1024
BLOCK_E = 64                   # the router tile's experts
f32 = jnp.float32


class Tiles(NamedTuple):
    """A program's work items and threads: `block_n` gate (and as many up) rows per gate_up item,
    `block_d` output columns per down item, `num_warps` warps per program (powers of two, the warps
    at most 32: a program's 1024 threads)."""
    block_n: int
    block_d: int
    num_warps: int


# The fastest of a sweep of items and warps on an H100 (docs/PERFORMANCE.md). With one program per
# SM its warps are all the SM's threads: 8 did better than 4 and 2.
TILES = Tiles(block_n=8, block_d=16, num_warps=8)


def router_tile(K: int, E: int, dtype) -> tuple[int, int]:
    """(block_k, block_e) of the router's tiles: ROUTER_TILE_BYTES, or the whole K."""
    block_e = min(BLOCK_E, E)
    return min(K, ROUTER_TILE_BYTES // (block_e * jnp.dtype(dtype).itemsize)), block_e


def fits(K: int, I: int, E: int, router_dtype, top_k: int, n_group: int, tiles: Tiles = TILES) -> bool:
    """Whether the kernel takes these sizes and tiles: Triton blocks of power-of-two sizes, I a
    multiple of the tiles' block_n, K of their block_d and of the router tile's rows, at most 32
    warps."""
    return (all(map(power_of_two, (K, I, E, n_group, top_k, E // n_group, *tiles))) and tiles.num_warps <= 32
            and E % n_group == 0 and min(K, I) >= 2 and I % tiles.block_n == 0 and K % tiles.block_d == 0
            and K % router_tile(K, E, router_dtype)[0] == 0)


def _rnd(v, dtype):
    return v.astype(dtype).astype(f32)


def _inverse_rms(x_ref, eps):
    row = x_ref[0, :].astype(f32)
    return jax.lax.rsqrt(jnp.sum(row * row) / row.shape[0] + eps)


def _normed(x_ref, norm_ref, layer, inverse_rms, columns):
    """x's columns (a `pl.ds`, strided or not) RMS-normalised as `pallas_kernels.matvec.reference.
    rms_norm` rounds: [size] float32 values of x's dtype. (Each read keeps its row axis: JAX's
    interpreter takes a strided slice only beside other slices.)"""
    x = x_ref[pl.ds(0, 1), columns].astype(f32)
    weight = norm_ref[pl.ds(layer, 1), columns].astype(f32)
    return _rnd(_rnd(x * inverse_rms, x_ref.dtype) * weight, x_ref.dtype).reshape(-1)


def _planes(w_ref) -> int:
    """The FP8 values per element of a weight stack as the kernel reads it: 2 for pairs, else 1."""
    return 2 if w_ref.dtype == jnp.uint16 else 1


def _strided(n: int, b: int, size: int):
    """Entries n j + b of a row of `size` (all of them for n = 1)."""
    return pl.ds(b, size // n, stride=n) if n > 1 else pl.ds(0, size)


def _product(tile, columns):
    """tile: FP8 [n, K], or pairs [n, K / 2] (`as_pairs`); columns: [K / planes] float32 for each
    plane b, the other operand's entries planes j + b -> [n] float32, the rows' products with it."""
    if len(columns) == 1:
        return jnp.sum(tile.astype(f32) * columns[0][None, :], axis=1)
    total = None
    for b, column in enumerate(columns):
        part = jnp.sum(e4m3((tile >> (8 * b)) & 0xFF) * column[None, :], axis=1)
        total = part if total is None else total + part
    return total


def _items(total, program, programs, body):
    """body(i) for the items i = program, program + programs, ... below total."""
    def step(t, carry):
        body(program + t * programs)
        return carry
    jax.lax.fori_loop(0, (total - program + programs - 1) // programs, step, 0)


def _barrier(count_ref, arrivals):
    """Waits until the count of arrivals at barriers, this one included, reaches `arrivals`: every
    program's stores before it are seen by every program's loads after it, plain loads included
    (the atomics are acquire-release at GPU scope, one thread of each program issues them, and CTA
    barriers order the other threads around them: the pattern of CUDA's grid sync)."""
    pltriton.debug_barrier()
    seen = pltriton.atomic_add(count_ref, jnp.int32(0), jnp.int32(1)) + 1
    jax.lax.while_loop(lambda c: c < arrivals,
                       lambda c: pltriton.atomic_add(count_ref, jnp.int32(0), jnp.int32(0)), seen)
    pltriton.debug_barrier()


def _router(index_ref, x_ref, norm_ref, router_ref, partial_ref, *, eps, program, programs):
    K, E = router_ref.shape[1:]
    bk, be = router_tile(K, E, router_ref.dtype)
    inverse_rms = _inverse_rms(x_ref, eps)

    def item(i):
        s, n = i // (E // be), i % (E // be)
        x = _normed(x_ref, norm_ref, index_ref[0], inverse_rms, pl.ds(s * bk, bk))             # [bk]
        tile = router_ref[index_ref[1], pl.ds(s * bk, bk), pl.ds(n * be, be)].astype(f32)     # [bk, be]
        partial_ref[s, pl.ds(n * be, be)] = jnp.sum(x[:, None] * tile, axis=0)
    _items((K // bk) * (E // be), program, programs, item)


def _select(index_ref, bias_ref, partial_ref, *, n_group, top_k, topk_group, scaling, rounding, interpret):
    """-> (ids [1, top_k] int32, weights [1, top_k] float32) from the router's partial logits."""
    S, E = partial_ref.shape
    logits = partial_ref[0, :]
    for s in range(1, S):
        logits = logits + partial_ref[s, :]
    scores = reciprocal(1 + jnp.exp(-logits), interpret).reshape(n_group, E // n_group)
    bias = bias_ref[index_ref[2]].reshape(n_group, E // n_group)
    return choose(scores, bias, top_k=top_k, topk_group=topk_group, scaling=scaling, rounding=rounding)


def _pick(values, j):
    """values [1, n] -> entry j as a scalar."""
    return jnp.sum(jnp.where(jnp.arange(values.shape[1])[None, :] == j, values, 0))


def _gate_up(index_ref, x_ref, norm_ref, ids, act_ref, routed, routed_scale, shared, shared_scale, *, eps,
             block_n, program, programs, interpret):
    P, I = act_ref.shape
    K = x_ref.shape[1]
    first, mine = index_ref[3], index_ref[4]
    inverse_rms = _inverse_rms(x_ref, eps)
    x = {n: [_normed(x_ref, norm_ref, index_ref[0], inverse_rms, _strided(n, b, K)) for b in range(n)]
         for n in {_planes(routed), _planes(shared)}}
    blocks = I // block_n

    def product(w_ref, s_ref, m, j, c):
        gate_rows, up_rows = pl.ds(c * block_n, block_n), pl.ds(I + c * block_n, block_n)
        gate = _product(w_ref[m, gate_rows, :], x[_planes(w_ref)]) * s_ref[m, gate_rows]
        up = _product(w_ref[m, up_rows, :], x[_planes(w_ref)]) * s_ref[m, up_rows]
        gate, up = _rnd(gate, x_ref.dtype), _rnd(up, x_ref.dtype)
        silu = _rnd(gate * reciprocal(1 + jnp.exp(-gate), interpret), x_ref.dtype)
        act_ref[j, gate_rows] = (silu * up).astype(act_ref.dtype)

    def item(i):
        j, c = i // blocks, i % blocks
        pl.when(j < P - 1)(lambda: product(routed, routed_scale, _pick(ids, j) + first, j, c))
        pl.when(j == P - 1)(lambda: product(shared, shared_scale, mine, j, c))
    _items(P * blocks, program, programs, item)


def _down(index_ref, ids, weights, act_ref, out_ref, routed, routed_scale, shared, shared_scale, *,
          block_d, program, programs):
    P, I = act_ref.shape
    K = out_ref.shape[1]
    first, mine = index_ref[3], index_ref[4]
    dtype = out_ref.dtype

    def act(j, w_ref):                                # pair j's SwiGLU output, by plane of w_ref's
        n = _planes(w_ref)
        return [act_ref[pl.ds(j, 1), _strided(n, b, I)].astype(f32).reshape(-1) for b in range(n)]

    def item(i):
        columns = pl.ds(i * block_d, block_d)
        total = jnp.zeros((block_d,), f32)
        for j in range(P - 1):
            m = _pick(ids, j) + first
            y = _product(routed[m, columns, :], act(j, routed)) * routed_scale[m, columns]
            total = total + _rnd(y, dtype) * _pick(weights, j)
        y = _product(shared[mine, columns, :], act(P - 1, shared)) * shared_scale[mine, columns]
        out_ref[0, columns] = (_rnd(total, dtype) + _rnd(y, dtype)).astype(dtype)
    _items(K // block_d, program, programs, item)


def _kernel(index_ref, x_ref, norm_ref, router_ref, bias_ref, gate_up, gate_up_scale, shared_gate_up,
            shared_gate_up_scale, down, down_scale, shared_down, shared_down_scale, *refs, phases, settings):
    out_ref, ids_ref, weights_ref, partial_ref, act_ref, count_ref = refs[-6:]      # after their input buffers
    program, programs = pl.program_id(0), pl.num_programs(0)
    eps, interpret, tiles = settings["eps"], settings["interpret"], settings["tiles"]
    selection = {k: settings[k] for k in ("n_group", "top_k", "topk_group", "scaling", "rounding", "interpret")}
    if "router" in phases:
        _router(index_ref, x_ref, norm_ref, router_ref, partial_ref, eps=eps, program=program, programs=programs)
    # The interpreter's one program waits for none.
    together = phases == ("router", "gate_up", "down") and not interpret
    if together:
        _barrier(count_ref, programs)
    if "gate_up" in phases:
        ids, weights = _select(index_ref, bias_ref, partial_ref, **selection)

        @pl.when(program == 0)
        def _():
            ids_ref[...] = ids
            weights_ref[...] = weights
        _gate_up(index_ref, x_ref, norm_ref, ids, act_ref, gate_up, gate_up_scale, shared_gate_up,
                 shared_gate_up_scale, eps=eps, block_n=tiles.block_n, program=program, programs=programs,
                 interpret=interpret)
    if together:
        _barrier(count_ref, 2 * programs)
    if "down" in phases:
        if "gate_up" not in phases:
            ids, weights = ids_ref[...], weights_ref[...]
        _down(index_ref, ids, weights, act_ref, out_ref, down, down_scale, shared_down, shared_down_scale,
              block_d=tiles.block_d, program=program, programs=programs)


@functools.partial(jax.jit, static_argnames=("eps", "top_k", "n_group", "topk_group", "scaling", "rounding",
                                             "programs", "split", "tiles", "interpret"))
def moe_decode(x, norm_weight, router, bias, gate_up, gate_up_scale, down, down_scale, index, *, eps, top_k,
               n_group, topk_group, scaling, rounding=None, programs=None, split=False, tiles=TILES,
               interpret=False):
    """x: [1, K]; the rest as `api.moe_decode` -> (out [1, K], ids [top_k], weights [top_k]).
    programs: how many (default: one per SM; 1 in interpret mode unless split); split: the phases
    as three kernels; tiles: the programs' items and warps (`Tiles`)."""
    K = x.shape[1]
    E = router.shape[2]
    I = down[0].shape[2]
    P = top_k + 1
    S = K // router_tile(K, E, router.dtype)[0]
    if not fits(K, I, E, router.dtype, top_k, n_group, tiles):
        raise ValueError(f"moe_decode: the kernel does not take hidden {K}, expert width {I}, {E} experts in "
                         f"{n_group} groups, top_k {top_k} with {tiles}: powers of two, block_n dividing the width, "
                         f"block_d dividing the hidden size, at most 32 warps")
    if interpret and not split and programs not in (None, 1):
        raise ValueError("moe_decode: the interpreter runs its programs one after another: one program, or split")
    if not (interpret or split) and (programs or 0) > sm_count():
        raise ValueError(f"moe_decode: {programs} programs cannot all be resident on {sm_count()} SMs, and the "
                         f"grid barriers would wait forever: at most one per SM, or split")
    programs = programs or (1 if interpret and not split else sm_count())
    settings = dict(eps=eps, n_group=n_group, top_k=top_k, topk_group=topk_group, scaling=scaling,
                    rounding=None if rounding is None else jnp.dtype(rounding), tiles=tiles, interpret=interpret)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    shapes = [jax.ShapeDtypeStruct((1, K), x.dtype), jax.ShapeDtypeStruct((1, top_k), jnp.int32),
              jax.ShapeDtypeStruct((1, top_k), f32), jax.ShapeDtypeStruct((S, E), f32),
              jax.ShapeDtypeStruct((P, I), x.dtype), jax.ShapeDtypeStruct((1,), jnp.int32)]
    def read(w):
        return as_pairs(w) if triton_offsets_overflow(w) else w
    operands = [jnp.asarray(index, jnp.int32), x, norm_weight, router, bias, read(gate_up[0]), gate_up_scale[0],
                read(gate_up[1]), gate_up_scale[1], read(down[0]), down_scale[0], read(down[1]), down_scale[1]]

    def call(phases, buffers, outputs):
        """The kernel on the phases; buffers: the arrays that outputs (their indices) start from."""
        return pl.pallas_call(
            functools.partial(_kernel, phases=phases, settings=settings),
            grid=(programs,),
            in_specs=[anywhere] * (len(operands) + len(buffers)),
            out_specs=[anywhere] * len(shapes),
            out_shape=shapes,
            input_output_aliases={len(operands) + i: o for i, o in enumerate(outputs)},
            compiler_params=pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
            interpret=interpret,
            name="moe_decode",
        )(*operands, *buffers)

    if split:                                  # each phase's outputs are the next one's buffers
        buffers = [jnp.zeros(s.shape, s.dtype) for s in shapes]
        for phases in (("router",), ("gate_up",), ("down",)):
            buffers = call(phases, buffers, range(len(shapes)))
    else:                                      # only the barriers' count must start at zero
        buffers = call(("router", "gate_up", "down"), [jnp.zeros((1,), jnp.int32)], [len(shapes) - 1])
    out, ids, weights = buffers[:3]
    return out, ids[0], weights[0]
