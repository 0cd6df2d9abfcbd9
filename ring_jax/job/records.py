"""The job's input and output, in plain Python (nothing here runs JAX; the chat template comes from
`ring_jax.chat`): input lines to prompt token ids, the batches, the output records, and the output
file written in input order with its resume checks (`ring_jax.job` says the formats)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np

from ring_jax.chat import prompt_ids as chat_prompt_ids, text_prompt_ids
from ring_jax.sampling import until_eos
from ring_jax.tokenizer import TokenizerError

PROMPT_FIELDS = ("prompt", "messages", "input_ids")


class JobError(ValueError):
    """A problem with the job's arguments or files: reported as one line, exit status 2."""


class BadLine(ValueError):
    """An input line that cannot run; its message goes into the line's error record."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One non-blank input line: its prompt token ids [T], or why it cannot run."""
    line: int                                  # 1-based line number in the input file
    echo: dict = dataclasses.field(default_factory=dict)   # {"id": value} when the input has one
    ids: tuple[int, ...] = ()
    error: str | None = None


# ------------------------------------------------------------------------------------- input
def prompt_ids(obj: Any, tokenizer, *, chat: bool, thinking: bool | None = None) -> list[int]:
    """A parsed input line -> prompt token ids [T]; BadLine if it holds no usable prompt. A text
    prompt follows `ring_jax.chat.text_prompt_ids` (with --chat, through the chat template),
    messages go through the template (`ring_jax.chat.prompt_ids`); thinking is the template's switch."""
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
    fields = [f for f in PROMPT_FIELDS if f in obj]
    if len(fields) != 1:
        raise BadLine(f"needs exactly one of {', '.join(PROMPT_FIELDS)}; got "
                      f"{', '.join(fields) if fields else 'none'}")
    value = obj[fields[0]]
    if fields[0] == "input_ids":
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise BadLine("input_ids must be a list of integers")
        return value
    if fields[0] == "prompt" and not isinstance(value, str):
        raise BadLine(f"prompt must be a string, got {type(value).__name__}")
    if fields[0] == "messages" and (not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)):
        raise BadLine('messages must be a list of {"role": string, "content": string} objects')
    try:
        if fields[0] == "prompt":
            return text_prompt_ids(tokenizer, value, chat=chat, enable_thinking=thinking)
        return chat_prompt_ids(tokenizer, value, thinking)
    except (jinja2.TemplateError, TokenizerError) as e:
        raise BadLine(f"chat template: {e}") from None


def parse_line(data: bytes, line: int, tokenizer, *, chat: bool, vocab_size: int, max_prompt_len: int,
               thinking: bool | None = None) -> Item:
    """One non-blank input line -> an Item: its prompt ids, or the error that stops it."""
    echo = {}
    try:
        try:
            obj = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadLine(f"not UTF-8: {e}") from None
        except json.JSONDecodeError as e:
            raise BadLine(f"invalid JSON: {e}") from None
        if isinstance(obj, dict) and "id" in obj:
            echo = {"id": obj["id"]}
        ids = prompt_ids(obj, tokenizer, chat=chat, thinking=thinking)
        if not ids:
            raise BadLine("the prompt has no tokens")
        outside = [t for t in ids if not 0 <= t < vocab_size]
        if outside:
            raise BadLine(f"token id {outside[0]} is outside the model's vocabulary [0, {vocab_size})")
        if len(ids) > max_prompt_len:
            raise BadLine(f"the prompt has {len(ids)} tokens, more than the {max_prompt_len} that "
                          "max_position_embeddings leaves beside --max-new-tokens")
    except BadLine as e:
        return Item(line, echo, error=str(e))
    return Item(line, echo, tuple(ids))


def read_items(path: str, tokenizer, *, chat: bool, vocab_size: int, max_prompt_len: int,
               thinking: bool | None = None) -> list[Item]:
    """Every non-blank line of the input file, in order."""
    items = []
    with open(path, "rb") as f:
        for line, data in enumerate(f, start=1):
            if data.strip():
                items.append(parse_line(data, line, tokenizer, chat=chat, thinking=thinking, vocab_size=vocab_size,
                                        max_prompt_len=max_prompt_len))
    return items


