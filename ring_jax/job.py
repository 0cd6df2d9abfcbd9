"""python -m ring_jax.job: batch inference over a JSONL file, on one process or many (SPMD).

Each non-blank input line is a JSON object with one of
    "prompt": text (tokenized as is; with --chat, rendered as a user message by the chat template),
    "messages": a chat, [{"role": ..., "content": ...}, ...] (always through the chat template),
    "input_ids": token ids,
and optionally "id" (any JSON value, echoed). Process 0 writes one JSON line per input line, in
input order:
    {"line": n, "id": ..., "output": text, "output_ids": [...], "num_tokens": k,
     "finish_reason": "stop" | "length"}
or, for a line that cannot run (invalid JSON, no prompt field, ids outside the vocabulary, too long
for max_position_embeddings, ...), {"line": n, "id": ..., "error": "..."} (also reported on stderr).
"line" is the 1-based line number; "id" appears when the input has one. output_ids run up to and
including the end-of-sequence token ("stop") or are max_new_tokens long ("length"); "output" is
their text without it and without special tokens.

Batches: the runnable prompts are cut into windows of --sort-window batches, sorted by length within
a window (less padding) and split into batches of --batch-size. The batches depend on the input
alone, so a resumed run computes the same batches as an uninterrupted one.

Crash safety and resume: records are appended in input order as soon as every earlier line's record
is ready (later ones wait in memory), and the file is flushed and fsynced after each batch. When the
output file exists, the job keeps its complete records (a truncated last line is dropped), skips
their lines and appends the rest: the final file equals an uninterrupted run's. A sidecar file
`<output>.job.json` holds a fingerprint of the prompts and the settings that shape the outputs; a
rerun whose fingerprint differs (another input, --max-new-tokens, sampling, batching) refuses to
append to the file.

Multi-process (SPMD): start the same command on every host, with --coordinator HOST:PORT (process
0's address) --num-processes N --process-id I, or with --distributed auto where
jax.distributed.initialize() finds the processes itself (Cloud TPU pods, SLURM, Open MPI). Every
process reads the whole input (give each the same file) and calls generate() with the same batches;
the model and the batch are split over the --mesh of all processes' devices. Only process 0 reads
and writes the output file (it need not be on a shared filesystem); it broadcasts how many records
the file already holds to the others. Progress and bad lines are reported on process 0's stderr.

    python -m ring_jax.job --model ring-mini-jax/ --input in.jsonl --output out.jsonl --chat
    (2 hosts of 8 GPUs: that, plus --mesh data=2,expert=8 --coordinator host0:1234
     --num-processes 2 --process-id 0 on host0 and --process-id 1 on the other)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jinja2
import numpy as np
from jax.experimental import multihost_utils

import ring_jax
from ring_jax.chat import prompt_ids as chat_prompt_ids, text_prompt_ids
from ring_jax.config import ConfigError, RingConfig
from ring_jax.errors import ArgumentParser, exit_now, one_line, quiet_closed_event_loops, user_errors
from ring_jax.generate import Sampling
from ring_jax.progress import CompileReport, Progress
from ring_jax.sharding import check_mesh, make_mesh, parse_mesh
from ring_jax.tokenizer import TokenizerError, load_tokenizer

PROMPT_FIELDS = ("prompt", "messages", "input_ids")


class JobError(Exception):
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
    tokens = [int(t) for t in tokens]
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    ids = tokens if end is None else tokens[:end + 1]
    text = tokenizer.decode(ids if end is None else ids[:-1], skip_special_tokens=True)
    return {"line": item.line, **item.echo, "output": text, "output_ids": ids, "num_tokens": len(ids),
            "finish_reason": "length" if end is None else "stop"}


def error_record(item: Item) -> dict:
    return {"line": item.line, **item.echo, "error": item.error}


# Arguments that change the records (with the prompts): a resume must use the same.
SHAPING_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size", "sort_window", "chat", "dtype")


def fingerprint(args, items: Sequence[Item]) -> str:
    """sha256 of the prompts (or their errors) and the arguments that shape the records."""
    content = {"args": {name: getattr(args, name) for name in SHAPING_ARGS},
               "items": [[item.line, item.echo, list(item.ids), item.error] for item in items]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def check_same_everywhere(digest: str) -> None:
    """Every process must have read the same prompts with the same settings (they run SPMD)."""
    if jax.process_count() > 1:
        try:
            multihost_utils.assert_equal(np.frombuffer(bytes.fromhex(digest)[:16], np.uint32))
        except AssertionError:
            raise JobError("the processes read different prompts or settings: give every process the same "
                           "--input, model folder, tokenizer and generation flags") from None


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


def log(message: str) -> None:
    """A line on stderr from process 0 (the others stay quiet)."""
    if jax.process_index() == 0:
        print(f"[job] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- processes
def init_distributed(args) -> None:
    """Joins the processes of a multi-process run; must come before any other JAX use.

    On the CPU, cross-process collectives use gloo: jax 0.10+ picks it by default
    (`jax_cpu_collectives_implementation`), so nothing is set here."""
    try:
        if args.coordinator:
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
        elif args.distributed == "auto":
            jax.distributed.initialize()
    except (RuntimeError, ValueError, TypeError) as e:
        raise JobError(f"jax.distributed.initialize failed: {e}") from None


def build_mesh(spec: str | None):
    """The jax.sharding.Mesh of --mesh over every device of every process (default: data=1,
    tensor=1, expert = all devices)."""
    try:
        axes = parse_mesh(spec) if spec else {}
    except ValueError as e:
        raise JobError(f"bad --mesh {e}") from None
    try:
        return make_mesh(**axes)
    except ValueError as e:
        raise JobError(f"--mesh {spec!r} does not fit this run's devices: {e}") from None


def stop_all(failure: JobError | None) -> None:
    """Raises `failure` (process 0's output error, or None) on every process, so that the others
    do not wait for process 0 in their next collective. Every process must call it."""
    failed = failure is not None
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    if failed:
        raise failure or JobError("process 0 failed to open or write the output (see its error)")


def open_output(path: str, items: Sequence[Item], digest: str) -> tuple[int, OrderedWriter | None]:
    """Process 0 reads what an earlier run left in the output (with the same fingerprint) and opens
    it for appending; every process learns how many records are there (broadcast). Returns (that
    count, the writer on process 0, None on the others)."""
    written, writer, failure = 0, None, None
    if jax.process_index() == 0:
        try:
            written, size = existing_records(path, items)
            check_sidecar(path, digest)
            writer = OrderedWriter(path, [item.line for item in items], written, size)
        except JobError as e:
            failure = e
        except OSError as e:
            failure = JobError(f"--output {path!r}: {e}")
    stop_all(failure)
    if jax.process_count() > 1:
        written = int(multihost_utils.broadcast_one_to_all(np.int32(written)))
    return written, writer


def write(writer: OrderedWriter | None, make_records: Callable[[], list[dict]], path: str) -> list[dict]:
    """Process 0 makes the records, queues them and writes those that are ready (durably); when
    any of that fails, every process stops with the error (stop_all), so that none waits for
    process 0 in a collective. The others (writer None) join the broadcast. Returns the records
    (none on the others)."""
    records, failure = [], None
    if writer:
        try:
            records = make_records()
            for rec in records:
                writer.add(rec)
            writer.flush()
        except OSError as e:
            failure = JobError(f"writing {path}: {e}")
        except Exception as e:  # noqa: BLE001  (any failure here must reach the other processes)
            failure = JobError(f"making the records for {path}: {type(e).__name__}: {e}")
    stop_all(failure)
    return records


# ------------------------------------------------------------------------------------- the job
def check_args(args) -> None:
    """Everything about the arguments that can be checked before JAX starts."""
    if not os.path.isdir(args.model):
        raise JobError(f"--model {args.model!r} is not a folder")
    if not os.path.isfile(args.input):
        raise JobError(f"--input {args.input!r} is not a file")
    for name in ("batch_size", "max_new_tokens", "sort_window"):
        if getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise JobError(f"--seed must be >= 0, got {args.seed}")
    try:
        Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise JobError(str(e)) from None
    multi = (args.num_processes, args.process_id)
    if args.coordinator and None in multi:
        raise JobError("--coordinator needs --num-processes and --process-id")
    if not args.coordinator and multi != (None, None):
        raise JobError("--num-processes and --process-id go with --coordinator")
    if args.coordinator and args.distributed == "auto":
        raise JobError("--coordinator and --distributed auto exclude each other")


def load_config_and_tokenizer(args):
    """The model's RingConfig (without loading the weights) and the tokenizer."""
    try:
        config = RingConfig.from_hf(args.model)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (ConfigError, TokenizerError, FileNotFoundError) as e:
        raise JobError(str(e)) from None
    if args.max_new_tokens >= config.max_position_embeddings:
        raise JobError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt: the model "
                       f"takes {config.max_position_embeddings} tokens (max_position_embeddings)")
    return config, tokenizer


