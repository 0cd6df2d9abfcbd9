"""Grouped matmul in plain jnp: the reference every MoE kernel is held to (and the row gather's
and the FP8 rows' quantization's, `quantize_rows`)."""

import jax
import jax.numpy as jnp

from pallas_kernels import backend


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, scale=None, lhs_scale=None):
    """Row group g of lhs times rhs[g]: the semantics of `jax.lax.ragged_dot`.

    lhs: [M, K]; rhs: [G, K, N]; group_sizes: [G] int32 with sum <= M (rows past the sum come back
    as zeros). Returns [M, N] in preferred_element_type (default lhs.dtype; bf16 for FP8 lhs),
    accumulated in f32.
    scale: None; or FP8 weights (`pallas_kernels.backend.FP8`): rhs is float8_e4m3fn [G, N, K]
    (K-major), scale [G, N] float32, and group g's rows are (rows @ rhs[g].T, the values exact in
    lhs.dtype, accumulated in f32) * scale[g], rounded once.
    lhs_scale: None; or with FP8 weights, FP8 lhs (`pallas_kernels.backend.quantize_rows`) and its
    [M] float32 row scales: ((rows @ rhs[g].T, the FP8 products exact in f32, accumulated in f32)
    * scale[g]) * lhs_scale[:, None], rounded once.
    """
    precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    out_dtype = preferred_element_type or (jnp.bfloat16 if lhs_scale is not None else lhs.dtype)
    if lhs_scale is not None:        # every e4m3 value is a bf16 value, and their products f32 values
        lhs = lhs.astype(jnp.bfloat16)
    if scale is not None:
        rhs = jnp.swapaxes(rhs, 1, 2).astype(lhs.dtype)
    sizes = group_sizes.astype(jnp.int32)
    out = jax.lax.ragged_dot(lhs, rhs, sizes, precision=precision, preferred_element_type=jnp.float32)
    if scale is not None:            # rows past the sum: group G, scale 0 (they are zeros already)
        out = out * jnp.take(scale, row_groups(sizes, lhs.shape[0]), axis=0, mode="fill", fill_value=0)
    if lhs_scale is not None:
        out = out * lhs_scale[:, None]
    return out.astype(out_dtype)


def row_groups(group_sizes, m: int):
    """The group of each of m rows, [m] int32: g for the rows of group g, G for rows past the sum."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


@jax.checkpoint          # its gradient computes silu's float32 values again rather than keep them
def swiglu(gate_up):
    """silu(gate) * up for gate_up [..., 2 I] holding gate then up: silu computed in float32 and
    rounded once to the input dtype (as torch's bf16 activations are), the product in that dtype."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * up


def gmm_swiglu(lhs, rhs, group_sizes, *, scale=None, lhs_scale=None):
    """`swiglu(gmm(lhs, rhs, group_sizes, scale=scale, lhs_scale=lhs_scale))`: [M, N / 2] in
    lhs.dtype (bf16 for FP8 lhs)."""
    return swiglu(gmm(lhs, rhs, group_sizes, scale=scale, lhs_scale=lhs_scale))


def take_rows(x, idx):
    """x [R, H], idx [N] -> [N, H]: out[n] = x[idx[n]]."""
    return x[idx]


def quantize_rows(x):
    """x [..., K] -> (values [..., K] float8_e4m3fn, scale [...] float32): the FP8 rows,
    `pallas_kernels.backend.quantize_rows`."""
    return backend.quantize_rows(x)