def plan_batches(items: Sequence[Item], batch_size: int, window: int) -> list[list[Item]]:
    """The runnable items in batches of up to batch_size: windows of window * batch_size items in
    input order, each sorted by prompt length (stable). Depends on the items alone."""
    runnable = [item for item in items if item.error is None]
    span = batch_size * window
    batches = []
    for w in range(0, len(runnable), span):
        ordered = sorted(runnable[w:w + span], key=lambda item: len(item.ids))
        batches += [ordered[b:b + batch_size] for b in range(0, len(ordered), batch_size)]
    return batches


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of batch `index` (a uint32): independent streams per batch."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ------------------------------------------------------------------------------------ output
def record(item: Item, tokens: np.ndarray, eos_ids: Sequence[int], tokenizer) -> dict:
    """A finished item's output record. tokens: [max_new_tokens] the generated ids (pad after
    the end-of-sequence token)."""
    reply = until_eos(tokens, eos_ids)
    stopped = len(reply) < len(tokens)
    ids = reply + [int(tokens[len(reply)])] if stopped else reply
    return {"line": item.line, **item.echo, "output": tokenizer.decode(reply, skip_special_tokens=True),
            "output_ids": ids, "num_tokens": len(ids), "finish_reason": "stop" if stopped else "length"}


def error_record(item: Item) -> dict:
    return {"line": item.line, **item.echo, "error": item.error}


# Arguments that change the records (with the prompts): a resume must use the same.
SHAPING_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size", "sort_window", "chat", "dtype")
# Shape the records where given; absent from the fingerprint when not (outputs begun before they
# existed resume).
OPTIONAL_SHAPING_ARGS = ("quantize",)


def fingerprint(args, items: Sequence[Item]) -> str:
    """sha256 of the prompts (or their errors) and the arguments that shape the records."""
    shaping = {name: getattr(args, name) for name in SHAPING_ARGS}
    shaping.update({name: getattr(args, name) for name in OPTIONAL_SHAPING_ARGS if getattr(args, name, None) is not None})
    content = {"args": shaping,
               "items": [[item.line, item.echo, list(item.ids), item.error] for item in items]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def check_sidecar(path: str, digest: str) -> None:
    """Records the fingerprint beside a new output, or checks it against an existing output's."""
    sidecar = f"{path}.job.json"
    if not os.path.exists(path):
        with open(sidecar, "w") as f:
            json.dump({"fingerprint": digest}, f)
        return
    try:
        with open(sidecar) as f:
            stored = json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        stored = None
    if stored != digest:
        raise JobError(f"{path} was written from other prompts or settings ({sidecar} "
                       f"{'has another fingerprint' if stored else 'is missing'}): rerun with the same "
                       "input and flags, or choose another --output")


def existing_records(path: str, items: Sequence[Item]) -> tuple[int, int]:
    """How many records an earlier run left at the start of `path`, and the bytes they span.

    The file must hold the records of items[:k] in order (what this job writes); a last line
    without its newline (a write cut by a crash) is not counted. (0, 0) if there is no file."""
    if not os.path.exists(path):
        return 0, 0
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.splitlines()
    if len(lines) > len(items):
        raise JobError(f"{path} holds {len(lines)} records, the input has {len(items)} non-blank lines: "
                       "not an output of this input (choose another --output)")
    for n, (text, item) in enumerate(zip(lines, items), start=1):
        try:
            line = json.loads(text).get("line")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            line = None
        if line != item.line:
            raise JobError(f"{path} line {n} is not the record of input line {item.line}: not an "
                           "output of this input (choose another --output)")
    return len(lines), len(complete)


class OrderedWriter:
    """Appends records to the output in input order. A record is written once every earlier
    line's is; `flush` makes what was written durable (flush + fsync)."""

    def __init__(self, path: str, order: Sequence[int], written: int, size: int):
        """order: the line numbers of all records, in input order; the first `written` are
        already in the file, in its first `size` bytes (anything after them is cut)."""
        self._file = open(path, "ab")
        self._file.truncate(size)
        self._order, self._next, self._ready, self._failed = list(order), written, {}, False
        self._position = {line: i for i, line in enumerate(self._order)}

    @property
    def written(self) -> int:
        """How many records the file holds."""
        return self._next

    def add(self, rec: dict) -> None:
        """Queues a record (one whose line is already in the file is dropped)."""
        if self._position[rec["line"]] >= self._next:
            self._ready[rec["line"]] = rec

    def flush(self) -> None:
        start = self._next
        try:
            while self._next < len(self._order) and self._order[self._next] in self._ready:
                rec = self._ready.pop(self._order[self._next])
                self._file.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
                self._next += 1
            if self._next > start:
                self._file.flush()
                os.fsync(self._file.fileno())
        except OSError:
            self._failed = True
            raise

    def close(self) -> None:
        """Closes the file. After a failed flush, closing fails the same way (the buffered records
        cannot be written either): that error is already being reported, so it is not raised again."""
        try:
            self._file.close()
        except OSError:
            if not self._failed:
                raise


