"""Softmax GQA attention with q/k RMSNorm and partial RoPE (docs/SPEC.md §5)."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import pallas_kernels
from pallas_kernels.softmax_attention.reference import visible
from ring_jax import backends
from ring_jax.cache import ATTENTION_BLOCK, KV_AXES, Cache, KVCache
from ring_jax.config import RingConfig
from ring_jax.layers.linear import Linear, einsum
from ring_jax.layers.norms import RMSNorm
from ring_jax.layers.rope import apply_rope
from ring_jax.layers.stack import StackSlice, slice_in_dim
from ring_jax.sharding import constrain, on_blocks

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
        keys = slice_in_dim(kv.keys, i * block, block, axis=1)
        s = einsum("btkgd,bskd->bkgts", qg, keys, jnp.float32) * (D ** -0.5)
        seen = visible(i * block + jnp.arange(block), q_slots, start)                # [B, T, block]
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
        values = slice_in_dim(kv.values, i * block, block, axis=1)
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


def _shift_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """x: [B, T, ...]; row b moved `shift[b]` places towards the front (its last rows repeat)."""
    idx = jnp.minimum(jnp.arange(x.shape[1])[None, :] + shift[:, None], x.shape[1] - 1)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def flash_cached_attention(q: jax.Array, kv: KVCache, cursor: jax.Array, start: jax.Array) -> jax.Array:
    """`cached_attention` for queries at slots cursor..cursor+T-1, by cuDNN's flash attention (GPU).

    Two cuDNN calls, merged by their float32 log-sum-exps: the chunk's own keys (causal), and the
    keys before it. Left padding becomes cuDNN's sequence lengths by moving each sequence's real
    tokens to the front: the chunk's rows by max(start - cursor, 0), the cache's by start. A
    padding query reads its own slot only, as in `cached_attention`. The numerics are flash
    attention's (float32 scores and running softmax; unnormalised probabilities rounded to q.dtype
    before the product with v), as PyTorch's SDPA flash kernel computes them; the two parts'
    outputs are rounded to q.dtype before the merge. Inference only: JAX's backward pass of the
    cuDNN call ignores the log-sum-exps' cotangent, so gradients through the merge are wrong.
    q: [B, T, H, D] bf16 or f16; kv: the layer's cache [B, L, Hkv, D] in q's dtype, holding the
    chunk's keys; cursor: [] int32; start: [B]. Returns [B, T, H, D] in q.dtype.
    """
    dot_product_attention, MaskType = backends.cudnn_attention()
    B, T, H, D = q.shape
    chunk = [lax.dynamic_slice_in_dim(c, cursor, T, axis=1) for c in (kv.keys, kv.values)]
    pad = jnp.clip(start - cursor, 0, T).astype(jnp.int32)          # padding rows of the chunk
    n_own = T - pad
    n_before = jnp.maximum(cursor - start, 0).astype(jnp.int32)     # real slots before the chunk

    def attend(q, k, v, q_len, kv_len, mask):                       # -> o [B, T, H, D], lse [B, T, H] f32
        o, lse = dot_product_attention(q, k, v, q_seqlen=q_len, kv_seqlen=kv_len, scale=D ** -0.5,
                                       mask_type=mask, return_residual=True)
        return o, jnp.swapaxes(lse, 1, 2)

    own_q, own_k, own_v = (_shift_rows(x, pad) for x in (q, *chunk))
    o_own, lse_own = attend(own_q, own_k, own_v, n_own, n_own, MaskType.PADDING_CAUSAL)
    back = jnp.maximum(jnp.arange(T)[None, :] - pad[:, None], 0)    # undo the shift
    o_own = jnp.take_along_axis(o_own, back[:, :, None, None], axis=1)
    lse_own = jnp.take_along_axis(lse_own, back[:, :, None], axis=1)

    # At least one key per row, and no lax.cond (on GPU it syncs with the host): rows with
    # nothing before the chunk read one key and drop the result.
    k, v = (_shift_rows(c, start) for c in (kv.keys, kv.values))
    o_before, lse_before = attend(q, k, v, jnp.full((B,), T, jnp.int32), jnp.maximum(n_before, 1),
                                  MaskType.PADDING)
    seen = n_before[:, None, None] > 0
    lse_before = jnp.where(seen, lse_before, -jnp.inf)
    lse = jnp.logaddexp(lse_own, lse_before)
    out = (o_own.astype(jnp.float32) * jnp.exp(lse_own - lse)[..., None]
           + jnp.where(seen[..., None], o_before.astype(jnp.float32), 0.0) * jnp.exp(lse_before - lse)[..., None])
    Hkv = kv.keys.shape[2]
    own_value = jnp.repeat(chunk[1], H // Hkv, axis=2)              # what a padding query reads
    padding = jnp.arange(T)[None, :] < pad[:, None]
    return jnp.where(padding[:, :, None, None], own_value.astype(jnp.float32), out).astype(q.dtype)


def flash_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The cache-free causal forward by cuDNN: q [B, T, H, D], k, v [B, T, Hkv, D] -> [B, T, H, D]."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _per_block(fn, q, k, v, *rest):
    """fn(q, k, v, *rest) on each device's (batch, heads) block under a mesh (`sharding.on_blocks`).
    q: [B, T, H, D]; k, v: [B, S, Hkv, D], or stacks [n, B, S, Hkv, D]; rest: scalars (each device
    takes them whole) and [B] arrays (split as the batch)."""
    kv = "b.h." if k.ndim == 4 else ".b.h."
    layouts = ("b.h.", kv, kv) + tuple("b" if jnp.ndim(x) else "" for x in rest)
    return on_blocks(fn, q, k, v, *rest, layouts=layouts, out="b.h.", batch=q.shape[0], heads=q.shape[2],
                     kv_heads=k.shape[-2])


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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Cache | None = None,
                 slot=None, valid: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """x: [B, T, hidden] (an array or a `Normed`); cos, sin: [T, rotary_dim] or [B, T,
        rotary_dim]; slot: this layer's softmax-layer slot in the cache (int or traced [] int32).
        valid is unused: padding is read from cache.start.

        Without a cache: the causal forward. With one: x's keys and values are written at slots
        cursor..cursor+T-1 of cache.keys[slot] and cache.values[slot], and the queries read them.
        Returns ([B, T, hidden], cache).
        """
        B, T, _ = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = self.query_key_value(x).reshape(B, T, H + 2 * Hkv, self.head_dim)
        q, k, v = jnp.split(qkv, [H, H + Hkv], axis=2)
        q = apply_rope(self.query_layernorm(q), cos, sin)
        k = apply_rope(self.key_layernorm(k), cos, sin)
        if cache is None:
            o = _per_block(flash_causal_attention, q, k, v) if backends.flash_attention(q, k) else causal_attention(q, k, v)
            return self.dense(o.reshape(B, T, H * self.head_dim)), None
        cursor, start = cache.cursor, cache.start
        slot = 0 if slot is None else slot
        at = (jnp.asarray(slot, jnp.int32), 0, cursor, 0, 0)
        keys, values = (constrain(lax.dynamic_update_slice(stack, new[None].astype(stack.dtype), at), KV_AXES)
                        for stack, new in ((cache.keys, k), (cache.values, v)))
        cache = dataclasses.replace(cache, keys=keys, values=values)
        kv = KVCache(StackSlice(keys, slot), StackSlice(values, slot))
        if backends.attention_decode_kernel(q, keys):
            o = _per_block(lambda q, k, v, start, cursor, slot: pallas_kernels.softmax_attention_decode(
                q, k, v, start, cursor, slot=slot), q, keys, values, start, cursor, jnp.asarray(slot, jnp.int32))
        elif backends.flash_attention(q, kv.keys):
            o = _per_block(lambda q, k, v, cursor, start: flash_cached_attention(q, KVCache(k, v), cursor, start),
                           q, kv.keys.read(), kv.values.read(), cursor, start)
        else:
            o = cached_attention(q, kv, cursor + jnp.arange(T, dtype=jnp.int32), start)
        return self.dense(o.reshape(B, T, H * self.head_dim)), cache
