"""generate(), stream() and warmup(): a call's prompts prefilled into the hybrid cache, then decoded
inside jit (`ring_jax.steps`), at the few shapes of `ring_jax.batching`'s buckets.

A model sharded over a mesh (`ring_jax.sharding`) runs the same steps under that mesh: the batch is
padded to a multiple of the `data` axis and split over it, the cache is laid out like the model,
and on a multi-process launch every process calls generate() with the same prompts (SPMD) and
gets every sequence's tokens back.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Iterator, Sequence

import jax
import numpy as np

from ring_jax.cache import cache_length, check_cache_length, init_cache
from ring_jax.model import check_model
from ring_jax.batching import Plan, prompt_ids, token_bucket
from ring_jax.sampling import GenerationConfig, StopRule
from ring_jax.sharding import model_mesh, sharding_mesh
from ring_jax.steps import DecodeState, decode_loop, flatten, host_rows, on_mesh, placer, prefill_step


@dataclasses.dataclass
class Generation:
    """A call after its prefill: the decode loop's state (`state.tokens` holds the new tokens of
    every row of the batch bucket) and what decoding it takes; the first `rows` rows are the
    caller's prompts'."""
    state: DecodeState
    config: GenerationConfig
    rule: StopRule
    mesh: jax.sharding.Mesh | None
    rows: int
    flat: tuple

    def decode(self, limit: int) -> None:
        """Decodes until `limit` (at most max_new_tokens) tokens were generated or every sequence
        finished."""
        if not 0 <= limit <= self.config.max_new_tokens:
            raise ValueError(f"decode limit {limit} is outside [0, max_new_tokens={self.config.max_new_tokens}]: "
                             "the cache and the token buffer hold max_new_tokens")
        with on_mesh(self.mesh):
            self.state = decode_loop(*self.flat, self.state, np.int32(limit), sampling=self.config.sampling(),
                                     rule=self.rule)

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The caller's rows of new tokens [start, stop), on the host (every process). (Sliced on
        the host: a slice on the device would compile a program per width.)"""
        return host_rows(self.state.tokens, self.rows)[:, start:stop]


def prefill(model, input_ids, config: GenerationConfig | None = None, *, attention_mask=None,
            **settings) -> Generation:
    """Checks the call, runs its prompts through the model into a new cache, and returns it ready
    to decode. input_ids, attention_mask, config and settings: as for `generate`."""
    check_model(model)
    config = GenerationConfig.of(config, **settings)
    n = config.max_new_tokens
    if n is None:
        raise TypeError("max_new_tokens is required: the tokens to generate per sequence")
    model_config = model.config
    prompts = prompt_ids(input_ids, attention_mask, model_config.vocab_size)
    longest = max(len(p) for p in prompts)
    max_len = model_config.max_position_embeddings if config.max_len is None else config.max_len
    if longest + n > max_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={n} exceeds max_len="
                         f"{max_len} (the model's max_position_embeddings unless given)")
    rule = StopRule.of(model_config, config.eos_token_id, config.stop, config.pad_token_id)

    # All parameters are placed alike (on one device or over one mesh), so the first leaf's
    # sharding says where the inputs and the cache go.
    structure, arrays = flat = flatten(model)
    placed = arrays[0].sharding
    mesh = sharding_mesh(placed)
    plan = Plan.of(model_config, model.dtype, len(prompts), longest, config.prefill_chunk,
                   1 if mesh is None else mesh.shape.get("data", 1))
    ids, start = plan.padded(prompts, rule.pad_id)
    needed = plan.length + n
    if config.cache_len is not None:
        check_cache_length(config.cache_len, "cache_len")
    if config.cache_len is not None and config.cache_len < needed:
        raise ValueError(f"cache_len={config.cache_len} is below the {needed} slots this call needs "
                         f"(prompt bucket {plan.length} + max_new_tokens {n})")
    B = plan.batch
    cache = init_cache(model_config, B, config.cache_len or cache_length(needed), start, model.dtype, mesh,
                       device=placed if mesh is None else None)
    place = placer(placed)
    with on_mesh(mesh):
        for c, size in plan.chunks():
            logits, cache = prefill_step(structure, arrays, cache, place(ids[:, c:c + size], ("batch", None)))
    state = DecodeState(cache, logits, place(np.full((B, token_bucket(n)), rule.pad_id, np.int32), ("batch", None)),
                        place(np.int32(0), ()), place(np.arange(B) >= len(prompts), ("batch",)),
                        place(np.full((B, rule.window), -1, np.int32), ("batch", None)),
                        place(np.uint32(config.seed % 2**32), ()))
    return Generation(state, config, rule, mesh, len(prompts), flat)


