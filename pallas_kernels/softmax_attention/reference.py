"""Softmax attention of a few new queries (decode) over the cache that holds their keys: the jnp
reference of the GPU kernel in `decode_gpu.py`."""

import jax
import jax.numpy as jnp


def visible(slots: jax.Array, q_slots: jax.Array, start: jax.Array) -> jax.Array:
    """Which cache slots each query reads: slots [S], q_slots [T], start [B] -> [B, T, S] bool.
    Query t reads the slots start[b]..q_slots[t]; a padding query (q_slots[t] < start[b]) reads
    only its own slot."""
    s, q = slots[None, None, :], q_slots[None, :, None]
    return (s >= start[:, None, None]) & (s <= q) | (s == q)


def probabilities(scores: jax.Array, dtype) -> jax.Array:
    """The softmax over the last axis of float32 scores (-inf where not read), rounded to dtype:
    exp(s - max) / sum(exp(s - max)), the normalised probabilities rounded once, as torch's eager
    attention rounds them before the product with the values."""
    m = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - m)
    return (e / jnp.sum(e, axis=-1, keepdims=True)).astype(dtype)


def decode_attention(q, keys, values, start, cursor):
    """q: [B, T, H, D], query t at slot cursor + t; keys, values: [B, L, Hkv, D], already holding
    the queries' own keys; start: [B] int32, each sequence's first real slot; cursor: [] int32.
    GQA: query head h reads kv head h // (H // Hkv).

    Scores q k^T / sqrt(D) and the softmax in float32, the probabilities rounded to q.dtype, then
    their product with the values accumulated in float32. Returns [B, T, H, D] in q.dtype.
    """
    B, T, H, D = q.shape
    L, Hkv = keys.shape[1], keys.shape[2]
    qg = q.reshape(B, T, Hkv, H // Hkv, D)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, precision=precision,
                        preferred_element_type=jnp.float32) * (D ** -0.5)
    seen = visible(jnp.arange(L), cursor + jnp.arange(T, dtype=jnp.int32), start)         # [B, T, L]
    probs = probabilities(jnp.where(seen[:, None, None], scores, -jnp.inf), q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(B, T, H, D)
