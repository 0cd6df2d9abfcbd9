"""Perplexity: the model's loss on each token of a text given the tokens before it.

    python -m ring_jax.eval --model DIR (--text FILE | --jsonl FILE) [--context N] [--stride S]
                            [--slope-law hf|engine] [--losses OUT.jsonl]

A text longer than `context` tokens runs as sliding windows of `context` tokens every `stride`
tokens; each window scores the tokens after the previous window's end (the first window: every
token but the first), so each token is scored once, with at least context - stride tokens before
it (fewer at the start of the text; with stride == context the windows do not overlap, and a
window's first token, with nothing before it, is not scored). A window runs through the cache in chunks (`steps.score_step`),
so the activations are bounded by the chunk, not the window; the linear layers' states carry the
window's whole past, the softmax layers read the window's keys and values.

The decay slope's layer offset is an open question of the model family (`slope_law`, docs/SPEC.md):
with the real weights, the reading with the lower held-out perplexity is the one the weights were
trained with:

    python -m ring_jax.eval --model ring-mini-jax/ --text heldout.txt --slope-law hf
    python -m ring_jax.eval --model ring-mini-jax/ --text heldout.txt --slope-law engine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from ring_jax.cache import cache_length, init_cache
from ring_jax.errors import ArgumentParser, exit_now, run_command
from ring_jax.flags import add_model_flags, build_mesh, positive_int
from ring_jax.model import check_model
from ring_jax.batching import Plan
from ring_jax.sharding import sharding_mesh
from ring_jax.steps import flatten, host_rows, on_mesh, placer, score_step

# Tokens per scoring step: a step holds its logits, [chunk, vocab] float32 (1.3 GB at Ring's
# 157k-token vocabulary and 2048 tokens).
CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """losses: [n] float64, the loss (nats) of each scored token, in text order; positions: [n]
    their indices in the text; windows: how many windows ran."""
    losses: np.ndarray
    positions: np.ndarray
    windows: int

    @property
    def tokens(self) -> int:
        return int(self.losses.size)

    @property
    def loss(self) -> float:
        """The mean loss per scored token (nats)."""
        return float(self.losses.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @classmethod
    def joined(cls, parts: Sequence[Perplexity]) -> Perplexity:
        """Several texts' results as one (each token weighs the same)."""
        return cls(np.concatenate([p.losses for p in parts]), np.concatenate([p.positions for p in parts]),
                   sum(p.windows for p in parts))


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of each window over n tokens: tokens [start, end) run, the
    targets [first scored, end) are scored (each predicted from the token before it)."""
    _check_stride(stride, context)
    spans, start, scored = [], 0, 1
    while True:
        end = min(start + context, n)
        spans.append((start, end, max(scored, start + 1)))
        if end == n:
            return spans
        scored, start = end, start + stride


def _check_stride(stride: int, context: int) -> None:
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")


def settings(config, context: int | None, stride: int | None, chunk: int) -> tuple[int, int]:
    """(context, stride) of `perplexity`, their defaults filled in; a ValueError names a bad one."""
    context = config.max_position_embeddings if context is None else context
    if not 2 <= context <= config.max_position_embeddings:
        raise ValueError(f"context={context} must be in [2, max_position_embeddings={config.max_position_embeddings}]")
    stride = max(context // 2, 1) if stride is None else stride
    _check_stride(stride, context)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk} must be a power of two >= 16")
    return context, stride


def check_ids(tokens, vocab_size: int, where: str = "") -> None:
    """A ValueError naming the first token id outside [0, vocab_size) (`where`: its text)."""
    tokens = np.asarray(tokens)
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"{where}token id {tokens.min() if tokens.min() < 0 else tokens.max()} is outside the "
                         f"vocabulary [0, {vocab_size})")


def perplexity(model, tokens, *, context: int | None = None, stride: int | None = None,
               chunk: int = CHUNK) -> Perplexity:
    """The loss of each token of `tokens` ([n] ids, n >= 2) given the ones before it in its window.

    context: tokens per window (default: the model's max_position_embeddings); stride: tokens
    between windows (default: context // 2); chunk: tokens per scoring step (a power of two)."""
    check_model(model)
    config = model.config
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size < 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"perplexity takes [n] integer token ids with n >= 2, got {tokens.dtype} {tokens.shape}")
    check_ids(tokens, config.vocab_size)
    context, stride = settings(config, context, stride, chunk)
    spans = windows(tokens.size, context, stride)
    structure, arrays = flatten(model)
    placed = arrays[0].sharding
    mesh = sharding_mesh(placed)
    place = placer(placed)
    losses = []
    for start, end, first in spans:
        plan = Plan.of(config, model.dtype, 1, end - start, chunk, 1 if mesh is None else mesh.shape.get("data", 1))
        ids, starts = plan.padded([tokens[start:end]], 0)
        targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
        cache = init_cache(config, plan.batch, cache_length(plan.length), starts, model.dtype, mesh,
                           device=placed if mesh is None else None)
        nll = []
        with on_mesh(mesh):
            for c, size in plan.chunks():
                out, cache = score_step(structure, arrays, cache, place(ids[:, c:c + size], ("batch", None)),
                                        place(targets[:, c:c + size], ("batch", None)))
                nll.append(host_rows(out, 1)[0])
        nll = np.concatenate(nll).astype(np.float64)
        pad = plan.length - (end - start)              # position p of the window predicts token start + p + 1
        losses.append(nll[pad + first - 1 - start:pad + end - 1 - start])
    positions = np.concatenate([np.arange(first, end) for _, end, first in spans])
    return Perplexity(np.concatenate(losses), positions, len(spans))


def read_texts(args, tokenizer) -> list[tuple[str, list[int]]]:
    """(where, token ids) of --text (the whole file) or of each line of --jsonl ({"text": ...} or
    {"input_ids": [...]}); where names the file, or the file and line, for messages."""
    path = args.text or args.jsonl
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read() if args.text else f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8: {e}") from None
    if args.text:
        return [(path, tokenizer.encode(lines))]
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e}") from None
        if not isinstance(obj, dict) or ("text" in obj) == ("input_ids" in obj):
            raise ValueError(f'{where}: needs exactly one of "text" and "input_ids"')
        if "text" in obj and not isinstance(obj["text"], str):
            raise ValueError(f'{where}: "text" must be a string, got {type(obj["text"]).__name__}')
        ids = obj.get("input_ids")
        if ids is not None and not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            raise ValueError(f'{where}: "input_ids" must be a list of integers')
        texts.append((where, tokenizer.encode(obj["text"]) if "text" in obj else ids))
    if not texts:
        raise ValueError(f"{path}: no texts (every line is blank)")
    return texts


