"""The router's expert selection (`pallas_kernels.select_experts`): the GPU kernel in Pallas
interpret mode against the jnp reference (ties, +-0.0, -inf included) and against a float64 numpy
loop; the reference's comparison top-k against lax.top_k."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import as_if_on_hopper, load_config_dict
from pallas_kernels.backend import platform
from pallas_kernels.router import gpu, reference, select_experts
from ring_jax.config import RingConfig
from ring_jax.layers import moe
from ring_jax.layers.linear import float32_matmul

# (experts, groups, groups kept, top_k): Ring's router, an uneven number of kept groups, one group,
# top_k 1 (no normalisation) with 16 groups
ROUTERS = [(256, 8, 4, 8), (64, 8, 3, 4), (32, 1, 1, 2), (128, 16, 5, 1)]


def scores(rng, shape):
    """float32 scores with many ties, +-0.0 and +-inf."""
    s = np.round(rng.standard_normal(shape) * rng.choice([1, 4])) / 4
    s[rng.random(shape) < 0.1] = -np.inf
    s[rng.random(shape) < 0.02] = np.inf
    s[rng.random(shape) < 0.05] = -0.0
    s[rng.random(shape) < 0.05] = 0.0
    return jnp.asarray(s, jnp.float32)


def tied_router_inputs(rng, N, E):
    """Sigmoid-like scores in [0, 1] in steps of 1/8 (many ties, some -0.0), a bias with ties,
    +-0.0 and a few -inf."""
    s = np.round(rng.random((N, E)) * 8) / 8
    s[rng.random((N, E)) < 0.05] = -0.0
    bias = np.round(rng.standard_normal(E) * 2) / 16
    bias[rng.random(E) < 0.1] = -0.0
    bias[rng.random(E) < 0.03] = -np.inf
    return jnp.asarray(s, jnp.float32), jnp.asarray(bias, jnp.float32)


def select64(s, bias, top_k, n_group, topk_group, scaling):
    """A float64 numpy loop over tokens (inputs without ties)."""
    s, b = np.asarray(s, np.float64), np.asarray(bias, np.float64)
    N, E = s.shape
    ids, weights = np.zeros((N, top_k), np.int64), np.zeros((N, top_k))
    for n in range(N):
        grouped = (s[n] + b).reshape(n_group, -1)
        group_score = np.sort(grouped, axis=1)[:, -2:].sum(axis=1)
        kept = np.argsort(-group_score)[:topk_group]
        masked = np.full_like(grouped, -np.inf)
        masked[kept] = grouped[kept]
        ids[n] = np.argsort(-masked.reshape(-1))[:top_k]
        w = s[n, ids[n]]
        weights[n] = (w / (w.sum() + 1e-20) if top_k > 1 else w) * scaling
    return ids, weights


@pytest.mark.parametrize("router", ROUTERS)
def test_kernel_equals_reference_with_ties(router, monkeypatch):
    """Same experts in the same order as the reference on both of its paths (comparisons, and
    lax.top_k itself), ties to the lower index, -0.0 below +0.0, -inf biases; the weights equal up
    to the order of their sum."""
    E, G, kept, top_k = router
    s, bias = tied_router_inputs(np.random.default_rng(E + top_k), 9, E)
    args = dict(top_k=top_k, n_group=G, topk_group=kept, scaling=2.5)
    ids, weights = select_experts(s, bias, backend="gpu", interpret=True, **args)
    for compare_max in (reference.COMPARE_TOP_K_MAX, 0):
        monkeypatch.setattr(reference, "COMPARE_TOP_K_MAX", compare_max)
        want_ids, want_weights = select_experts(s, bias, backend="reference", **args)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(weights, want_weights, rtol=1e-6)


@pytest.mark.parametrize("router", [ROUTERS[0], ROUTERS[-1]])
def test_kernel_and_reference_match_float64(router):
    E, G, kept, top_k = router
    rng = np.random.default_rng(100 + E)
    s = jnp.asarray(jax.nn.sigmoid(rng.standard_normal((5, E))), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(E) * 0.1, jnp.float32)
    args = dict(top_k=top_k, n_group=G, topk_group=kept, scaling=2.5)
    want_ids, want_weights = select64(s, bias, **args)
    for got_ids, got_weights in (select_experts(s, bias, backend="gpu", interpret=True, **args),
                                 select_experts(s, bias, backend="reference", **args)):
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_weights, want_weights, rtol=1e-6)


def test_errors_and_backend_choice():
    s, bias = jnp.ones((2, 24), jnp.float32), jnp.zeros(24, jnp.float32)
    with pytest.raises(ValueError, match="bias"):
        select_experts(s, bias[:8], top_k=2, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="float32"):
        select_experts(s.astype(jnp.bfloat16), bias, top_k=2, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="at least 2"):
        select_experts(s, bias, top_k=2, n_group=24, topk_group=2)
    for backend, interpret in (("reference", False), ("gpu", True)):      # no tokens: empty, no launch
        ids, weights = select_experts(s[:0, :16], bias[:16], top_k=2, n_group=4, topk_group=2, backend=backend,
                                      interpret=interpret)
        assert ids.shape == weights.shape == (0, 2) and ids.dtype == jnp.int32
    with pytest.raises(ValueError, match="top_k=9"):
        select_experts(s, bias, top_k=9, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="backend"):
        select_experts(s, bias, top_k=2, n_group=4, topk_group=2, backend="cuda")
    with pytest.raises(NotImplementedError, match="power-of-two"):
        select_experts(s, bias, top_k=2, n_group=4, topk_group=2, backend="gpu", interpret=True)   # groups of 6
    ids, _ = select_experts(s, bias, top_k=2, n_group=4, topk_group=2)             # reference
    np.testing.assert_array_equal(ids, [[0, 1], [0, 1]])
    assert gpu.fits(256, 8, 8) and not gpu.fits(24, 2, 4) and not gpu.fits(256, 6, 8)
    assert platform() != "hopper" or gpu.fits(256, 8, 8)


@pytest.mark.parametrize("rows", [3, 100])
def test_comparison_top_k_equals_lax_top_k(rows):
    """`top_k_indices` and `in_top_k` give lax.top_k's picks in its order (descending, -0.0 below
    +0.0, ties to the lower index), on the comparison path (3 rows) and the lax path (100 x 256 x
    256 > COMPARE_TOP_K_MAX)."""
    rng = np.random.default_rng(rows)
    for n in (8, 32, 256):
        s = scores(rng, (rows, n))
        for k in (1, 2, 4, 8):
            want = np.asarray(jax.lax.top_k(s, k)[1])
            np.testing.assert_array_equal(reference.top_k_indices(s, k), want)
            mask = np.zeros(s.shape, bool)
            np.put_along_axis(mask, want, True, axis=-1)
            np.testing.assert_array_equal(reference.in_top_k(s, k), mask)


def test_reference_selection_same_on_both_paths(monkeypatch):
    s = scores(np.random.default_rng(5), (40, 64))
    bias = jnp.zeros(64, jnp.float32)
    args = dict(top_k=6, n_group=8, topk_group=3, scaling=1.0)
    compared = reference.select_experts(s, bias, **args)[0]
    monkeypatch.setattr(reference, "COMPARE_TOP_K_MAX", 0)
    np.testing.assert_array_equal(compared, reference.select_experts(s, bias, **args)[0])


def test_bias_read_in_its_stack_and_rounded():
    """Inside the scanned decoder the bias comes as the stack of every layer's with the layer's
    index, rounded to the model dtype where the config says so: the kernel (interpret mode) and the
    reference take the entry, as a call with the rounded entry itself does."""
    rng = np.random.default_rng(9)
    s = scores(rng, (5, 64))
    biases = jnp.asarray(rng.standard_normal((3, 64)) * 0.3, jnp.float32)
    args = dict(top_k=4, n_group=8, topk_group=3, scaling=1.5)
    for rounding in (None, jnp.bfloat16):
        entry = biases[2] if rounding is None else biases[2].astype(rounding).astype(jnp.float32)
        want_ids, want_weights = select_experts(s, entry, backend="reference", **args)
        for interpret, backend in ((True, "gpu"), (False, "reference")):
            ids, weights = select_experts(s, biases, bias_index=jnp.int32(2), bias_rounding=rounding,
                                          interpret=interpret, backend=backend, **args)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(weights, want_weights, rtol=1e-6)
    with pytest.raises(ValueError, match="with bias_index"):
        select_experts(s, biases, **args)


def test_router_takes_the_kernel_as_on_hopper(monkeypatch):
    """The MoE router with "auto" on a Hopper GPU runs the kernel (here in interpret mode) and
    returns what the reference returns."""
    config = RingConfig.from_hf(load_config_dict("tiny.json"), num_experts=64, n_group=8, topk_group=3,
                                num_experts_per_tok=4)
    router = moe.Router(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, config.hidden_size)), jnp.float32)
    want_ids, want_weights = router(x)
    calls = as_if_on_hopper(monkeypatch, {"select_experts": lambda *a, **k: 1})
    ids, weights = router(x)
    assert calls
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-6)


def test_bf16_router_multiplies_in_float32():
    """A bf16 model's router multiplies in float32 (docs/SPEC.md §7.1, §10.4): its logits are not rounded
    to bf16 anywhere (same experts and weights as float64 logits)."""
    config = RingConfig.from_hf(load_config_dict("tiny.json"), num_experts=64, n_group=8, topk_group=3,
                                num_experts_per_tok=4)
    router = moe.Router(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(6)
    router.expert_bias[...] = jnp.asarray(rng.standard_normal(64) * 0.01, jnp.float32)
    x = jnp.asarray(rng.standard_normal((32, config.hidden_size)), jnp.bfloat16)
    ids, weights = router(x)
    logits = np.asarray(x, np.float64) @ np.asarray(router.kernel[...], np.float64)
    scores = jnp.asarray(1 / (1 + np.exp(-logits)), jnp.float32)
    want_ids, want_weights = reference.select_experts(scores, router.expert_bias[...], top_k=4, n_group=8,
                                                      topk_group=3, scaling=config.routed_scaling_factor)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-6)


def test_scanned_model_routes_through_the_kernel(monkeypatch):
    """In the scanned decoder the routers' biases are entries of a stack: the forward through the
    kernel (interpret mode, as if on a Hopper GPU) reads each layer's own bias, rounded as the
    config says, and gives the reference path's logits."""
    import ring_jax

    config = RingConfig.from_hf(load_config_dict("tiny.json"), num_experts=64, n_group=8, topk_group=3,
                                num_experts_per_tok=4)
    model = ring_jax.RingModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    for kind, _ in model.schedule.counts:                          # a different bias in every layer
        mlp = getattr(model, kind).mlp
        if hasattr(mlp, "gate"):
            mlp.gate.expert_bias.set_value(jnp.asarray(rng.standard_normal(mlp.gate.expert_bias.shape) * 0.3,
                                                       jnp.float32))
    ids = rng.integers(0, config.vocab_size, (2, 9))
    want = model(ids)
    calls = as_if_on_hopper(monkeypatch, {"select_experts": lambda scores, biases, *a, **k: biases.shape})
    got = model(ids)
    assert calls and any(shape[0] > 1 for shape in calls)         # a stack of several layers' biases
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_narrow_float32_product_is_the_float32_product():
    """`float32_matmul` of bf16 operands (the router of a bf16 model, many rows) multiplies them
    as bf16 with float32 output (the lowered forward's product), which is the float32 product of
    their float32 copies up to the order of its sums; its gradients are float32-precision products
    of the float32 cotangent, as autodiff of that float32 product gives, for x, w and each alone,
    run as bf16 products of the cotangent's three bf16 parts (the lowered backward's: 3 x 24
    columns). float32 operands keep the float32 product."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((3, 40, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((96, 24)) / 10, jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((3, 40, 24)), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = float32_matmul(x, w)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    products = lambda f, *args: re.findall(r"dot_general.*", jax.jit(f).lower(*args).as_text())
    assert [p for p in products(float32_matmul, x, w) if "bf16>) -> tensor<3x40x24xf32>" in p]
    assert not [p for p in products(float32_matmul, x.astype(jnp.float32), w.astype(jnp.float32)) if "bf16" in p]

    def widened(x, w):
        return jnp.sum(float32_matmul(x, w) * r)

    def promoted(x, w):
        return jnp.sum(jnp.einsum("...k,kn->...n", x.astype(jnp.float32), w.astype(jnp.float32),
                                  precision=jax.lax.Precision.HIGHEST) * r)

    backward = products(jax.grad(widened, (0, 1)), x, w)              # dx and dw; the forward is unused
    assert len(backward) == 2 and all("x72xbf16>" in p and "HIGHEST" not in p for p in backward), backward
    for argnums in [(0, 1), 0, 1]:        # the same up to the float32 sums' order: a bf16 step at most
        got, want = jax.grad(widened, argnums)(x, w), jax.grad(promoted, argnums)(x, w)
        for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(v, np.float32), rtol=2 ** -7)
            assert np.mean(np.asarray(g) == np.asarray(v)) > 0.99