def run(args, load=functools.partial(ring_jax.load_model, verify=True)) -> int:
    """The job (see the module docstring). Returns the exit status.

    load(args.model, dtype=args.dtype, mesh=mesh) makes the model: a benchmark can make a random one."""
    check_args(args)
    init_distributed(args)
    ring_jax.enable_compilation_cache(args.compilation_cache)
    mesh = build_mesh(args.mesh)
    config, tokenizer = load_config_and_tokenizer(args)
    try:
        check_mesh(config, mesh)
    except ValueError as e:
        raise JobError(f"--mesh: {e}") from None
    items = read_items(args.input, tokenizer, chat=args.chat, thinking=args.thinking, vocab_size=config.vocab_size,
                       max_prompt_len=config.max_position_embeddings - args.max_new_tokens)
    digest = fingerprint(args, items)
    check_same_everywhere(digest)
    written, writer = open_output(args.output, items, digest)
    try:
        generate_all(args, items, written, mesh, config, tokenizer, writer, load)
    finally:
        if writer:
            writer.close()
    return 0


def generate_all(args, items: Sequence[Item], written: int, mesh, config, tokenizer,
                 writer: OrderedWriter | None, load) -> None:
    """Runs every batch with an item beyond the first `written`, and hands the records to the
    writer (process 0; None on the others). load: makes the model (see run)."""
    done = {item.line for item in items[:written]}
    errors = [item for item in items[written:] if item.error is not None]
    batches = [(index, batch) for index, batch in enumerate(plan_batches(items, args.batch_size, args.sort_window))
               if any(item.line not in done for item in batch)]
    log(f"{len(items)} prompts: {written} already in {args.output}, {len(errors)} with errors, "
        f"{len(batches)} batches to run on {jax.device_count()} devices in {jax.process_count()} processes")
    for item in errors:
        log(f"input line {item.line}: {item.error}")
    write(writer, lambda: [error_record(item) for item in errors], args.output)
    if not batches:
        return
    model = load(args.model, dtype=args.dtype, mesh=mesh)
    log(f"loaded {args.model}; the first batch of each shape compiles its steps")
    eos_ids = list(tokenizer.eos_token_ids) or list(config.eos_token_ids)
    main = jax.process_index() == 0
    progress = Progress(len(items), unit="prompt", done=written + len(errors), bar=None if main else False)
    compiles, finished, tokens_out = CompileReport(), written + len(errors), 0
    for n, (index, batch) in enumerate(batches, 1):
        tokens = ring_jax.generate(
            model, [list(item.ids) for item in batch], max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=batch_seed(args.seed, index), eos_token_id=eos_ids)
        compiled = compiles.take()
        records = write(writer, lambda: [record(item, row, eos_ids, tokenizer) for item, row in zip(batch, tokens)
                                         if item.line not in done], args.output)
        if main:
            if compiled:
                progress.say(f"[job] batch {n} of {len(batches)} ({len(batch)} prompts): {compiled}")
            finished += len(records)
            tokens_out += sum(rec["num_tokens"] for rec in records)
            rate = f"{tokens_out} tokens in {progress.seconds:.1f} s ({tokens_out / max(progress.seconds, 1e-9):.1f} tokens/s)"
            progress.update(len(records), f"[job] {finished}/{len(items)} prompts, {rate}", note=rate)
    progress.close()
    if writer:
        log(f"done: {writer.written} records in {args.output}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m ring_jax.job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="converted model folder (or an HF folder)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: the model folder)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="parameter dtype (default: as stored)")
    p.add_argument("--input", required=True, help="JSONL prompts (see above)")
    p.add_argument("--output", required=True, help="JSONL results; an existing file is resumed")
    p.add_argument("--mesh", help="device mesh, e.g. data=1,expert=8,tensor=1 (axes left out: 1); its size "
                                  "must be the device count of all processes (default: expert = every device)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call (global batch)")
    p.add_argument("--sort-window", type=int, default=8,
                   help="sort prompts by length within windows of this many batches (larger: less padding; "
                        "smaller: less finished work waiting to be written in input order, lost to a crash)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (batch i samples with one derived from it and i)")
    p.add_argument("--chat", action="store_true", help='render "prompt" lines as a user message with the chat template')
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="the chat template's thinking switch (default: the template's default)")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="keep compiled steps in DIR for later runs (on a shared filesystem for multi-host runs), "
                        "or 'off' (default: $RING_JAX_COMPILATION_CACHE, else ~/.cache/ring_jax/xla)")
    dist = p.add_argument_group("multi-process runs (one process per host, the same arguments but --process-id)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address: join a run of --num-processes")
    dist.add_argument("--num-processes", type=int)
    dist.add_argument("--process-id", type=int)
    dist.add_argument("--distributed", choices=("off", "auto"), default="off",
                      help="auto: jax.distributed.initialize() finds the processes itself (Cloud TPU pods, SLURM, "
                           "Open MPI)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_closed_event_loops()
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (JobError, *user_errors()) as e:           # a damaged model folder, a full disk, ...
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_now(main())
