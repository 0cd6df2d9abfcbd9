"""Lightning linear attention on Hopper GPUs: Pallas Mosaic GPU kernels (wgmma, TMA pipelines).

Work split. A CTA (one warpgroup) owns a (batch, head, half of the value columns, segment of the
sequence) and walks its segment chunk by chunk (C = 64 tokens), keeping its [D, Dv/2] slice of the
float32 state S in registers as a wgmma accumulator. Per chunk, with the q, k, v tiles brought in
by a TMA pipeline:

    o = row_decay * (q @ S) + ((q @ k^T) * intra_decay) @ v                 # [C, Dv/2]
    S = chunk_decay * S + k^T @ (k_decay * v)                                # [D, Dv/2]

Batch x heads x 2 CTAs do not fill 132 SMs at batch 1, so the sequence is cut into segments: a
first kernel computes each segment's own state contribution U_s (the second line only, from zero;
it reads k and v), a tiny jnp scan chains them into each segment's incoming state, and the output
kernel runs all segments in parallel from those states. Bytes: q, k, v, o once each plus k, v once
more for all but the last segment.

Numerics: q, k, v and o are bf16; every product accumulates in float32; S stays float32 across the
sequence but enters q @ S rounded to bf16, and k_decay * v is rounded to bf16 before k^T @ (.), as
fla's chunk kernel does. The decay tables are exp of non-positive multiples of the head's log
decay, computed outside the kernels.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CHUNK = 64
TARGET_CTAS = 264  # two per SM on an H100


def decay_tables(log_decay, chunk: int, head_dim: int, tail: int):
    """Per-head decay factors, all exp(g * n) with n >= 0, float32.

    intra [H, C, C]: exp((i-j) g) for j <= i, else 0.
    rows [H, 3, C]: exp((i+1) g); exp((C-1-j) g); exp((tail-1-j) g) for j < tail, else 0 (the
      last chunk holds only `tail` tokens).
    state [H, 2, D]: exp(C g) and exp(tail g), repeated along D.
    """
    g = log_decay.astype(jnp.float32)[:, None]                               # [H, 1]
    i = jnp.arange(chunk)
    lag = i[:, None] - i[None, :]
    intra = jnp.where(lag >= 0, jnp.exp(jnp.maximum(lag, 0)[None] * g[:, :, None]), 0.0)
    tail_age = tail - 1 - i
    rows = jnp.stack([jnp.exp((i + 1)[None] * g),
                      jnp.exp((chunk - 1 - i)[None] * g),
                      jnp.where(tail_age >= 0, jnp.exp(jnp.maximum(tail_age, 0)[None] * g), 0.0)], axis=1)
    state = jnp.stack([jnp.exp(chunk * g), jnp.exp(tail * g)], axis=1)       # [H, 2, 1]
    return intra, rows, jnp.broadcast_to(state, (g.shape[0], 2, head_dim))


def _num_segments(n_chunks: int, parallel: int) -> int:
    """Largest divisor of n_chunks up to what fills the GPU (segments of at least 4 chunks)."""
    want = max(1, min(n_chunks // 4, -(-TARGET_CTAS // parallel)))
    return max(d for d in range(1, want + 1) if n_chunks % d == 0)


def _wgmma_value(a, b, shape):
    """a @ b for SMEM refs, as a float32 array in registers."""
    def scope(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]
    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def _wgmma_add(value, a, b):
    """value + a @ b, value a float32 array in the WGMMA layout."""
    def update(acc):
        plgpu.wgmma(acc, a, b)
    return pl.run_state(update)(plgpu.ACC.init(value))


def linear_attention(q, k, v, log_decay, *, scale=None, initial_state=None):
    """q, k: [B, T, H, D], v: [B, T, H, Dv], bf16, D % 64 == 0, Dv % 128 == 0; log_decay [H];
    initial_state [B, H, D, Dv] f32 or None -> (o [B, T, H, Dv] bf16, final_state f32).
    The math of `reference.linear_attention` (no mask)."""
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    C = CHUNK
    if q.dtype != jnp.bfloat16 or D % 64 or Dv % 128:
        raise NotImplementedError(f"gpu kernel needs bf16, D % 64 == 0 and Dv % 128 == 0, got "
                                  f"{q.dtype}, D={D}, Dv={Dv}")
    scale = D ** -0.5 if scale is None else scale
    half = Dv // 2
    n_chunks = -(-T // C)
    tail = T - (n_chunks - 1) * C
    if tail != C:  # pad to whole chunks; the tail tables keep the padding out of the state
        q, k, v = (jnp.pad(x, ((0, 0), (0, n_chunks * C - T), (0, 0), (0, 0))) for x in (q, k, v))
    n_seg = _num_segments(n_chunks, B * H * 2)
    per_seg = n_chunks // n_seg
    intra, rows, sdec = decay_tables(log_decay, C, D, tail)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, D, Dv), jnp.float32)
    wgmma_layout, row_layout = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def load_tables(h, intra_gmem, rows_gmem, sdec_gmem, intra_smem, rows_smem, sdec_smem, bar):
        plgpu.copy_gmem_to_smem(intra_gmem.at[h], intra_smem, bar.at[0])
        plgpu.copy_gmem_to_smem(rows_gmem.at[h], rows_smem, bar.at[1])
        plgpu.copy_gmem_to_smem(sdec_gmem.at[h], sdec_smem, bar.at[2])
        for n in range(3):
            plgpu.barrier_wait(bar.at[n])

    def column(ref, r, width):  # row r of a [n, len] SMEM table as a [len, width] array
        return jnp.broadcast_to(plgpu.layout_cast(ref[r, :], row_layout)[:, None], (ref.shape[1], width))

    def state_step(is_tail, state, k_smem, v_smem, w_smem, rows_smem, sdec_smem):
        """S <- chunk_decay * S + k^T @ (k_decay * v), with the tail's factors on the last chunk."""
        k_decay, chunk_decay = column(rows_smem, 1, half), column(sdec_smem, 0, half)
        if is_tail is not False:  # traced: the global last chunk holds `tail` tokens
            k_decay = jnp.where(jnp.broadcast_to(is_tail, (C, half)), column(rows_smem, 2, half), k_decay)
            chunk_decay = jnp.where(jnp.broadcast_to(is_tail, (D, half)), column(sdec_smem, 1, half),
                                    chunk_decay)
        v_tile = plgpu.layout_cast(v_smem[...], wgmma_layout).astype(jnp.float32)
        w_smem[...] = (v_tile * k_decay).astype(jnp.bfloat16)
        plgpu.commit_smem()
        return plgpu.layout_cast(_wgmma_add(state * chunk_decay, k_smem.transpose((1, 0)), w_smem),
                                 wgmma_layout)

    # ---- kernel 1: each segment's own state contribution (all segments but the last) ----------
    def segment_body(k_gmem, v_gmem, intra_gmem, rows_gmem, sdec_gmem, u_gmem,
                     intra_smem, rows_smem, sdec_smem, w_smem, st_smem, bar):
        b, h, j, s = (lax.axis_index(n) for n in ("b", "h", "j", "s"))
        cols = pl.ds(j * half, half)
        load_tables(h, intra_gmem, rows_gmem, sdec_gmem, intra_smem, rows_smem, sdec_smem, bar)

        def chunk(_, k_smem, v_smem, state):
            return state_step(False, plgpu.layout_cast(state, wgmma_layout), k_smem, v_smem, w_smem,
                              rows_smem, sdec_smem)

        first = s * per_seg
        state = plgpu.emit_pipeline(
            chunk, grid=(per_seg,),
            in_specs=[plgpu.BlockSpec((C, D), lambda c: (first + c, 0)),
                      plgpu.BlockSpec((C, half), lambda c: (first + c, 0))],
            max_concurrent_steps=2,
            init_carry=plgpu.layout_cast(jnp.zeros((D, half), jnp.float32), wgmma_layout),
        )(k_gmem.at[b, :, h], v_gmem.at[b, :, h, cols])
        st_smem[...] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_smem, u_gmem.at[b, h, s, :, cols])
        plgpu.wait_smem_to_gmem(0)

    table_scratch = (plgpu.SMEM((C, C), jnp.float32), plgpu.SMEM((3, C), jnp.float32),
                     plgpu.SMEM((2, D), jnp.float32))
    if n_seg > 1:
        u = plgpu.kernel(
            segment_body,
            out_type=jax.ShapeDtypeStruct((B, H, n_seg - 1, D, Dv), jnp.float32),
            scratch_types=table_scratch + (plgpu.SMEM((C, half), jnp.bfloat16),
                                           plgpu.SMEM((D, half), jnp.float32), plgpu.Barrier(num_barriers=3)),
            grid=(B, H, 2, n_seg - 1), grid_names=("b", "h", "j", "s"), compiler_params=params,
        )(k, v, intra, rows, sdec)
        # Chain the segments: S_in[s + 1] = exp(L g) S_in[s] + U_s, L = tokens per segment.
        seg_decay = jnp.exp(log_decay.astype(jnp.float32) * (per_seg * C))[None, :, None, None]

        def chain(state, u_s):
            nxt = seg_decay * state + u_s
            return nxt, nxt
        _, later = lax.scan(chain, initial_state, jnp.moveaxis(u, 2, 0))
        seg_states = jnp.concatenate([initial_state[None], later], axis=0)    # [n_seg, B, H, D, Dv]
    else:
        seg_states = initial_state[None]

    # ---- kernel 2: outputs of every segment from its incoming state; the last writes S_T --------
    def output_body(q_gmem, k_gmem, v_gmem, intra_gmem, rows_gmem, sdec_gmem, s_in_gmem,
                    o_gmem, s_out_gmem, intra_smem, rows_smem, sdec_smem, s_smem, p_smem, w_smem,
                    st_smem, bar):
        b, h, j, s = (lax.axis_index(n) for n in ("b", "h", "j", "s"))
        cols = pl.ds(j * half, half)
        load_tables(h, intra_gmem, rows_gmem, sdec_gmem, intra_smem, rows_smem, sdec_smem, bar)
        plgpu.copy_gmem_to_smem(s_in_gmem.at[s, b, h, :, cols], st_smem, bar.at[3])
        plgpu.barrier_wait(bar.at[3])
        intra_tab = plgpu.layout_cast(intra_smem[...], wgmma_layout)
        first = s * per_seg

        def chunk(idx, q_smem, k_smem, v_smem, o_smem, state):
            state = plgpu.layout_cast(state, wgmma_layout)
            s_smem[...] = state.astype(jnp.bfloat16)
            plgpu.commit_smem()
            o = _wgmma_value(q_smem, s_smem, (C, half)) * column(rows_smem, 0, half)
            p = _wgmma_value(q_smem, k_smem.transpose((1, 0)), (C, C)) * intra_tab
            p_smem[...] = p.astype(jnp.bfloat16)
            plgpu.commit_smem()
            o = _wgmma_add(o, p_smem, v_smem)
            o_smem[...] = (o * scale).astype(o_smem.dtype)
            plgpu.commit_smem()
            is_tail = first + idx[0] == n_chunks - 1
            return state_step(is_tail, state, k_smem, v_smem, w_smem, rows_smem, sdec_smem)

        state = plgpu.emit_pipeline(
            chunk, grid=(per_seg,),
            in_specs=[plgpu.BlockSpec((C, D), lambda c: (first + c, 0)),
                      plgpu.BlockSpec((C, D), lambda c: (first + c, 0)),
                      plgpu.BlockSpec((C, half), lambda c: (first + c, 0))],
            out_specs=[plgpu.BlockSpec((C, half), lambda c: (first + c, 0))],
            max_concurrent_steps=2,
            init_carry=plgpu.layout_cast(st_smem[...], wgmma_layout),
        )(q_gmem.at[b, :, h], k_gmem.at[b, :, h], v_gmem.at[b, :, h, cols], o_gmem.at[b, :, h, cols])

        @pl.when(s == n_seg - 1)
        def _():
            st_smem[...] = state
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_smem, s_out_gmem.at[b, h, :, cols])
            plgpu.wait_smem_to_gmem(0)

    o, final_state = plgpu.kernel(
        output_body,
        out_type=(jax.ShapeDtypeStruct((B, n_chunks * C, H, Dv), q.dtype),
                  jax.ShapeDtypeStruct((B, H, D, Dv), jnp.float32)),
        scratch_types=table_scratch + (
            plgpu.SMEM((D, half), jnp.bfloat16),
            plgpu.SMEM((C, C), jnp.bfloat16),
            plgpu.SMEM((C, half), jnp.bfloat16),
            plgpu.SMEM((D, half), jnp.float32),
            plgpu.Barrier(num_barriers=4),
        ),
        grid=(B, H, 2, n_seg), grid_names=("b", "h", "j", "s"), compiler_params=params,
    )(q, k, v, intra, rows, sdec, seg_states)
    return o[:, :T], final_state
