"""RMSNorm and GroupRMSNorm with the HF numerics (SPEC.md §3, §6.4, §10.2).

Statistics are taken in float32 and the normalised value is rounded to the input dtype *before*
the multiply by the weight, as `BailingMoeV2RMSNorm` does (`pallas_kernels.norm.reference`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels.norm.reference import normalize
from ring_jax.sharding import in_mesh


class RMSNorm(nnx.Module):
    """weight * normalize(x) over the last axis; weight: [dim]."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...] * normalize(x, self.eps)

    def add(self, x: jax.Array, delta: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """The residual add before a pre-norm block: (x + delta, this norm of it); delta None
        normalises x. A decode step's few rows take one fused kernel on a Hopper GPU (not under
        a mesh, where XLA partitions the jnp ops)."""
        return pallas_kernels.add_rms_norm(x, delta, self.weight[...], eps=self.eps,
                                           backend="reference" if in_mesh() else "auto")


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
        return self.weight[...] * normalize(grouped, self.eps).reshape(x.shape)
