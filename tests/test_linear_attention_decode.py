"""The Lightning layer's one-token decode kernel (`pallas_kernels.linear_attention_decode`) in
Pallas interpret mode and its jnp reference, against float64 and against the layer's own path."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import as_if_on_hopper, load_config_dict, rel_err
from pallas_kernels import backend as kernel_backend
from pallas_kernels.linear_attention import api, decode_gpu, reference
from ring_jax import RingConfig
from ring_jax.cache import Cache
from ring_jax.layers.linear_attention import LinearAttention


def operands(B, H, D, rotary_dim, dtype, seed):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(3 * rng.standard_normal((B, 3 * H * D)), dtype)
    q_weight, k_weight = (jnp.asarray(1 + 0.3 * rng.standard_normal(D), dtype) for _ in range(2))
    angles = rng.uniform(0, 6.3, (B, rotary_dim // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)
    log_decay = jnp.asarray(-rng.uniform(0.01, 0.9, H), jnp.float32)
    state = jnp.asarray(rng.standard_normal((B, H, D, D)), jnp.float32)
    valid = jnp.asarray(np.arange(B) != 1)                                 # sequence 1: padding
    return qkv, q_weight, k_weight, cos, sin, log_decay, state, valid


def decode64(qkv, q_weight, k_weight, cos, sin, log_decay, state, valid, eps):
    """The same step in float64, without the intermediate roundings."""
    qkv, qw, kw, cos, sin, g, state = (np.asarray(t, np.float64) for t in (qkv, q_weight, k_weight, cos, sin,
                                                                         log_decay, state))
    B, H, D, _ = state.shape
    r = cos.shape[-1]
    q, k, v = np.split(qkv.reshape(B, 3 * H, D), 3, axis=1)

    def head(x, w):
        x = w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
        rotated = np.concatenate([-x[..., r // 2:r], x[..., :r // 2]], axis=-1)
        return np.concatenate([x[..., :r] * cos[:, None] + rotated * sin[:, None], x[..., r:]], axis=-1)

    keep = np.asarray(valid)[:, None, None]
    q, k, v = head(q, qw), head(k, kw) * keep, v * keep
    decay = np.exp(g)[None, :, None, None]
    new = decay * state + k[..., :, None] * v[..., None, :]
    o = D ** -0.5 * (np.einsum("bhd,bhde->bhe", q, decay * state) + np.sum(q * k, -1, keepdims=True) * v)
    return o, new


@pytest.mark.parametrize("B, H, D, rotary_dim, dtype", [(3, 2, 128, 64, jnp.float32), (3, 2, 128, 128, jnp.float32),
                                                        (2, 3, 64, 32, jnp.bfloat16)])
def test_kernel_and_reference_match_float64(B, H, D, rotary_dim, dtype):
    args = operands(B, H, D, rotary_dim, dtype, seed=B * H + rotary_dim)
    want_o, want_state = decode64(*args, eps=1e-6)
    ref = reference.decode_step(*args, eps=1e-6)
    kernel = api.linear_attention_decode(*args, eps=1e-6, backend="gpu", interpret=True)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2            # bf16: the roundings of q, k and o
    for o, state in (ref, kernel):
        assert o.shape == (B, H, D) and o.dtype == dtype and state.dtype == jnp.float32
        assert rel_err(o, want_o) <= tol and rel_err(state, want_state) <= tol
    assert rel_err(kernel[0], ref[0]) <= (1e-6 if dtype == jnp.float32 else 4e-3)
    assert rel_err(kernel[1], ref[1]) <= (1e-6 if dtype == jnp.float32 else 4e-3)
    np.testing.assert_array_equal(np.asarray(kernel[1][1]), np.asarray(ref[1][1]))      # padding: decayed only


def test_errors_and_backend_choice(monkeypatch):
    args = operands(1, 2, 128, 64, jnp.bfloat16, seed=0)
    qkv, *rest = args
    with pytest.raises(ValueError, match="does not hold q, k and v"):
        api.linear_attention_decode(qkv[:, :-128], *rest, eps=1e-6)
    with pytest.raises(ValueError, match="rotary_dim"):
        api.linear_attention_decode(qkv, rest[0], rest[1], rest[2][:, :48], rest[3], *rest[4:], eps=1e-6)
    with pytest.raises(NotImplementedError, match="rotary_dim / 2"):
        api.linear_attention_decode(qkv, rest[0], rest[1], rest[2][:, :48], rest[3][:, :48], *rest[4:], eps=1e-6,
                                    backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="must have qkv's dtype"):
        api.linear_attention_decode(qkv, rest[0].astype(jnp.float32), *rest[1:], eps=1e-6)
    monkeypatch.setattr(kernel_backend, "platform", lambda: "other")
    assert api.linear_attention_decode_backend(qkv, rest[5], 64) == "reference"
    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    assert api.linear_attention_decode_backend(qkv, rest[5], 64) == "gpu"
    assert api.linear_attention_decode_backend(qkv, rest[5], 48) == "reference"
    assert not decode_gpu.fits(qkv.astype(jnp.float16), rest[5], 64)
    assert not decode_gpu.fits(qkv, rest[5].astype(jnp.bfloat16), 64)
    assert not decode_gpu.fits(jnp.zeros((1, 6 * 96), jnp.bfloat16), jnp.zeros((1, 2, 96, 96)), 64)   # D = 96


def test_layer_takes_the_kernel_with_its_own_numerics(monkeypatch):
    """A bf16 layer's decode token through the kernel (interpret mode, as if on a Hopper GPU)
    against the same layer's jnp path: the same roundings, so the same output and state up to the
    float32 sum order; a left-padding row keeps its state decayed only."""
    dtype = jnp.bfloat16
    config = load_config_dict("tiny.json")
    config.update(head_dim=64, partial_rotary_factor=0.5)
    config = RingConfig.from_hf(config)
    layer = LinearAttention(config, dtype=dtype, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(4)
    B, H, D = 3, config.num_attention_heads, config.head_dim
    x = jnp.asarray(rng.standard_normal((B, 1, config.hidden_size)), dtype)
    angles = jnp.asarray(rng.uniform(0, 6.3, (B, 1, config.rotary_dim // 2)), jnp.float32)
    cos, sin = (f(jnp.concatenate([angles, angles], -1)).astype(dtype) for f in (jnp.cos, jnp.sin))
    states = jnp.asarray(rng.standard_normal((len(layer.log_decay), B, H, D, D)), jnp.float32)   # layer slot 1
    no_kv = jnp.zeros((0, B, 1, 1, 1), dtype)
    cache = Cache(states, no_kv, no_kv, jnp.zeros((B,), jnp.int32), jnp.int32(0))
    valid = jnp.asarray([[True], [False], [True]])
    o, want = layer(x, cos, sin, cache, 1, valid)                         # on the CPU: the layer's jnp path
    want = (o, want.states[1])

    calls = as_if_on_hopper(monkeypatch, {"decode_step": lambda *a, **k: a[0].shape})
    o, got = layer(x, cos, sin, cache, 1, valid)
    for other in set(range(len(states))) - {1}:            # the kernel writes only its slot
        np.testing.assert_array_equal(np.asarray(got.states[other]), np.asarray(states[other]))
    got = (o, got.states[1])
    assert calls == [(B, 3 * H * D)]
    assert rel_err(got[0], want[0]) <= 4e-3 and rel_err(got[1], want[1]) <= 4e-3      # a flipped rounding: one step
    np.testing.assert_array_equal(np.asarray(got[1][1]), np.asarray(want[1][1]))
    calls.clear()
    layer(jnp.concatenate([x, x], axis=1), jnp.concatenate([cos, cos], 1), jnp.concatenate([sin, sin], 1), cache, 1)
    assert not calls                                                       # two tokens: the jnp step


def test_kernel_reads_the_layers_entries_of_stacks():
    """Inside the scanned decoder the norm weights come as stacks [N, D] with the layer's index
    and the decays as every linear layer's table [S, H] with the state's slot: the kernel (and the
    reference path) take the entries, and the kernel writes only the slot's state."""
    qkv, q_weight, k_weight, cos, sin, log_decay, state, valid = operands(2, 2, 64, 32, jnp.bfloat16, seed=7)
    rng = np.random.default_rng(8)
    q_stack, k_stack = (jnp.asarray(1 + 0.3 * rng.standard_normal((3, 64)), jnp.bfloat16).at[2].set(w)
                        for w in (q_weight, k_weight))
    decays = jnp.asarray(-rng.uniform(0.01, 0.9, (4, 2)), jnp.float32).at[1].set(log_decay)
    states = jnp.asarray(rng.standard_normal((4,) + state.shape), jnp.float32).at[1].set(state)
    want = reference.decode_step(qkv, q_weight, k_weight, cos, sin, log_decay, state, valid, eps=1e-6)
    for backend, interpret in (("reference", False), ("gpu", True)):
        o, got = api.linear_attention_decode(qkv, q_stack, k_stack, cos, sin, decays, states, valid, slot=jnp.int32(1),
                                             weight_index=jnp.int32(2), eps=1e-6, backend=backend, interpret=interpret)
        assert rel_err(o, want[0]) <= 4e-3 and rel_err(got[1], want[1]) <= 4e-3
        for other in (0, 2, 3):
            np.testing.assert_array_equal(np.asarray(got[other]), np.asarray(states[other]))
    with pytest.raises(ValueError, match="one row per state"):
        api.linear_attention_decode(qkv, q_stack, k_stack, cos, sin, decays[:3], states, valid, slot=1,
                                    weight_index=2, eps=1e-6)
    with pytest.raises(ValueError, match="with weight_index"):
        api.linear_attention_decode(qkv, q_stack, k_stack, cos, sin, decays, states, valid, slot=1, eps=1e-6)
