"""The hybrid decoding cache: one pytree for every layer of a batch of sequences.

Slots. The cache has `max_len` slots per sequence, written left to right and shared by the batch:
`cursor` is the next slot to write, the same for every sequence. Prompts of different lengths are
left-padded, so sequence b's first real token sits at slot `start[b]` and the slots before it are
padding, never attended to and never fed to a recurrent state. Token positions (RoPE) count from
each sequence's own start: position = slot - start[b].

Per layer:
- softmax layer: keys and values `[B, max_len, Hkv, D]` in the model dtype (grows with context);
- linear layer: the recurrent state `[B, H, D, D]` float32 (the same size at any context length).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ring_jax.config import RingConfig

# Keys are read in blocks of this many slots (`attention.cached_attention`): a cache longer than
# one block has a max_len that is a multiple of it.
ATTENTION_BLOCK = 4096


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """keys, values: [B, max_len, Hkv, D]."""
    keys: jax.Array
    values: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """layers: per decoder layer, a KVCache (softmax) or a state [B, H, D, D] f32 (linear);
    start: [B] int32, slot of each sequence's first token; cursor: [] int32, next slot to write."""
    layers: tuple
    start: jax.Array
    cursor: jax.Array

    @property
    def max_len(self) -> int:
        return next(c.keys.shape[1] for c in self.layers if isinstance(c, KVCache))

    @property
    def lengths(self) -> jax.Array:
        """[B] int32: the tokens each sequence holds."""
        return self.cursor - self.start


def cache_length(needed: int) -> int:
    """The max_len a cache gets for `needed` slots: a multiple of 256 up to one attention block,
    a multiple of ATTENTION_BLOCK beyond."""
    step = 256 if needed <= ATTENTION_BLOCK else ATTENTION_BLOCK
    return -(-needed // step) * step


def init_cache(config: RingConfig, batch: int, max_len: int, start, dtype) -> Cache:
    """An empty cache. start: [batch] int (left padding of each prompt); dtype: the model dtype."""
    if max_len > ATTENTION_BLOCK and max_len % ATTENTION_BLOCK:
        raise ValueError(f"max_len={max_len}: beyond {ATTENTION_BLOCK} it must be a multiple of "
                         f"{ATTENTION_BLOCK} (use cache_length)")
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layers = []
    for i in range(config.num_decoder_layers):
        if config.is_softmax_layer(i):
            layers.append(KVCache(jnp.zeros((batch, max_len, Hkv, D), dtype),
                                  jnp.zeros((batch, max_len, Hkv, D), dtype)))
        else:
            layers.append(jnp.zeros((batch, H, D, D), jnp.float32))
    return Cache(tuple(layers), jnp.asarray(start, jnp.int32).reshape(batch), jnp.zeros((), jnp.int32))


def cache_bytes(config: RingConfig, batch: int, max_len: int, dtype_bytes: int = 2) -> dict:
    """Bytes of a cache: {"softmax": KV bytes, "linear": state bytes} (the KV part grows with max_len)."""
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    n_soft = sum(config.is_softmax_layer(i) for i in range(config.num_decoder_layers))
    n_lin = config.num_decoder_layers - n_soft
    return {"softmax": n_soft * 2 * batch * max_len * Hkv * D * dtype_bytes,
            "linear": n_lin * batch * H * D * D * 4}
