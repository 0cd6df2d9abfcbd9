"""Generation settings, token sampling and the stop rule: what `generate()` is asked to do.

`GenerationConfig` holds every setting of a call (HF's name for the same thing); `Sampling` and
`StopRule` are the parts the compiled decode step depends on, and `sample` draws a token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The settings of a `generate()`, `stream()` or `warmup()` call.

    max_new_tokens: tokens to generate per sequence (generate() and stream() need it).
    temperature 0 is greedy; otherwise sampling with top_k / top_p, reproducible for a given seed.
    A sequence finishes at one of eos_token_id (int or list; default: the model config's, or
    where a tokenizer is at hand its eos set: `eos_ids`) or when its output ends with one of `stop`
    (token-id sequences); its later tokens are pad_token_id (default: the config's pad, else the
    first eos, else 0). The eos or stop tokens themselves are part of the output, and every id
    must be in the vocabulary.
    max_len: the most prompt + new tokens allowed (default: the config's max_position_embeddings).
    prefill_chunk: prompt tokens per prefill step, summed over the batch (a power of two >= 16; it
    bounds the activation memory). None: `ring_jax.backends.prefill_chunk`: 32768 where the prefill
    takes cuDNN's flash attention (bf16 or f16 models on Hopper GPUs), else 4096.
    cache_len: the cache's slots (default: the prompt bucket + max_new_tokens, rounded up). The
    compiled steps depend on it: one fixed value serves every prompt length with one compile, at
    the cost of decode steps that read the whole cache.
    """
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    eos_token_id: int | Sequence[int] | None = None
    stop: Sequence[Sequence[int]] | None = None
    pad_token_id: int | None = None
    max_len: int | None = None
    prefill_chunk: int | None = None
    cache_len: int | None = None

    def __post_init__(self):
        for name in ("max_new_tokens", "seed", "max_len", "prefill_chunk", "cache_len", "pad_token_id"):
            value = getattr(self, name)
            if (value is not None or name == "seed") and (not isinstance(value, (int, np.integer))
                                                          or isinstance(value, bool)):
                raise TypeError(f"{name} must be an integer, got {value!r:.80}")
            if value is not None:
                object.__setattr__(self, name, int(value))
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if (value is not None or name == "temperature") and (
                    not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool)):
                raise TypeError(f"{name} must be a number, got {value!r:.80}")
        n = self.max_new_tokens
        if n is not None and n < 1:
            raise ValueError(f"max_new_tokens={n} must be >= 1")
        c = self.prefill_chunk
        if c is not None and (c < 16 or c & (c - 1)):
            raise ValueError(f"prefill_chunk={c} must be a power of two >= 16")
        self.sampling()                                  # validates temperature, top_k, top_p
        # Lists as tuples: the config is hashable, as a frozen dataclass should be.
        if self.stop is not None:
            object.__setattr__(self, "stop", tuple(_token_ids(s, "stop", "a list of token-id lists")
                                                   for s in _sequence(self.stop, "stop", "a list of token-id lists")))
        if self.eos_token_id is not None and not isinstance(self.eos_token_id, (int, np.integer)):
            object.__setattr__(self, "eos_token_id", _token_ids(self.eos_token_id, "eos_token_id",
                                                                "a token id or a list of them"))

    @classmethod
    def of(cls, config: GenerationConfig | None = None, **settings) -> GenerationConfig:
        """`config` (default: the defaults) with `settings` (field names) replacing its fields."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError(f"the generation settings must be a ring_jax.GenerationConfig (or keywords), got "
                            f"{type(config).__name__} {config!r:.80}")
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return dataclasses.replace(config or cls(), **settings)

    def sampling(self) -> Sampling:
        return Sampling(float(self.temperature), self.top_k, self.top_p)


def _sequence(value, name: str, what: str):
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be {what}, got {value!r:.80}")
    return value


def _token_ids(value, name: str, what: str) -> tuple[int, ...]:
    """value: a sequence of integer token ids (a list, numpy or JAX array) -> a tuple of ints; a
    TypeError naming `name` and `what` it must be otherwise."""
    try:
        ids = np.asarray(list(_sequence(value, name, what)))
    except (TypeError, ValueError):
        ids = None
    if ids is None or ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"{name} must be {what}, got {value!r:.80}")
    return tuple(int(t) for t in ids)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax). Otherwise logits / temperature, then the top_k most likely
    tokens (None: all), then the smallest set whose probability reaches top_p (None: all)."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool)):
            raise TypeError(f"top_k must be an integer (or None), got {self.top_k!r:.80}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 (or None)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (or None)")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits: [B, V] float32 -> token ids [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p     # mass before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def eos_ids(model_config, tokenizer=None, eos_token_id=None) -> tuple[int, ...]:
    """The one eos rule of every entry point: eos_token_id (an int or a list) if given, else the
    tokenizer's eos set (its eos token and generation_config.json's), else the model config's."""
    if eos_token_id is not None:
        return tuple(int(e) for e in np.atleast_1d(eos_token_id).tolist())
    found = () if tokenizer is None else tuple(tokenizer.eos_token_ids)
    return tuple(int(e) for e in (found or model_config.eos_token_ids))


def until_eos(tokens: Sequence[int], eos: Sequence[int]) -> list[int]:
    """A sequence's generated tokens before its first eos (what a reply's text is decoded from)."""
    tokens = [int(t) for t in tokens]
    return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a sequence is finished: it produced one of eos_ids or ended with one of `stop`; its
    later tokens are pad_id."""
    eos_ids: tuple[int, ...]
    stop: tuple[tuple[int, ...], ...]
    pad_id: int

    @classmethod
    def of(cls, model_config, eos_token_id=None, stop=None, pad_token_id=None) -> StopRule:
        """eos: `eos_ids` (without a tokenizer); pad_token_id if given, else the config's pad, else
        the first eos, else 0."""
        eos = eos_ids(model_config, None, eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (
            model_config.pad_token_id if model_config.pad_token_id is not None else (eos[0] if eos else 0))
        stop = tuple(tuple(int(t) for t in s) for s in (stop or ()))
        if any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty lists of token ids")
        vocab = model_config.vocab_size
        if not 0 <= pad < vocab:                      # padding is embedded like any token
            raise ValueError(f"pad_token_id={pad} is outside the vocabulary [0, {vocab})")
        for name, ids in (("eos_token_id", eos), ("stop", [t for s in stop for t in s])):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:                       # a token the model never produces: no stop
                raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab})")
        return cls(eos, stop, int(pad))

    @property
    def window(self) -> int:
        return max((len(s) for s in self.stop), default=1)

    def finished(self, token: jax.Array, recent: jax.Array) -> jax.Array:
        """token: [B]; recent: [B, window] ending with token -> [B] bool."""
        done = jnp.isin(token, jnp.asarray(self.eos_ids, jnp.int32)) if self.eos_ids else jnp.zeros(token.shape, bool)
        for seq in self.stop:
            done |= jnp.all(recent[:, recent.shape[1] - len(seq):] == jnp.asarray(seq, jnp.int32), axis=1)
        return done
