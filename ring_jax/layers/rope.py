"""Partial NeoX rotary embedding, default and YaRN, as transformers 4.56.1 computes it (docs/SPEC.md §4).

One (cos, sin) table per forward is shared by every layer, softmax and linear alike. The inverse
frequencies are host constants computed in float32 the way transformers does; the angles are
float32 and cos/sin are rounded to the activation dtype before they touch q and k.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.config import RingConfig


def rope_frequencies(config: RingConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [rotary_dim // 2] float32, attention_scaling) for the config's rope type."""
    dim = config.rotary_dim
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)       # float32, as torch
    # torch's float32 pow rounds the exact power (mostly); numpy's float32 pow does not always.
    pos_freqs = (np.float64(np.float32(config.rope_theta)) ** exponents.astype(np.float64)).astype(np.float32)
    if config.rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    return _yarn_frequencies(config.rope_scaling, config.max_position_embeddings, dim,
                             float(config.rope_theta), pos_freqs)


def _yarn_frequencies(scaling: dict, max_position_embeddings: int, dim: int, base: float,
                      pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    """transformers 4.56.1 `_compute_yarn_parameters`: blend of interpolated and extrapolated
    frequencies along a linear ramp between the correction dims, plus the attention factor."""
    factor = float(scaling["factor"])
    original_max = scaling.get("original_max_position_embeddings") or max_position_embeddings
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = np.float32(1) - ramp.astype(np.float32)
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = (inv_interpolation * (np.float32(1) - extrapolation_weight)
                + inv_extrapolation * extrapolation_weight)
    return inv_freq.astype(np.float32), attention_factor


def rope_tables(config: RingConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [..., rotary_dim] in `dtype` for integer positions [...]."""
    inv_freq, scaling = rope_frequencies(config)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scaling != 1.0:
        cos, sin = cos * jnp.float32(scaling), sin * jnp.float32(scaling)
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first rotary_dim channels of every head (rotate_half style); the rest pass.

    x: [B, T, N, D]; cos, sin: [B, T, rotary_dim] or [T, rotary_dim].
    """
    rd = cos.shape[-1]
    cos, sin = cos[..., None, :], sin[..., None, :]     # broadcast over heads
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
