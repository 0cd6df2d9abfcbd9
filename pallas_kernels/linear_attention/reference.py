"""Lightning (simple-GLA) linear attention in plain jnp: the reference every kernel is held to.

Per head h with log decay g_h < 0 and scale s (docs/SPEC.md §6.3):

    S_t = exp(g_h) * S_{t-1} + k_t^T v_t          # S: [D, Dv], float32
    o_t = s * q_t S_t

`linear_attention` evaluates this chunk by chunk: within a chunk of C tokens the output is a masked
[C, C] product plus the decayed carry-in state; across chunks a `lax.scan` carries the state. Every
decay factor is exp of a non-positive number (masked differences, never an inverse), so nothing
overflows at any length.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def linear_attention(q, k, v, log_decay, *, scale=None, initial_state=None, mask=None, chunk_size=64):
    """Causal linear attention over a whole sequence.

    q, k: [B, T, H, D]; v: [B, T, H, Dv] (bf16 or f32); log_decay: [H] f32 (negative);
    initial_state: [B, H, D, Dv] f32 or None (zeros); mask: [B, T] bool or None (all True): a
    False token (padding, on either side) neither decays nor feeds the state, and its output is 0.
    Returns (o [B, T, H, Dv] in q.dtype, final_state [B, H, D, Dv] f32).
    """
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    scale = D ** -0.5 if scale is None else scale
    g = log_decay.astype(jnp.float32)                                     # [H]
    mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    mask = jnp.pad(mask, ((0, 0), (0, pad))).reshape(B, n_chunks, C).transpose(1, 0, 2)  # [n, B, C]

    def chunked(x):  # [B, T, H, d] -> [n_chunks, B, H, C, d] float32
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(B, n_chunks, C, H, -1).transpose(1, 0, 3, 2, 4)

    causal = jnp.tril(jnp.ones((C, C), bool))

    def step(state, chunk):
        qc, kc, vc, m = chunk                                             # [B, H, C, d], [B, C]
        # Token i of the chunk has seen n_i = (valid tokens <= i) decays since the chunk began;
        # every factor below is exp(g * a non-negative count): no exponent is ever positive.
        n = jnp.cumsum(m, axis=-1).astype(jnp.float32)                    # [B, C]
        lag = n[:, :, None] - n[:, None, :]                               # [B, C, C], n_i - n_j
        gb = g[None, :, None, None]
        intra = jnp.where(causal & m[:, None, :, None] & m[:, None, None, :],
                          jnp.exp(jnp.maximum(lag, 0)[:, None] * gb), 0.0)          # [B, H, C, C]
        scores = jnp.einsum("bhid,bhjd->bhij", qc, kc, precision=_HIGHEST) * intra
        o = jnp.einsum("bhij,bhje->bhie", scores, vc, precision=_HIGHEST)
        carry = jnp.where(m[:, None, :], jnp.exp(n[:, None, :] * g[None, :, None]), 0.0)  # [B, H, C]
        o += carry[..., None] * jnp.einsum("bhid,bhde->bhie", qc, state, precision=_HIGHEST)
        total = n[:, -1]                                                  # [B] valid tokens in the chunk
        age = jnp.where(m, total[:, None] - n, 0)                         # decays after token j
        k_weight = jnp.where(m[:, None, :], jnp.exp(age[:, None, :] * g[None, :, None]), 0.0)  # [B, H, C]
        state = (jnp.exp(total[:, None] * g[None, :])[..., None, None] * state
                 + jnp.einsum("bhjd,bhje->bhde", kc * k_weight[..., None], vc, precision=_HIGHEST))
        return state, o * scale

    state0 = (jnp.zeros((B, H, D, Dv), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))
    final_state, o = jax.lax.scan(step, state0, (chunked(q), chunked(k), chunked(v), mask))
    o = o.transpose(1, 0, 3, 2, 4).reshape(B, n_chunks * C, H, Dv)[:, :T]
    return o.astype(q.dtype), final_state


def linear_attention_step(q, k, v, log_decay, state, *, scale=None):
    """A few tokens (decode or speculative) continuing from `state`.

    q, k: [B, S, H, D]; v: [B, S, H, Dv]; state: [B, H, D, Dv] f32.
    Returns (o [B, S, H, Dv] in q.dtype, new_state [B, H, D, Dv] f32).

    The S tokens are one chunk in closed form (no loop, so nothing but fused kernels inside a
    jitted decode loop): o_i = s [sum_{j<=i} exp((i-j) g) (q_i.k_j) v_j + exp((i+1) g) q_i S],
    S' = exp(S g) S + sum_j exp((S-1-j) g) k_j^T v_j.
    """
    S = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = log_decay.astype(jnp.float32)                                     # [H]
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    i = jnp.arange(S)
    lag = i[:, None] - i[None, :]
    intra = jnp.where(lag >= 0, jnp.exp(jnp.maximum(lag, 0) * g[:, None, None]), 0.0)   # [H, S, S]
    scores = jnp.einsum("bihd,bjhd->bhij", qf, kf, precision=_HIGHEST) * intra
    o = jnp.einsum("bhij,bjhe->bihe", scores, vf, precision=_HIGHEST)
    o += jnp.exp((i[:, None] + 1) * g)[None, :, :, None] * jnp.einsum(
        "bihd,bhde->bihe", qf, state, precision=_HIGHEST)
    k_weight = jnp.exp((S - 1 - i)[:, None] * g)                          # [S, H]
    new_state = (jnp.exp(S * g)[None, :, None, None] * state
                 + jnp.einsum("bjhd,bjhe->bhde", kf * k_weight[None, :, :, None], vf, precision=_HIGHEST))
    return (scale * o).astype(q.dtype), new_state


def decode_step(qkv, q_weight, k_weight, cos, sin, log_decay, state, valid, *, eps, scale=None):
    """One token per sequence of the Lightning layer, from its fused projection (docs/SPEC.md §6).

    q and k are RMS-normalised over D (float32 statistics, rounded to qkv.dtype before the weight
    multiplies), rotated on their first rotary_dim = cos.shape[-1] channels (NeoX halves, each
    product and the sum rounded to qkv.dtype), k and v are zeroed where not valid, and then
    `linear_attention_step` runs.

    qkv: [B, 3 H D] (q heads, k heads, v heads); q_weight, k_weight: [D]; cos, sin: [B, rotary_dim];
    log_decay: [H]; state: [B, H, D, D] f32; valid: [B] bool.
    Returns (o [B, H, D] in qkv.dtype, new_state [B, H, D, D] f32).
    """
    B, H, D, _ = state.shape
    q, k, v = jnp.split(qkv.reshape(B, 1, 3 * H, D), 3, axis=2)              # [B, 1, H, D] each
    r = cos.shape[-1]
    c, s = cos[:, None, None, :], sin[:, None, None, :]

    def head(x, w):
        x32 = x.astype(jnp.float32)
        x = w * (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)
        rotated = jnp.concatenate([-x[..., r // 2:r], x[..., :r // 2]], axis=-1)
        return jnp.concatenate([x[..., :r] * c + rotated * s, x[..., r:]], axis=-1)

    keep = valid[:, None, None, None]
    q, k, v = head(q, q_weight), jnp.where(keep, head(k, k_weight), 0), jnp.where(keep, v, 0)
    o, state = linear_attention_step(q, k, v, log_decay, state, scale=scale)
    return o[:, 0], state
