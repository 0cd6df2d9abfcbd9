import pytest

from conftest import load_config_dict
from ring_jax import ConfigError, RingConfig


def test_released_configs_schedule_and_derived_fields():
    mini = RingConfig.from_hf(load_config_dict("ring-mini-linear-2.0.json"))
    assert [i for i, t in enumerate(mini.layer_types) if t == "softmax"] == [4, 9, 14, 19]
    assert mini.rotary_dim == 64 and mini.num_decoder_layers == 20
    assert not mini.is_moe_layer(0) and mini.is_moe_layer(1)
    assert mini.shared_expert_intermediate_size == 512
    flash = RingConfig.from_hf(load_config_dict("ring-flash-linear-2.0.json"))
    assert [i for i, t in enumerate(flash.layer_types) if t == "softmax"] == [7, 15, 23, 31]


def test_tail_rule_when_layers_do_not_fill_the_last_group(tiny_dict):
    c = RingConfig.from_hf(dict(tiny_dict, num_hidden_layers=8))  # groups of 3: 2, 5, then tail 6, 7
    assert [i for i, t in enumerate(c.layer_types) if t == "softmax"] == [2, 5, 6, 7]


def test_from_file_folder_and_overrides(tmp_path, tiny_dict):
    import json

    (tmp_path / "config.json").write_text(json.dumps(tiny_dict))
    a = RingConfig.from_hf(tmp_path)
    b = RingConfig.from_hf(tmp_path / "config.json", slope_law="engine")
    assert a.hidden_size == 64 and b.slope_law == "engine" and a != b
    assert hash(a) == hash(RingConfig.from_hf(tiny_dict))
    assert RingConfig.from_hf(a.to_hf_dict()) == a


def test_mtp_placement(tiny_dict):
    inside = RingConfig.from_hf(dict(tiny_dict, num_nextn_predict_layers=1))
    after = RingConfig.from_hf(dict(tiny_dict, num_nextn_predict_layers=1, mtp_placement="after"))
    assert inside.num_decoder_layers == 5 and inside.mtp_layer_indices == (5,)
    assert after.num_decoder_layers == 6 and after.mtp_layer_indices == (6,)


def test_yarn_is_read(tiny_dict):
    c = RingConfig.from_hf(dict(tiny_dict, rope_scaling={"type": "yarn", "factor": 4.0}))
    assert c.rope_type == "yarn"


@pytest.mark.parametrize("change, field", [
    ({"score_function": "softmax"}, "score_function"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.factor"),
    ({"group_norm_size": 3}, "group_norm_size"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_qkv_bias": True}, "use_qkv_bias"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"slope_law": "mlx"}, "slope_law"),
    ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"factor": 4.0}}, "rope_scaling.type"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"partial_rotary_factor": "half"}, "partial_rotary_factor"),
    ({"num_nextn_predict_layers": -1, "mtp_placement": "after"}, "num_nextn_predict_layers"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"linear_silu": False, "use_linear_silu": True}, "use_linear_silu"),
    ({"first_k_dense_replace": "1"}, "first_k_dense_replace"),
    ({"moe_shared_expert_intermediate_size": "32"}, "moe_shared_expert_intermediate_size"),
    ({"pad_token_id": "0"}, "pad_token_id"),
    ({"eos_token_id": "1"}, "eos_token_id"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": "x"}},
     "rope_scaling.original_max_position_embeddings"),
])
def test_bad_fields_are_named(tiny_dict, change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RingConfig.from_hf(dict(tiny_dict, **change))


def test_missing_layer_group_size_and_unknown_override(tiny_dict, tmp_path):
    d = dict(tiny_dict)
    del d["layer_group_size"]
    with pytest.raises(ConfigError, match="layer_group_size"):
        RingConfig.from_hf(d)
    with pytest.raises(ConfigError, match="no_such_field"):
        RingConfig.from_hf(tiny_dict, no_such_field=1)
    with pytest.raises(ConfigError, match="no config.json"):
        RingConfig.from_hf(tmp_path)


def test_aliases_nulls_and_hash(tiny_dict):
    alias = {k: v for k, v in tiny_dict.items() if k != "linear_silu"}
    assert RingConfig.from_hf(dict(alias, use_linear_silu=True)).linear_silu
    assert RingConfig.from_hf(dict(tiny_dict, head_dim=None)).head_dim == 64 // 4
    no_shared = RingConfig.from_hf(dict(tiny_dict, num_shared_experts=None))
    assert no_shared.shared_expert_intermediate_size == 0
    a = RingConfig.from_hf(dict(tiny_dict, rope_scaling={"type": "yarn", "factor": 4.0}))
    b = RingConfig.from_hf(dict(tiny_dict, rope_scaling={"factor": 4.0, "type": "yarn"}))
    assert a == b and hash(a) == hash(b)


def test_missing_sizes_and_broken_files_are_named(tiny_dict, tmp_path):
    for field in ("model_type", "hidden_size", "vocab_size"):
        with pytest.raises(ConfigError, match=f"the config lacks {field}"):
            RingConfig.from_hf({k: v for k, v in tiny_dict.items() if k != field})
    (tmp_path / "config.json").write_text('{"model_type": "bailing_moe_linear",')
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        RingConfig.from_hf(tmp_path)
