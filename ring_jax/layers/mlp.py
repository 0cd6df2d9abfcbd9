"""The dense SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases."""

import jax
from flax import nnx

from ring_jax.layers.linear import Linear


class MLP(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden_size, intermediate_size, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden_size, intermediate_size, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., hidden] -> [..., hidden]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
