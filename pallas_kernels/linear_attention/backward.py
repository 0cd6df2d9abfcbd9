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
  states would need a factor exp(-g), which overflows for a steep decay).
The decay's gradient is the jnp reference's (autodiff, float32 inside). A closed form exists,
Σ_t n_t (do_t . o_t) - Σ_u n_u (dk_u . k_u) + N <dS_N, S_N>, but it is a small difference of two
sums that grow with T, over the kernel's bf16 outputs: rounding swamps it. The reference runs only
where something differentiates the decay; XLA drops it otherwise (the model's decays are
constants).
"""

from typing import Callable

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def differentiable(scan: Callable, reference: Callable, scale: float) -> Callable:
    """scan(q, k, v, log_decay, initial_state, mask) -> (o, final_state), a linear-attention kernel
    at the given scale (shapes as `reference.linear_attention`; the backward pass also calls it
    with the widths of q and v swapped), made differentiable in q, k, v and initial_state by the
    three scans above, and in log_decay by reference (the same signature: the jnp reference at
    this scale). Returns
    f(q, k, v, log_decay, initial_state, mask) -> (o, final_state)."""

    @jax.custom_vjp
    def f(q, k, v, log_decay, initial_state, mask):
        return scan(q, k, v, log_decay, initial_state, mask)

    def forward(q, k, v, log_decay, initial_state, mask):
        return f(q, k, v, log_decay, initial_state, mask), (q, k, v, log_decay, initial_state, mask)

    def backward(residuals, cotangents):
        q, k, v, log_decay, initial_state, mask = residuals
        do, d_final = cotangents
        B, T, H, _ = q.shape
        valid = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        g = log_decay.astype(jnp.float32)                                   # [H]
        n = jnp.cumsum(valid, axis=1).astype(jnp.float32)                   # [B, T] valid tokens up to t
        total = n[:, -1]                                                    # [B]

        def flip_time(x):
            return None if x is None else jnp.flip(x, axis=1)

        s0_t = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)
        dq, _ = scan(do, v, k, log_decay, s0_t, mask)
        dk, _ = scan(*map(flip_time, (v, do, q)), log_decay, None, flip_time(mask))
        dv, dv_final = scan(*map(flip_time, (k, q, do)), log_decay, None, flip_time(mask))
        dk, dv = flip_time(dk), flip_time(dv)

        # Through the final state: weight exp(g (N - n_u)) on valid tokens, 0 on masked ones.
        age = jnp.where(valid, total[:, None] - n, 0)[..., None] * g         # [B, T, H]
        weight = jnp.where(valid[..., None], jnp.exp(age), 0.0)[..., None]
        d_final = d_final.astype(jnp.float32)
        dk = dk.astype(jnp.float32) + weight * jnp.einsum("bhde,bthe->bthd", d_final, v.astype(jnp.float32),
                                                          precision=_HIGHEST)
        dv = dv.astype(jnp.float32) + weight * jnp.einsum("bhde,bthd->bthe", d_final, k.astype(jnp.float32),
                                                          precision=_HIGHEST)

        d_initial = None
        if initial_state is not None:
            d_initial = (scale * jnp.exp(g)[None, :, None, None] * dv_final
                         + jnp.exp(total[:, None] * g)[..., None, None] * d_final).astype(initial_state.dtype)
        d_decay = jax.vjp(lambda decay: reference(q, k, v, decay, initial_state, mask), log_decay)[1](cotangents)[0]
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_decay, d_initial, None

    f.defvjp(forward, backward)
    return f