_GENERATE_DOC = """
    model: a RingModel. input_ids: [B, T] (or [T]) token ids with attention_mask [B, T] (1 = token,
    0 = left or right padding), or a list of token-id lists of different lengths.
    config: a `GenerationConfig` (default: its defaults); settings: any of its fields by name
    (max_new_tokens=..., temperature=..., ...), replacing config's.
"""


def generate(model, input_ids, config: GenerationConfig | None = None, *, attention_mask=None,
             **settings) -> np.ndarray:
    """Generates up to max_new_tokens after each prompt. Returns the new tokens [B, max_new_tokens]
    int32 (numpy), the pad token after a sequence finished.
    """
    run = prefill(model, input_ids, config, attention_mask=attention_mask, **settings)
    n = run.config.max_new_tokens
    run.decode(n)
    return run.tokens(0, n)


def stream(model, input_ids, config: GenerationConfig | None = None, *, steps_per_call: int = 8,
           attention_mask=None, **settings) -> Iterator[np.ndarray]:
    """generate(), yielding the new tokens as they come: arrays [B, n] (n <= steps_per_call; one
    jitted call of the decode loop each). Concatenated they equal generate()'s output up to the
    step where every sequence finished.
    """
    if not isinstance(steps_per_call, (int, np.integer)) or isinstance(steps_per_call, bool):
        raise TypeError(f"steps_per_call must be an integer, got {steps_per_call!r:.80}")
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call={steps_per_call} must be >= 1")
    run = prefill(model, input_ids, config, attention_mask=attention_mask, **settings)
    n, emitted = run.config.max_new_tokens, 0
    while emitted < n:
        limit = min(emitted + steps_per_call, n)
        run.decode(limit)
        step = int(run.state.step)
        if step > emitted:
            yield run.tokens(emitted, step)
        if step < limit:              # every sequence finished
            return
        emitted = step


generate.__doc__ += _GENERATE_DOC
stream.__doc__ += _GENERATE_DOC


def warmup(model, config: GenerationConfig | None = None, *, batch_sizes: Sequence[int] = (1,),
           prompt_lengths: Sequence[int] = (256,), parallel: bool = True, **settings) -> int:
    """Compiles ahead of use the steps that generate() and stream() run for every pair of a batch
    size and a prompt length (each rounded to its bucket: `batching.batch_bucket`, the prefill steps,
    the cache length of prompt + max_new_tokens), with these generation settings (config and
    settings as for `generate`; max_new_tokens 256 unless given; the sampling and stop settings
    are part of the compiled decode step). It runs each pair once on dummy prompts, one decode
    step, so that a later call with the same buckets compiles nothing; with `parallel`, the pairs
    in threads at once (XLA compiles outside Python's lock; each holds its cache meanwhile), one
    after the other on a multi-process launch (where every process must run the same steps in the
    same order). Returns the number of distinct shapes compiled."""
    check_model(model)
    config = GenerationConfig.of(config, **settings)
    if config.max_new_tokens is None:
        config = dataclasses.replace(config, max_new_tokens=256)
    mesh = model_mesh(model)
    data = 1 if mesh is None else mesh.shape.get("data", 1)
    for name, sizes in (("batch_sizes", batch_sizes), ("prompt_lengths", prompt_lengths)):
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__") or not all(
                isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in sizes):
            raise ValueError(f"warmup: {name} must be a list of integers >= 1, got {sizes!r:.80}")
    pairs = {}
    for B in map(int, batch_sizes):
        for T in map(int, prompt_lengths):
            plan = Plan.of(model.config, model.dtype, B, T, config.prefill_chunk, data)
            pairs.setdefault(plan, (B, T))
    token = 0 if config.pad_token_id is None else config.pad_token_id

    def run(pair):
        B, T = pair
        started = prefill(model, [[token] * T] * B, config)
        started.decode(1)
        jax.block_until_ready(started.state.tokens)

    workers = len(pairs) if parallel and jax.process_count() == 1 else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        list(pool.map(run, pairs.values()))
    return len(pairs)
