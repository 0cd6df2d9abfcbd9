"""Softmax attention of a decode step over the stacked KV cache
(`pallas_kernels.softmax_attention_decode`): the GPU kernels in Pallas interpret mode and the jnp
reference against float64, and the softmax layer's decode step through the kernels against its
jnp path."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from conftest import attention64, load_config_dict, rel_err
from pallas_kernels import backend as kernel_backend
from pallas_kernels.backend import platform
from pallas_kernels.softmax_attention import api, decode_gpu
from ring_jax import RingConfig
from ring_jax.cache import Cache
from ring_jax.layers import attention
from ring_jax.layers.rope import rope_tables
from ring_jax.sharding import make_mesh

def operands(S, B, L, H, Hkv, D, T, dtype, seed):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
    keys, values = (jnp.asarray(rng.standard_normal((S, B, L, Hkv, D)), dtype) for _ in range(2))
    return q, keys, values

@pytest.mark.parametrize("B, L, H, Hkv, D, T, cursor, start, dtype", [
    (2, 256, 4, 2, 64, 1, 200, [0, 37], jnp.float32),             # decode: GQA groups of 2, left padding
    (3, 512, 8, 2, 32, 2, 300, [0, 64, 301], jnp.bfloat16),       # two tokens; one row's first is padding
    (1, 512, 2, 2, 16, 4, 3, [1], jnp.float32),                   # start of the cache: most blocks skipped
    (2, 1024, 16, 4, 128, 1, 1000, [5, 999], jnp.bfloat16),       # Ring-mini's heads: splits of one block
    (1, 256, 16, 2, 32, 4, 250, [0], jnp.bfloat16),              # 32 query rows per kv head
])
def test_kernels_and_reference_match_float64(B, L, H, Hkv, D, T, cursor, start, dtype):
    S, slot = 3, 1
    q, keys, values = operands(S, B, L, H, Hkv, D, T, dtype, seed=B * L + T)
    start = jnp.asarray(start, jnp.int32)
    want = attention64(q, keys[slot], values[slot], cursor, np.asarray(start))
    ref = api.softmax_attention_decode(q, keys, values, start, jnp.int32(cursor), slot=slot, backend="reference")
    kernel = api.softmax_attention_decode(q, keys, values, start, jnp.int32(cursor), slot=jnp.int32(slot),
                                          backend="gpu", interpret=True)
    tol = 2e-6 if dtype == jnp.float32 else 1e-2                    # bf16: probabilities and output rounded
    for got in (ref, kernel):
        assert got.shape == (B, T, H, D) and got.dtype == dtype
        assert rel_err(got, want) <= tol
    assert rel_err(kernel, ref) <= (2e-6 if dtype == jnp.float32 else 8e-3)
    # a padding query reads its own slot: exactly its value
    padding = (cursor + np.arange(T))[None, :] < np.asarray(start)[:, None]
    for b, t in zip(*np.nonzero(padding)):
        own = np.repeat(np.asarray(values[slot, b, cursor + t], np.float32), H // Hkv, axis=0)
        np.testing.assert_array_equal(np.asarray(kernel[b, t], np.float32), own)

def test_errors_and_backend_choice(monkeypatch):
    q, keys, values = operands(2, 1, 256, 4, 2, 64, 1, jnp.bfloat16, seed=0)
    start, cursor = jnp.zeros((1,), jnp.int32), jnp.int32(3)
    with pytest.raises(ValueError, match="must be one stack"):
        api.softmax_attention_decode(q, keys[0], values[0], start, cursor)
    with pytest.raises(ValueError, match="start"):
        api.softmax_attention_decode(q, keys, values, jnp.zeros((2,), jnp.int32), cursor)
    with pytest.raises(NotImplementedError, match="multiple of"):
        api.softmax_attention_decode(q, keys[:, :, :100], values[:, :, :100], start, cursor, backend="gpu",
                                     interpret=True)
    with pytest.raises(ValueError, match="backend"):
        api.softmax_attention_decode_backend(q, keys, backend="tpu")
    monkeypatch.setattr(kernel_backend, "platform", lambda: "other")
    assert api.softmax_attention_decode_backend(q, keys) == "reference"
    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    assert api.softmax_attention_decode_backend(q, keys) == "gpu"
    assert api.softmax_attention_decode_backend(q.astype(jnp.float32), keys) == "reference"        # dtypes differ
    rows = jnp.zeros((1, decode_gpu.MAX_ROWS + 1, 2, 64), jnp.bfloat16)                           # too many rows
    assert api.softmax_attention_decode_backend(rows, keys) == "reference"

def test_values_kernel_splits():
    """Few sequences and kv heads: the slots split over many programs; many: one split each."""
    assert decode_gpu.slot_splits(1, 4, 128) == (128, 1)
    assert decode_gpu.slot_splits(64, 4, 128)[0] * 64 * 4 >= decode_gpu.TARGET_PROGRAMS
    assert decode_gpu.slot_splits(256, 4, 128) == (1, 128)
    assert decode_gpu.slot_splits(1, 1, 10) == (10, 1)

@pytest.mark.parametrize("mesh", [None, (2, 1, 2)])
def test_softmax_layer_decodes_through_the_kernels(monkeypatch, mesh):
    """Where the kernels run (here: forced, in interpret mode), the layer's decode step takes them,
    reading the layer's entry of the cache's stacks, and matches its jnp path; under a mesh
    (data=2, tensor=2) each device runs them on its block of sequences and heads."""
    config = RingConfig.from_hf({**load_config_dict("tiny.json"), "head_dim": 32})
    layer = attention.SoftmaxAttention(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    B, L, Hkv, D = 2, 256, config.num_key_value_heads, config.head_dim
    rng = np.random.default_rng(1)
    keys, values = (jnp.asarray(rng.standard_normal((2, B, L, Hkv, D)), jnp.float32) for _ in range(2))
    start, cursor = jnp.asarray([0, 90], jnp.int32), jnp.int32(100)
    cache = Cache(jnp.zeros((0, B, 1, 1, 1), jnp.float32), keys, values, start, cursor)
    x = jnp.asarray(rng.standard_normal((B, 1, config.hidden_size)), jnp.float32)
    cos, sin = rope_tables(config, (cursor - start)[:, None], jnp.float32)
    with contextlib.ExitStack() as stack:
        if mesh:
            stack.enter_context(jax.set_mesh(make_mesh(*mesh, devices=jax.devices()[:4])))
        want, want_cache, got, got_cache, calls = decode_both_ways(monkeypatch, layer, x, cos, sin, cache)
    assert calls
    assert rel_err(got, want) <= 2e-6
    np.testing.assert_array_equal(np.asarray(got_cache.keys), np.asarray(want_cache.keys))


def decode_both_ways(monkeypatch, layer, x, cos, sin, cache):
    """The layer's decode step at slot 1 on its jnp path, then forced through the kernels:
    (want, want_cache, got, got_cache, kernel calls)."""
    step = jax.jit(lambda x, cache, slot: layer(x, cos, sin, cache, slot))
    want, want_cache = step(x, cache, jnp.int32(1))
    calls = []
    monkeypatch.setattr(pallas_kernels, "softmax_attention_decode_backend", lambda *a, **k: "gpu")
    monkeypatch.setattr(pallas_kernels, "softmax_attention_decode", lambda *a, f=api.softmax_attention_decode, **k:
                        calls.append(1) or f(*a, **k, backend="gpu", interpret=True))
    step = jax.jit(lambda x, cache, slot: layer(x, cos, sin, cache, slot))
    got, got_cache = step(x, cache, jnp.int32(1))
    return want, want_cache, got, got_cache, calls


@pytest.mark.gpu
@pytest.mark.skipif(platform() != "hopper", reason="the kernels run on Hopper")
@pytest.mark.parametrize("T", [1, 4])
def test_gpu_kernels_match_float64_at_ring_mini_shapes(T):
    """Compiled for the GPU: Ring-mini's heads (16 query, 4 kv, D 128), an 8k cache of which the
    sequences read up to 5,000 slots, left padding of several lengths."""
    B, L, H, Hkv, D, cursor = 4, 8192, 16, 4, 128, 4999
    q, keys, values = operands(4, B, L, H, Hkv, D, T, jnp.bfloat16, seed=T)
    start = jnp.asarray([0, 3, 1000, 4998], jnp.int32)
    got = api.softmax_attention_decode(q, keys, values, start, jnp.int32(cursor), slot=jnp.int32(2))
    assert api.softmax_attention_decode_backend(q, keys) == "gpu"
    ref = api.softmax_attention_decode(q, keys, values, start, jnp.int32(cursor), slot=2, backend="reference")
    want = attention64(q, keys[2], values[2], cursor, np.asarray(start))
    assert rel_err(got, want) <= 1e-2 and rel_err(got, ref) <= 8e-3
