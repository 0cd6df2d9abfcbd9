"""The Lightning linear-attention layer (docs/SPEC.md §6): fused qkv, q/k RMSNorm, RoPE, a per-head
decaying recurrent state, GroupRMSNorm, a sigmoid output gate and `dense`."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from ring_jax import backends
from ring_jax.cache import STATE_AXES, Cache
from ring_jax.config import RingConfig
from ring_jax.layers.linear import Linear
from ring_jax.layers.mlp import rounded
from ring_jax.layers.norms import GroupRMSNorm, RMSNorm
from ring_jax.layers.rope import apply_rope
from ring_jax.layers.stack import StackSlice, set_entry, stack_and_index
from ring_jax.sharding import constrain, on_blocks

# Continuations of at most this many tokens (decode, speculative steps) use the closed-form step.
STEP_MAX_TOKENS = 8


def alibi_slopes(n: int) -> list[float]:
    """The ALiBi head slopes for n heads (float64), as `build_slope_tensor` lists them."""
    def power_of_two(m):
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


def log_decay(config: RingConfig, layer_idx: int) -> np.ndarray:
    """g: [H] float32 < 0, the per-head log decay of linear layer `layer_idx` (global index).

    The slope buffer is float32; the layer factor multiplies it in float32 (docs/SPEC.md §6.2).
    """
    offset = 1 if config.slope_law == "hf" else 0
    factor = 1 - (layer_idx - offset) / (config.num_hidden_layers - 1) + 1e-5
    slopes = np.asarray(alibi_slopes(config.num_attention_heads), np.float32)
    return (-slopes) * np.float32(factor)


def scan(q, k, v, g, state):
    """The kernels on q, k, v: [B, T, H, D], g: [H], state: [B, H, D, D] f32 or None ->
    (o [B, T, H, D], final state). A few tokens after a state take the closed-form step. Under a
    mesh, each device runs them on its (batch, head) block."""
    def run(q, k, v, g, *state):
        if state and q.shape[1] <= STEP_MAX_TOKENS:
            return pallas_kernels.linear_attention_step(q, k, v, g, state[0])
        return pallas_kernels.linear_attention(q, k, v, g, initial_state=state[0] if state else None)

    args = (q, k, v, g) + (() if state is None else (state,))
    layouts = ("b.h.",) * 3 + ("h",) + (() if state is None else ("bh..",))
    return on_blocks(run, *args, layouts=layouts, out=("b.h.", "bh.."), batch=q.shape[0], heads=q.shape[2])


def log_decays(config: RingConfig) -> tuple[tuple[float, ...], ...]:
    """The log decays of every linear layer, in cache-slot order (the layers' order): [n_linear][H]
    float32 values, exact as Python floats."""
    return tuple(tuple(float(x) for x in log_decay(config, i))
                 for i in range(config.num_decoder_layers) if not config.is_softmax_layer(i))


class LinearAttention(nnx.Module):
    """Lightning attention; every head has its own q, k and v (MHA). One module serves every
    linear layer of a stack: a layer's decay comes from its cache slot."""

    def __init__(self, config: RingConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = H = config.num_attention_heads
        self.head_dim = D = config.head_dim
        self.linear_silu = config.linear_silu
        self.log_decay = log_decays(config)        # static, exact f32: [n_linear][H]
        eps = config.rms_norm_eps
        self.query_key_value = Linear(config.hidden_size, 3 * H * D, axes=("embed", "fused"),
                                      dtype=dtype, rngs=rngs)
        self.query_layernorm = RMSNorm(D, eps, dtype=dtype)
        self.key_layernorm = RMSNorm(D, eps, dtype=dtype)
        self.g_proj = Linear(config.hidden_size, H * D, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.g_norm = GroupRMSNorm(H * D, config.group_norm_size, eps, dtype=dtype)
        self.dense = Linear(H * D, config.hidden_size, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Cache | None = None,
                 slot=None, valid: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """x: [B, T, hidden] (an array or a `Normed`); cos, sin: [(B,) T, rotary_dim]; slot: this
        layer's linear-layer slot (int or traced [] int32): its decay, and its state in cache.states.

        Without a cache: the causal forward from a zero state. With one: x continues the state
        cache.states[slot], which comes back updated. valid: [B, T] bool or None: False marks left
        padding, tokens before a sequence's first token. Their keys and values are zeroed, which
        is exact because the state they would enter is still zero for that sequence: they add
        nothing, and the decays they cause act on zero. A few tokens (T <= STEP_MAX_TOKENS,
        decoding) continue in closed form.

        Returns (out [B, T, hidden], cache).
        """
        if slot is None:
            raise ValueError("LinearAttention needs the layer's slot (`ring_jax.schedule.cache_slot`): "
                             "it selects the layer's decay")
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        log_decays = jnp.asarray(self.log_decay, jnp.float32)                          # [n_linear, H]
        qkv = self.query_key_value(x)
        if self.linear_silu:                      # SGLang's placement: on the fused projection
            qkv = rounded(jax.nn.silu, qkv)
        if cache is not None and backends.linear_decode_kernel(qkv, cache.states, cos.shape[-1]):
            cos, sin = (jnp.broadcast_to(t, (B, T, t.shape[-1]))[:, 0] for t in (cos, sin))
            (q_weight, index), (k_weight, _) = (stack_and_index(norm.weight.get_value())
                                                for norm in (self.query_layernorm, self.key_layernorm))
            o, states = pallas_kernels.linear_attention_decode(
                qkv[:, 0], q_weight, k_weight, cos, sin, log_decays, cache.states,
                None if valid is None else valid[:, 0], slot=slot, weight_index=index, eps=self.query_layernorm.eps)
        else:
            q, k, v = jnp.split(qkv.reshape(B, T, 3 * H, D), 3, axis=2)
            q = apply_rope(self.query_layernorm(q), cos, sin)
            k = apply_rope(self.key_layernorm(k), cos, sin)
            if valid is not None:
                k, v = (jnp.where(valid[:, :, None, None], t, 0) for t in (k, v))
            state = None if cache is None else StackSlice(cache.states, slot).read()
            o, state = scan(q, k, v, StackSlice(log_decays, slot).read(), state)
            states = None if cache is None else set_entry(cache.states, slot, state)
        if cache is not None:
            cache = dataclasses.replace(cache, states=constrain(states, STATE_AXES))
        o = self.g_norm(o.reshape(B, T, H * D))
        o = o * rounded(jax.nn.sigmoid, self.g_proj(x))
        return self.dense(o), cache
