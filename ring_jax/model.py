"""RingModel: embed -> decoder layers -> norm -> head (docs/SPEC.md §3), plus the MTP layers (§8).

The decoder layers are held as one stack per kind and run in the order of `ring_jax.schedule`:
scanned, so that a compiled program holds a few layer bodies whatever the depth.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ring_jax.cache import Cache
from ring_jax.config import RingConfig
from ring_jax.layers.attention import SoftmaxAttention
from ring_jax.layers.linear import Linear, matmul
from ring_jax.layers.linear_attention import LinearAttention
from ring_jax.layers.mlp import MLP
from ring_jax.layers.moe import Experts, MoE
from ring_jax.layers.norms import RMSNorm
from ring_jax.layers.rope import rope_tables
from ring_jax.layers.stack import layer_view, stack_modules
from ring_jax.schedule import Run, Schedule, attention_of, kind_index
from ring_jax.quantization import METHODS, quantized_path
from ring_jax.sharding import constrain, model_mesh, param, put, shard_model, spec
from ring_jax.steps import flatten

ACTIVATION_AXES = ("batch", None, "embed")   # x: [B, T, hidden]


class DecoderLayer(nnx.Module):
    """Pre-norm residual block of one kind (`ring_jax.schedule`): attention (linear or softmax)
    then MLP (dense or MoE)."""

    def __init__(self, config: RingConfig, kind: str, *, dtype, rngs: nnx.Rngs):
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps, dtype=dtype)
        self.attention = (LinearAttention(config, dtype=dtype, rngs=rngs) if attention_of(kind) == "linear"
                          else SoftmaxAttention(config, dtype=dtype, rngs=rngs))
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype=dtype)
        self.mlp = (MoE(config, dtype=dtype, rngs=rngs) if kind.endswith("_moe")
                    else MLP(hidden, config.intermediate_size, dtype=dtype, rngs=rngs))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Cache | None = None,
                 slot=None, valid: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """x: [B, T, hidden] -> (x [B, T, hidden], cache). Without a cache: the causal forward.
        With one: x continues the layer's entry `slot` of it (valid: [B, T] bool, False for left
        padding), which comes back updated."""
        h, cache = self.attention(self.input_layernorm.deferred(x), cos, sin, cache, slot, valid)
        x = x + h
        return constrain(x + self.mlp(self.post_attention_layernorm.deferred(x)), ACTIVATION_AXES), cache


class MTPLayer(nnx.Module):
    """A multi-token-prediction layer (Ling-V2 `BailingMoeV2MTPLayer`): mixes the embedding of the
    next token with the previous hidden state, then a softmax-attention MoE block."""

    def __init__(self, config: RingConfig, *, dtype, rngs: nnx.Rngs):
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(hidden, eps, dtype=dtype)
        self.hnorm = RMSNorm(hidden, eps, dtype=dtype)
        self.eh_proj = Linear(2 * hidden, hidden, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(hidden, eps, dtype=dtype)
        self.attention = SoftmaxAttention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype=dtype)
        self.mlp = MoE(config, dtype=dtype, rngs=rngs)
        self.final_layernorm = RMSNorm(hidden, eps, dtype=dtype)

    def __call__(self, embeds, hidden, cos, sin):
        """embeds, hidden: [B, T, hidden] -> [B, T, hidden] (normed by final_layernorm)."""
        x = self.eh_proj(jnp.concatenate([self.enorm(embeds), self.hnorm(hidden)], axis=-1))
        x = x + self.attention(self.input_layernorm(x), cos, sin)[0]
        x = x + self.mlp(self.post_attention_layernorm(x))
        return self.final_layernorm(x)


class RingModel(nnx.Module):
    """The Ring-linear-2.0 causal LM. `model(input_ids)` -> float32 logits [B, T, vocab]."""

    def __init__(self, config: RingConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        V, hidden = config.vocab_size, config.hidden_size
        self.word_embeddings = param(jax.random.normal(rngs.params(), (V, hidden)).astype(dtype), ("vocab", "embed"))
        self.schedule = Schedule.of(config)
        for kind, n in self.schedule.counts:     # one stack per kind: linear_moe, softmax_moe, ...
            setattr(self, kind, stack_modules([DecoderLayer(config, kind, dtype=dtype, rngs=rngs)
                                               for _ in range(n)]))
        self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(hidden, V, axes=("embed", "vocab"), dtype=dtype, rngs=rngs))
        self.mtp_layers = nnx.List([MTPLayer(config, dtype=dtype, rngs=rngs)
                                    for _ in range(config.num_nextn_predict_layers)])
        self.remat = False             # training (`ring_jax.train.split`): recompute each layer in the backward pass
        # Every layer unrolled, not scanned: in training without remat, whose backward pass keeps
        # every layer's activations (kept by a scan, they would be written into its stacks of them,
        # zeroed first, and copied back out: a pass over all of them each way, more at each level of
        # nesting); and in a GPU's decode loop of a few sequences (`backends.decode_unrolled`).
        self.unroll = False
        self.quantization = None       # "fp8" after `quantize`

    def quantize(self, method: str = "fp8") -> RingModel:
        """Quantizes the parameters of `ring_jax.quantization.QUANTIZED` to FP8, in place (on a
        mesh, each laid out again by its annotation). Returns the model."""
        if method not in METHODS:
            raise ValueError(f"quantize method {method!r}: choose one of {METHODS}")
        if self.quantization is not None:
            raise ValueError(f"the model is quantized ({self.quantization}) already")
        for path, node in list(nnx.iter_graph(self)):
            if isinstance(node, Linear) and quantized_path(tuple(path) + ("kernel",)):
                node.quantize()
            elif isinstance(node, Experts) and quantized_path(tuple(path) + ("gate_up_proj",)):
                node.quantize()
        self.quantization = method
        mesh = model_mesh(self)
        return self if mesh is None else shard_model(self, mesh)

    @property
    def dtype(self):
        return self.word_embeddings[...].dtype

    # ------------------------------------------------------------------------ traceable forward
    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i on its own (its parameters read out of the stacks): for inspection and
        tests; the model runs the stacks."""
        kind, index = kind_index(self.config, i)
        return jax.tree.map(lambda entry: entry.read(), layer_view(getattr(self, kind), index))

    def decoder(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Cache | None = None,
                valid: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """x: [B, T, hidden] through every decoder layer in the schedule's order -> (x, cache)."""
        schedule = self.schedule

        def run(r: Run, repeat, x, cache):
            """Run r of group `repeat` (0 outside the groups), scanned when longer than one layer."""
            stack = getattr(self, r.kind)
            index = r.index + repeat * schedule.index_stride(r.kind)
            slot = r.slot + repeat * schedule.slot_stride(r.kind)

            def one(x, cache, index, slot):
                def layer(x, cache, index, slot):
                    return layer_view(stack, index)(x, cos, sin, cache, slot, valid)
                # remat: a layer's activations are recomputed in the backward pass, not kept
                return (jax.checkpoint(layer) if self.remat else layer)(x, cache, index, slot)

            if r.length == 1 or self.unroll:
                for i in range(r.length):
                    x, cache = one(x, cache, index + i, slot + i)
                return x, cache

            # The layer's stack index and cache slot ride in the carry as counters: derived from
            # the scan's own counter, they would be one more launch per layer on a GPU.
            def step(carry, _):
                x, cache, index, slot = carry
                return (*one(x, cache, index, slot), index + 1, slot + 1), None

            (x, cache, _, _), _ = jax.lax.scan(step, (x, cache, jnp.int32(index), jnp.int32(slot)), length=r.length)
            return x, cache

        for r in schedule.head:
            x, cache = run(r, 0, x, cache)
        if schedule.repeats and self.unroll:
            for repeat in range(schedule.repeats):
                for r in schedule.group:
                    x, cache = run(r, repeat, x, cache)
        elif schedule.repeats:
            def group(carry, repeat):
                for r in schedule.group:
                    carry = run(r, repeat, *carry)
                return carry, None

            (x, cache), _ = jax.lax.scan(group, (x, cache), jnp.arange(schedule.repeats, dtype=jnp.int32))
        for r in schedule.tail:
            x, cache = run(r, 0, x, cache)
        return x, cache

    def hidden_states(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, T] -> final-normed hidden states [B, T, hidden]."""
        x = constrain(jnp.take(self.word_embeddings[...], input_ids, axis=0), ACTIVATION_AXES)
        cos, sin = rope_tables(self.config, jnp.arange(input_ids.shape[1]), x.dtype)   # [T, rotary_dim]
        return self.norm(self.decoder(x, cos, sin)[0])

    def extend(self, input_ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Runs input_ids [B, T] (the tokens at slots cursor..cursor+T-1) through the model on top
        of `cache`: chunked prefill and decoding are both this. Returns (final-normed hidden
        states [B, T, hidden], the cache advanced by T slots)."""
        T = input_ids.shape[1]
        slots = cache.cursor + jnp.arange(T, dtype=jnp.int32)                        # [T]
        valid = slots[None, :] >= cache.start[:, None]                                 # [B, T]
        positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)
        x = constrain(jnp.take(self.word_embeddings[...], input_ids, axis=0), ACTIVATION_AXES)
        cos, sin = rope_tables(self.config, positions, x.dtype)                        # [B, T, rotary_dim]
        x, cache = self.decoder(x, cos, sin, cache, valid)
        return self.norm(x), cache.advanced(T)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., hidden] -> float32 logits [..., vocab] (the head's matmul in model dtype)."""
        fn, weights = self.head()
        return fn(weights, hidden).astype(jnp.float32)

    def head(self):
        """The head's product as a function of its own weights: (fn, weights), a pytree of arrays,
        with fn(weights, hidden) the logits in the model's dtype (`logits` casts them to float32),
        for a loss that differentiates the head apart from the rest of the model
        (`ring_jax.train.loss`)."""
        if self.lm_head is None:
            return (lambda embeddings, hidden: matmul(hidden, embeddings.T)), self.word_embeddings[...]
        graphdef, state = nnx.split(self.lm_head)
        return (lambda state, hidden: nnx.merge(graphdef, state)(hidden)), state

    def forward(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, T] int -> logits [B, T, vocab] float32 (full causal forward, no cache)."""
        return self.logits(self.hidden_states(input_ids))

    def mtp_logits(self, input_ids: jax.Array, hidden: jax.Array) -> list[jax.Array]:
        """Logits of each MTP layer, [B, T, vocab] float32; layer j predicts token t + 2 + j.

        hidden: the main model's final-normed hidden states for input_ids.
        """
        cos, sin = rope_tables(self.config, jnp.arange(input_ids.shape[1]), hidden.dtype)
        out = []
        for layer in self.mtp_layers:
            input_ids = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
            embeds = jnp.take(self.word_embeddings[...], input_ids, axis=0)
            hidden = layer(embeds, hidden, cos, sin)
            out.append(self.logits(hidden))
        return out

    # ------------------------------------------------------------------------------- user call
    def __call__(self, input_ids) -> jax.Array:
        """input_ids: [B, T] (or [T]) integer token ids -> float32 logits [B, T, vocab], jitted
        (under the model's mesh when it is sharded: the batch is split over `data`)."""
        ids = check_input_ids(input_ids, self.config.vocab_size)
        mesh = model_mesh(self)
        if mesh is None or isinstance(ids, jax.core.Tracer):          # traced: under the caller's mesh
            return _jit_forward(*flatten(self), ids)
        with jax.set_mesh(mesh):
            ids = put(np.asarray(ids), jax.sharding.NamedSharding(mesh, spec(("batch", None), ids.shape, mesh)))
            return _jit_forward(*flatten(self), ids)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(structure, arrays, input_ids):
    """The model as its arrays and its static structure (`ring_jax.steps.flatten`: cheaper per call
    than a jitted call that walks the NNX module's graph)."""
    return jax.tree.unflatten(structure, arrays).forward(input_ids)


def check_input_ids(input_ids, vocab_size: int) -> jax.Array:
    """Validates token ids: integer, [B, T] (a [T] vector becomes [1, T]), T >= 1, ids in range."""
    try:
        ids = input_ids if isinstance(input_ids, jax.Array) else np.asarray(input_ids)
    except ValueError:                                         # a ragged list
        raise ValueError("input_ids must be a rectangular [batch, seq_len] of token ids (prompts of "
                         "different lengths: ring_jax.generate takes a list of them)") from None
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or 0 in ids.shape:
        raise ValueError(f"input_ids must have shape [batch, seq_len] with both >= 1, got {ids.shape}")
    if not isinstance(ids, jax.core.Tracer):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids hold {lo if lo < 0 else hi}, outside the vocabulary [0, {vocab_size})")
    return jnp.asarray(ids, jnp.int32)


def check_model(model) -> None:
    """A TypeError unless `model` is a RingModel: the entry points' first check, so that a folder
    passed for the model is named as such."""
    if not isinstance(model, RingModel):
        raise TypeError(f"model must be a ring_jax.RingModel (ring_jax.load_model(folder)), got "
                        f"{type(model).__name__} {model!r:.80}")
