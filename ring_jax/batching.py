"""Batching a call: the prompts' token ids, checked, and the few shapes (buckets) it runs at.

Prompts of different lengths are left-padded to a length bucket: whole prefill chunks after one
step of the rest rounded up to a power of two (`prefill_steps`), so that prefill compiles once per
step size, not per prompt length. The batch runs at a power of two (`batch_bucket`) and the decode
loop's token buffer at one (`token_bucket`), so that one compiled step serves every batch size and
every max_new_tokens up to its bucket.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ring_jax import backends


def prompt_ids(input_ids, attention_mask, vocab_size: int) -> list[np.ndarray]:
    """The real tokens of each prompt: [B, T] (or [T]) ids with an optional [B, T] 0/1 mask (left
    or right padding), or a list of token-id lists of any lengths."""
    if isinstance(input_ids, str):
        raise TypeError("prompts are token ids, not text: encode it first "
                        "(ring_jax.load_tokenizer(folder).encode(text)), or use ring_jax.chat")
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray,
                                                                                       jax.Array)):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a [B, T] array, not with a list of prompts")
        prompts = [np.asarray(p) for p in input_ids]
    else:
        try:
            ids = np.asarray(input_ids)
        except ValueError:                                     # e.g. [1, [2, 3]]
            raise ValueError("input_ids must be [batch, seq_len] token ids, [seq_len], or a list of "
                             "token-id lists") from None
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {ids.shape}")
        if attention_mask is None:
            prompts = list(ids)
        else:
            mask = np.asarray(attention_mask)
            mask = mask[None] if mask.ndim == 1 else mask
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {ids.shape}")
            prompts = []
            for b, (row, m) in enumerate(zip(ids, mask.astype(bool))):
                where = np.flatnonzero(m)
                if where.size and where[-1] - where[0] + 1 != where.size:
                    raise ValueError(f"attention_mask row {b} has holes: only left or right padding is supported")
                prompts.append(row[where])
    for b, p in enumerate(prompts):
        if p.ndim != 1:
            raise ValueError(f"prompt {b} is not a flat list of token ids (shape {p.shape})")
        if p.size == 0:
            raise ValueError(f"prompt {b} is empty: it needs at least one token")
        if p.dtype == object and all(isinstance(t, int) for t in p.tolist()):     # Python ints, maybe huge
            bad = next((t for t in p.tolist() if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt {b} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
            p = prompts[b] = p.astype(np.int64)
        if not np.issubdtype(p.dtype, np.integer):
            raise TypeError(f"prompt {b}: token ids must be integers, got {p.dtype}")
        if p.min() < 0 or p.max() >= vocab_size:
            raise ValueError(f"prompt {b} holds token id {p.min() if p.min() < 0 else p.max()}, "
                             f"outside the vocabulary [0, {vocab_size})")
    return prompts


def batch_bucket(prompts: int, data: int = 1) -> int:
    """The batch that a call of `prompts` prompts runs at: the next power of two (a multiple of a
    mesh's `data` axis), so that one compiled decode step serves every batch size up to it. The
    rows past the prompts are copies of the last one, finished from the start."""
    return -(-(1 << (prompts - 1).bit_length()) // data) * data


def token_bucket(max_new_tokens: int) -> int:
    """The width of the decode loop's token buffer for max_new_tokens: a power of two of at least
    16, so that a new max_new_tokens within it compiles nothing."""
    return max(16, 1 << (max_new_tokens - 1).bit_length())


def prefill_steps(length: int, chunk: int) -> list[int]:
    """Prefill step sizes for a prompt of `length` tokens, `chunk` tokens per step: the rest of the
    length over whole chunks rounded up to a power of two (>= 16) first, then the whole chunks.
    Their sum is the padded prompt length."""
    full, rest = divmod(length, chunk)
    return ([min(max(16, 1 << (rest - 1).bit_length()), chunk)] if rest else []) + [chunk] * full


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes a call runs at: `batch` rows (its bucket) and prefill steps of `steps` tokens."""
    batch: int
    steps: tuple[int, ...]

    @classmethod
    def of(cls, model_config, dtype, prompts: int, longest: int, prefill_chunk: int | None, data: int = 1) -> Plan:
        """For `prompts` prompts of at most `longest` tokens, `prefill_chunk` tokens per step over
        the batch (None: `backends.prefill_chunk`), a mesh whose `data` axis has `data` devices."""
        chunk = backends.prefill_chunk(model_config, dtype) if prefill_chunk is None else prefill_chunk
        batch = batch_bucket(prompts, data)
        return cls(batch, tuple(prefill_steps(longest, max(16, 1 << max(chunk // batch, 1).bit_length() - 1))))

    @property
    def length(self) -> int:
        """The padded prompt length."""
        return sum(self.steps)

    def chunks(self) -> list[tuple[int, int]]:
        """(first token, tokens) of each prefill step in the padded prompt."""
        starts = np.cumsum((0,) + self.steps[:-1])
        return [(int(c), size) for c, size in zip(starts, self.steps)]

    def padded(self, prompts: list[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [batch, length] int32: the prompts left-padded with `pad`, the last one repeated to
        fill the batch; start [batch] int32: each row's first real slot)."""
        prompts = prompts + [prompts[-1]] * (self.batch - len(prompts))
        ids = np.full((self.batch, self.length), pad, np.int32)
        for b, p in enumerate(prompts):
            ids[b, self.length - len(p):] = p
        return ids, np.array([self.length - len(p) for p in prompts], np.int32)
