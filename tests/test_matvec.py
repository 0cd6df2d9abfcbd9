"""The few-row matmul (`pallas_kernels.matvec`) in Pallas interpret mode and its jnp reference,
against float64."""


import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
import ring_jax
from conftest import as_if_on_hopper, load_config_dict, rel_err
from pallas_kernels import backend as kernel_backend
from pallas_kernels.backend import platform
from pallas_kernels.matvec import matvec, matvec_backend, reference
from ring_jax import RingConfig, backends
from ring_jax.cache import init_cache
from ring_jax.layers import moe
from ring_jax.layers.norms import Normed
from ring_jax.quantization import Fp8
from test_generate import extend

# (X groups of rows, M rows, K, E matrices, N, P output groups, x dtype, w dtype)
CASES = {
    "one row, one matrix": (1, 1, 256, 1, 128, 1, jnp.bfloat16, jnp.bfloat16),
    "3 rows, 8 groups share 2 row groups": (2, 3, 512, 6, 192, 8, jnp.bfloat16, jnp.bfloat16),
    "float32 rows, bf16 matrices (router)": (4, 1, 256, 16, 64, 4, jnp.float32, jnp.bfloat16),
    "float32 both": (1, 2, 128, 3, 128, 3, jnp.float32, jnp.float32),
}


def operands(X, M, K, E, N, P, x_dtype, w_dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((X, M, K)), x_dtype)
    w = jnp.asarray(rng.standard_normal((E, K, N)), w_dtype)
    ids = jnp.asarray(rng.integers(0, E, P), jnp.int32)
    return x, w, ids


def matvec64(x, w, ids):
    x, w, ids = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(ids)
    return np.einsum("pmk,pkn->pmn", np.repeat(x, len(ids) // len(x), axis=0), w[ids])


@pytest.mark.parametrize("case", CASES)
def test_kernel_and_reference_match_float64(case):
    X, M, K, E, N, P, xd, wd = CASES[case]
    x, w, ids = operands(X, M, K, E, N, P, xd, wd, seed=len(case))
    want = matvec64(x, w, ids)
    for out in (matvec(x, w, ids, backend="gpu", interpret=True), reference.matvec(x, w, ids)):
        assert out.shape == (P, M, N) and out.dtype == jnp.float32
        assert rel_err(out, want) <= 1e-6


def test_stacks_addressed_as_one_match_float64():
    """A tuple of stacks (the routed experts and the shared expert) equals their concatenation."""
    x, w, ids = operands(3, 1, 256, 6, 128, 9, jnp.bfloat16, jnp.bfloat16, seed=5)
    ids = ids.at[2::3].set(6)                                   # every token's last pair: the extra stack
    extra = jnp.asarray(np.random.default_rng(6).standard_normal((1, 256, 128)), jnp.bfloat16)
    want = matvec64(x, jnp.concatenate([w, extra]), ids)
    kernel, ref = matvec(x, (w, extra), ids, backend="gpu", interpret=True), reference.matvec(x, (w, extra), ids)
    assert rel_err(kernel, want) <= 1e-6 and rel_err(ref, want) <= 1e-6
    together = matvec(x, jnp.concatenate([w, extra]), ids, backend="gpu", interpret=True)
    assert np.array_equal(np.asarray(kernel), np.asarray(together))
    with pytest.raises(ValueError, match="differ in K, N or dtype"):
        matvec(x, (w, extra[:, :, :64]), ids)
    with pytest.raises(ValueError, match="differ in K, N or dtype"):
        matvec(x, (w, extra.astype(jnp.float32)), ids)


def test_rows_normalised_in_the_kernel_match_float64():
    """norm_weight: the rows go through HF RMSNorm first, in the kernel (interpret mode) as in the
    reference: float32 against float64, and bf16 with the reference's roundings."""
    rng = np.random.default_rng(11)
    x, w, ids = operands(2, 1, 256, 4, 128, 4, jnp.float32, jnp.float32, seed=11)
    weights = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    x64 = np.asarray(x, np.float64)
    normed = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-6) * np.asarray(weights[1], np.float64)
    want = matvec64(normed, w, ids)
    for backend in ("gpu", "reference"):
        out = matvec(x, w, ids, norm_weight=weights, norm_index=jnp.int32(1), norm_eps=1e-6, backend=backend,
                     interpret=backend == "gpu")
        assert rel_err(out, want) <= 1e-6, backend
    one = matvec(x, w, ids, norm_weight=weights[1], norm_eps=1e-6, backend="gpu", interpret=True)
    assert rel_err(one, want) <= 1e-6

    xb, wb, wnb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), weights.astype(jnp.bfloat16)
    kernel, ref = (matvec(xb, wb, ids, norm_weight=wnb, norm_index=jnp.int32(2), norm_eps=1e-6, backend=backend,
                          interpret=backend == "gpu") for backend in ("gpu", "reference"))
    assert rel_err(kernel, ref) <= 1e-5
    assert np.array_equal(np.asarray(ref), np.asarray(matvec(reference.rms_norm(xb, wnb[2], 1e-6), wb, ids)))
    with pytest.raises(ValueError, match="norm_eps"):
        matvec(x, w, ids, norm_weight=weights[1])
    with pytest.raises(ValueError, match="norm_weight"):
        matvec(x, w, ids, norm_weight=weights[1, :128], norm_eps=1e-6)
    with pytest.raises(NotImplementedError, match="norm"):
        matvec(xb, wb, ids, norm_weight=weights[1], norm_eps=1e-6, backend="gpu", interpret=True)


