"""generate() and stream(): chunked prefill into the hybrid cache, then decoding inside jit.

Prompts of different lengths are left-padded to a length bucket: whole prefill chunks after one
step of the rest rounded up to a power of two (`_steps`), so prefill compiles once per step size
(powers of two up to the chunk), not per prompt. The prompt runs through `RingModel.extend` one
step at a time (bounded activation memory at any length; softmax layers read the cache block by
block). Decoding is one jitted `lax.while_loop`: sample, record, stop checks, one `extend` step,
until every sequence finished or the step limit; the cache is donated, so it is updated in place,
and no Python runs per token.

A model sharded over a mesh (`ring_jax.sharding`) runs the same steps under that mesh: the batch is
padded to a multiple of the `data` axis and split over it, the cache is laid out like the model,
and on a multi-process launch every process calls generate() with the same prompts (SPMD) and
gets every sequence's tokens back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from ring_jax.cache import Cache, cache_length, init_cache
from ring_jax.layers.attention import FLASH_MIN_TOKENS, use_flash
from ring_jax.sharding import first_array, put, sharding_mesh, spec


def default_prefill_chunk(model) -> int:
    """Prompt tokens per prefill step (summed over the batch) when the caller gives none: 32768
    where the model's prefill attention is cuDNN's flash attention (a Hopper GPU and a bf16 or f16
    model: `attention.use_flash`), 4096 elsewhere, where the jnp attention holds [B, H, chunk,
    block] float32 scores. On the GPU every MoE layer's grouped matmuls read all expert weights
    once per step, which bounds 4096-token steps by bandwidth (5-layer Ring-mini, 32k tokens on an
    H200: 28.7% MFU at 4096, 37.2% at 32768; docs/PERFORMANCE.md)."""
    config = model.config
    q = jax.ShapeDtypeStruct((1, 2 * FLASH_MIN_TOKENS, config.num_attention_heads, config.head_dim), model.dtype)
    k = jax.ShapeDtypeStruct((1, 2 * FLASH_MIN_TOKENS, config.num_key_value_heads, config.head_dim), model.dtype)
    return 32768 if use_flash(q, k) else 4096


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax). Otherwise logits / temperature, then the top_k most likely
    tokens (None: all), then the smallest set whose probability reaches top_p (None: all)."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries. logits: [B, V] float32 for the next token; tokens:
    [B, N] generated so far (pad after a sequence finished; N: `token_bucket`, at least the
    tokens asked for); step: [] tokens generated; done: [B];
    recent: [B, W] the last W tokens (stop sequences); seed: [] uint32, of the sampling keys."""
    cache: Cache
    logits: jax.Array
    tokens: jax.Array
    step: jax.Array
    done: jax.Array
    recent: jax.Array
    seed: jax.Array


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a sequence is finished: it produced one of eos_ids or ended with one of `stop`."""
    eos_ids: tuple[int, ...]
    stop: tuple[tuple[int, ...], ...]
    pad_id: int

    @property
    def window(self) -> int:
        return max((len(s) for s in self.stop), default=1)

    def finished(self, token: jax.Array, recent: jax.Array) -> jax.Array:
        """token: [B]; recent: [B, window] ending with token -> [B] bool."""
        done = jnp.isin(token, jnp.asarray(self.eos_ids, jnp.int32)) if self.eos_ids else jnp.zeros(token.shape, bool)
        for seq in self.stop:
            done |= jnp.all(recent[:, recent.shape[1] - len(seq):] == jnp.asarray(seq, jnp.int32), axis=1)
        return done


# The steps take the model flattened: its arrays as arguments and its structure (a treedef) as a
# static key, flattened once per generate() call. A jitted call that takes the NNX module itself
# walks its graph in Python every time, which costs more host time per call than flattening once
# (and nnx.split, or hashing its GraphDef, more still).
# A prefill step's products are large: cuBLAS runs them as fast as XLA's Triton GEMMs, whose
# autotuning over tile configurations is most of the step's compile time. Decoding keeps the Triton
# GEMMs, faster on its small products (docs/PERFORMANCE.md, "Compile time").
PREFILL_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2, compiler_options=PREFILL_COMPILER_OPTIONS)
def _prefill_chunk(structure, arrays, cache: Cache, ids: jax.Array):
    """ids: [B, C] -> (logits of the last position [B, V] float32, cache advanced by C)."""
    model = jax.tree.unflatten(structure, arrays)
    hidden, cache = model.extend(ids, cache)
    return model.logits(hidden[:, -1]), cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampling", "rule"), donate_argnames="state")
def _decode(structure, arrays, state: DecodeState, limit, *, sampling: Sampling, rule: StopRule):
    """Decodes until `limit` tokens were generated in all or every sequence is done."""
    model = jax.tree.unflatten(structure, arrays)

    def running(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        token = sample(s.logits, jax.random.fold_in(jax.random.key(s.seed), s.step), sampling)
        token = jnp.where(s.done, rule.pad_id, token)
        recent = jnp.concatenate([s.recent[:, 1:], token[:, None]], axis=1)
        done = s.done | rule.finished(token, recent)
        hidden, cache = model.extend(token[:, None], s.cache)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1)
        return DecodeState(cache, model.logits(hidden[:, 0]), tokens, s.step + 1, done, recent, s.seed)

    return jax.lax.while_loop(running, step, state)


def _prompts(input_ids, attention_mask, vocab_size: int) -> list[np.ndarray]:
    """The real tokens of each prompt: [B, T] (or [T]) ids with an optional [B, T] 0/1 mask (left
    or right padding), or a list of token-id lists of any lengths."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a [B, T] array, not with a list of prompts")
        prompts = [np.asarray(p) for p in input_ids]
    else:
        ids = np.asarray(input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {ids.shape}")
        if attention_mask is None:
            prompts = list(ids)
        else:
            mask = np.asarray(attention_mask).reshape(ids.shape) if np.size(attention_mask) == ids.size else None
            if mask is None:
                raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {ids.shape}")
            prompts = []
            for b, (row, m) in enumerate(zip(ids, mask.astype(bool))):
                where = np.flatnonzero(m)
                if where.size and where[-1] - where[0] + 1 != where.size:
                    raise ValueError(f"attention_mask row {b} has holes: only left or right padding is supported")
                prompts.append(row[where])
    for b, p in enumerate(prompts):
        if p.ndim != 1 or p.size == 0:
            raise ValueError(f"prompt {b} is empty or not a flat list of token ids")
        if p.dtype == object and all(isinstance(t, int) for t in p.tolist()):     # ids beyond int64
            bad = next(t for t in p.tolist() if not 0 <= t < vocab_size)
            raise ValueError(f"prompt {b} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
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


def _steps(length: int, chunk: int) -> list[int]:
    """Prefill step sizes for a prompt of `length` tokens, `chunk` tokens per step: the rest of the
    length over whole chunks rounded up to a power of two (>= 16) first, then the whole chunks.
    Their sum is the padded prompt length."""
    full, rest = divmod(length, chunk)
    return ([min(max(16, 1 << (rest - 1).bit_length()), chunk)] if rest else []) + [chunk] * full


def _shapes(model, prompts: int, longest: int, prefill_chunk: int | None) -> tuple[int, list[int]]:
    """(the batch bucket, the prefill step sizes) of a call with `prompts` prompts of at most
    `longest` tokens: what its compiled steps depend on, with the cache length."""
    prefill_chunk = default_prefill_chunk(model) if prefill_chunk is None else prefill_chunk
    if prefill_chunk < 16 or prefill_chunk & (prefill_chunk - 1):
        raise ValueError(f"prefill_chunk={prefill_chunk} must be a power of two >= 16")
    mesh = sharding_mesh(first_array(model).sharding)
    B = batch_bucket(prompts, 1 if mesh is None else mesh.shape.get("data", 1))
    return B, _steps(longest, max(16, 1 << max(prefill_chunk // B, 1).bit_length() - 1))   # chunk over the batch


def _on(mesh):
    """The context that traces and runs a model's steps under its mesh (none: one device)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _placer(placed: jax.sharding.Sharding):
    """place(host array, logical axes) -> a device array beside the model's parameters, which are
    `placed` (a parameter's sharding): split over their mesh by the axes, or on their one device.
    (Committed, as the steps' outputs are, so that a second call of a step finds the first one's
    compilation.)"""
    mesh = sharding_mesh(placed)
    if mesh is None:
        return lambda x, axes: jax.device_put(np.asarray(x), placed)
    return lambda x, axes: put(x, NamedSharding(mesh, spec(axes, np.shape(x), mesh)))


def _host(tokens: jax.Array, batch: int) -> np.ndarray:
    """The first `batch` rows of a (possibly multi-process) array, on every process."""
    if not tokens.is_fully_addressable:
        tokens = multihost_utils.process_allgather(tokens, tiled=True)
    return np.asarray(tokens)[:batch]


def _start(model, input_ids, *, attention_mask, max_new_tokens, temperature, top_k, top_p, seed,
           eos_token_id, stop, pad_token_id, max_len, prefill_chunk, cache_len=None):
    """Validates, prefills, and returns (DecodeState, Sampling, StopRule, mesh,
    the number of prompts: the state's batch may hold copies of the last one after them, to fill
    the mesh's data axis, the model flattened: (structure, arrays) for `_decode`)."""
    config = model.config
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool):
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    sampling = Sampling(float(temperature), top_k, top_p)
    prompts = _prompts(input_ids, attention_mask, config.vocab_size)
    longest = max(len(p) for p in prompts)
    max_len = config.max_position_embeddings if max_len is None else max_len
    if longest + max_new_tokens > max_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds max_len="
                         f"{max_len} (the model's max_position_embeddings unless given)")
    eos = config.eos_token_ids if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    pad = pad_token_id if pad_token_id is not None else (
        config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0))
    stop = tuple(tuple(int(t) for t in s) for s in (stop or ()))
    if any(not s for s in stop):
        raise ValueError("stop sequences must be non-empty lists of token ids")
    rule = StopRule(tuple(int(e) for e in eos), stop, int(pad))

    # Flattened once (the steps take the arrays). All parameters are placed alike (on one device or
    # over one mesh), so the first leaf's sharding says where the inputs and the cache go.
    arrays, structure = jax.tree.flatten(model)
    placed = arrays[0].sharding
    n_prompts, mesh = len(prompts), sharding_mesh(placed)
    B, steps = _shapes(model, n_prompts, longest, prefill_chunk)
    prompts += [prompts[-1]] * (B - n_prompts)            # filler rows, done from the start
    padded = sum(steps)
    ids = np.full((B, padded), pad, np.int32)
    for b, p in enumerate(prompts):
        ids[b, padded - len(p):] = p
    start = np.array([padded - len(p) for p in prompts], np.int32)
    needed = padded + max_new_tokens
    if cache_len is not None and cache_len < needed:
        raise ValueError(f"cache_len={cache_len} is below the {needed} slots this call needs "
                         f"(prompt bucket {padded} + max_new_tokens {max_new_tokens})")
    cache = init_cache(config, B, cache_len or cache_length(needed), start, model.dtype, mesh,
                       device=placed if mesh is None else None)

    place = _placer(placed)
    with _on(mesh):
        for c, n in zip(np.cumsum([0] + steps[:-1]), steps):
            logits, cache = _prefill_chunk(structure, arrays, cache, place(ids[:, c:c + n], ("batch", None)))
    state = DecodeState(cache, logits, place(np.full((B, token_bucket(max_new_tokens)), pad, np.int32), ("batch", None)),
                        place(np.int32(0), ()), place(np.arange(B) >= n_prompts, ("batch",)),
                        place(np.full((B, rule.window), -1, np.int32), ("batch", None)),
                        place(np.uint32(seed % 2**32), ()))
    return state, sampling, rule, mesh, n_prompts, (structure, arrays)


_GENERATE_DOC = """
    model: a RingModel. input_ids: [B, T] (or [T]) token ids with attention_mask [B, T] (1 = token,
    0 = left or right padding), or a list of token-id lists of different lengths.
    max_new_tokens: tokens to generate per sequence. temperature 0 is greedy; otherwise sampling
    with top_k / top_p, reproducible for a given seed. A sequence finishes at one of
    eos_token_id (int or list; default: the config's) or when its output ends with one of `stop`
    (token-id sequences); its later tokens are pad_token_id (default: the config's pad, else eos).
    The eos or stop tokens themselves are part of the output.
    max_len: the most prompt + new tokens allowed (default: the config's max_position_embeddings).
    prefill_chunk: prompt tokens per prefill step, summed over the batch (a power of two; it bounds
    the activation memory). None: `default_prefill_chunk(model)`: 32768 for bf16 models on
    Hopper GPUs, else 4096.
    cache_len: the cache's slots (default: the prompt bucket + max_new_tokens, rounded up). The
    compiled steps depend on it: one fixed value serves every prompt length with one compile, at
    the cost of decode steps that read the whole cache.
"""


def generate(model, input_ids, *, attention_mask=None, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_token_id=None,
             stop: Sequence[Sequence[int]] | None = None, pad_token_id: int | None = None,
             max_len: int | None = None, prefill_chunk: int | None = None,
             cache_len: int | None = None) -> np.ndarray:
    """Generates up to max_new_tokens after each prompt. Returns the new tokens [B, max_new_tokens]
    int32 (numpy), pad_token_id after a sequence finished.
    """
    state, sampling, rule, mesh, batch, flat = _start(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
        stop=stop, pad_token_id=pad_token_id, max_len=max_len, prefill_chunk=prefill_chunk,
        cache_len=cache_len)
    with _on(mesh):
        state = _decode(*flat, state, np.int32(max_new_tokens), sampling=sampling, rule=rule)
    return _host(state.tokens, batch)[:, :max_new_tokens]


def stream(model, input_ids, *, steps_per_call: int = 8, attention_mask=None, max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           seed: int = 0, eos_token_id=None, stop: Sequence[Sequence[int]] | None = None,
           pad_token_id: int | None = None, max_len: int | None = None,
           prefill_chunk: int | None = None, cache_len: int | None = None) -> Iterator[np.ndarray]:
    """generate(), yielding the new tokens as they come: arrays [B, n] (n <= steps_per_call; one
    jitted call of the decode loop each). Concatenated they equal generate()'s output up to the
    step where every sequence finished.
    """
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call={steps_per_call} must be >= 1")
    state, sampling, rule, mesh, batch, flat = _start(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
        stop=stop, pad_token_id=pad_token_id, max_len=max_len, prefill_chunk=prefill_chunk,
        cache_len=cache_len)
    emitted = 0
    while emitted < max_new_tokens:
        limit = min(emitted + steps_per_call, max_new_tokens)
        with _on(mesh):
            state = _decode(*flat, state, np.int32(limit), sampling=sampling, rule=rule)
        step = int(state.step)
        if step > emitted:
            yield _host(state.tokens[:, emitted:step], batch)
        if step < limit:              # every sequence finished
            return
        emitted = step


generate.__doc__ += _GENERATE_DOC
stream.__doc__ += _GENERATE_DOC


def warmup(model, *, batch_sizes: Sequence[int] = (1,), prompt_lengths: Sequence[int] = (256,),
           max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, eos_token_id=None, stop: Sequence[Sequence[int]] | None = None,
           pad_token_id: int | None = None, prefill_chunk: int | None = None, cache_len: int | None = None,
           parallel: bool = True) -> int:
    """Compiles ahead of use the steps that generate() and stream() run for every pair of a batch
    size and a prompt length (each rounded to its bucket: `batch_bucket`, the prefill steps, the
    cache length of prompt + max_new_tokens), with these generation settings (the sampling and stop
    settings are part of the compiled decode step). It runs each pair once on dummy prompts, one
    decode step, so that a later call with the same buckets compiles nothing; with `parallel`, the
    pairs in threads at once (XLA compiles outside Python's lock; each holds its cache meanwhile),
    one after the other on a multi-process launch (where every process must run the same steps in
    the same order). Returns the number of distinct shapes compiled."""
    pairs = {}
    for B in batch_sizes:
        for T in prompt_lengths:
            if B < 1 or T < 1:
                raise ValueError(f"warmup: batch sizes and prompt lengths must be >= 1, got {B} and {T}")
            batch, steps = _shapes(model, B, T, prefill_chunk)
            pairs.setdefault((batch, tuple(steps)), (B, T))
    token = 0 if pad_token_id is None else pad_token_id

    def run(pair):
        B, T = pair
        state, sampling, rule, mesh, _, flat = _start(
            model, [[token] * T] * B, attention_mask=None, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=0, eos_token_id=eos_token_id, stop=stop,
            pad_token_id=pad_token_id, max_len=None, prefill_chunk=prefill_chunk, cache_len=cache_len)
        with _on(mesh):
            jax.block_until_ready(_decode(*flat, state, np.int32(1), sampling=sampling, rule=rule).tokens)

    workers = len(pairs) if parallel and jax.process_count() == 1 else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        list(pool.map(run, pairs.values()))
    return len(pairs)
