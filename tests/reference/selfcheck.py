"""Quick self-check of the reference: `cd /work/main && python -m tests.reference.selfcheck` (< 30 s)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from .checkpoint import load_hf_checkpoint, make_hf_checkpoint
from .model import (RefModel, alibi_slopes, layer_is_softmax, linear_attention_recurrence, rope_cos_sin,
                    rope_parameters)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def check(ok: bool, what: str):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        raise SystemExit(1)


def expected_names(config: dict, placement: str = "inside") -> set[str]:
    """docs/SPEC.md §9 names, enumerated independently of RefModel."""
    L, n = config["num_hidden_layers"], config.get("num_nextn_predict_layers", 0)
    main = L - n if placement == "inside" else L
    names = {"model.word_embeddings.weight", "model.norm.weight"}
    if not config.get("tie_word_embeddings", False):
        names.add("lm_head.weight")

    def moe(p):
        out = {p + "mlp.gate.weight", p + "mlp.gate.expert_bias"}
        for e in range(config["num_experts"]):
            out |= {f"{p}mlp.experts.{e}.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
        return out | {f"{p}mlp.shared_experts.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}

    attn = ("query_key_value", "query_layernorm", "key_layernorm", "dense")
    for i in range(main):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}attention.{m}.weight" for m in attn}
        if not layer_is_softmax(config, i):
            names |= {p + "attention.g_proj.weight", p + "attention.g_norm.weight"}
        if i < config["first_k_dense_replace"]:
            names |= {f"{p}mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
        else:
            names |= moe(p)
    for i in range(main, main + n):
        p = f"model.layers.{i}."
        names |= {f"{p}{m}.weight" for m in ("enorm", "hnorm", "eh_proj", "input_layernorm",
                                                 "post_attention_layernorm", "final_layernorm")}
        names |= {f"{p}attention.{m}.weight" for m in attn} | moe(p)
    return names


def chunked_sum(q, k, v, g, scale):
    """o_t = scale * sum_{s<=t} exp((t-s) g) (q_t.k_s) v_s and S_T, float64 numpy, all at once."""
    B, T, H, D = q.shape
    t = np.arange(T)
    diff = t[:, None] - t[None, :]  # [T, S]
    decay = np.where(diff >= 0, np.exp(np.maximum(diff, 0)[None] * g[:, None, None]), 0.0)  # [H, T, S]
    scores = np.einsum("bthd,bshd->bhts", q, k) * decay[None]
    o = scale * np.einsum("bhts,bshe->bthe", scores, v)
    state = np.einsum("hs,bshd,bshe->bhde", np.exp((T - 1 - t)[None] * g[:, None]), k, v)
    return o, state


def yarn_numpy(config: dict):
    """inv_freq, attention_scaling of transformers' _compute_yarn_parameters, re-derived in float64."""
    sc = config["rope_scaling"]
    base, dim = config["rope_theta"], int(config["head_dim"] * config["partial_rotary_factor"])
    factor, orig = sc["factor"], sc.get("original_max_position_embeddings") or config["max_position_embeddings"]
    corr = lambda rot: dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / ((high - low) or 0.001), 0, 1)
    pos = base ** (np.arange(0, dim, 2) / dim)
    extra = 1 - ramp
    return (1 / (factor * pos)) * (1 - extra) + (1 / pos) * extra, 0.1 * math.log(factor) + 1.0