def test_ids_default_and_errors():
    x, w, _ = operands(2, 1, 128, 1, 64, 2, jnp.bfloat16, jnp.bfloat16, seed=0)
    assert rel_err(matvec(x, w, backend="gpu", interpret=True), matvec64(x, w, np.zeros(2, int))) <= 1e-6
    with pytest.raises(ValueError, match="K differs"):
        matvec(x, w[:, :64])
    with pytest.raises(ValueError, match="pass ids"):
        matvec(x, jnp.concatenate([w, w]))
    with pytest.raises(ValueError, match="multiple of 2"):
        matvec(x, w, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="backend"):
        matvec(x, w, backend="cuda")
    with pytest.raises(NotImplementedError, match="K % 128"):
        matvec(x[:, :, :100], w[:, :100], backend="gpu", interpret=True)
    assert matvec_backend(x, w) == ("gpu" if platform() == "hopper" else "reference")
    empty = matvec(x[:0], w, jnp.zeros(0, jnp.int32))
    assert empty.shape == (0, 1, 64) and empty.dtype == jnp.float32


def model_with_kernel_shapes(dtype):
    """The tiny config widened so that every product of a decode step fits the kernel's tiles."""
    config = load_config_dict("tiny.json")
    config.update(hidden_size=256, head_dim=64, intermediate_size=128, moe_intermediate_size=128,
                  moe_shared_expert_intermediate_size=128, num_experts=64)
    return ring_jax.RingModel(RingConfig.from_hf(config), dtype=dtype, rngs=nnx.Rngs(1))


def decode_logits(model, p, steps):
    """Prefill p[:-steps], then one token at a time -> the steps' logits [steps, V]."""
    cache = init_cache(model.config, 1, 128, [0], model.dtype)
    _, cache = extend(model, p[None, :-steps], cache)
    out = []
    for t in range(len(p) - steps, len(p)):
        logits, cache = extend(model, p[None, t:t + 1], cache)
        out.append(logits[0, 0])
    return jnp.stack(out)


def on_hopper(monkeypatch):
    """`as_if_on_hopper`, recording the weight shape of each matvec call (("normed", shape) where
    the kernel normalises the rows), "router" for the selection and "linear attention" for the
    linear layers' decode step."""
    def matvec_label(x, w, ids, *norm, **k):
        shape = tuple(s.shape for s in w) if isinstance(w, tuple) else w.shape
        return ("normed", shape) if norm else shape

    return as_if_on_hopper(monkeypatch, {
        "matvec": matvec_label,
        "select_experts": lambda *a, **k: "router", "decode_step": lambda *a, **k: "linear attention"})


def test_decode_step_through_the_kernel_on_the_cpu(monkeypatch):
    """The model's kernel branches (one-row `matmul`, the routed experts by id, the router's
    selection, the linear-attention step) in interpret mode: batch-1 decode logits equal the full forward (float32)."""
    model = model_with_kernel_shapes(jnp.float32)
    p = np.random.default_rng(3).integers(2, 256, 12)
    want = model(p[None])[0, -2:]                    # the full forward, before the kernels come in
    calls = on_hopper(monkeypatch)
    got = decode_logits(model, p, 2)
    # experts gate_up and down, each with the shared expert as one more matrix
    # The weights reach the kernel as the stacks of every layer of a kind (tiny: 3 linear MoE
    # layers, 2 softmax MoE layers), read in place by index. The products that follow a norm
    # (qkv, the router, the experts' gate_up) normalise their rows in the kernel.
    assert ("normed", ((3 * 64, 256, 256), (3, 256, 256))) in calls and ((3 * 64, 128, 256), (3, 128, 256)) in calls
    assert ("normed", ((2 * 64, 256, 256), (2, 256, 256))) in calls
    assert ("normed", (3, 256, 768)) in calls and ("normed", (3, 256, 64)) in calls   # linear qkv, router
    assert "router" in calls and "linear attention" in calls
    assert rel_err(got, want) <= 1e-5


