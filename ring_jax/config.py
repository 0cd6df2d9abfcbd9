"""RingConfig: the HF `config.json` of a Ring-linear-2.0 model, validated, plus what derives from it.

Field names follow the HF remote code (`BailingMoeLinearV2Config`, docs/SPEC.md §1); that class could
not be read, so the defaults of a key a config.json leaves out are those of its Ling-V2 sibling
`BailingMoeV2Config` (the released configs give every field that matters). Four
readings are uncertain in docs/SPEC.md; each is a field with the HF reading as its default and can be set
in `config.json` or as a keyword of `from_hf`:

- `slope_law`: "hf" decays linear layer i by `1 - (i - 1) / (L - 1) + 1e-5`, "engine" (SGLang,
  vLLM) by `1 - i / (L - 1) + 1e-5` (docs/SPEC.md §6.2, §13).
- `expert_bias_dtype`: "model" rounds the router's expert bias to the parameter dtype before use
  (HF registers the buffer in the model dtype), "float32" keeps it exact (docs/SPEC.md §10.4).
- `mtp_placement`: "inside" (Ring-V2 HF code) makes the MTP layers the last
  `num_nextn_predict_layers` of `num_hidden_layers`; "after" (Ling-V2) appends them (docs/SPEC.md §8).
- `shared_expert_size`: "hf" sizes the shared expert `moe_intermediate_size * num_shared_experts`,
  "explicit" uses `moe_shared_expert_intermediate_size` (docs/SPEC.md §7).

One more switch is a numerics choice for FP8 models (docs/FP8.md), set the same ways:
- `fp8_activations`: "none" multiplies FP8 weights by the activations as they are (weight-only);
  "grouped" quantizes the routed experts' input rows to FP8 per row in the grouped matmul (prefill
  and large decode batches), which then runs on FP8 tensor cores; the few-row decode products stay
  weight-only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

MODEL_TYPE = "bailing_moe_linear"

# Fields a config must give: the model's sizes have no default worth guessing.
REQUIRED = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")

SWITCHES = {
    "slope_law": ("hf", "engine"),
    "expert_bias_dtype": ("model", "float32"),
    "mtp_placement": ("inside", "after"),
    "shared_expert_size": ("hf", "explicit"),
    "fp8_activations": ("none", "grouped"),
}


class ConfigError(ValueError):
    """A config.json field that is missing, malformed or not supported."""


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Every field of a Ring-linear-2.0 `config.json` that changes the computation."""

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    use_rmsnorm: bool = True
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    use_qk_norm: bool = True
    num_experts: int = 256
    num_shared_experts: int | None = 1  # None or 0: no shared expert
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 512
    moe_shared_expert_intermediate_size: int | None = None
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    norm_topk_prob: bool = True
    router_dtype: str = "fp32"
    layer_group_size: int = 0  # no HF default is known: config.json must give it
    group_norm_size: int = 1
    linear_silu: bool = False
    num_nextn_predict_layers: int = 0
    pad_token_id: int | None = 156892
    eos_token_id: int | list[int] | None = 156892
    bos_token_id: int | None = None
    torch_dtype: str | None = None
    # Readings docs/SPEC.md leaves open (module docstring).
    slope_law: str = "hf"
    expert_bias_dtype: str = "model"
    mtp_placement: str = "inside"
    shared_expert_size: str = "hf"
    fp8_activations: str = "none"

    def __post_init__(self):
        _validate(self)

    def __hash__(self):  # rope_scaling is a dict; the config is a static jit argument
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> "RingConfig":
        """Reads an HF config: a dict, a `config.json` file, or a folder holding one.

        Keys that do not change the computation (`architectures`, `auto_map`, `use_cache`, ...) are
        ignored; `overrides` replace fields of the file.
        """
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ConfigError(f"no config.json at {path}")
            with open(path) as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path} is not valid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path} holds no JSON object")
        raw.update(overrides)
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"the config lacks {', '.join(missing)} (an HF config.json of a Ring-linear-2.0 model "
                              "gives them)")
        if raw["model_type"] != MODEL_TYPE:
            raise ConfigError(f"model_type is {raw['model_type']!r}; ring_jax reads {MODEL_TYPE!r} configs")
        if "dtype" in raw and "torch_dtype" not in raw:  # newer transformers write `dtype`
            raw["torch_dtype"] = raw["dtype"]
        if "use_linear_silu" in raw:  # SGLang's alias
            if raw.setdefault("linear_silu", raw["use_linear_silu"]) != raw["use_linear_silu"]:
                raise ConfigError("linear_silu and use_linear_silu disagree")
        from ring_jax.quantization import hf_quantization    # (which imports this module)

        hf_quantization(raw.get("quantization_config"))       # a layout ring_jax cannot read: an error
        if raw.get("head_dim", 0) is None:  # HF: head_dim or hidden_size // num_attention_heads
            raw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        if "layer_group_size" not in raw:
            raise ConfigError("config.json lacks layer_group_size (the softmax-layer period)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown_overrides = set(overrides) - names
        if unknown_overrides:
            raise ConfigError(f"unknown config field(s) {sorted(unknown_overrides)}")
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_hf_dict(self) -> dict:
        """The fields as an HF config dict (switches left at their defaults are omitted)."""
        out = {"model_type": MODEL_TYPE, "architectures": ["BailingMoeLinearV2ForCausalLM"]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SWITCHES and value == f.default:
                continue
            out[f.name] = value
        return out

    # --------------------------------------------------------------------------------- derived
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_decoder_layers(self) -> int:
        """Layers of the main decoder stack (MTP layers excluded)."""
        if self.mtp_placement == "inside":
            return self.num_hidden_layers - self.num_nextn_predict_layers
        return self.num_hidden_layers

    @property
    def mtp_layer_indices(self) -> tuple[int, ...]:
        """Checkpoint indices (`model.layers.{i}`) of the MTP layers."""
        first = self.num_decoder_layers
        return tuple(range(first, first + self.num_nextn_predict_layers))

    def is_softmax_layer(self, i: int) -> bool:
        """HF schedule (docs/SPEC.md §2): every layer_group_size-th layer, and the tail past the last
        whole group, is softmax attention; the rest are linear attention."""
        g = self.layer_group_size
        return (i + 1) % g == 0 or i >= (self.num_hidden_layers // g) * g

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @property
    def layer_types(self) -> tuple[str, ...]:
        """"softmax" or "linear" for each main decoder layer."""
        return tuple("softmax" if self.is_softmax_layer(i) else "linear"
                     for i in range(self.num_decoder_layers))

    @property
    def shared_expert_intermediate_size(self) -> int:
        """Width of the shared expert; 0 when there is none."""
        if not self.num_shared_experts:
            return 0
        if self.shared_expert_size == "explicit" and self.moe_shared_expert_intermediate_size:
            return self.moe_shared_expert_intermediate_size
        return self.moe_intermediate_size * self.num_shared_experts

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)


def _validate(c: RingConfig) -> None:
    def need(ok: bool, field: str, why: str):
        if not ok:
            raise ConfigError(f"{field}: {why}")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "layer_group_size",
                 "group_norm_size", "num_experts", "num_experts_per_tok", "n_group", "topk_group",
                 "moe_intermediate_size", "max_position_embeddings"):
        value = getattr(c, name)
        need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
             f"must be a positive integer, got {value!r}")
    for name, allowed in SWITCHES.items():
        need(getattr(c, name) in allowed, name, f"must be one of {allowed}, got {getattr(c, name)!r}")
    need(c.hidden_act == "silu", "hidden_act", f"only 'silu' is implemented, got {c.hidden_act!r}")
    need(c.score_function == "sigmoid", "score_function",
         f"only the 'sigmoid' router is implemented, got {c.score_function!r}")
    need(c.router_dtype in ("fp32", "float32", None), "router_dtype",
         f"only an fp32 router is implemented, got {c.router_dtype!r}")
    need(not c.use_qkv_bias, "use_qkv_bias", "attention biases are not implemented")
    need(not c.use_bias, "use_bias", "output biases are not implemented")
    need(c.use_rmsnorm, "use_rmsnorm", "only RMSNorm is implemented")
    need(c.use_qk_norm, "use_qk_norm", "the HF code always applies q/k RMSNorm; false is not supported")
    need(c.moe_router_enable_expert_bias, "moe_router_enable_expert_bias",
         "the router without an expert bias is not implemented")
    need(c.num_attention_heads % c.num_key_value_heads == 0, "num_key_value_heads",
         f"{c.num_key_value_heads} does not divide num_attention_heads={c.num_attention_heads}")
    need((c.num_attention_heads * c.head_dim) % c.group_norm_size == 0, "group_norm_size",
         f"{c.group_norm_size} does not divide num_attention_heads*head_dim="
         f"{c.num_attention_heads * c.head_dim}")
    for name in ("partial_rotary_factor", "rms_norm_eps", "routed_scaling_factor", "rope_theta"):
        value = getattr(c, name)
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
             and value > 0, name, f"must be a positive number, got {value!r}")
    need(c.partial_rotary_factor <= 1, "partial_rotary_factor", f"must be at most 1, got {c.partial_rotary_factor}")
    need(c.rotary_dim % 2 == 0 and c.rotary_dim > 0, "partial_rotary_factor",
         f"head_dim*partial_rotary_factor={c.head_dim * c.partial_rotary_factor} must be a positive even integer")
    need(c.num_experts % c.n_group == 0, "n_group", f"{c.n_group} does not divide num_experts={c.num_experts}")
    need(c.num_experts // c.n_group >= 2, "n_group", "each expert group needs at least 2 experts (top-2 group score)")
    need(c.topk_group <= c.n_group, "topk_group", f"{c.topk_group} exceeds n_group={c.n_group}")
    need(c.num_experts_per_tok <= c.topk_group * (c.num_experts // c.n_group), "num_experts_per_tok",
         f"{c.num_experts_per_tok} exceeds the experts of topk_group={c.topk_group} groups")
    need(c.num_shared_experts is None or (isinstance(c.num_shared_experts, int) and c.num_shared_experts >= 0),
         "num_shared_experts", f"must be a non-negative integer or null, got {c.num_shared_experts!r}")
    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    need(integer(c.first_k_dense_replace), "first_k_dense_replace",
         f"must be an integer, got {c.first_k_dense_replace!r}")
    need(c.moe_shared_expert_intermediate_size is None or (integer(c.moe_shared_expert_intermediate_size)
                                                          and c.moe_shared_expert_intermediate_size >= 0),
         "moe_shared_expert_intermediate_size",
         f"must be a non-negative integer or null, got {c.moe_shared_expert_intermediate_size!r}")
    need(c.pad_token_id is None or integer(c.pad_token_id), "pad_token_id",
         f"must be a token id or null, got {c.pad_token_id!r}")
    eos = c.eos_token_id
    need(eos is None or integer(eos) or (isinstance(eos, list) and all(map(integer, eos))), "eos_token_id",
         f"must be a token id, a list of them or null, got {eos!r}")
    need(0 <= c.first_k_dense_replace <= c.num_hidden_layers, "first_k_dense_replace",
         f"must be in [0, num_hidden_layers], got {c.first_k_dense_replace}")
    need(isinstance(c.num_nextn_predict_layers, int) and c.num_nextn_predict_layers >= 0,
         "num_nextn_predict_layers", f"must be a non-negative integer, got {c.num_nextn_predict_layers!r}")
    need(c.mtp_placement == "after" or c.num_nextn_predict_layers < c.num_hidden_layers,
         "num_nextn_predict_layers", f"{c.num_nextn_predict_layers} leaves no decoder layer")
    need(c.num_hidden_layers > 1, "num_hidden_layers", "the decay law divides by num_hidden_layers - 1")
    if c.rope_scaling:
        need(isinstance(c.rope_scaling, dict), "rope_scaling", "must be an object or null")
        need(c.rope_type is not None, "rope_scaling.type", "rope_scaling has neither rope_type nor type")
        need(c.rope_type in ("default", "yarn"), "rope_scaling.type",
             f"{c.rope_type!r} is not implemented (default and yarn are)")
        if c.rope_type == "yarn":
            factor = c.rope_scaling.get("factor")
            need(number(factor) and factor >= 1, "rope_scaling.factor", f"yarn needs a factor >= 1, got {factor!r}")
            for key in ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
                        "mscale_all_dim"):
                value = c.rope_scaling.get(key)
                need(value is None or number(value), f"rope_scaling.{key}", f"must be a number or null, got {value!r}")
