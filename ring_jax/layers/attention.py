"""Softmax GQA attention with q/k RMSNorm and partial RoPE (SPEC.md §5)."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ring_jax.cache import ATTENTION_BLOCK, KVCache
from ring_jax.config import RingConfig
from ring_jax.layers.linear import Linear, einsum
from ring_jax.layers.norms import RMSNorm
from ring_jax.layers.rope import apply_rope

# The largest float32 score matrix [B, H, T, L] computed whole; longer caches go block by block.
SCORE_BYTES = 1 << 30


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


def cached_attention(q: jax.Array, kv: KVCache, q_slots: jax.Array, start: jax.Array) -> jax.Array:
    """Softmax attention of new queries over a cache that already holds their keys.

    q: [B, T, H, D], query i at slot q_slots[i] (q_slots: [T] int32, increasing); kv: the layer's
    cache [B, L, Hkv, D]; start: [B] first real slot of each sequence. Query t reads the slots
    [start[b], slot_t]; a padding query (slot_t < start[b]) reads only its own slot.

    The numerics of `causal_attention` (float32 scores and softmax, probabilities rounded to
    q.dtype before the product with v) in two passes over blocks of ATTENTION_BLOCK slots, so that
    no [T, L] score matrix is ever whole (unless it takes at most SCORE_BYTES, as when decoding:
    then it is one block and there is no loop): pass one takes each row's max and sum of exponentials
    (the sum rescaled when the max grows), pass two the normalised probabilities times v. Only
    the blocks up to the last query's slot are read.
    Returns [B, T, H, D] in q.dtype.
    """
    B, T, H, D = q.shape
    L, Hkv = kv.keys.shape[1], kv.keys.shape[2]
    block = L if B * T * H * L * 4 <= SCORE_BYTES or L <= ATTENTION_BLOCK else ATTENTION_BLOCK
    qg = q.reshape(B, T, Hkv, H // Hkv, D)

    def scores(i):                                              # [B, Hkv, G, T, block] float32
        keys = lax.dynamic_slice_in_dim(kv.keys, i * block, block, axis=1)
        s = einsum("btkgd,bskd->bkgts", qg, keys, jnp.float32) * (D ** -0.5)
        slots = i * block + jnp.arange(block)
        seen = ((slots[None, None, :] >= start[:, None, None]) & (slots[None, None, :] <= q_slots[None, :, None])
                | (slots[None, None, :] == q_slots[None, :, None]))               # [B, T, block]
        return jnp.where(seen[:, None, None], s, -jnp.inf)

    def max_and_sum(i, carry):                                 # running max, sum rescaled to it
        m, total = carry
        s = scores(i)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)        # rows with nothing seen yet
        total = total * jnp.exp(m - shift) + jnp.sum(jnp.exp(s - shift[..., None]), axis=-1)
        return m_new, total

    def weighted_values(i, acc, m, total):
        probs = (jnp.exp(scores(i) - m[..., None]) / total[..., None]).astype(q.dtype)
        values = lax.dynamic_slice_in_dim(kv.values, i * block, block, axis=1)
        return acc + einsum("bkgts,bskd->btkgd", probs, values, jnp.float32)

    m0 = jnp.full((B, Hkv, H // Hkv, T), -jnp.inf)
    acc0 = jnp.zeros((B, T, Hkv, H // Hkv, D), jnp.float32)
    if L == block:                          # one block: no loop (a decode step stays loop-free)
        m, total = max_and_sum(0, (m0, jnp.zeros_like(m0)))
        out = weighted_values(0, acc0, m, total)
    else:                                   # only the blocks up to the last query's slot
        n_blocks = q_slots[-1] // block + 1
        m, total = lax.fori_loop(0, n_blocks, max_and_sum, (m0, jnp.zeros_like(m0)))
        out = lax.fori_loop(0, n_blocks, lambda i, acc: weighted_values(i, acc, m, total), acc0)
    return out.astype(q.dtype).reshape(B, T, H, D)


class SoftmaxAttention(nnx.Module):
    """query_key_value -> split [H | Hkv | Hkv] heads -> q/k RMSNorm -> RoPE -> attention -> dense."""

    def __init__(self, config: RingConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = D = config.head_dim
        width = (self.num_heads + 2 * self.num_kv_heads) * D
        self.query_key_value = Linear(config.hidden_size, width, axes=("embed", "fused"), dtype=dtype, rngs=rngs)
        self.query_layernorm = RMSNorm(D, config.rms_norm_eps, dtype=dtype)
        self.key_layernorm = RMSNorm(D, config.rms_norm_eps, dtype=dtype)
        self.dense = Linear(self.num_heads * D, config.hidden_size, axes=("heads", "embed"), dtype=dtype,
                            rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv: KVCache | None = None,
                 cursor: jax.Array | None = None, start: jax.Array | None = None):
        """x: [B, T, hidden]; cos, sin: [T, rotary_dim] or [B, T, rotary_dim].

        Without a cache: the causal forward, -> [B, T, hidden]. With kv (this layer's cache), cursor
        ([] int32, the slot of x's first token) and start ([B]): x's keys and values are written at
        slots cursor..cursor+T-1 and the queries read the cache, -> ([B, T, hidden], new kv).
        """
        B, T, _ = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = self.query_key_value(x).reshape(B, T, H + 2 * Hkv, self.head_dim)
        q, k, v = jnp.split(qkv, [H, H + Hkv], axis=2)
        q = apply_rope(self.query_layernorm(q), cos, sin)
        k = apply_rope(self.key_layernorm(k), cos, sin)
        if kv is None:
            return self.dense(causal_attention(q, k, v).reshape(B, T, H * self.head_dim))
        kv = KVCache(lax.dynamic_update_slice_in_dim(kv.keys, k.astype(kv.keys.dtype), cursor, axis=1),
                     lax.dynamic_update_slice_in_dim(kv.values, v.astype(kv.values.dtype), cursor, axis=1))
        o = cached_attention(q, kv, cursor + jnp.arange(T, dtype=jnp.int32), start)
        return self.dense(o.reshape(B, T, H * self.head_dim)), kv
