"""The job's command line and its run: arguments, the model, the batches through generate(), the
records to the output (the formats and guarantees: `ring_jax.job`)."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence

import jax

import ring_jax
from ring_jax.config import ConfigError, RingConfig
from ring_jax.errors import ArgumentParser, run_command
from ring_jax.flags import add_generation_flags, add_model_flags, build_mesh, generation_config, positive_int
from ring_jax.job import __doc__ as JOB_DOC
from ring_jax.job.processes import check_same_everywhere, init_distributed, log, open_output, write
from ring_jax.job.records import (Item, JobError, OrderedWriter, batch_seed, error_record, fingerprint, plan_batches,
                                  read_items, record)

from ring_jax.progress import CompileReport, Progress
from ring_jax.sampling import eos_ids
from ring_jax.sharding import check_mesh
from ring_jax.tokenizer import TokenizerError, load_tokenizer

PROG = "python -m ring_jax.job"


def input_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no file at {text}" if not os.path.exists(text) else f"{text} is not a file")
    return text


def check_args(args) -> None:
    """What argparse's types do not check about the arguments (before JAX starts)."""
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

    load(args.model, dtype=args.dtype, mesh=mesh, quantize=args.quantize) makes the model: a benchmark
    can make a random one."""
    check_args(args)
    init_distributed(args)
    ring_jax.enable_compilation_cache(args.compilation_cache)
    config, tokenizer = load_config_and_tokenizer(args)
    mesh = build_mesh(args.mesh, config.num_experts)
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
    model = load(args.model, dtype=args.dtype, mesh=mesh, quantize=args.quantize)
    log(f"loaded {args.model}; the first batch of each shape compiles its steps")
    eos = eos_ids(config, tokenizer)
    main = jax.process_index() == 0
    progress = Progress(len(items), unit="prompt", done=written + len(errors), bar=None if main else False)
    compiles, finished, tokens_out = CompileReport(), written + len(errors), 0
    for n, (index, batch) in enumerate(batches, 1):
        tokens = ring_jax.generate(model, [list(item.ids) for item in batch],
                                   generation_config(args, seed=batch_seed(args.seed, index), eos_token_id=eos))
        compiled = compiles.take()
        records = write(writer, lambda: [record(item, row, eos, tokenizer) for item, row in zip(batch, tokens)
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
    p = ArgumentParser(prog=PROG, description=JOB_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--input", required=True, type=input_file, help="JSONL prompts (see above)")
    p.add_argument("--output", required=True, help="JSONL results; an existing file is resumed")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts per generate() call (global batch)")
    p.add_argument("--sort-window", type=positive_int, default=8,
                   help="sort prompts by length within windows of this many batches (larger: less padding; "
                        "smaller: less finished work waiting to be written in input order, lost to a crash)")
    add_generation_flags(p)
    p.add_argument("--chat", action="store_true", help='render "prompt" lines as a user message with the chat template')
    dist = p.add_argument_group("multi-process runs (one process per host, the same arguments but --process-id)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address: join a run of --num-processes")
    dist.add_argument("--num-processes", type=int)
    dist.add_argument("--process-id", type=int)
    dist.add_argument("--distributed", choices=("off", "auto"), default="off",
                      help="auto: jax.distributed.initialize() finds the processes itself (Cloud TPU pods, SLURM, "
                           "Open MPI)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(run, args, PROG, debug=args.debug)

