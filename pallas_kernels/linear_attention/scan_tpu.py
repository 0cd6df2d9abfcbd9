"""Lightning (simple-GLA) linear attention on TPU: Pallas Mosaic TPU kernels.

The math is `reference.linear_attention` (prefill) and `reference.linear_attention_step` (decode).

Layout. The kernels read q, k, v and write o in the caller's token-major layout, viewed as
[B, T, H * D] (a free reshape of [B, T, H, D]): a block is C tokens x `hb` heads, i.e. a
[C, hb * D] tile whose rows are strided by H * D in HBM. `hb` is the fewest heads whose width is a
multiple of 128 lanes (1 for D = Dv = 128, 2 for D = 64 with H even), or all H heads when no divisor
of H gets there (the block is then the full minor dim, which Mosaic also accepts). This costs no
HBM traffic beyond the kernel's own; feeding a heads-major [B, H, T, D] copy instead would add a
transpose of q, k, v and of o, i.e. about twice the kernel's HBM bytes again, unless XLA fuses it
into the producer. A sequence whose length is not a multiple of C ends in a partial block (one
shorter than chunk_size is a single chunk of C = T rounded up to a multiple of 8): the block's rows
past T are undefined on read and dropped on write, and the kernel masks them like padding, so
nothing is padded or copied in HBM either. The only extra input is a per-token table
[B, n_chunks, 2, C] float32 (the mask and the within-chunk count of valid tokens, as rows), 8 bytes
a token, read once per head block.

Prefill grid (B, H / hb, n_chunks): batch and head blocks "parallel", chunks "arbitrary" (in order).
The [hb, D, Dv] float32 state lives in a VMEM scratch for the whole sequence: loaded from
`initial_state` (or zeroed) at chunk 0, written to `final_state` after the last chunk. Per chunk and
head, with n_i = valid tokens <= i in the chunk and N = n_{C-1}:

    P = (q @ k^T) * [j <= i, both valid] exp(g (n_i - n_j))    # [C, C]
    o = s * (P @ v + exp(g n_i) * (q @ S))                     # [C, Dv], 0 where i is masked
    S = exp(g N) * S + (exp(g (N - n_j)) * k)^T @ v             # [D, Dv]

Every exponent is g times a non-negative count. In VMEM per grid step: the q, k, v, o tiles
(double-buffered by the pipeline), the state scratch, the initial/final state blocks and a few
[C, C] float32 temporaries; about 0.5 MiB at C = 64, D = Dv = 128, hb = 1.

Cost per chunk and head: 2 C (C (D + Dv) + 2 D Dv) FLOPs on the MXU (6.3 MFLOP at C = 64,
D = Dv = 128), C^2 + 2 C exps, and C (2 D + 2 Dv) x itemsize bytes of q, k, v, o (64 KiB in bf16):
about 96 FLOP/byte, below the ridge point of v5e (~240) and v5p (~170), so bf16 prefill is bound by
HBM bandwidth (float32 at HIGHEST takes several MXU passes per matmul and is compute-bound). The
state adds D Dv x 4 bytes in and out per (batch, head), once per sequence.

Numerics: matmul operands stay in the input dtype with float32 accumulation. For bf16 inputs the
state enters q @ S rounded to bf16, and P and the decayed k are rounded to bf16 before their
matmuls (as fla's chunk kernels do); the state itself is accumulated in float32. For float32
inputs every matmul runs at precision HIGHEST: within a few 1e-7 of a float64 recurrence.

Decode (`linear_attention_step`): grid (B, H / hb), both "parallel"; the state block is read once,
the S <= 8 new tokens are applied as one all-valid chunk of S tokens (the closed form of S
recurrence steps, the same `_chunk` as prefill), and the state is written back through
`input_output_aliases`: in place when the caller donates it (e.g. `donate_argnums` on an enclosing
jit), else XLA copies it first. Decode moves 2 D Dv x 4 bytes of state per (batch, head) and step.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_LANES = 128
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T


def _heads_per_block(num_heads: int, d: int, dv: int) -> int:
    """Fewest heads whose q/k and v/o widths are whole multiples of 128 lanes, else all heads."""
    for hb in range(1, num_heads + 1):
        if num_heads % hb == 0 and (hb * d) % _LANES == 0 and (hb * dv) % _LANES == 0:
            return hb
    return num_heads


def _keep(valid, x):
    """x where `valid` (a float32 0/1 array broadcastable to x) is 1, else 0; None keeps all.

    A select, not a product: the undefined rows of a partial block may hold NaN or inf.
    """
    return x if valid is None else jnp.where(jnp.broadcast_to(valid, x.shape) > 0, x, 0.0)


def _chunk(q, k, v, state, g, *, lag, n, age, total, valid, pairs, scale, precision):
    """One chunk of one head: returns (o [C, Dv] float32, new state [D, Dv] float32).

    q, k: [C, D]; v: [C, Dv] (input dtype); state: [D, Dv] float32; g: the head's log decay.
    lag [C, C]: max(n_i - n_j, 0); n [C, 1]: valid tokens <= i; age [C, 1]: N - n_j;
    total [1, 1]: N, the chunk's valid tokens; valid [C, 1]: token i is valid; pairs [C, C]: j <= i
    and both valid; valid and pairs are float32 0/1 (valid may be None: all valid). Every count is
    float32 and non-negative.
    """
    f32, dtype = jnp.float32, q.dtype
    dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=f32)
    v = _keep(valid, v.astype(f32)).astype(dtype)
    scores = dot(q, k, _NT)                                                    # [C, C]
    p = _keep(pairs, scores * jnp.exp(g * lag))
    carry = dot(q, state.astype(dtype), _NN)                                   # [C, Dv]
    o = dot(p.astype(dtype), v, _NN) + jnp.exp(g * n) * carry
    k_decayed = _keep(valid, k.astype(f32) * jnp.exp(g * age))                # [C, D]
    state = jnp.exp(g * total) * state + dot(k_decayed.T.astype(dtype), v, _NN)  # [D, Dv]
    return _keep(valid, o * scale), state


def _prefill_kernel(g_ref, tok_ref, q_ref, k_ref, v_ref, *refs, hb, scale, precision,
                    has_initial_state):
    """Grid step (b, head block, chunk). tok_ref [2, C]: row 0 the mask, row 1 the counts n_j."""
    if has_initial_state:
        s0_ref, o_ref, s_ref, state_ref = refs
    else:
        (o_ref, s_ref, state_ref), s0_ref = refs, None
    head_block, c = pl.program_id(1), pl.program_id(2)
    d, dv = q_ref.shape[-1] // hb, v_ref.shape[-1] // hb

    @pl.when(c == 0)
    def _load_state():
        state_ref[...] = (jnp.zeros(state_ref.shape, jnp.float32) if s0_ref is None
                          else s0_ref[...])

    # Per-token tables, shared by the heads of the block. The wrapper gives them as rows [1, C];
    # the column forms [C, 1] come out of a diagonal select and a lane reduction.
    mask_row, n_row = tok_ref[0:1, :], tok_ref[1:2, :]
    chunk = mask_row.shape[1]
    i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    j = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    def column(row):
        return jnp.sum(jnp.where(i == j, row, 0.0), axis=1, keepdims=True)

    mask_col, n_col = column(mask_row), column(n_row)
    total = jnp.sum(mask_row, axis=1, keepdims=True)                           # [1, 1]
    tables = dict(lag=jnp.maximum(n_col - n_row, 0.0), n=n_col, age=total - n_col, total=total,
                  valid=mask_col, pairs=jnp.where(j <= i, mask_col * mask_row, 0.0))

    for h in range(hb):
        qk_cols, v_cols = slice(h * d, (h + 1) * d), slice(h * dv, (h + 1) * dv)
        o, state = _chunk(q_ref[:, qk_cols], k_ref[:, qk_cols], v_ref[:, v_cols], state_ref[h],
                          g_ref[head_block * hb + h], scale=scale, precision=precision, **tables)
        o_ref[:, v_cols] = o.astype(o_ref.dtype)
        state_ref[h] = state

    @pl.when(c == pl.num_programs(2) - 1)
    def _store_state():
        s_ref[...] = state_ref[...]


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _smem_spec():
    return pl.BlockSpec(memory_space=pltpu.SMEM)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "interpret"))
def linear_attention(q, k, v, log_decay, *, scale=None, initial_state=None, mask=None, chunk_size=64,
                     interpret=False):
    """Causal Lightning attention over a whole sequence, chunk by chunk.

    q, k: [B, T, H, D]; v: [B, T, H, Dv] (bf16 or f32; k, v are cast to q.dtype); log_decay: [H] f32
    (negative);
    initial_state: [B, H, D, Dv] f32 or None (zeros); mask: [B, T] bool or None (all valid): a False
    token (padding on either side) neither decays nor feeds the state, and its output is 0.
    chunk_size: tokens per grid step, a multiple of 8 (a sequence shorter than it is one chunk).
    interpret: False, True or a `pltpu.InterpretParams` (TPU interpret mode on CPU).
    Returns (o [B, T, H, Dv] in q.dtype, final_state [B, H, D, Dv] f32).
    """
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or log_decay.shape != (H,):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"log_decay {log_decay.shape}")
    if chunk_size % 8:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of 8")
    dtype = q.dtype
    k, v = k.astype(dtype), v.astype(dtype)
    scale = D ** -0.5 if scale is None else float(scale)
    C = min(chunk_size, 8 * pl.cdiv(T, 8))  # a short sequence is one chunk, still 8-row aligned
    n_chunks = pl.cdiv(T, C)
    hb = _heads_per_block(H, D, Dv)

    valid = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    valid = jnp.pad(valid, ((0, 0), (0, n_chunks * C - T))).reshape(B, n_chunks, C)
    counts = jnp.cumsum(valid, axis=-1, dtype=jnp.int32)                      # n_j per chunk
    tokens = jnp.stack([valid.astype(jnp.float32), counts.astype(jnp.float32)], axis=2)

    qk_spec = pl.BlockSpec((None, C, hb * D), lambda b, h, c: (b, c, h))
    v_spec = pl.BlockSpec((None, C, hb * Dv), lambda b, h, c: (b, c, h))
    state_spec = pl.BlockSpec((None, hb, D, Dv), lambda b, h, c: (b, h, 0, 0))
    in_specs = [_smem_spec(), pl.BlockSpec((None, None, 2, C), lambda b, h, c: (b, c, 0, 0)),
                qk_spec, qk_spec, v_spec]
    args = [log_decay.astype(jnp.float32), tokens, q.reshape(B, T, H * D), k.reshape(B, T, H * D),
            v.reshape(B, T, H * Dv)]
    if initial_state is not None:
        in_specs.append(state_spec)
        args.append(initial_state.astype(jnp.float32))

    itemsize = jnp.dtype(dtype).itemsize
    chunks = B * H * n_chunks
    cost = pl.CostEstimate(
        flops=2 * C * (C * (D + Dv) + 2 * D * Dv) * chunks,
        transcendentals=(C * C + 2 * C) * chunks,
        bytes_accessed=B * T * H * (2 * D + 2 * Dv) * itemsize + tokens.size * 4
        + (1 + (initial_state is not None)) * B * H * D * Dv * 4)

    kernel = functools.partial(_prefill_kernel, hb=hb, scale=scale, precision=_precision(dtype),
                               has_initial_state=initial_state is not None)
    o, final_state = pl.pallas_call(
        kernel,
        grid=(B, H // hb, n_chunks),
        in_specs=in_specs,
        out_specs=[v_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct((B, T, H * Dv), dtype),
                   jax.ShapeDtypeStruct((B, H, D, Dv), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((hb, D, Dv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(*args)
    return o.reshape(B, T, H, Dv), final_state


def _step_kernel(g_ref, q_ref, k_ref, v_ref, state_ref, o_ref, new_state_ref, *, hb, scale,
                 precision):
    """Grid step (b, head block): the S tokens as one all-valid chunk.

    state_ref and new_state_ref share their HBM buffer (input_output_aliases), but an output block
    is never read in from HBM: the state is read from the input block and written to the output.
    """
    head_block = pl.program_id(1)
    d, dv = q_ref.shape[-1] // hb, v_ref.shape[-1] // hb
    steps = q_ref.shape[0]
    i = lax.broadcasted_iota(jnp.int32, (steps, steps), 0)
    j = lax.broadcasted_iota(jnp.int32, (steps, steps), 1)
    n = (lax.broadcasted_iota(jnp.int32, (steps, 1), 0) + 1).astype(jnp.float32)
    total = jnp.full((1, 1), steps, jnp.float32)
    tables = dict(lag=jnp.maximum(i - j, 0).astype(jnp.float32), n=n, age=total - n, total=total,
                  valid=None, pairs=(j <= i).astype(jnp.float32))
    for h in range(hb):
        qk_cols, v_cols = slice(h * d, (h + 1) * d), slice(h * dv, (h + 1) * dv)
        o, state = _chunk(q_ref[:, qk_cols], k_ref[:, qk_cols], v_ref[:, v_cols], state_ref[h],
                          g_ref[head_block * hb + h], scale=scale, precision=precision, **tables)
        o_ref[:, v_cols] = o.astype(o_ref.dtype)
        new_state_ref[h] = state


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def linear_attention_step(q, k, v, log_decay, state, *, scale=None, interpret=False):
    """A few tokens (decode or speculative) continuing from `state`.

    q, k: [B, S, H, D]; v: [B, S, H, Dv] (S = 1..8, bf16 or f32; k, v are cast to q.dtype);
    log_decay: [H] f32; state: [B, H, D, Dv] f32, updated in place when the caller donates it.
    interpret: False, True or a `pltpu.InterpretParams` (TPU interpret mode on CPU).
    Returns (o [B, S, H, Dv] in q.dtype, new_state [B, H, D, Dv] f32).
    """
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or state.shape != (B, H, D, Dv):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape}, state {state.shape}")
    dtype = q.dtype
    k, v = k.astype(dtype), v.astype(dtype)
    scale = D ** -0.5 if scale is None else float(scale)
    hb = _heads_per_block(H, D, Dv)
    qk_spec = pl.BlockSpec((None, S, hb * D), lambda b, h: (b, 0, h))
    v_spec = pl.BlockSpec((None, S, hb * Dv), lambda b, h: (b, 0, h))
    state_spec = pl.BlockSpec((None, hb, D, Dv), lambda b, h: (b, h, 0, 0))
    kernel = functools.partial(_step_kernel, hb=hb, scale=scale, precision=_precision(dtype))
    o, new_state = pl.pallas_call(
        kernel,
        grid=(B, H // hb),
        in_specs=[_smem_spec(), qk_spec, qk_spec, v_spec, state_spec],
        out_specs=[v_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct((B, S, H * Dv), dtype),
                   jax.ShapeDtypeStruct((B, H, D, Dv), jnp.float32)],
        input_output_aliases={4: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
    )(log_decay.astype(jnp.float32), q.reshape(B, S, H * D), k.reshape(B, S, H * D),
      v.reshape(B, S, H * Dv), state.astype(jnp.float32))
    return o.reshape(B, S, H, Dv), new_state
