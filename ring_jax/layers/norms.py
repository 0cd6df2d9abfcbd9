"""RMSNorm and GroupRMSNorm with the HF numerics (docs/SPEC.md §3, §6.4, §10.2).

Statistics are taken in float32 and the normalised value is rounded to the input dtype *before*
the multiply by the weight, as `BailingMoeV2RMSNorm` does.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, computed in float32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """weight * normalize(x) over the last axis; weight: [dim]."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...] * _normalize(x, self.eps)


class GroupRMSNorm(nnx.Module):
    """RMSNorm over `num_groups` contiguous chunks of the last axis, then a per-channel weight.

    x: [..., dim]; weight: [dim]; each chunk of dim // num_groups channels has its own statistics.
    """

    def __init__(self, dim: int, num_groups: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.num_groups = num_groups
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        grouped = x.reshape(*x.shape[:-1], self.num_groups, x.shape[-1] // self.num_groups)
        return self.weight[...] * _normalize(grouped, self.eps).reshape(x.shape)
