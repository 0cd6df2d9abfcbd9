"""The jnp references of the kernels against float64 numpy loops, on fresh random inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import recurrence64, rel_err
from pallas_kernels.linear_attention import reference as la
from pallas_kernels.moe import reference as moe


def random_qkv(seed, B, T, H, D, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(keys[i], (B, T, H, D), jnp.float32).astype(dtype) for i in range(3))
    g = -jax.random.uniform(keys[3], (H,), minval=0.005, maxval=0.8)
    s0 = jax.random.normal(keys[4], (B, H, D, D))
    return q, k, v, g, s0


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("H, D", [(1, 16), (3, 32)])
def test_linear_attention_matches_float64_recurrence(T, H, D):
    q, k, v, g, s0 = random_qkv(T * 7 + H, 2, T, H, D)
    for state in (None, s0):
        o, s = la.linear_attention(q, k, v, g, initial_state=state)
        o64, s64 = recurrence64(q, k, v, g, state)
        assert rel_err(o, o64) <= 1e-5 and rel_err(s, s64) <= 1e-5


def test_linear_attention_long_sequence_small_chunks():
    q, k, v, g, s0 = random_qkv(11, 1, 1000, 3, 16)
    o, s = la.linear_attention(q, k, v, g, initial_state=s0, chunk_size=16)
    o64, s64 = recurrence64(q, k, v, g, s0)
    assert rel_err(o, o64) <= 1e-5 and rel_err(s, s64) <= 1e-5


def test_linear_attention_bf16_inputs():
    q, k, v, g, _ = random_qkv(5, 2, 130, 2, 32, jnp.bfloat16)
    o, _ = la.linear_attention(q, k, v, g)
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, recurrence64(q, k, v, g)[0]) <= 1e-2


def test_prefill_then_steps_equal_one_prefill():
    q, k, v, g, s0 = random_qkv(3, 2, 70, 3, 16)
    o_all, s_all = la.linear_attention(q, k, v, g, initial_state=s0)
    o1, s1 = la.linear_attention(q[:, :65], k[:, :65], v[:, :65], g, initial_state=s0)
    o2, s2 = la.linear_attention_step(q[:, 65:], k[:, 65:], v[:, 65:], g, s1)
    assert rel_err(jnp.concatenate([o1, o2], 1), o_all) <= 1e-5 and rel_err(s2, s_all) <= 1e-5


def gmm64(lhs, rhs, sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, n in enumerate(np.asarray(sizes)):
        out[start:start + n] = lhs[start:start + n] @ rhs[g]
        start += n
    return out


@pytest.mark.parametrize("sizes", [[0, 5, 0, 3, 9, 0], [17, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
def test_gmm_matches_float64_loop(sizes):
    M, K, N = 20, 24, 12
    key = jax.random.PRNGKey(sum(sizes))
    lhs = jax.random.normal(key, (M, K))
    rhs = jax.random.normal(jax.random.fold_in(key, 1), (len(sizes), K, N))
    out = moe.gmm(lhs, rhs, jnp.asarray(sizes, jnp.int32))
    want = gmm64(lhs, rhs, sizes)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=1))
    assert not np.any(np.asarray(out)[sum(sizes):])  # rows past the groups are zeros


def swiglu64(gate_up):
    gate, up = np.split(np.asarray(gate_up, np.float64), 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


def test_gmm_swiglu_matches_float64_and_the_entry_point():
    """The reference SwiGLU of the grouped product against float64, and `pallas_kernels.gmm_swiglu`
    (its CPU path) equal to it; rows past the groups stay zeros."""
    import pallas_kernels

    sizes = [0, 9, 4, 0, 30]
    key = jax.random.PRNGKey(7)
    lhs = jax.random.normal(key, (50, 32))
    rhs = jax.random.normal(jax.random.fold_in(key, 1), (len(sizes), 32, 2 * 24)) / 32 ** 0.5
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = moe.gmm_swiglu(lhs, rhs, group_sizes)
    assert out.shape == (50, 24)
    assert rel_err(out, swiglu64(gmm64(lhs, rhs, sizes))) <= 1e-5
    assert not np.any(np.asarray(out)[sum(sizes):])
    np.testing.assert_array_equal(pallas_kernels.gmm_swiglu(lhs, rhs, group_sizes), out)
    bf16 = [x.astype(jnp.bfloat16) for x in (lhs, rhs)]
    np.testing.assert_array_equal(pallas_kernels.gmm_swiglu(*bf16, group_sizes),
                                  moe.swiglu(moe.gmm(*bf16, group_sizes)))


def test_gmm_swiglu_takes_the_fused_kernel_only_where_it_applies(monkeypatch):
    """On a (pretended) Hopper GPU: the SwiGLU epilogue at 128-row tiles; at 64-row tiles the kernel's
    product then the jnp SwiGLU; float32 or N % 256 != 0 operands through the reference."""
    from pallas_kernels import backend as kernel_backend
    from pallas_kernels.moe import api, gmm_gpu

    calls = []

    def fake_gmm(lhs, rhs, group_sizes, **kwargs):
        calls.append(kwargs)
        return jnp.zeros((lhs.shape[0], rhs.shape[2] // (2 if kwargs.get("swiglu") else 1)), lhs.dtype)

    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    monkeypatch.setattr(gmm_gpu, "gmm", fake_gmm)
    sizes = jnp.zeros(4, jnp.int32)
    bf16 = functools.partial(jnp.zeros, dtype=jnp.bfloat16)
    assert api.gmm_swiglu(bf16((1024, 64)), bf16((4, 64, 512)), sizes).shape == (1024, 256)
    assert calls[0]["swiglu"] and calls[0]["tile_m"] == 128    # 256 rows per group: 128-row tiles
    assert api.gmm_swiglu(bf16((128, 64)), bf16((4, 64, 512)), sizes).shape == (128, 256)
    assert not calls[1].get("swiglu") and calls[1]["tile_m"] == 64   # 32 rows per group
    api.gmm_swiglu(jnp.zeros((1024, 64)), jnp.zeros((4, 64, 512)), sizes)
    api.gmm_swiglu(bf16((1024, 64)), bf16((4, 64, 384)), sizes)
    assert len(calls) == 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_touch_the_state(side):
    q, k, v, g, s0 = random_qkv(21, 3, 70, 2, 16)
    lengths = np.array([70, 33, 1])
    pos = np.arange(70)[None]
    mask = (pos < lengths[:, None]) if side == "right" else (pos >= 70 - lengths[:, None])
    o, s = la.linear_attention(q, k, v, g, initial_state=s0, mask=jnp.asarray(mask))
    for b, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(70 - n, 70)
        o64, s64 = recurrence64(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], g, s0[b:b + 1])
        assert rel_err(o[b:b + 1, sl], o64) <= 1e-5 and rel_err(s[b:b + 1], s64) <= 1e-5
        assert not np.any(np.asarray(o[b])[~mask[b]])   # padded outputs are zeros
