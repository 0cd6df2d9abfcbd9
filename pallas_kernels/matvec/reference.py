"""Plain-jnp reference of `matvec`: every row group through its chosen weight matrix."""

import jax
import jax.numpy as jnp


def matvec(x, w, ids):
    """x: [X, M, K]; w: [E, K, N]; ids: [P] int32 in [0, E), P a multiple of X -> [P, M, N]
    float32, out[p] = x[p // (P / X)] @ w[ids[p]] accumulated in float32 (at full float32
    precision where an operand is float32)."""
    P, X = ids.shape[0], x.shape[0]
    precision = jax.lax.Precision.HIGHEST if jnp.float32 in (x.dtype, w.dtype) else None
    return jnp.einsum("pmk,pkn->pmn", jnp.repeat(x, P // X, axis=0), jnp.take(w, ids, axis=0),
                      precision=precision, preferred_element_type=jnp.float32)
