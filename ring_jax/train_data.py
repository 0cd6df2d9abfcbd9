"""Fine-tuning data: a JSONL file of texts and chats -> fixed-shape next-token batches (numpy only).

Each non-blank line of the file is a JSON object with exactly one of

    "text": a string. Tokenized by the tokenizer's `encode` (bos / eos as tokenizer_config asks, as
        a text prompt is tokenized for generation); every token is a target.
    "messages": a chat, [{"role": ..., "content": ...}, ...], rendered by the chat template as
        `ring_jax.chat` renders one (the template writes its own bos; none is added). Only the
        assistant turns' tokens are targets, each with the tokens the template writes to close the
        turn (Ring's `<|role_end|>`), so that the model learns to stop.

Other fields (an "id", ...) are ignored. A line that breaks these rules is a `DataError` naming the
file and line.

An assistant turn's tokens are found by rendering prefixes of the chat: for assistant message i, the
rendering of messages[:i] with the generation prompt ends where the turn starts, and the rendering of
messages[:i + 1] ends where it ends. That needs a prefix-stable template (rendering more messages only
appends tokens); one that rewrites earlier turns (e.g. drops past reasoning) is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jinja2
import numpy as np

from ring_jax.tokenizer import Tokenizer, TokenizerError


class DataError(ValueError):
    """A training file or record that cannot become examples, or batch settings that cannot be met."""


class _BadRecord(ValueError):
    """What is wrong with one record; `_example` prefixes its location."""


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One training sequence.

    tokens: int32 [n], the token ids (n >= 1).
    mask: bool [n]; mask[t] says whether token t is a target, i.e. whether predicting it from
        tokens[:t] counts in the loss. mask[0] is never used (nothing precedes the first token);
        the readers here set it False, so that mask.sum() counts the example's targets.
    """

    tokens: np.ndarray
    mask: np.ndarray

    def __post_init__(self):
        tokens, mask = np.asarray(self.tokens, np.int32), np.asarray(self.mask, np.bool_)
        if tokens.ndim != 1 or tokens.shape != mask.shape or tokens.size == 0:
            raise DataError(f"an Example needs tokens [n] and mask [n] with n >= 1, got shapes "
                            f"{tokens.shape} and {mask.shape}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "mask", mask)


def read_examples(path: str | os.PathLike, tokenizer: Tokenizer, *,
                  enable_thinking: bool | None = None) -> list[Example]:
    """Every non-blank line of a JSONL file -> one Example each, in file order.

    enable_thinking: the chat template's thinking switch for "messages" lines (None: the template's
    default), as `ring_jax.chat` passes it. Raises DataError naming the file and the 1-based line
    for the first bad line, and for a file without examples.
    """
    path = os.fspath(path)
    examples = []
    with open(path, "rb") as f:
        for line, data in enumerate(f, start=1):
            if not data.strip():
                continue
            where = f"{path}, line {line}"
            try:
                record = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8: {e}") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e}") from None
            examples.append(_example(record, tokenizer, where, enable_thinking))
    if not examples:
        raise DataError(f"{path}: no examples (every line is blank)")
    return examples


def examples_from_records(records: Iterable[Any], tokenizer: Tokenizer, *, source: str = "records",
                          enable_thinking: bool | None = None) -> list[Example]:
    """Parsed records (the objects of a JSONL file's lines) -> one Example each, in order.

    As `read_examples`, for records already in memory: the n-th record (1-based) is reported as
    `{source}, line {n}`.
    """
    return [_example(record, tokenizer, f"{source}, line {n}", enable_thinking)
            for n, record in enumerate(records, start=1)]


def _example(record: Any, tokenizer: Tokenizer, where: str, enable_thinking: bool | None) -> Example:
    """One record -> its Example; DataError prefixed with `where` if it cannot be one."""
    try:
        if not isinstance(record, dict):
            raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
        fields = [field for field in ("text", "messages") if field in record]
        if len(fields) != 1:
            raise _BadRecord(f'needs exactly one of "text" or "messages", got '
                             f'{" and ".join(map(repr, fields)) if fields else "neither"}')
        if fields[0] == "text":
            return _text_example(record["text"], tokenizer)
        return _chat_example(record["messages"], tokenizer, enable_thinking)
    except _BadRecord as e:
        raise DataError(f"{where}: {e}") from None


def _text_example(text: Any, tokenizer: Tokenizer) -> Example:
    if not isinstance(text, str):
        raise _BadRecord(f'"text" must be a string, got {type(text).__name__}')
    if not text:
        raise _BadRecord('"text" is empty')
    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise _BadRecord(f'"text" encodes to {len(tokens)} token: nothing to predict (a text needs 2 or more)')
    mask = np.ones(len(tokens), np.bool_)
    mask[0] = False
    return Example(np.array(tokens, np.int32), mask)