def test_shared_expert_rides_along_with_the_same_bits(monkeypatch):
    """At batch 1 on a Hopper GPU the shared expert runs as one more pair in the routed experts'
    matvec calls: the MoE layer's output is the same bits as with its own calls, and it is taken
    only when its shapes match a routed expert's."""
    model = model_with_kernel_shapes(jnp.bfloat16)
    layer = model.layer(1).mlp
    x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 1, 256)), jnp.bfloat16)
    calls = on_hopper(monkeypatch)
    together = layer(x)
    assert ((64, 256, 256), (1, 256, 256)) in calls
    calls.clear()
    monkeypatch.setattr(backends, "shared_expert_joins", lambda *a: False)
    alone = layer(x)
    assert (1, 256, 256) in calls and (64, 256, 256) in calls
    assert np.array_equal(np.asarray(together), np.asarray(alone))
    monkeypatch.undo()
    config = load_config_dict("tiny.json")
    config.update(hidden_size=256, head_dim=64, intermediate_size=128, moe_intermediate_size=128,
                  num_shared_experts=2, num_experts=64)
    wider = moe.MoE(RingConfig.from_hf(config), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    tokens, ids = x[0], jnp.zeros((1, 8), jnp.int32)
    gate_up, down = wider.experts.gate_up_proj[...], wider.experts.down_proj[...]
    on_hopper(monkeypatch)

    def shared(mlp):
        return mlp.gate_up_proj.kernel.get_value(), mlp.down_proj.kernel.get_value()
    assert not backends.shared_expert_joins(tokens, ids, gate_up, down, shared(wider.shared_experts))
    assert backends.shared_expert_joins(tokens, ids, gate_up, down, shared(layer.shared_experts))


def test_gathered_path_choice(monkeypatch):
    """On a Hopper GPU, up to GATHER_MAX_PAIRS pairs take the matvec kernel, not under expert
    parallelism; without a grouped-matmul kernel (CPU) always; on a TPU never."""
    tokens = jnp.zeros((8, 256), jnp.bfloat16)
    gate_up, down = jnp.zeros((64, 256, 256), jnp.bfloat16), jnp.zeros((64, 128, 256), jnp.bfloat16)
    ids = jnp.zeros((8, 8), jnp.int32)
    assert backends.experts_gather(tokens, ids, gate_up, down) and backends.experts_gather(tokens, ids, gate_up, down, True)
    assert not backends.experts_gather(jnp.zeros((9, 256), jnp.bfloat16), jnp.zeros((9, 8), jnp.int32), gate_up, down)
    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    monkeypatch.setattr(pallas_kernels, "gmm_backend", lambda *a, **k: "gpu")
    assert backends.experts_gather(tokens, ids, gate_up, down)
    assert not backends.experts_gather(tokens, ids, gate_up, down, expert_parallel=True)
    assert not backends.experts_gather(tokens, ids, gate_up, jnp.zeros((64, 100, 256), jnp.bfloat16))
    # Normed tokens: only gate_up normalises its rows (whole rows: K a power of two), down's K = 384 is not one
    normed = Normed(tokens, jnp.ones(256, jnp.bfloat16), 1e-6)
    wide = jnp.zeros((64, 256, 768), jnp.bfloat16), jnp.zeros((64, 384, 256), jnp.bfloat16)
    assert backends.experts_gather(normed, ids, *wide)
    fp8 = [Fp8(jnp.zeros((64, n, 256), jnp.float8_e4m3fn), jnp.ones((64, n), jnp.float32)) for n in (512, 256)]
    assert backends.experts_gather(tokens, ids, *fp8)                        # FP8 experts (K-major) alike
    assert not backends.experts_gather(tokens, ids, *fp8, expert_parallel=True)
    monkeypatch.setattr(kernel_backend, "platform", lambda: "tpu")
    assert not backends.experts_gather(tokens, ids, gate_up, down)


def test_moe_layer_with_no_tokens():
    config = RingConfig.from_hf(load_config_dict("tiny.json"))
    layer = moe.MoE(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert layer(jnp.zeros((1, 0, config.hidden_size))).shape == (1, 0, config.hidden_size)
