"""Parity with the PyTorch transcription of the HF reference (tests/reference), per module and for
the whole model: float32 against the float64 reference (max relative error <= 1e-5) and bfloat16
against the bfloat16 reference (docs/SPEC.md §10 dtype steps, bf16-level tolerance).

Every case writes a random checkpoint in the HF layout with the reference and loads it with
`ring_jax.load_model`, so the conversion path is part of each comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ring_jax
from conftest import rel_err
from reference.checkpoint import make_hf_checkpoint
from reference.model import rope_cos_sin
from ring_jax.layers.rope import rope_tables
from ring_jax.schedule import cache_slot

F32_TOL = 1e-5
BF16_TOL = 3e-2
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}

VARIANTS = {  # name -> (config changes, reference options)
    "default": ({}, {}),
    "engine_decay": ({"slope_law": "engine"}, {"slope_law": "engine"}),
    "tied_head": ({"tie_word_embeddings": True}, {}),
    "dense_only": ({"first_k_dense_replace": 6}, {}),
    "yarn": ({"rope_scaling": YARN}, {}),
    "linear_silu_6_heads": ({"linear_silu": True, "num_attention_heads": 6, "num_key_value_heads": 3,
                             "group_norm_size": 3}, {}),
    "no_shared_expert_null_head_dim": ({"num_shared_experts": None, "head_dim": None}, {}),
    "bias_float32_explicit_shared": ({"expert_bias_dtype": "float32", "shared_expert_size": "explicit",
                                      "moe_shared_expert_intermediate_size": 48},
                                     {"expert_bias_dtype": "float32", "shared_expert_size": "explicit"}),
}


def build(tmp_path, tiny_dict, variant="default", dtype=torch.float32, **extra):
    changes, options = VARIANTS[variant]
    config = dict(tiny_dict, **changes, **extra)
    ref = make_hf_checkpoint(str(tmp_path), config, dtype=dtype, seed=1, **options)
    return ref, ring_jax.load_model(str(tmp_path))


def token_ids(B, T, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T))


def reference_logits(ref, ids, dtype):
    with torch.no_grad():
        return ref.with_dtype(dtype)(torch.as_tensor(ids)).numpy()


@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
def test_model_float32_matches_float64_reference(tmp_path, tiny_dict, T):
    ref, model = build(tmp_path, tiny_dict)
    ids = token_ids(2, T, tiny_dict["vocab_size"], seed=T)
    assert rel_err(model(ids), reference_logits(ref, ids, torch.float64)) <= F32_TOL


def test_deep_model_float32_matches_float64_reference(tmp_path, tiny_dict):
    """14 layers, 4 of them dense: scanned runs before, inside (two repeated groups) and after the
    groups (`ring_jax.schedule`), loaded from HF names, against the float64 reference."""
    ref, model = build(tmp_path, tiny_dict, num_hidden_layers=14, first_k_dense_replace=4)
    assert model.schedule.repeats == 2
    ids = token_ids(2, 33, tiny_dict["vocab_size"])
    assert rel_err(model(ids), reference_logits(ref, ids, torch.float64)) <= F32_TOL


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "default"])
def test_model_variants_float32(tmp_path, tiny_dict, variant):
    ref, model = build(tmp_path, tiny_dict, variant)
    ids = token_ids(2, 70, tiny_dict["vocab_size"])
    assert rel_err(model(ids), reference_logits(ref, ids, torch.float64)) <= F32_TOL


@pytest.mark.parametrize("T", [7, 65])
def test_model_bfloat16_matches_bfloat16_reference(tmp_path, tiny_dict, T):
    """Whole model in bf16, dense MLPs: an MoE model's bf16 noise flips near-tie expert choices
    (a flip is not an error, and both bf16 implementations then differ from float64 by O(1) on
    that token), so the MoE layers are held to bf16 one by one below, on identical inputs."""
    ref, model = build(tmp_path, tiny_dict, "dense_only", dtype=torch.bfloat16)
    assert model.dtype == jnp.bfloat16
    ids = token_ids(2, T, tiny_dict["vocab_size"])
    got = model(ids)
    assert rel_err(got, reference_logits(ref, ids, torch.bfloat16)) <= BF16_TOL
    assert rel_err(got, reference_logits(ref, ids, torch.float64)) <= BF16_TOL


def assert_bf16_steps_match(got, want):
    """bf16 results of the same dtype steps: at least 99.9% of elements bit-equal, none more than
    one bf16 ulp apart (a different rounding step changes far more than 0.1% of elements)."""
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = want.float().numpy()
    assert np.mean(got == want) >= 0.999
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=0)


def test_layers_bfloat16_match_bfloat16_reference(tmp_path, tiny_dict):
    """Each module in bf16 on identical bf16 inputs, against the bf16 reference's dtype steps.

    Norms, the head, attention and the MLPs/MoE follow the HF bf16 steps (bit-exact here but for
    rare 1-ulp matmul differences, which a later bf16 product can widen a little: a module is
    held to one bf16 ulp of its largest output, 2**-8 relative).
    """
    ref, model = build(tmp_path, tiny_dict, dtype=torch.bfloat16)
    ref16 = ref.with_dtype(torch.bfloat16)
    T = 65
    x32 = np.random.default_rng(5).standard_normal((2, T, tiny_dict["hidden_size"])).astype(np.float32)
    x = jnp.asarray(x32, jnp.bfloat16)
    x16 = torch.as_tensor(x32).to(torch.bfloat16)
    cos, sin = rope_tables(model.config, jnp.arange(T), jnp.bfloat16)
    rc, rs = rope_cos_sin(dict(tiny_dict), torch.arange(T), torch.bfloat16)
    assert_bf16_steps_match(cos, rc)
    with torch.no_grad():
        assert_bf16_steps_match(model.norm(x), ref16.model.norm(x16))
        assert_bf16_steps_match(model.logits(x).astype(jnp.bfloat16), ref16.logits(x16).to(torch.bfloat16))
        g_norm = model.layer(0).attention.g_norm
        wide = jnp.concatenate([x, x], axis=-1)[..., : g_norm.weight[...].shape[0]]
        wide16 = torch.cat([x16, x16], dim=-1)[..., : g_norm.weight[...].shape[0]]
        assert_bf16_steps_match(g_norm(wide), ref16.model.layers[0].attention.g_norm(wide16))
        for i in range(model.config.num_decoder_layers):
            layer, slot, r = model.layer(i), cache_slot(model.config, i), ref16.model.layers[i]
            got = layer.attention(x, cos, sin, slot=slot)[0]
            assert rel_err(got, r.attention(x16, rc, rs).float().numpy()) <= 2 ** -8, (i, "attention")
            assert rel_err(layer.mlp(x), r.mlp(x16).float().numpy()) <= 2 ** -8, (i, "mlp")
            if not model.config.is_moe_layer(i):  # a whole MoE layer re-routes its own bf16 noise
                assert rel_err(layer(x, cos, sin, slot=slot)[0], r(x16, rc, rs).float().numpy()) <= 1e-2, (i, "layer")


@pytest.mark.parametrize("config", ["ring-mini-linear-2.0.json", "ring-flash-linear-2.0.json", "tiny.json"])
def test_inverse_frequencies_are_torch_bits(config):
    from conftest import load_config_dict
    from reference.model import rope_parameters
    from ring_jax.layers.rope import rope_frequencies

    d = load_config_dict(config)
    for scaling in (None, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}):
        ours, factor = rope_frequencies(ring_jax.RingConfig.from_hf(dict(d, rope_scaling=scaling)))
        want, want_factor = rope_parameters(dict(d, rope_scaling=scaling))
        np.testing.assert_array_equal(ours, want.numpy())
        assert factor == pytest.approx(want_factor, rel=1e-12)


def forward_with_mtp(model, ids):
    """ids [B, T] -> (logits [B, T, V], the MTP layers' logits: a tuple of [B, T, V])."""
    hidden = model.hidden_states(ids)
    return model.logits(hidden), model.mtp_logits(ids, hidden)


def test_mtp_logits(tmp_path, tiny_dict):
    for placement in ("inside", "after"):
        path = tmp_path / placement
        config = dict(tiny_dict, num_nextn_predict_layers=1, mtp_placement=placement)
        ref = make_hf_checkpoint(str(path), config, dtype=torch.float32, seed=2, mtp_placement=placement)
        model = ring_jax.load_model(str(path))
        ids = token_ids(1, 9, tiny_dict["vocab_size"])
        with torch.no_grad():
            want_logits, want_mtp = ref.with_dtype(torch.float64).forward_with_mtp(torch.as_tensor(ids))
        logits, (mtp,) = jax.jit(forward_with_mtp)(model, jnp.asarray(ids))
        assert rel_err(logits, want_logits.numpy()) <= F32_TOL
        assert rel_err(mtp, want_mtp[0].numpy()) <= F32_TOL


# ---------------------------------------------------------------------------------- per module
def module_inputs(B, T, hidden, seed=0):
    x = np.random.default_rng(seed).standard_normal((B, T, hidden)).astype(np.float32)
    return x, torch.as_tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("rope_scaling", [None, YARN])
def test_rope_tables(tiny_dict, rope_scaling):
    config = ring_jax.RingConfig.from_hf(dict(tiny_dict, rope_scaling=rope_scaling))
    T = 300
    cos, sin = rope_tables(config, jnp.arange(T), jnp.float32)
    rc, rs = rope_cos_sin(dict(tiny_dict, rope_scaling=rope_scaling), torch.arange(T), torch.float64)
    assert rel_err(cos, rc.numpy()) <= 1e-6 and rel_err(sin, rs.numpy()) <= 1e-6


@pytest.mark.parametrize("T", [1, 65])
def test_layers_one_by_one(tmp_path, tiny_dict, T):
    ref, model = build(tmp_path, tiny_dict)
    ref64 = ref.with_dtype(torch.float64)
    x, x64 = module_inputs(2, T, tiny_dict["hidden_size"], seed=T)
    cos, sin = rope_tables(model.config, jnp.broadcast_to(jnp.arange(T), (2, T)), jnp.float32)
    rc, rs = rope_cos_sin(dict(tiny_dict), torch.arange(T), torch.float64)
    with torch.no_grad():
        for i in range(model.config.num_decoder_layers):
            layer, slot, r = model.layer(i), cache_slot(model.config, i), ref64.model.layers[i]
            assert rel_err(layer.input_layernorm(x), r.input_layernorm(x64).numpy()) <= F32_TOL, i
            got = layer.attention(x, cos, sin, slot=slot)[0]
            assert rel_err(got, r.attention(x64, rc, rs).numpy()) <= F32_TOL, (i, "attention")
            assert rel_err(layer.mlp(x), r.mlp(x64).numpy()) <= F32_TOL, (i, "mlp")
            assert rel_err(layer(x, cos, sin, slot=slot)[0], r(x64, rc, rs).numpy()) <= F32_TOL, (i, "layer")
        g_norm = model.layer(0).attention.g_norm
        wide = np.random.default_rng(3).standard_normal((2, T, g_norm.weight[...].shape[0])).astype(np.float32)
        assert rel_err(g_norm(wide), ref64.model.layers[0].attention.g_norm(torch.as_tensor(wide, dtype=torch.float64)).numpy()) <= F32_TOL


def test_router_picks_the_reference_experts(tmp_path, tiny_dict):
    ref, model = build(tmp_path, tiny_dict)
    x, x64 = module_inputs(1, 50, tiny_dict["hidden_size"], seed=9)
    ids, weights = model.layer(1).mlp.gate(jnp.asarray(x[0]))
    with torch.no_grad():
        want_ids, want_w = ref.with_dtype(torch.float64).model.layers[1].mlp.gate.route(x64[0])
    order = np.argsort(np.asarray(ids), axis=-1)
    want_order = np.argsort(want_ids.numpy(), axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(ids), order, -1),
                                  np.take_along_axis(want_ids.numpy(), want_order, -1))
    assert rel_err(np.take_along_axis(np.asarray(weights), order, -1),
                   np.take_along_axis(want_w.numpy(), want_order, -1)) <= F32_TOL


