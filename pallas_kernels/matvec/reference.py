"""Plain-jnp reference of `matvec`: every row group through its chosen weight matrix, its rows
RMS-normalised first where a norm is given."""

import jax
import jax.numpy as jnp


def normalize(x, eps: float):
    """x * rsqrt(mean(x^2) + eps) over the last axis, computed in float32, returned in x.dtype (the
    HF `BailingMoeV2RMSNorm` rounds before its weight multiplies)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rms_norm(x, weight, eps: float):
    """weight [K] * normalize(x [..., K]): HF RMSNorm."""
    return weight * normalize(x, eps)


def matvec(x, w, ids, norm_weight=None, norm_index=None, *, eps=None):
    """x: [X, M, K]; w: [E, K, N] or a tuple of such stacks, addressed as their concatenation;
    ids: [P] int32 in [0, E), P a multiple of X -> [P, M, N] float32, out[p] = x[p // (P / X)] @
    w[ids[p]] accumulated in float32 (at full float32 precision where an operand is float32).
    norm_weight: None, or x's rows go through `rms_norm` with weight norm_weight[norm_index]
    (norm_weight: [L, K], norm_index: [] int32) first."""
    if norm_weight is not None:
        x = rms_norm(x, jax.lax.dynamic_index_in_dim(norm_weight, norm_index, keepdims=False), eps)
    stacks = w if isinstance(w, tuple) else (w,)
    P, X = ids.shape[0], x.shape[0]
    precision = jax.lax.Precision.HIGHEST if jnp.float32 in (x.dtype, stacks[0].dtype) else None
    rows = jnp.repeat(x, P // X, axis=0)
    out, first = None, 0
    for stack in stacks:          # every pair through every stack, kept where the stack holds it
        local = ids - first
        y = jnp.einsum("pmk,pkn->pmn", rows, jnp.take(stack, jnp.clip(local, 0, stack.shape[0] - 1), axis=0),
                       precision=precision, preferred_element_type=jnp.float32)
        out = y if out is None else jnp.where((local >= 0)[:, None, None], y, out)
        first += stack.shape[0]
    return out
