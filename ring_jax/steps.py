"""The compiled steps of generation, and where their inputs go.

`prefill_step` runs a chunk of prompt tokens through `RingModel.extend` (bounded activation memory
at any length; softmax layers read the cache block by block); `score_step` does the same and returns
each position's loss on the next token (evaluation). `decode_loop` is one jitted
`lax.while_loop`: sample, record, stop checks, one `extend` step, until every sequence finished or
the step limit; the cache is donated, so it is updated in place, and no Python runs per token.

The steps take the model flattened (`flatten`): its arrays as arguments and its structure (a
treedef) as a static key, flattened once per call of generate(). A jitted call that takes the NNX
module itself walks its graph in Python every time, which costs more host time per call than
flattening once (and nnx.split, or hashing its GraphDef, more still).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from ring_jax import backends
from ring_jax.cache import Cache
from ring_jax.sampling import Sampling, StopRule, sample
from ring_jax.sharding import put, sharding_mesh, spec

# A prefill step's products are large: cuBLAS runs them as fast as XLA's Triton GEMMs, whose
# autotuning over tile configurations is most of the step's compile time. Decoding keeps the Triton
# GEMMs, faster on its small products (docs/PERFORMANCE.md, "Compile time").
PREFILL_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries. logits: [B, V] float32 for the next token; tokens:
    [B, N] generated so far (pad after a sequence finished; N: `batching.token_bucket`, at least the
    tokens asked for); step: [] tokens generated; done: [B];
    recent: [B, W] the last W tokens (stop sequences); seed: [] uint32, of the sampling keys."""
    cache: Cache
    logits: jax.Array
    tokens: jax.Array
    step: jax.Array
    done: jax.Array
    recent: jax.Array
    seed: jax.Array


def flatten(model) -> tuple:
    """(structure, arrays): the model as the steps take it."""
    arrays, structure = jax.tree.flatten(model)
    return structure, arrays


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2, compiler_options=PREFILL_COMPILER_OPTIONS)
def prefill_step(structure, arrays, cache: Cache, ids: jax.Array):
    """ids: [B, C] -> (logits of the last position [B, V] float32, cache advanced by C)."""
    model = jax.tree.unflatten(structure, arrays)
    hidden, cache = model.extend(ids, cache)
    return model.logits(hidden[:, -1]), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2, compiler_options=PREFILL_COMPILER_OPTIONS)
def score_step(structure, arrays, cache: Cache, ids: jax.Array, targets: jax.Array):
    """ids, targets: [B, C] -> (the negative log-likelihood of each target after its position,
    [B, C] float32 (from the float32 logits: logsumexp - the target's logit), cache advanced by C)."""
    model = jax.tree.unflatten(structure, arrays)
    hidden, cache = model.extend(ids, cache)
    logits = model.logits(hidden)                                                  # [B, C, V] float32
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked, cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampling", "rule"), donate_argnames="state")
def decode_loop(structure, arrays, state: DecodeState, limit, *, sampling: Sampling, rule: StopRule):
    """Decodes until `limit` tokens were generated in all or every sequence is done; the step's
    layers unrolled where `backends.decode_unrolled` says (`RingModel.unroll`)."""
    model = jax.tree.unflatten(structure, arrays)
    model.unroll = backends.decode_unrolled(state.tokens.shape[0])

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


def on_mesh(mesh):
    """The context that traces and runs a model's steps under its mesh (none: one device)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def placer(placed: jax.sharding.Sharding):
    """place(host array, logical axes) -> a device array beside the model's parameters, which are
    `placed` (a parameter's sharding): split over their mesh by the axes, or on their one device.
    (Committed, as the steps' outputs are, so that a second call of a step finds the first one's
    compilation.)"""
    mesh = sharding_mesh(placed)
    if mesh is None:
        return lambda x, axes: jax.device_put(np.asarray(x), placed)
    return lambda x, axes: put(x, NamedSharding(mesh, spec(axes, np.shape(x), mesh)))


def host_rows(tokens: jax.Array, batch: int) -> np.ndarray:
    """The first `batch` rows of a (possibly multi-process) array, on every process."""
    if not tokens.is_fully_addressable:
        tokens = multihost_utils.process_allgather(tokens, tiled=True)
    return np.asarray(tokens)[:batch]