def main():
    start = time.time()
    torch.manual_seed(0)
    with open(os.path.join(ROOT, "configs", "tiny.json")) as f:
        tiny = json.load(f)
    V = tiny["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="refcheck_") as tmp:
        run_checks(tiny, V, tmp)
    elapsed = time.time() - start
    print(f"all checks passed in {elapsed:.1f} s")  # ~1 s on an idle 2-core CPU


def run_checks(tiny: dict, V: int, tmp: str):

    # ---- schedule and names
    check([i for i in range(6) if layer_is_softmax(tiny, i)] == [2, 5], "tiny schedule: softmax layers 2, 5")
    ref32 = make_hf_checkpoint(os.path.join(tmp, "f32"), tiny, dtype=torch.float32, seed=0)
    names = set(ref32.state_dict())
    check(names == expected_names(tiny), f"state_dict keys == SPEC §9 names ({len(names)} tensors)")
    sd = ref32.state_dict()
    check(sd["model.layers.0.attention.query_key_value.weight"].shape == (3 * 4 * 16, 64)
          and sd["model.layers.2.attention.query_key_value.weight"].shape == ((4 + 2 * 2) * 16, 64)
          and sd["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64)
          and sd["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, 32)
          and sd["model.layers.1.attention.g_norm.weight"].shape == (64,)
          and sd["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32, "tensor shapes / expert_bias float32")

    # ---- whole model: f32 and bf16 against float64
    ref64 = ref32.with_dtype(torch.float64)
    ref16 = make_hf_checkpoint(os.path.join(tmp, "bf16"), tiny, dtype=torch.bfloat16, seed=0)
    ref16_64 = ref16.with_dtype(torch.float64)
    check(ref16.state_dict()["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
          and ref16.state_dict()["model.norm.weight"].dtype == torch.bfloat16, "bf16 model: weights bf16, expert_bias f32")
    for T in (7, 65):
        ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            l32, l64, l16 = ref32(ids), ref64(ids), ref16(ids)
            routes16, routes64 = ref16.routing(ids), ref16_64.routing(ids)
            l16_64 = ref16_64(ids, routing=routes16)  # float64 math, the bf16 model's expert choices
            l16_64_free = ref16_64(ids)
        check(l32.shape == (2, T, V) and l32.dtype == torch.float32 and l64.dtype == torch.float64
              and l16.dtype == torch.float32, f"T={T}: logits shapes/dtypes")
        check(all(bool(torch.isfinite(x).all()) for x in (l32, l64, l16)), f"T={T}: finite")
        check(torch.equal(ref64(ids, routing=ref64.routing(ids)), l64), f"T={T}: forcing a model's own routing is a no-op")
        e32, e16 = rel(l32, l64), rel(l16, l16_64)
        check(e32 < 1e-5, f"T={T}: f32 vs f64 rel err {e32:.2e} < 1e-5")
        flips = sum(int((routes16[i].sort(-1).values != routes64[i].sort(-1).values).any(-1).sum()) for i in routes16)
        check(e16 < 5e-2, f"T={T}: bf16 vs f64 (same bf16 weights, bf16's routing) rel err {e16:.2e} < 5e-2"
              f"  [free routing: {rel(l16, l16_64_free):.2e}, {flips} token-layer routing flips of "
              f"{2 * T * len(routes16)}; vs f32-weight f64: {rel(l16, l64):.2e}]")

    # ---- linear-attention recurrence vs the chunked-sum formula (float64), and state carry-over
    rng = np.random.default_rng(0)
    B, T, H, D = 2, 50, 3, 8
    q, k, v = (rng.standard_normal((B, T, H, D)) for _ in range(3))
    g = -rng.uniform(0.01, 1.0, H)
    o, S = linear_attention_recurrence(*(torch.as_tensor(x) for x in (q, k, v, g)))
    o_want, S_want = chunked_sum(q, k, v, g, D ** -0.5)
    check(rel(o, o_want) < 1e-12 and rel(S, S_want) < 1e-12,
          f"recurrence == chunked sum (o {rel(o, o_want):.1e}, state {rel(S, S_want):.1e})")
    la = ref64.model.layers[0].attention
    x = torch.randn(2, 30, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_cos_sin(tiny, torch.arange(30), torch.float64)
    with torch.no_grad():
        full, S_full = la.forward_with_state(x, cos, sin)
        a, S_a = la.forward_with_state(x[:, :13], cos[:13], sin[:13])
        # continuing needs the continuing positions: rope tables of positions 13..29
        b, S_b = la.forward_with_state(x[:, 13:], cos[13:], sin[13:], initial_state=S_a)
    check(rel(torch.cat([a, b], 1), full) < 1e-12 and rel(S_b, S_full) < 1e-12 and S_full.shape == (2, 4, 16, 16),
          "forward_with_state: split prefill == full prefill")
    check(la.slope.dtype == torch.float32 and abs(float(la.slope[0]) + 0.25 * (1 + 1 / 5 + 1e-5)) < 1e-7
          and abs(float(la.slope[3]) + 0.25 ** 4 * (1 + 1 / 5 + 1e-5)) < 1e-9,
          f"tiny layer 0 slope {la.slope.tolist()}")

    # ---- decay slopes: docs/SPEC.md §6.2 numbers for Ring-mini (H=16, L=20)
    mini = dict(tiny, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4, layer_group_size=5,
                group_norm_size=4)
    from .model import decay_slope
    check(abs(alibi_slopes(16)[0] - 2 ** -0.5) < 1e-15 and abs(alibi_slopes(16)[-1] - 2 ** -8) < 1e-15
          and alibi_slopes(6) == alibi_slopes(4) + alibi_slopes(8)[0::2][:2], "alibi slopes")
    check(abs(float(decay_slope(mini, 0)[0]) / -2 ** -0.5 - 1.0526416) < 1e-6
          and abs(float(decay_slope(mini, 18)[0]) + 0.074439) < 1e-5
          and abs(float(decay_slope(mini, 1, "engine")[0]) + 2 ** -0.5 * (1 - 1 / 19 + 1e-5)) < 1e-7,
          "mini slopes (hf layer 0 / 18, engine layer 1)")

    # ---- MTP, both placements
    for placement in ("inside", "after"):
        config = dict(tiny, num_nextn_predict_layers=1)
        ref = make_hf_checkpoint(os.path.join(tmp, "mtp_" + placement), config, seed=2, mtp_placement=placement)
        check(set(ref.state_dict()) == expected_names(config, placement), f"MTP {placement}: keys")
        ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            logits, mtp = ref.with_dtype(torch.float64).forward_with_mtp(ids)
            plain = ref.with_dtype(torch.float64)(ids)
        check(len(mtp) == 1 and mtp[0].shape == (1, 9, V) and bool(torch.isfinite(mtp[0]).all())
              and torch.equal(logits, plain), f"MTP {placement}: forward_with_mtp (main layers "
              f"{ref.model.num_decoder_layers}, MTP index {ref.model.layers[-1].layer_idx})")

    # ---- YaRN
    yarn = dict(tiny, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    inv_freq, scaling = rope_parameters(yarn)
    inv_want, scaling_want = yarn_numpy(yarn)
    check(inv_freq.dtype == torch.float32 and rel(inv_freq, inv_want) < 1e-6 and scaling == scaling_want,
          f"YaRN inv_freq {inv_freq.tolist()} (rel {rel(inv_freq, inv_want):.1e}), attention_scaling {scaling:.6f}")
    inv_default, _ = rope_parameters(tiny)
    check(rel(inv_default, 10000.0 ** (-np.arange(0, 8, 2) / 8)) < 1e-6, "default inv_freq")
    cos, sin = rope_cos_sin(yarn, torch.arange(5), torch.bfloat16)
    check(cos.shape == (5, 8) and cos.dtype == torch.bfloat16 and abs(float(cos[0, 0]) - scaling) < 1e-2,
          "YaRN cos/sin tables")
    ref_y = make_hf_checkpoint(os.path.join(tmp, "yarn"), yarn, seed=4)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ly, ly64 = ref_y(ids), ref_y.with_dtype(torch.float64)(ids)
    check(bool(torch.isfinite(ly).all()) and rel(ly, ly64) < 1e-5, f"YaRN model runs (f32 vs f64 {rel(ly, ly64):.1e})")

    # ---- options and checkpoint files
    opts = dict(slope_law="engine", expert_bias_dtype="float32", shared_expert_size="explicit")
    cfg2 = dict(tiny, linear_silu=True, tie_word_embeddings=True, moe_shared_expert_intermediate_size=48,
                num_attention_heads=6, num_key_value_heads=3, group_norm_size=3)
    ref2 = make_hf_checkpoint(os.path.join(tmp, "sharded"), cfg2, seed=5, shards=3, **opts)
    files = sorted(os.listdir(os.path.join(tmp, "sharded")))
    check(files == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                    "model-00003-of-00003.safetensors", "model.safetensors.index.json"], f"sharded files {files}")
    back = load_hf_checkpoint(os.path.join(tmp, "sharded"), **opts)
    check(all(torch.equal(a, b) for a, b in zip(ref2.state_dict().values(), back.state_dict().values()))
          and "lm_head.weight" not in ref2.state_dict()
          and ref2.state_dict()["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (48, 64),
          "sharded round trip, tied head, explicit shared size")
    with torch.no_grad():
        l2, l2_64 = back(ids), back.with_dtype(torch.float64)(ids)
    check(rel(l2, l2_64) < 1e-5, f"linear_silu / 6 heads / engine slopes / tied: f32 vs f64 {rel(l2, l2_64):.1e}")
    with open(os.path.join(tmp, "bf16", "config.json")) as f:
        check(json.load(f)["torch_dtype"] == "bfloat16", "config.json torch_dtype")


if __name__ == "__main__":
    main()
