"""The hybrid decoding cache: one pytree for every layer of a batch of sequences.

Slots. The cache has `max_len` slots per sequence, written left to right and shared by the batch:
`cursor` is the next slot to write, the same for every sequence. Prompts of different lengths are
left-padded, so sequence b's first real token sits at slot `start[b]` and the slots before it are
padding, never attended to and never fed to a recurrent state. Token positions (RoPE) count from
each sequence's own start: position = slot - start[b].

Layers. The entries of layers of one attention type are stacked (`ring_jax.schedule`: a layer
addresses its own by its slot), so that scanned layers update them in place:
- softmax layers: keys and values `[n_softmax, B, max_len, Hkv, D]` in the model dtype (they grow
  with the context);
- linear layers: the recurrent states `[n_linear, B, H, D, D]` float32 (the same size at any
  context length).

Under a mesh the batch is split over `data`, KV heads and state heads over `tensor`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ring_jax.config import RingConfig
from ring_jax.schedule import Schedule
from ring_jax.sharding import put, spec

# Keys are read in blocks of this many slots (`attention.cached_attention`): a cache longer than
# one block has a max_len that is a multiple of it.
ATTENTION_BLOCK = 4096

KV_AXES = ("layers", "batch", None, "kv_heads", None)     # keys, values [n_softmax, B, max_len, Hkv, D]
STATE_AXES = ("layers", "batch", "heads", None, None)     # linear states [n_linear, B, H, D, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One softmax layer's keys and values: [B, max_len, Hkv, D] each (arrays, or `StackSlice`s
    of the cache's stacks)."""
    keys: jax.Array
    values: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """states: [n_linear, B, H, D, D] float32; keys, values: [n_softmax, B, max_len, Hkv, D];
    start: [B] int32, slot of each sequence's first token; cursor: [] int32, next slot to write."""
    states: jax.Array
    keys: jax.Array
    values: jax.Array
    start: jax.Array
    cursor: jax.Array

    @property
    def lengths(self) -> jax.Array:
        """[B] int32: the tokens each sequence holds."""
        return self.cursor - self.start

    def advanced(self, tokens: int) -> "Cache":
        """The cache with its cursor moved past `tokens` written slots."""
        return dataclasses.replace(self, cursor=self.cursor + tokens)


def cache_length(needed: int) -> int:
    """The max_len a cache gets for `needed` slots: a power of two of at least 256 up to one
    attention block, a multiple of ATTENTION_BLOCK beyond. Few sizes, since every compiled step
    depends on it: a new prompt length or max_new_tokens within one compiles nothing. (A decode
    step reads the whole cache, so the sizes beyond one block stay one block apart.)"""
    if needed <= ATTENTION_BLOCK:
        return max(256, 1 << (needed - 1).bit_length())
    return -(-needed // ATTENTION_BLOCK) * ATTENTION_BLOCK


def check_cache_length(max_len: int, name: str = "max_len") -> None:
    """A ValueError unless max_len is a length a cache can have: any up to one attention block, a
    multiple of ATTENTION_BLOCK beyond (`cache_length` gives one)."""
    if max_len > ATTENTION_BLOCK and max_len % ATTENTION_BLOCK:
        raise ValueError(f"{name}={max_len}: beyond {ATTENTION_BLOCK} it must be a multiple of {ATTENTION_BLOCK} "
                         f"(ring_jax.cache.cache_length(n) gives the one for n slots)")


def cache_shardings(cache: Cache, mesh: jax.sharding.Mesh) -> Cache:
    """NamedShardings of a (possibly abstract) cache on `mesh`."""
    def named(x, axes):
        return NamedSharding(mesh, spec(axes, x.shape, mesh))

    return Cache(named(cache.states, STATE_AXES), named(cache.keys, KV_AXES), named(cache.values, KV_AXES),
                 named(cache.start, ("batch",)), named(cache.cursor, ()))


def init_cache(config: RingConfig, batch: int, max_len: int, start, dtype, mesh=None, device=None) -> Cache:
    """An empty cache. start: [batch] int (left padding of each prompt); dtype: the model dtype;
    mesh: lay it out over this mesh (each device allocates only its block); else device: the
    device (or single-device sharding) to commit it to, like the outputs of the steps that
    continue it, so that the first prefill chunk and the later ones share one compilation
    (default: uncommitted, on JAX's default device)."""
    check_cache_length(max_len)
    start = np.asarray(start, np.int32).reshape(batch)
    if mesh is None:
        start = jnp.asarray(start) if device is None else jax.device_put(start, device)
        return _empty_jit(config, max_len, jnp.dtype(dtype), start)
    start = put(start, NamedSharding(mesh, spec(("batch",), start.shape, mesh)))
    return _empty_on(config, max_len, jnp.dtype(dtype), mesh, start)


def _empty(config: RingConfig, max_len: int, dtype, start: jax.Array) -> Cache:
    """An empty cache for start.shape[0] sequences (traceable)."""
    B = start.shape[0]
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    schedule = Schedule.of(config)
    n_linear, n_softmax = schedule.count("linear"), schedule.count("softmax")
    kv = (n_softmax, B, max_len, Hkv, D)
    return Cache(jnp.zeros((n_linear, B, H, D, D), jnp.float32), jnp.zeros(kv, dtype), jnp.zeros(kv, dtype),
                 start, jnp.zeros((), jnp.int32))


_empty_jit = jax.jit(_empty, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty_on(config: RingConfig, max_len: int, dtype, mesh, start: jax.Array) -> Cache:
    """`_empty` allocated in its layout on mesh: each device holds only its block."""
    cache = _empty(config, max_len, dtype, start)
    shardings = cache_shardings(cache, mesh)
    return jax.tree.map(jax.lax.with_sharding_constraint, cache, shardings)


def cache_bytes(config: RingConfig, batch: int, max_len: int, dtype_bytes: int = 2) -> dict:
    """Bytes of a cache: {"softmax": KV bytes, "linear": state bytes} (the KV part grows with max_len)."""
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    schedule = Schedule.of(config)
    return {"softmax": schedule.count("softmax") * 2 * batch * max_len * Hkv * D * dtype_bytes,
            "linear": schedule.count("linear") * batch * H * D * D * 4}
