"""The MoE dispatch: sort_by_expert agrees with a stable sort; the row-gather kernel copies x[idx]."""


import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.layers import moe


@pytest.mark.parametrize("pairs", [1, 8, 64, 1024, 1025, 5000])
def test_sort_by_expert(pairs):
    ids = np.random.default_rng(pairs).integers(0, 16, pairs)
    order, rank, sizes = moe.sort_by_expert(jnp.asarray(ids, jnp.int32), 16)
    np.testing.assert_array_equal(order, np.argsort(ids, kind="stable"))
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(rank)], np.arange(pairs))
    np.testing.assert_array_equal(sizes, np.bincount(ids, minlength=16))


@pytest.mark.parametrize("dtype, R, H, N", [(dtype, *shape) for dtype in (jnp.bfloat16, jnp.float32)
                                            for shape in ((37, 2048, 64), (5, 96, 8), (300, 256, 2400))]
                         + [(jnp.float8_e4m3fn, *shape) for shape in ((37, 2048, 64), (5, 192, 8))])
def test_take_rows_kernel_copies_the_indexed_rows(dtype, R, H, N):
    """The GPU row-gather kernel (interpret mode) returns x[idx] bit for bit: random rows, indices
    repeated and in any order, every column block; FP8 rows moved as uint16 pairs (the smallest
    block of 32 pairs at H = 192)."""
    import pallas_kernels

    rng = np.random.default_rng(R + H + N)
    x = jnp.asarray(rng.standard_normal((R, H)), dtype)
    idx = jnp.asarray(rng.integers(0, R, N), jnp.int32)
    got = pallas_kernels.take_rows(x, idx, backend="gpu", interpret=True)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x)[np.asarray(idx)])


def test_take_rows_kernel_names_shapes_it_does_not_take():
    import pallas_kernels

    with pytest.raises(NotImplementedError, match="positive multiple of 8"):
        pallas_kernels.take_rows(jnp.ones((4, 64)), jnp.zeros((5,), jnp.int32), backend="gpu")
    with pytest.raises(NotImplementedError, match="H % 32"):
        pallas_kernels.take_rows(jnp.ones((4, 40)), jnp.zeros((8,), jnp.int32), backend="gpu")
    with pytest.raises(NotImplementedError, match="64 for 1-byte rows"):
        pallas_kernels.take_rows(jnp.ones((4, 96), jnp.float8_e4m3fn), jnp.zeros((8,), jnp.int32), backend="gpu")
    np.testing.assert_array_equal(pallas_kernels.take_rows(jnp.arange(8.0).reshape(4, 2), jnp.asarray([3, 0])),
                                  [[6, 7], [0, 1]])
    with pytest.raises(ValueError, match="interpret runs a Pallas kernel"):      # interpret names no kernel
        pallas_kernels.take_rows(jnp.arange(8.0).reshape(4, 2), jnp.asarray([1]), backend="reference", interpret=True)


def test_prefill_dispatch_takes_the_row_kernel(monkeypatch):
    """A prefill-sized MoE layer, "auto" answering as on a Hopper GPU: the sorted dispatch gathers
    its rows through the row kernel (interpret mode; the grouped matmuls stay the jnp reference),
    and the layer's output is the same bits as with XLA's gather."""
    from flax import nnx

    from conftest import as_if_on_hopper, load_config_dict
    from ring_jax.config import RingConfig

    config = RingConfig.from_hf(load_config_dict("tiny.json"), hidden_size=256, moe_intermediate_size=128)
    layer = moe.MoE(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 40, 256)), jnp.bfloat16)
    want = layer(x)
    calls = as_if_on_hopper(monkeypatch, {"take_rows": lambda x, idx, **k: idx.shape})
    got = layer(x)
    assert calls == [(40 * config.num_experts_per_tok,)]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_grouped_outputs_gradient_gathers_what_autodiff_scatters():
    """The dispatch's and the combine's gradients run as gathers (through the inverse
    permutations) instead of autodiff's scatter-adds: the same float32 gradients as the plain
    indexing, with experts held elsewhere (ids == E) among the pairs."""
    import jax

    from pallas_kernels.moe import reference

    rng = np.random.default_rng(0)
    N, k, E, H, I = 24, 4, 6, 32, 16
    tokens = jnp.asarray(rng.standard_normal((N, H)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, E + 1, (N, k)), jnp.int32)            # E: held elsewhere
    gate_up = jnp.asarray(rng.standard_normal((E, H, 2 * I)) / H ** 0.5, jnp.float32)
    down = jnp.asarray(rng.standard_normal((E, I, H)) / I ** 0.5, jnp.float32)
    weights = jnp.asarray(rng.standard_normal((N, k, H)), jnp.float32)

    def plain(x):
        order, rank, sizes = moe.sort_by_expert(ids.reshape(-1), E + 1)
        rows = x[order // k]
        out = reference.gmm(reference.gmm_swiglu(rows, gate_up, sizes[:E]), down, sizes[:E])
        return out[rank].reshape(N, k, H)

    grad = jax.grad(lambda x: jnp.sum(moe.grouped_outputs(x, ids, gate_up, down) * weights))
    want = jax.grad(lambda x: jnp.sum(plain(x) * weights))
    np.testing.assert_allclose(np.asarray(grad(tokens)), np.asarray(want(tokens)), rtol=1e-5, atol=1e-6)
    assert "scatter-add" in str(jax.make_jaxpr(want)(tokens))
    assert "scatter-add" not in str(jax.make_jaxpr(grad)(tokens))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_combining_in_expert_order_equals_combining_in_token_order(dtype):
    """`combined_outputs` combines the grouped matmuls' outputs where they lie, in expert order:
    the same values as combining the token-order outputs, bit for bit; the same gradients with
    respect to the tokens and the experts, bit for bit, and the routing weights (within float32
    summation order), with no scatter-add in them."""
    import jax

    rng = np.random.default_rng(1)
    N, k, E, H, I = 40, 4, 6, 32, 16
    tokens = jnp.asarray(rng.standard_normal((N, H)), dtype)
    ids = jnp.asarray(np.argsort(rng.random((N, E)), axis=1)[:, :k], jnp.int32)
    gate_up = jnp.asarray(rng.standard_normal((E, H, 2 * I)) / H ** 0.5, dtype)
    down = jnp.asarray(rng.standard_normal((E, I, H)) / I ** 0.5, dtype)
    weights = jnp.asarray(rng.random((N, k)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((N, H)), dtype)

    def pullback(f):
        return jax.jit(lambda *args: jax.vjp(f, *args)[1](cotangent))
    fused = lambda x, w, g, d: moe.combined_outputs(x, ids, w, g, d, gathered=False)
    token_order = lambda x, w, g, d: moe.combine(moe.grouped_outputs(x, ids, g, d), w)
    args = (tokens, weights, gate_up, down)
    np.testing.assert_array_equal(np.asarray(jax.jit(fused)(*args), np.float32),
                                  np.asarray(jax.jit(token_order)(*args), np.float32))
    got, want = pullback(fused)(*args), pullback(token_order)(*args)
    assert [g.dtype for g in got] == [w.dtype for w in want]
    for i in (0, 2, 3):                                                      # tokens, gate_up, down
        np.testing.assert_array_equal(np.asarray(got[i], np.float32), np.asarray(want[i], np.float32))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-6)
    assert "scatter-add" not in str(jax.make_jaxpr(pullback(fused))(*args))
