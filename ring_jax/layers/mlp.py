"""The dense SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases; gate and up are one matmul."""

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.moe.reference import swiglu
from ring_jax.layers.linear import Linear


class MLP(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, rngs: nnx.Rngs):
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, axes=("embed", "fused"),
                                   dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate_size, hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., hidden] -> [..., hidden]."""
        return self.down_proj(swiglu(self.gate_up_proj(x)))


def rounded(fn, x: jax.Array) -> jax.Array:
    """fn(x) computed in float32 and rounded once to x.dtype, as torch's bf16 activations are. The
    gradient computes fn's float32 values again from x (jax.checkpoint), where autodiff would keep
    them for the backward pass: twice x's bytes (bf16), per layer of a training step."""
    return jax.checkpoint(lambda x: fn(x.astype(jnp.float32)).astype(x.dtype))(x)
