"""Softmax GQA attention with q/k RMSNorm and partial RoPE (SPEC.md §5)."""

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import RingConfig
from ring_jax.layers.linear import Linear, einsum
from ring_jax.layers.norms import RMSNorm
from ring_jax.layers.rope import apply_rope


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention, GQA: query head h reads kv head h // (H // Hkv).

    q: [B, T, H, D]; k, v: [B, T, Hkv, D]. Scores and softmax in float32, probabilities rounded to
    q.dtype before the product with v (float32 accumulation). Returns [B, T, H, D] in q.dtype.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, H // Hkv, D)
    scores = einsum("btkgd,bskd->bkgts", qg, k, jnp.float32) * (D ** -0.5)
    causal = jnp.tril(jnp.ones((T, T), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1).astype(q.dtype)
    return einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, D)


class SoftmaxAttention(nnx.Module):
    """query_key_value -> split [H | Hkv | Hkv] heads -> q/k RMSNorm -> RoPE -> attention -> dense."""

    def __init__(self, config: RingConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = D = config.head_dim
        width = (self.num_heads + 2 * self.num_kv_heads) * D
        self.query_key_value = Linear(config.hidden_size, width, dtype=dtype, rngs=rngs)
        self.query_layernorm = RMSNorm(D, config.rms_norm_eps, dtype=dtype)
        self.key_layernorm = RMSNorm(D, config.rms_norm_eps, dtype=dtype)
        self.dense = Linear(self.num_heads * D, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x: [B, T, hidden]; cos, sin: [T, rotary_dim] or [B, T, rotary_dim] -> [B, T, hidden]."""
        B, T, _ = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = self.query_key_value(x).reshape(B, T, H + 2 * Hkv, self.head_dim)
        q, k, v = jnp.split(qkv, [H, H + Hkv], axis=2)
        q = apply_rope(self.query_layernorm(q), cos, sin)
        k = apply_rope(self.key_layernorm(k), cos, sin)
        return self.dense(causal_attention(q, k, v).reshape(B, T, H * self.head_dim))
