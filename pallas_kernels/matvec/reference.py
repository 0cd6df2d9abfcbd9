"""Plain-jnp reference of `matvec`: every row group through its chosen weight matrix."""

import jax
import jax.numpy as jnp


def matvec(x, w, ids):
    """x: [X, M, K]; w: [E, K, N] or a tuple of such stacks, addressed as their concatenation;
    ids: [P] int32 in [0, E), P a multiple of X -> [P, M, N] float32, out[p] = x[p // (P / X)] @
    w[ids[p]] accumulated in float32 (at full float32 precision where an operand is float32)."""
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
