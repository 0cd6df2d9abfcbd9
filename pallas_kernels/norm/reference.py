"""Plain-jnp reference of `add_rms_norm`: the residual add, then RMSNorm with the HF numerics
(SPEC.md §3, §10.2): statistics in float32, the normalised value rounded to the input dtype before
the multiply by the weight."""

import jax
import jax.numpy as jnp


def normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, computed in float32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype)


def add_rms_norm(x, delta, weight, *, eps):
    """x, delta: [..., K] (delta may be None); weight: [K] -> (x + delta, weight * normalize(x +
    delta)), each in x's dtype."""
    if delta is not None:
        x = x + delta
    return x, weight * normalize(x, eps)
