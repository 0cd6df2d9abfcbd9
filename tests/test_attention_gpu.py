"""cuDNN flash attention over the cache (prefill chunks on GPU) against float64 and the jnp path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import attention64, load_config_dict, rel_err
from pallas_kernels.backend import platform
from ring_jax import RingConfig, backends
from ring_jax.cache import Cache, KVCache
from ring_jax.layers import attention
from ring_jax.layers.rope import rope_tables

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(platform() != "hopper", reason="the flash path runs on Hopper")]


@pytest.mark.parametrize("T, cursor, start", [
    (64, 0, [0, 5, 64]),            # first chunk: no padding, padding inside it, all padding
    (300, 600, [0, 17, 700]),       # a later chunk: keys before it, padding reaching into it
    (128, 384, [200, 384, 0, 600]),  # padding ending before the chunk, at it, none, beyond it
])
def test_flash_matches_float64_and_the_jnp_path(T, cursor, start):
    B, L, H, Hkv, D = len(start), 1024, 16, 4, 128
    ks = jax.random.split(jax.random.PRNGKey(T + cursor), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    keys, values = (jax.random.normal(k, (B, L, Hkv, D), jnp.float32).astype(jnp.bfloat16) for k in ks[1:])
    kv, start = KVCache(keys, values), jnp.asarray(start, jnp.int32)
    got = jax.jit(attention.flash_cached_attention)(q, kv, jnp.int32(cursor), start)
    jnp_path = attention.cached_attention(q, kv, cursor + jnp.arange(T, dtype=jnp.int32), start)
    want = attention64(q, keys, values, cursor, np.asarray(start))
    assert got.dtype == jnp.bfloat16 and np.isfinite(np.asarray(got, np.float32)).all()
    real = (cursor + np.arange(T))[None, :] >= np.asarray(start)[:, None]             # [B, T]
    for b in range(B):
        if real[b].any():
            assert rel_err(got[b][real[b]], want[b][real[b]]) <= 1e-2
            assert rel_err(got[b][real[b]], jnp_path[b][real[b]]) <= 1e-2
        # a padding query reads its own slot: exactly its value, as on the jnp path
        np.testing.assert_array_equal(np.asarray(got[b][~real[b]], np.float32),
                                      np.asarray(jnp_path[b][~real[b]], np.float32))


def test_softmax_layer_takes_flash(monkeypatch):
    """The layer takes the cuDNN path for a prefill chunk and for the cache-free forward, and the
    jnp path for a decode step; the results equal the jnp path's within bf16 tolerance."""
    config = RingConfig.from_hf({**load_config_dict("tiny.json"), "head_dim": 64})
    layer = attention.SoftmaxAttention(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    B, L, T = 2, 256, 96
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, config.hidden_size)).astype(jnp.bfloat16)
    kv = jnp.zeros((2, B, L, config.num_key_value_heads, config.head_dim), jnp.bfloat16)   # 2 layers
    start = jnp.asarray([0, 40], jnp.int32)
    cache = Cache(jnp.zeros((0, B, 1, 1, 1), jnp.float32), kv, kv, start, jnp.int32(0))
    cos, sin = rope_tables(config, jnp.maximum(jnp.arange(T)[None, :] - start[:, None], 0), jnp.bfloat16)
    calls = []
    monkeypatch.setattr(attention, "flash_cached_attention",
                        lambda *a, f=attention.flash_cached_attention: calls.append("chunk") or f(*a))
    monkeypatch.setattr(attention, "flash_causal_attention",
                        lambda *a, f=attention.flash_causal_attention: calls.append("forward") or f(*a))

    def run():
        chunk = jax.jit(lambda x, cache: layer(x, cos, sin, cache, 1))(x, cache)
        return chunk, jax.jit(lambda x: layer(x, cos[0], sin[0])[0])(x)

    (got, got_kv), got_full = run()
    assert calls == ["chunk", "forward"], calls
    monkeypatch.setattr(backends, "FLASH_MIN_TOKENS", 1 << 30)
    (want, want_kv), want_full = run()
    np.testing.assert_array_equal(np.asarray(got_kv.keys, np.float32), np.asarray(want_kv.keys, np.float32))
    assert not np.asarray(got_kv.keys[0], np.float32).any()      # slot 1 written, slot 0 untouched
    for b in range(B):
        assert rel_err(got[b, int(start[b]):], want[b, int(start[b]):]) <= 2e-2
    assert rel_err(got_full, want_full) <= 2e-2
    one = jnp.zeros((1, 1, 16, 128), jnp.bfloat16)
    assert not backends.flash_attention(one, one)                   # a decode step


def test_cudnn_causal_attention_matches_float64():
    """The cuDNN call of the cache-free causal forward (model(ids), the MTP layers) with GQA."""
    B, T, H, Hkv, D = 2, 200, 16, 4, 128
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(ks[0], (B, T, H, D)).astype(jnp.bfloat16)
    k, v = (jax.random.normal(key, (B, T, Hkv, D)).astype(jnp.bfloat16) for key in ks[1:])
    got = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    want = attention64(q, k, v, 0, np.zeros(B, int))
    assert rel_err(got, want) <= 1e-2
    assert rel_err(attention.causal_attention(q, k, v), want) <= 1e-2
