"""Linear projection without bias: kernel [in, out] (the transpose of torch's weight)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from ring_jax import backends
from ring_jax.layers.norms import norm_operands
from ring_jax.layers.stack import StackSlice, read
from ring_jax.sharding import param


def einsum(spec: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """jnp.einsum with float32 accumulation, rounded to `out_dtype` (default x.dtype).

    float32 inputs use full-precision passes (a GPU would otherwise use TF32); bf16 inputs use the
    native bf16 MMA with a float32 accumulator, as torch does.
    """
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jnp.einsum(spec, x, w, precision=precision, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def matmul(x, w, out_dtype=None) -> jax.Array:
    """x [..., K] (an array or a `Normed`) @ w [K, N] (an array or a `StackSlice`), as `einsum`;
    a decode step's few rows may take the matvec kernel (`backends.projection_matvec`), which
    reads a stacked layer's weights in their stack and normalises a Normed's rows itself."""
    K, N = w.shape
    rows = math.prod(x.shape[:-1])
    if backends.projection_matvec(x, w):
        rows_in, norm = norm_operands(x)
        if isinstance(w, StackSlice):
            y = pallas_kernels.matvec(rows_in.reshape(1, rows, K), w.stack, w.indices(), **norm)
        else:
            y = pallas_kernels.matvec(rows_in.reshape(1, rows, K), w[None], **norm)
        return y.reshape(*x.shape[:-1], N).astype(out_dtype or x.dtype)
    return einsum("...k,kn->...n", read(x), read(w), out_dtype)


class Linear(nnx.Module):
    """y = x @ kernel; kernel: [in_features, out_features] with logical axes `axes`. lora: None, or
    a `ring_jax.lora.LoRA` adapter whose update is added (fine-tuning)."""

    def __init__(self, in_features: int, out_features: int, *, axes=(None, None), dtype, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32)
        self.kernel = param((init / in_features ** 0.5).astype(dtype), axes)
        self.lora = nnx.data(None)

    def __call__(self, x) -> jax.Array:
        """x: [..., in] (an array or a `Normed`) -> [..., out] in x's dtype."""
        y = matmul(x, self.kernel.get_value())
        if self.lora is None:
            return y
        return (y.astype(jnp.float32) + self.lora(x)).astype(y.dtype)