def _chat_example(messages: Any, tokenizer: Tokenizer, enable_thinking: bool | None) -> Example:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise _BadRecord('"messages" must be a non-empty list of {"role": string, "content": string} objects')
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise _BadRecord('"messages" has no assistant message: nothing to learn')

    def render(prefix: list, generation_prompt: bool) -> list[int]:
        try:
            return tokenizer.apply_chat_template(prefix, add_generation_prompt=generation_prompt, tokenize=True,
                                                 enable_thinking=enable_thinking)
        except (jinja2.TemplateError, TokenizerError) as e:
            raise _BadRecord(f"chat template: {e}") from None

    tokens = render(messages, False)
    mask = np.zeros(len(tokens), np.bool_)
    for i in turns:
        start, end = render(messages[:i], True), render(messages[:i + 1], False)
        if end[:len(start)] != start or tokens[:len(end)] != end:
            raise _BadRecord(
                f"the chat template is not prefix-stable at assistant message {i}: the rendering of "
                f"messages[:{i}] with the generation prompt, then of messages[:{i + 1}], are not "
                "token-prefixes of the whole chat's, so the assistant's tokens cannot be told apart")
        mask[len(start):len(end)] = True
    # Templates may put the first assistant turn at the very start; token 0 still has nothing to
    # be predicted from.
    mask[0] = False
    if not mask.any():
        raise _BadRecord("the chat template renders no tokens for the assistant messages")
    return Example(np.array(tokens, np.int32), mask)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of n examples in the given epoch (cached: consecutive steps share an epoch)."""
    return np.random.default_rng((seed, epoch)).permutation(n)


class Batches:
    """Fixed-shape next-token batches of examples, deterministic in (seed, step).

    The examples are shuffled once per epoch, epoch e in the order
    `np.random.default_rng((seed, e)).permutation(len(examples))`, and taken in that order,
    batch_size per step: step s holds the examples at positions s * batch_size ... (s + 1) *
    batch_size - 1 of the endless sequence of epochs, so a batch may span two epochs (or several
    when there are fewer examples than batch_size). Step s's batch depends on (seed, s) alone, so a
    resumed run sees the batches an uninterrupted one would.

    Each row holds one example, never parts of two: the model's linear attention carries its state
    along a row, so packed examples would see each other. An example longer than seq_len + 1 tokens
    is cut to its first seq_len + 1 (seq_len inputs and their seq_len next tokens).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, seed: int = 0,
                 pad_id: int = 0):
        """batch_size: rows per batch (B). seq_len: positions per row (L). seed: a non-negative int.
        pad_id: the token id that fills a row after its example (its weight is 0)."""
        for name, value, least in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0),
                                   ("pad_id", pad_id, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
                raise DataError(f"{name} must be an integer >= {least}, got {value!r}")
        self.examples = list(examples)
        if not self.examples:
            raise DataError("no examples to batch")
        if not any(example.mask[1:seq_len + 1].any() for example in self.examples):
            raise DataError(f"none of the {len(self.examples)} examples has a target within its first "
                            f"{seq_len + 1} tokens (seq_len + 1): every batch would have zero weight")
        self.batch_size, self.seq_len, self.seed, self.pad_id = int(batch_size), int(seq_len), int(seed), int(pad_id)

    @property
    def tokens_per_step(self) -> int:
        """Positions the model runs per step, B * L, padding included (for throughput; a batch's
        number of targets is its weights' sum)."""
        return self.batch_size * self.seq_len

    def indices(self, step: int) -> np.ndarray:
        """The indices into `examples` of step's rows: int [B]."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise DataError(f"step must be an integer >= 0, got {step!r}")
        n = len(self.examples)
        positions = int(step) * self.batch_size + np.arange(self.batch_size)
        return np.array([_permutation(self.seed, int(p // n), n)[p % n] for p in positions])

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step's batch: (tokens, targets, weights).

        tokens: int32 [B, L], the row's example's first L tokens, then pad_id.
        targets: int32 [B, L], targets[b, t] = the example's token t + 1 (tokens[b, t + 1] where
            t + 1 < L), pad_id where the example has no token t + 1.
        weights: float32 [B, L], 1.0 where the example's token t + 1 exists and is a target (its
            mask), else 0.0 (padding, prompt tokens, tokens past the cut).
        """
        shape = (self.batch_size, self.seq_len)
        tokens = np.full(shape, self.pad_id, np.int32)
        targets = np.full(shape, self.pad_id, np.int32)
        weights = np.zeros(shape, np.float32)
        for row, index in enumerate(self.indices(step)):
            example = self.examples[index]
            ids, mask = example.tokens[:self.seq_len + 1], example.mask[:self.seq_len + 1]
            n = len(ids)
            tokens[row, :min(n, self.seq_len)] = ids[:self.seq_len]
            targets[row, :n - 1] = ids[1:]
            weights[row, :n - 1] = mask[1:]
        return tokens, targets, weights
