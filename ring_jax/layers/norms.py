"""RMSNorm and GroupRMSNorm with the HF numerics (docs/SPEC.md §3, §6.4, §10.2).

Statistics are taken in float32 and the normalised value is rounded to the input dtype *before*
the multiply by the weight, as `BailingMoeV2RMSNorm` does (`pallas_kernels.matvec.reference`
holds the formula, which the matvec kernel's own norm follows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.matvec import reference
from ring_jax.layers.stack import read, stack_and_index

# The norm's formula, its backward pass recomputing the float32 statistics from x: autodiff of the
# formula would keep float32 copies of x for it, four times x's bf16 bytes, and a decoder layer
# normalises its activations five times or more (training without remat keeps every layer's).
normalize = jax.checkpoint(reference.normalize, static_argnums=(1,))


def rms_norm(x, weight, eps: float):
    """weight [K] * normalize(x [..., K]): HF RMSNorm."""
    return weight * normalize(x, eps)


class Normed:
    """RMSNorm of x not yet computed: x [..., K], the norm's weight (an array [K] or a StackSlice
    of a stack of them), its eps, and the dtype the result is cast to (None: the norm's own).

    A pre-norm block hands its sublayer this rather than the normalised array: the matvec kernel
    normalises its rows itself (`ring_jax.layers.linear.matmul`), where in a decode step the norm
    would be two launches of its own. Every other use reads it (`read`), which computes it as
    `RMSNorm` does.
    """

    def __init__(self, x: jax.Array, weight, eps: float, cast=None):
        self.x, self.weight, self.eps, self.cast = x, weight, eps, cast

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    @property
    def ndim(self) -> int:
        return self.x.ndim

    @property
    def dtype(self):
        return jnp.dtype(self.cast or jnp.result_type(self.weight.dtype, self.x.dtype))

    def read(self) -> jax.Array:
        return rms_norm(self.x, read(self.weight), self.eps).astype(self.dtype)

    def astype(self, dtype) -> Normed:
        return Normed(self.x, self.weight, self.eps, dtype)

    def reshape(self, *shape) -> Normed:
        return Normed(self.x.reshape(*shape), self.weight, self.eps, self.cast)


def norm_operands(x) -> tuple[jax.Array, dict]:
    """x (an array or a `Normed`) as `pallas_kernels.matvec` takes it: (the rows, the norm's
    keyword arguments, empty for an array)."""
    if not isinstance(x, Normed):
        return x, {}
    weight, index = stack_and_index(x.weight)
    return x.x, dict(norm_weight=weight, norm_index=index, norm_eps=x.eps)


class RMSNorm(nnx.Module):
    """weight * normalize(x) over the last axis; weight: [dim]."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)

    def deferred(self, x: jax.Array) -> Normed:
        """The norm of x as a `Normed`, computed where it is used."""
        return Normed(x, self.weight.get_value(), self.eps)


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
