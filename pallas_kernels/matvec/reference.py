"""Plain-jnp reference of `matvec`: every row group through its chosen weight matrix (an FP8
matrix's float32 sums scaled per output column), its rows RMS-normalised first where a norm is
given."""

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


def gather(stacks, ids):
    """stacks: [E, ...] or a tuple of such stacks, addressed as their concatenation; ids: [P] int32
    in [0, E) -> [P, ...]: entry ids[p] of each, gathered per stack and kept where the stack holds
    it (the stacks can be every layer's: they are not concatenated)."""
    out, first = None, 0
    for stack in stacks if isinstance(stacks, tuple) else (stacks,):
        local = ids - first
        rows = jnp.take(stack, jnp.clip(local, 0, stack.shape[0] - 1), axis=0)
        out = rows if out is None else jnp.where((local >= 0).reshape(-1, *[1] * (rows.ndim - 1)), rows, out)
        first += stack.shape[0]
    return out


def matvec(x, w, ids, norm_weight=None, norm_index=None, *, scale=None, eps=None):
    """x: [X, M, K]; w: [E, K, N] or a tuple of such stacks, addressed as their concatenation;
    ids: [P] int32 in [0, E), P a multiple of X -> [P, M, N] float32, out[p] = x[p // (P / X)] @
    w[ids[p]] accumulated in float32 (at full float32 precision where an operand is float32).
    scale: None; or [E, N] float32 (a tuple of stacks like w's), and w holds float8_e4m3fn
    [E, N, K] (K-major): out[p] = (x[p // (P / X)] @ w[ids[p]].T) * scale[ids[p]], the fp8 values
    taken exactly in x's dtype and the scale applied to the float32 sums.
    norm_weight: None, or x's rows go through `rms_norm` with weight norm_weight[norm_index]
    (norm_weight: [L, K], norm_index: [] int32) first."""
    if norm_weight is not None:
        x = rms_norm(x, jax.lax.dynamic_index_in_dim(norm_weight, norm_index, keepdims=False), eps)
    stacks = w if isinstance(w, tuple) else (w,)
    P, X = ids.shape[0], x.shape[0]
    precision = jax.lax.Precision.HIGHEST if jnp.float32 in (x.dtype, stacks[0].dtype) else None
    rows = jnp.repeat(x, P // X, axis=0)
    layout = "pmk,pkn->pmn" if scale is None else "pmk,pnk->pmn"
    out, first = None, 0
    for stack in stacks:          # every pair through every stack, kept where the stack holds it
        local = ids - first
        matrices = jnp.take(stack, jnp.clip(local, 0, stack.shape[0] - 1), axis=0)
        if scale is not None:                                 # exact: every e4m3 value is a bf16 value
            matrices = matrices.astype(x.dtype)
        y = jnp.einsum(layout, rows, matrices, precision=precision, preferred_element_type=jnp.float32)
        out = y if out is None else jnp.where((local >= 0)[:, None, None], y, out)
        first += stack.shape[0]
    return out if scale is None else out * gather(scale, ids)[:, None, :]