def writable(path: str) -> bool:
    """Whether a file can be written at path (a new one, or over a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    return not os.path.isdir(path) and os.path.isdir(folder) and os.access(folder, os.W_OK)


def run(args) -> int:
    import ring_jax

    ring_jax.enable_compilation_cache(args.compilation_cache)
    config = ring_jax.RingConfig.from_hf(args.model)                      # bad input first: before loading
    settings(config, args.context, args.stride, args.chunk)
    if args.losses and not writable(args.losses):
        raise ValueError(f"--losses {args.losses}: cannot write a file there")
    texts = read_texts(args, ring_jax.load_tokenizer(args.tokenizer or args.model))
    for where, ids in texts:
        if len(ids) < 2:
            raise ValueError(f"{where}: fewer than 2 tokens, nothing to score")
        check_ids(ids, config.vocab_size, f"{where}: ")
    texts = [ids for _, ids in texts]
    overrides = {} if args.slope_law is None else {"slope_law": args.slope_law}
    mesh = build_mesh(args.mesh, config.num_experts)
    model = ring_jax.load_model(args.model, dtype=args.dtype, mesh=mesh, verify=True, quantize=args.quantize,
                                **overrides)
    results = []
    for n, ids in enumerate(texts, 1):
        results.append(perplexity(model, ids, context=args.context, stride=args.stride, chunk=args.chunk))
        print(f"[text {n}/{len(texts)}: {results[-1].tokens} tokens, loss {results[-1].loss:.4f}]", file=sys.stderr,
              flush=True)
    total = Perplexity.joined(results)
    if args.losses:
        with open(args.losses, "w") as f:
            for n, (ids, result) in enumerate(zip(texts, results), 1):
                f.write(json.dumps({"text": n, "positions": result.positions.tolist(),
                                    "ids": [int(ids[p]) for p in result.positions],
                                    "losses": [round(float(x), 6) for x in result.losses]}) + "\n")
    print(f"{total.tokens} tokens in {len(texts)} text(s), {total.windows} window(s): loss {total.loss:.4f} "
          f"nats/token, perplexity {total.perplexity:.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m ring_jax.eval", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a text file, scored as one text")
    source.add_argument("--jsonl", help='one text per line: {"text": ...} or {"input_ids": [...]}')
    p.add_argument("--context", type=positive_int, help="tokens per window (default: max_position_embeddings)")
    p.add_argument("--stride", type=positive_int, help="tokens between windows (default: context / 2)")
    p.add_argument("--chunk", type=positive_int, default=CHUNK, help="tokens per scoring step (a power of two)")
    p.add_argument("--slope-law", choices=("hf", "engine"), help="the decay slope's reading (default: the config's)")
    p.add_argument("--losses", metavar="FILE",
                   help="write each text's scored tokens (positions, ids) and their losses (JSONL)")
    args = p.parse_args(argv)
    return run_command(run, args, p.prog, debug=args.debug)


if __name__ == "__main__":
    exit_now(main())