def test_decay_laws(tiny_dict):
    from ring_jax.layers.linear_attention import alibi_slopes, log_decay

    assert alibi_slopes(16)[0] == pytest.approx(2 ** -0.5) and alibi_slopes(16)[-1] == pytest.approx(2 ** -8)
    assert alibi_slopes(6) == pytest.approx(alibi_slopes(4) + alibi_slopes(8)[0::2][:2])
    mini = ring_jax.RingConfig.from_hf(dict(tiny_dict, num_hidden_layers=20, num_attention_heads=16,
                                            num_key_value_heads=4, layer_group_size=5, group_norm_size=4))
    # docs/SPEC.md §6.2: layer 0 factor 1.0526416, layer 18 g[0] = -0.074439 (HF law)
    assert log_decay(mini, 0)[0] == pytest.approx(-2 ** -0.5 * 1.0526416, rel=1e-6)
    assert log_decay(mini, 18)[0] == pytest.approx(-0.074439, rel=1e-4)
    engine = ring_jax.RingConfig.from_hf(dict(mini.to_hf_dict(), slope_law="engine"))
    assert log_decay(engine, 1)[0] == pytest.approx(-2 ** -0.5 * (1 - 1 / 19 + 1e-5), rel=1e-6)


def test_moe_gathered_and_grouped_paths_agree(tmp_path, tiny_dict, monkeypatch):
    from ring_jax import backends
    from ring_jax.layers import moe

    _, model = build(tmp_path, tiny_dict)
    experts = model.layer(1).mlp.experts
    weights = (experts.gate_up_proj[...], experts.down_proj[...])
    tokens = jnp.asarray(np.random.default_rng(4).standard_normal((5, tiny_dict["hidden_size"])), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, tiny_dict["num_experts"], size=(5, 4)), jnp.int32)
    assert ids.size <= backends.GATHER_MAX_PAIRS
    gathered = moe.expert_outputs(tokens, ids, *weights)
    monkeypatch.setattr(backends, "GATHER_MAX_PAIRS", 0)
    assert rel_err(gathered, moe.expert_outputs(tokens, ids, *weights)) <= F32_TOL


@pytest.mark.gpu
def test_bf16_model_through_the_gpu_kernels(tmp_path, tiny_dict):
    """On a Hopper GPU, `auto` runs the Mosaic GPU linear-attention kernel inside the model (head_dim
    128); the bf16 model still matches the bf16 reference (dense MLPs: no routing flips)."""
    config = dict(tiny_dict, hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                  first_k_dense_replace=6)
    ref = make_hf_checkpoint(str(tmp_path), config, dtype=torch.bfloat16, seed=3)
    model = ring_jax.load_model(str(tmp_path))
    ids = token_ids(2, 130, tiny_dict["vocab_size"])
    got = model(ids)
    assert rel_err(got, reference_logits(ref, ids, torch.bfloat16)) <= BF16_TOL
    assert rel_err(got, reference_logits(ref, ids, torch.float64)) <= BF16_TOL
