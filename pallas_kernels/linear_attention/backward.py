"""The gradient of causal linear attention, computed by three more linear attentions.

With S_t = exp(g) S_{t-1} + k_t^T v_t and o_t = s q_t S_t (docs/SPEC.md §6.3; a masked token
neither decays nor feeds the state), a query at t reads the key at u <= t with the weight
w_tu = s exp(g (n_t - n_u)), n_t the valid tokens up to t. Each gradient is a sum of that same
shape, so the forward kernel computes it, run forward or backward in time:

    dq_t = Σ_{u<=t} w_tu (do_t . v_u) k_u  = attention(q=do, k=v, v=k)            (forward)
    dk_u = Σ_{t>=u} w_tu (v_u . do_t) q_t  = attention(q=v, k=do, v=q), reversed   (backward)
    dv_u = Σ_{t>=u} w_tu (k_u . q_t) do_t  = attention(q=k, k=q, v=do), reversed

Run on the time-reversed sequence (and mask), a causal attention sums over t >= u with the decay
counts of the pairs unchanged. The state terms:
- the initial state S0 enters o_t as s exp(g n_t) q_t S0: the dq call starts from S0^T, and
  dS0 = s exp(g) F + exp(g N) dS_N, where F, the dv call's final state, is
  Σ_t exp(g (n_t - 1)) q_t^T do_t (N: a sequence's valid tokens);
- the final state S_N holds exp(g (N - n_u)) k_u^T v_u: dk_u and dv_u gain that weight times
  dS_N v_u and dS_N^T k_u (two products in jnp: feeding them to the reversed calls as initial
  states would need a factor exp(-g), which overflows for a steep decay);
- the decay: differentiating every weight exp(g m) gives m times it, and the counts split as
  n_t - n_u, so dg = Σ_t n_t (do_t . o_t) - Σ_u n_u (dk_u . k_u) + N <dS_N, S_N>, summed over the
  batch, per head.
"""

from typing import Callable

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def differentiable(scan: Callable, scale: float) -> Callable:
    """scan(q, k, v, log_decay, initial_state, mask, scale) -> (o, final_state), a linear-attention
    kernel (shapes as `reference.linear_attention`, scale given), made differentiable in all of
    q, k, v, log_decay and initial_state by the three scans above. Returns
    f(q, k, v, log_decay, initial_state, mask) -> (o, final_state)."""

    @jax.custom_vjp
    def f(q, k, v, log_decay, initial_state, mask):
        return scan(q, k, v, log_decay, initial_state, mask, scale)

    def forward(q, k, v, log_decay, initial_state, mask):
        o, final = f(q, k, v, log_decay, initial_state, mask)
        return (o, final), (q, k, v, log_decay, initial_state, mask, o, final)

    def backward(residuals, cotangents):
        q, k, v, log_decay, initial_state, mask, o, final = residuals
        do, d_final = cotangents
        B, T, H, _ = q.shape
        valid = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        g = log_decay.astype(jnp.float32)                                   # [H]
        n = jnp.cumsum(valid, axis=1).astype(jnp.float32)                   # [B, T] valid tokens up to t
        total = n[:, -1]                                                    # [B]

        def reversed_(x):
            return None if x is None else jnp.flip(x, axis=1)

        s0_t = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)
        dq, _ = scan(do, v, k, log_decay, s0_t, mask, scale)
        dk, _ = scan(*map(reversed_, (v, do, q)), log_decay, None, reversed_(mask), scale)
        dv, f_state = scan(*map(reversed_, (k, q, do)), log_decay, None, reversed_(mask), scale)
        dk, dv = jnp.flip(dk, axis=1), jnp.flip(dv, axis=1)

        # Through the final state: weight exp(g (N - n_u)) on valid tokens, 0 on masked ones.
        age = jnp.where(valid, total[:, None] - n, 0)[..., None] * g         # [B, T, H]
        weight = jnp.where(valid[..., None], jnp.exp(age), 0.0)[..., None]
        d_final = d_final.astype(jnp.float32)
        dk = dk.astype(jnp.float32) + weight * jnp.einsum("bhde,bthe->bthd", d_final, v.astype(jnp.float32),
                                                          precision=_HIGHEST)
        dv = dv.astype(jnp.float32) + weight * jnp.einsum("bhde,bthd->bthe", d_final, k.astype(jnp.float32),
                                                          precision=_HIGHEST)

        d_decay = (jnp.einsum("bt,bthe,bthe->h", n, do.astype(jnp.float32), o.astype(jnp.float32),
                              precision=_HIGHEST)
                   - jnp.einsum("bt,bthd,bthd->h", n, dk, k.astype(jnp.float32), precision=_HIGHEST)
                   + jnp.einsum("b,bhde,bhde->h", total, d_final, final, precision=_HIGHEST))
        d_initial = None
        if initial_state is not None:
            d_initial = (scale * jnp.exp(g)[None, :, None, None] * f_state
                         + jnp.exp(total[:, None] * g)[..., None, None] * d_final).astype(initial_state.dtype)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_decay.astype(log_decay.dtype),
                d_initial, None)

    f.defvjp(forward, backward)
    return f
