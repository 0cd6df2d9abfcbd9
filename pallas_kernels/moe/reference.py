"""Grouped matmul in plain jnp: the reference every MoE kernel is held to."""

import jax
import jax.numpy as jnp


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """Row group g of lhs times rhs[g]: the semantics of `jax.lax.ragged_dot`.

    lhs: [M, K]; rhs: [G, K, N]; group_sizes: [G] int32 with sum <= M (rows past the sum come back
    as zeros). Returns [M, N] in preferred_element_type (default lhs.dtype), accumulated in f32.
    """
    precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), precision=precision,
                             preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs.dtype)


def swiglu(gate_up):
    """silu(gate) * up for gate_up [..., 2 I] holding gate then up: silu computed in float32 and
    rounded once to the input dtype (as torch's bf16 activations are), the product in that dtype."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * up


def gmm_swiglu(lhs, rhs, group_sizes):
    """`swiglu(gmm(lhs, rhs, group_sizes))`: [M, N / 2] in lhs.dtype."""
    return swiglu(gmm(lhs, rhs, group_sizes))


def take_rows(x, idx):
    """x [R, H], idx [N] -> [N, H]: out[n] = x[idx[n]]."""
    return x[idx]
