"""Lightning linear attention on Hopper GPUs: Pallas Mosaic GPU kernels (wgmma, TMA pipelines).

Work split. A CTA (one warpgroup) owns a (batch, head, half of the value columns, segment of the
sequence) and walks its segment chunk by chunk (C = 64 tokens), keeping its [D, Dv/2] slice of the
float32 state S in registers as a wgmma accumulator. Per chunk, with the q, k, v tiles brought in
by a TMA pipeline:

    o = row_decay * (q @ S) + ((q @ k^T) * intra_decay) @ v                 # [C, Dv/2]
    S = chunk_decay * S + k^T @ (k_decay * v)                                # [D, Dv/2]

Batch x heads x 2 CTAs do not fill 132 SMs at batch 1, so the sequence is cut into segments: a
first kernel computes each segment's own state contribution U_s (the second line only, from zero;
it reads k and v), one jnp contraction chains them into each segment's incoming state, and the
output kernel runs all segments in parallel from those states. Bytes: q, k, v, o once each plus k, v once
more for all but the last segment.

Occupancy. A CTA's chunk is a chain of dependent steps (two pairs of wgmmas with SMEM round trips
between them), so the SM needs a second CTA to overlap with, and each kernel fits two per SM at
D = Dv = 128: 112 KB of SMEM each. Buffers read only before the chunk loop (decay tables, the
incoming state) and the final state's way out are scoped around the loop and reuse its memory, and
the output tile leaves through the score tile's buffer. (One CTA per SM with 177 KB is slower:
docs/PERFORMANCE.md.)

Numerics: q, k, v and o are bf16; every product accumulates in float32; S stays float32 across the
sequence but enters q @ S rounded to bf16, and k_decay * v is rounded to bf16 before k^T @ (.), as
fla's chunk kernel does. The decay tables are exp of non-positive multiples of the head's log
decay, computed outside the kernels.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.backend import sm_count

CHUNK = 64
COL_GROUPS = 2  # CTAs per (batch, head, segment), each owning Dv / COL_GROUPS value columns
STAGES = 2  # depth of the TMA pipelines


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
    """1 when `parallel` CTAs already cover the SMs; else the largest divisor of n_chunks up to
    two CTAs per SM (segments of at least 4 chunks)."""
    sms = sm_count()
    if parallel >= sms:
        return 1
    want = max(1, min(n_chunks // 4, -(-2 * sms // parallel)))
    return max(d for d in range(1, want + 1) if n_chunks % d == 0)


def _wgmma_add(value, a, b):
    """value + a @ b, value a float32 array in the WGMMA layout."""
    def update(acc):
        plgpu.wgmma(acc, a, b)
    return pl.run_state(update)(plgpu.ACC.init(value))


# Jitted so that a program lowers the kernels once for all its call sites of one shape (a model's
# layers): lowering a Mosaic GPU kernel takes a good part of a second.
@functools.partial(jax.jit, static_argnames="scale")
def linear_attention(q, k, v, log_decay, *, scale=None, initial_state=None):
    """q, k: [B, T, H, D], v: [B, T, H, Dv], bf16, D % 64 == 0, Dv % 128 == 0; log_decay [H];
    initial_state [B, H, D, Dv] f32 or None -> (o [B, T, H, Dv] bf16, final_state f32).
    The math of `reference.linear_attention` (no mask)."""
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    C, col_groups, stages = CHUNK, COL_GROUPS, STAGES
    if q.dtype != jnp.bfloat16 or D % 64 or Dv % 128:
        raise NotImplementedError(f"gpu kernel needs bf16, D % 64 == 0 and Dv % 128 == 0, got "
                                  f"{q.dtype}, D={D}, Dv={Dv}")
    scale = D ** -0.5 if scale is None else scale
    width = Dv // col_groups
    n_chunks = -(-T // C)
    tail = T - (n_chunks - 1) * C
    if tail != C:  # pad to whole chunks; the tail tables keep the padding out of the state
        q, k, v = (jnp.pad(x, ((0, 0), (0, n_chunks * C - T), (0, 0), (0, 0))) for x in (q, k, v))
    n_seg = _num_segments(n_chunks, B * H * col_groups)
    per_seg = n_chunks // n_seg
    intra, rows, sdec = decay_tables(log_decay, C, D, tail)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, D, Dv), jnp.float32)
    wgmma_layout, row_layout = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def load_tables(h, pairs, bar):
        """Copies this head's slice of each (GMEM table, SMEM buffer) pair and waits for all."""
        for n, (table, buffer) in enumerate(pairs):
            plgpu.copy_gmem_to_smem(table.at[h], buffer, bar.at[n])
        for n in range(len(pairs)):
            plgpu.barrier_wait(bar.at[n])

    def vector(ref, r):  # row r of a [n, len] SMEM table as a [len] vector along the tile rows
        return plgpu.layout_cast(ref[r, :], row_layout)

    def decay_vectors(rows_smem, sdec_smem):
        """k_decay and chunk_decay vectors of a whole chunk and of the tail chunk."""
        return ((vector(rows_smem, 1), vector(sdec_smem, 0)), (vector(rows_smem, 2), vector(sdec_smem, 1)))

    def pick(is_tail, full, tail):
        """The tail's vectors on the global last chunk, the whole chunk's elsewhere."""
        return tuple(jnp.where(jnp.broadcast_to(is_tail, f.shape), t, f) for f, t in zip(full, tail))

    def load_tile(ref):
        return plgpu.layout_cast(ref[...], wgmma_layout).astype(jnp.float32)

    def store_state(state, dst):
        """Writes the [D, width] f32 state through SMEM scoped here (it reuses the pipeline's)."""
        def store(st_smem):
            plgpu.commit_smem()  # every warp's share of the last wgmma has read the memory reused here
            st_smem[...] = state
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_smem, dst)
            plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(store, plgpu.SMEM((D, width), jnp.float32))

    # ---- kernel 1: each segment's own state contribution (all segments but the last) ----------
    # State updates only, so a longer chunk (fewer, larger wgmmas) when the segment allows it.
    C1 = 2 * C if per_seg % 2 == 0 else C
    _, rows1, sdec1 = decay_tables(log_decay, C1, D, C1)

    def segment_body(k_gmem, v_gmem, rows_gmem, sdec_gmem, u_gmem, w_smem, bar):
        b, h, j, s = (lax.axis_index(n) for n in ("b", "h", "j", "s"))
        cols = pl.ds(j * width, width)

        def prologue(rows_smem, sdec_smem):
            load_tables(h, [(rows_gmem, rows_smem), (sdec_gmem, sdec_smem)], bar)
            vectors, _ = decay_vectors(rows_smem, sdec_smem)
            plgpu.commit_smem()  # every warp has read the tables before the memory is reused
            return vectors
        k_decay, chunk_decay = pl.run_scoped(prologue, plgpu.SMEM((3, C1), jnp.float32),
                                             plgpu.SMEM((2, D), jnp.float32))

        def chunk(_, k_smem, v_smem, state):
            w_smem[...] = (load_tile(v_smem) * k_decay[:, None]).astype(jnp.bfloat16)
            plgpu.commit_smem()
            state = _wgmma_add(plgpu.layout_cast(state, wgmma_layout) * chunk_decay[:, None],
                               k_smem.transpose((1, 0)), w_smem)
            return plgpu.layout_cast(state, wgmma_layout)

        steps = per_seg * C // C1
        first = s * steps
        state = plgpu.emit_pipeline(
            chunk, grid=(steps,),
            in_specs=[plgpu.BlockSpec((C1, D), lambda c: (first + c, 0)),
                      plgpu.BlockSpec((C1, width), lambda c: (first + c, 0))],
            max_concurrent_steps=stages,
            init_carry=plgpu.layout_cast(jnp.zeros((D, width), jnp.float32), wgmma_layout),
        )(k_gmem.at[b, :, h], v_gmem.at[b, :, h, cols])
        store_state(state, u_gmem.at[b, h, s, :, cols])

    if n_seg > 1:
        u = plgpu.kernel(
            segment_body,
            out_type=jax.ShapeDtypeStruct((B, H, n_seg - 1, D, Dv), jnp.float32),
            scratch_types=(plgpu.SMEM((C1, width), jnp.bfloat16), plgpu.Barrier(num_barriers=2)),
            grid=(B, H, col_groups, n_seg - 1), grid_names=("b", "h", "j", "s"), compiler_params=params,
        )(k, v, rows1, sdec1)
        # Chain the segments in closed form: S_in[s] = exp(s L g) S_0 + sum_{r<s} exp((s-1-r) L g) U_r,
        # L = tokens per segment (all exponents non-positive).
        g_seg = log_decay.astype(jnp.float32) * (per_seg * C)                    # [H]
        idx = jnp.arange(n_seg)
        lag = idx[:, None] - 1 - idx[None, :n_seg - 1]                            # [S, S-1]
        mix = jnp.where(lag >= 0, jnp.exp(jnp.maximum(lag, 0)[None] * g_seg[:, None, None]), 0.0)
        carry = jnp.exp(idx[None] * g_seg[:, None])                               # [H, S]
        seg_states = (jnp.einsum("hs,bhde->sbhde", carry, initial_state)
                      + jnp.einsum("hsr,bhrde->sbhde", mix, u, precision=lax.Precision.HIGHEST))
    else:
        seg_states = initial_state[None]

    # ---- kernel 2: outputs of every segment from its incoming state; the last writes S_T --------
    # The output tile leaves through the score tile's buffer (free once P @ v is done) when the two
    # have one shape, saving a pipelined output buffer: at D = Dv = 128 that brings the kernel to
    # 112 KB of SMEM, two CTAs per SM.
    shared_o = width == C

    def output_body(q_gmem, k_gmem, v_gmem, intra_gmem, rows_gmem, sdec_gmem, s_in_gmem,
                    o_gmem, s_out_gmem, s_smem, p_smem, w_smem, *rest):
        *o_buffer, bar = rest
        o_smem = p_smem if shared_o else o_buffer[0]
        b, h, j, s = (lax.axis_index(n) for n in ("b", "h", "j", "s"))
        cols = pl.ds(j * width, width)

        def prologue(intra_smem, rows_smem, sdec_smem, st_smem):
            load_tables(h, [(intra_gmem, intra_smem), (rows_gmem, rows_smem), (sdec_gmem, sdec_smem)], bar)
            plgpu.copy_gmem_to_smem(s_in_gmem.at[s, b, h, :, cols], st_smem, bar.at[3])
            plgpu.barrier_wait(bar.at[3])
            values = (plgpu.layout_cast(intra_smem[...], wgmma_layout), vector(rows_smem, 0),
                      decay_vectors(rows_smem, sdec_smem), plgpu.layout_cast(st_smem[...], wgmma_layout))
            plgpu.commit_smem()  # every warp has read the tables before the memory is reused
            return values
        intra_tab, row_decay, (full, tail), state = pl.run_scoped(
            prologue, plgpu.SMEM((C, C), jnp.float32), plgpu.SMEM((3, C), jnp.float32),
            plgpu.SMEM((2, D), jnp.float32), plgpu.SMEM((D, width), jnp.float32))
        first = s * per_seg

        def chunk(idx, q_smem, k_smem, v_smem, state):
            state = plgpu.layout_cast(state, wgmma_layout)
            s_smem[...] = state.astype(jnp.bfloat16)
            k_decay, chunk_decay = pick(first + idx[0] == n_chunks - 1, full, tail)
            w_smem[...] = (load_tile(v_smem) * k_decay[:, None]).astype(jnp.bfloat16)
            plgpu.commit_smem()
            k_t = k_smem.transpose((1, 0))

            def inter_and_scores(acc_o, acc_p):  # two independent wgmmas in flight together
                plgpu.wgmma(acc_o, q_smem, s_smem)
                plgpu.wgmma(acc_p, q_smem, k_t)
                return acc_o[...], acc_p[...]
            o, p = pl.run_scoped(inter_and_scores, plgpu.ACC((C, width), jnp.float32),
                                 plgpu.ACC((C, C), jnp.float32))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous output tile has left
            p_smem[...] = (p * intra_tab).astype(jnp.bfloat16)
            plgpu.commit_smem()

            def intra_and_update(accs):
                acc_o, acc_s = accs
                plgpu.wgmma(acc_o, p_smem, v_smem)
                plgpu.wgmma(acc_s, k_t, w_smem)
            o, state = pl.run_state(intra_and_update)(
                (plgpu.ACC.init(o * row_decay[:, None]), plgpu.ACC.init(state * chunk_decay[:, None])))
            o_smem[...] = (o * scale).astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[b, pl.ds((first + idx[0]) * C, C), h, cols])
            return plgpu.layout_cast(state, wgmma_layout)

        state = plgpu.emit_pipeline(
            chunk, grid=(per_seg,),
            in_specs=[plgpu.BlockSpec((C, D), lambda c: (first + c, 0)),
                      plgpu.BlockSpec((C, D), lambda c: (first + c, 0)),
                      plgpu.BlockSpec((C, width), lambda c: (first + c, 0))],
            max_concurrent_steps=stages,
            init_carry=state,
        )(q_gmem.at[b, :, h], k_gmem.at[b, :, h], v_gmem.at[b, :, h, cols])
        plgpu.wait_smem_to_gmem(0)

        @pl.when(s == n_seg - 1)
        def _():
            store_state(state, s_out_gmem.at[b, h, :, cols])

    o, final_state = plgpu.kernel(
        output_body,
        out_type=(jax.ShapeDtypeStruct((B, n_chunks * C, H, Dv), q.dtype),
                  jax.ShapeDtypeStruct((B, H, D, Dv), jnp.float32)),
        scratch_types=(
            plgpu.SMEM((D, width), jnp.bfloat16),
            plgpu.SMEM((C, C), jnp.bfloat16),
            plgpu.SMEM((C, width), jnp.bfloat16),
            *([] if shared_o else [plgpu.SMEM((C, width), jnp.bfloat16)]),
            plgpu.Barrier(num_barriers=4),
        ),
        grid=(B, H, col_groups, n_seg), grid_names=("b", "h", "j", "s"), compiler_params=params,
    )(q, k, v, intra, rows, sdec, seg_states)
    return o[:, :T], final_state
