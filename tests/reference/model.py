"""Ring-linear-2.0 (HF `bailing_moe_linear`) forward in plain PyTorch, transcribed from docs/SPEC.md §1-§10.

Slow and literal on purpose: a per-token loop for the linear-attention recurrence, a per-expert loop
for the MoE. The state_dict keys are exactly the HF checkpoint names (docs/SPEC.md §9).

Dtypes (docs/SPEC.md §10). `dt` is the model dtype, `acc = promote_types(float32, dt)`:
- bf16 model: the HF bf16 steps (Linear in bf16, norm statistics / softmax / router / recurrence /
  MoE combine in float32, cast back to bf16 where HF casts).
- float32 model: the same steps, all in float32.
- float64 model: every step in float64 (the float64 "truth"), except that the RoPE tables and the
  decay slopes are the float32 values HF computes, converted exactly.

Shape letters: B batch, T tokens, H query heads, Hkv key/value heads, D head_dim, R rotary_dim,
E experts, K experts per token, N = B*T tokens.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

# Defaults for keys a config.json may leave out. The Ring-linear HF config class could not be read
# (docs/SPEC.md §0); these mirror ring_jax.config.RingConfig so that both sides read an absent key alike.
# layer_group_size has no default: a config must give it.
DEFAULTS = {
    "vocab_size": 157184,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": None,  # None -> hidden_size // num_attention_heads (HF)
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "rope_theta": 600000.0,
    "rope_scaling": None,
    "partial_rotary_factor": 1.0,
    "use_qk_norm": True,
    "num_experts": 256,
    "num_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "moe_intermediate_size": 512,
    "moe_shared_expert_intermediate_size": None,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0,
    "group_norm_size": 1,
    "linear_silu": False,
    "num_nextn_predict_layers": 0,
}

OPTIONS = {
    "slope_law": ("hf", "engine"),
    "expert_bias_dtype": ("model", "float32"),
    "mtp_placement": ("inside", "after"),
    "shared_expert_size": ("hf", "explicit"),
}


# ------------------------------------------------------------------------------------ config
def cfg(config: dict, key: str):
    """config[key], or DEFAULTS[key] when the key is absent. head_dim falls back to
    hidden_size // num_attention_heads (HF), linear_silu to the alias use_linear_silu."""
    if key == "head_dim":
        return config.get("head_dim") or cfg(config, "hidden_size") // cfg(config, "num_attention_heads")
    if key == "linear_silu":
        return bool(config.get("linear_silu", config.get("use_linear_silu", False)))
    if key == "layer_group_size":
        return config["layer_group_size"]  # no default: a KeyError names the missing field
    return config[key] if key in config else DEFAULTS[key]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a model of `dtype`: float32, or float64 for a float64 model."""
    return torch.promote_types(torch.float32, dtype)


def layer_is_softmax(config: dict, i: int) -> bool:
    """docs/SPEC.md §2: softmax (GQA) attention every layer_group_size-th layer and past the last whole group."""
    g, L = cfg(config, "layer_group_size"), cfg(config, "num_hidden_layers")
    return (i + 1) % g == 0 or i >= (L // g) * g


def layer_is_moe(config: dict, i: int) -> bool:
    return cfg(config, "num_experts") is not None and i >= cfg(config, "first_k_dense_replace")


# ------------------------------------------------------------------------------------ RoPE
def rope_parameters(config: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq [R/2] float32, attention_scaling) as transformers 4.56.1 computes them.

    `_compute_default_rope_parameters`, or `_compute_yarn_parameters` when rope_scaling's
    "rope_type" (or legacy "type") is "yarn".
    """
    base = cfg(config, "rope_theta")
    head_dim = cfg(config, "head_dim")
    dim = int(head_dim * cfg(config, "partial_rotary_factor"))
    scaling = cfg(config, "rope_scaling")
    rope_type = "default" if not scaling else scaling.get("rope_type", scaling.get("type"))

    if rope_type == "default":
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type != "yarn":
        raise NotImplementedError(f"rope type {rope_type!r}")

    factor = scaling["factor"]
    attention_factor = scaling.get("attention_factor")
    mscale = scaling.get("mscale")
    mscale_all_dim = scaling.get("mscale_all_dim")
    original_max = scaling.get("original_max_position_embeddings") or cfg(config, "max_position_embeddings")

    def get_mscale(scale, mscale=1):
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def find_correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = find_correction_dim(beta_fast), find_correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: prevent singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [R/2]

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(dtype=torch.float)
    inv_freq = (inv_freq_interpolation * (1 - extrapolation_factor)
                + inv_freq_extrapolation * extrapolation_factor)
    return inv_freq, attention_factor


def rope_cos_sin(config: dict, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [..., T, R] from positions [..., T]; computed in float32 (HF), then cast to dtype."""
    inv_freq, attention_scaling = rope_parameters(config)
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [..., T, R/2] float32
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, R]
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on the first R dims of the last axis; the rest passes through.

    x: [..., D]; cos, sin: broadcastable to [..., R]. Elementwise in x.dtype.
    """
    R = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_rot, x_pass = x[..., :R], x[..., R:]
    x1, x2 = x_rot[..., : R // 2], x_rot[..., R // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def _tables_for(cos: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """cos/sin [T, R] or [B, T, R] -> [B|1, T, R] with a head axis inserted at unsqueeze_dim."""
    if cos.dim() == 2:
        cos = cos[None]
    return cos.unsqueeze(unsqueeze_dim)


# ------------------------------------------------------------------------------------ decay slopes
def alibi_slopes(n: int) -> list[float]:
    """Standard ALiBi slopes for n heads, in Python float64."""

    def power_of_two(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


def decay_slope(config: dict, layer_idx: int, slope_law: str = "hf") -> torch.Tensor:
    """Log-decay g per head, [H] float32 (docs/SPEC.md §6.2): -alibi_slopes(H) * layer factor."""
    L = cfg(config, "num_hidden_layers")
    if slope_law == "hf":
        factor = 1 - (layer_idx - 1) / (L - 1) + 1e-5
    elif slope_law == "engine":
        factor = 1 - layer_idx / (L - 1) + 1e-5
    else:
        raise ValueError(f"slope_law {slope_law!r}")
    slopes = torch.tensor(alibi_slopes(cfg(config, "num_attention_heads")), dtype=torch.float32)
    return -slopes * factor


# ------------------------------------------------------------------------------------ building blocks
def _weight(*shape, dtype, fill=0.0) -> nn.Parameter:
    # The reference is never trained: no grads, so outputs can go straight to .numpy().
    return nn.Parameter(torch.full(shape, fill, dtype=dtype), requires_grad=False)


class RefLinear(nn.Module):
    """y = x @ W.T in the input dtype (bf16 matmul rounds its output to bf16). W: [out, in], no bias."""

    def __init__(self, in_features: int, out_features: int, dtype):
        super().__init__()
        self.weight = _weight(out_features, in_features, dtype=dtype)

    def forward(self, x):
        return F.linear(x, self.weight)


class RefRMSNorm(nn.Module):
    """HF BailingMoeV2RMSNorm: statistics in acc, cast to the input dtype BEFORE × weight."""

    def __init__(self, size: int, eps: float, dtype):
        super().__init__()
        self.weight = _weight(size, dtype=dtype, fill=1.0)
        self.eps = eps

    def forward(self, x):  # x: [..., size]
        y = x.to(acc_dtype(x.dtype))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class RefGroupRMSNorm(nn.Module):
    """g_norm: RMS over `groups` contiguous chunks of the last axis [H*D], per-channel weight [H*D]."""

    def __init__(self, size: int, groups: int, eps: float, dtype):
        super().__init__()
        assert size % groups == 0, (size, groups)
        self.weight = _weight(size, dtype=dtype, fill=1.0)
        self.groups = groups
        self.eps = eps

    def forward(self, x):  # x: [..., H*D]
        shape = x.shape
        y = x.to(acc_dtype(x.dtype)).reshape(*shape[:-1], self.groups, shape[-1] // self.groups)  # [..., G, H*D/G]
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.reshape(shape).to(x.dtype)


class RefMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), all in the input dtype."""

    def __init__(self, hidden: int, intermediate: int, dtype):
        super().__init__()
        self.gate_proj = RefLinear(hidden, intermediate, dtype)
        self.up_proj = RefLinear(hidden, intermediate, dtype)
        self.down_proj = RefLinear(intermediate, hidden, dtype)

    def forward(self, x):  # x: [..., hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------------ attention
class RefSoftmaxAttention(nn.Module):
    """HF BailingMoeV2Attention (docs/SPEC.md §5): GQA, per-head q/k RMSNorm, partial RoPE, causal softmax."""

    def __init__(self, config: dict, dtype):
        super().__init__()
        hidden = cfg(config, "hidden_size")
        self.H, self.Hkv, self.D = cfg(config, "num_attention_heads"), cfg(config, "num_key_value_heads"), cfg(config, "head_dim")
        self.use_qk_norm = cfg(config, "use_qk_norm")
        eps = cfg(config, "rms_norm_eps")
        self.query_key_value = RefLinear(hidden, (self.H + 2 * self.Hkv) * self.D, dtype)
        if self.use_qk_norm:
            self.query_layernorm = RefRMSNorm(self.D, eps, dtype)
            self.key_layernorm = RefRMSNorm(self.D, eps, dtype)
        self.dense = RefLinear(self.H * self.D, hidden, dtype)

    def forward(self, x, cos, sin):  # x: [B, T, hidden]; cos, sin: [T, R] or [B, T, R]
        B, T, _ = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        qkv = self.query_key_value(x).view(B, T, H + 2 * Hkv, D)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|Hkv, T, D]
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        cos, sin = _tables_for(cos, 1), _tables_for(sin, 1)  # [B|1, 1, T, R]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(H // Hkv, dim=1)  # [B, H, T, D]: kv head j serves q heads j*H/Hkv ...
        v = v.repeat_interleave(H // Hkv, dim=1)
        # SDPA numerics (transformers' default attention for this model): scores and softmax in acc,
        # probabilities rounded to dt before the product with v.
        acc = acc_dtype(x.dtype)
        scores = torch.matmul(q.to(acc), k.transpose(2, 3).to(acc)) / math.sqrt(D)  # [B, H, T, T] in acc
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        o = torch.matmul(probs, v)  # [B, H, T, D]
        o = o.transpose(1, 2).reshape(B, T, H * D)
        return self.dense(o)


def linear_attention_recurrence(q, k, v, g, initial_state=None, scale=None):
    """Simple-GLA / Lightning recurrence, token by token in q.dtype (docs/SPEC.md §6.3).

    q, k, v: [B, T, H, D]; g: [H] log-decay; initial_state: [B, H, D, D] or None.
    S_t = exp(g) S_{t-1} + k_t^T v_t;  o_t = scale * q_t S_t.  Returns (o [B, T, H, D], S_T [B, H, D, D]).
    """
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    decay = torch.exp(g.to(q.dtype))[None, :, None, None]  # [1, H, 1, 1]
    S = torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype) if initial_state is None else initial_state.to(q.dtype)
    outputs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, D, Dv]: k_t^T v_t
        S = decay * S + kv
        outputs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], S))  # [B, H, Dv]
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, v.shape[-1])
    return o, S


class RefLinearAttention(nn.Module):
    """BailingMoeV2LinearAttention (docs/SPEC.md §6): MHA qkv, q/k RMSNorm, RoPE, decayed linear recurrence,
    group RMSNorm, sigmoid output gate."""

    def __init__(self, config: dict, layer_idx: int, dtype, slope_law: str = "hf"):
        super().__init__()
        hidden = cfg(config, "hidden_size")
        self.H, self.D = cfg(config, "num_attention_heads"), cfg(config, "head_dim")  # MHA: Hkv ignored
        self.use_qk_norm = cfg(config, "use_qk_norm")
        self.linear_silu = cfg(config, "linear_silu")
        eps = cfg(config, "rms_norm_eps")
        HD = self.H * self.D
        self.query_key_value = RefLinear(hidden, 3 * HD, dtype)
        if self.use_qk_norm:
            self.query_layernorm = RefRMSNorm(self.D, eps, dtype)
            self.key_layernorm = RefRMSNorm(self.D, eps, dtype)
        self.g_proj = RefLinear(hidden, HD, dtype)
        self.g_norm = RefGroupRMSNorm(HD, cfg(config, "group_norm_size"), eps, dtype)
        self.dense = RefLinear(HD, hidden, dtype)
        # Plain attribute, not a buffer: never in the state_dict and never cast by .to().
        self.slope = decay_slope(config, layer_idx, slope_law)  # [H] float32

    def forward(self, x, cos, sin):
        return self.forward_with_state(x, cos, sin)[0]

    def forward_with_state(self, x, cos, sin, initial_state=None):
        """x: [B, T, hidden] -> (out [B, T, hidden], final state [B, H, D, D] in acc)."""
        B, T, _ = x.shape
        H, D = self.H, self.D
        qkv = self.query_key_value(x)  # [B, T, 3*H*D]
        if self.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(B, T, 3 * H, D).split([H, H, H], dim=2)  # [B, T, H, D] each
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        cos, sin = _tables_for(cos, 2), _tables_for(sin, 2)  # [B|1, T, 1, R]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        acc = acc_dtype(x.dtype)
        o, state = linear_attention_recurrence(q.to(acc), k.to(acc), v.to(acc), self.slope.to(acc), initial_state)
        o = o.to(x.dtype).reshape(B, T, H * D)
        o = self.g_norm(o)
        o = o * torch.sigmoid(self.g_proj(x))
        return self.dense(o), state


# ------------------------------------------------------------------------------------ MoE
class RefGate(nn.Module):
    """HF BailingMoeV2Gate (docs/SPEC.md §7): sigmoid scores, biased group-limited top-k, renormalised weights."""

    def __init__(self, config: dict, dtype, expert_bias_dtype: str = "model"):
        super().__init__()
        self.E, self.K = cfg(config, "num_experts"), cfg(config, "num_experts_per_tok")
        self.n_group, self.topk_group = cfg(config, "n_group"), cfg(config, "topk_group")
        self.routed_scaling_factor = cfg(config, "routed_scaling_factor")
        self.expert_bias_dtype = expert_bias_dtype
        self.weight = _weight(self.E, cfg(config, "hidden_size"), dtype=dtype)
        self.register_buffer("expert_bias", torch.zeros(self.E, dtype=torch.float32), persistent=True)
        # Test hooks: route() records its choice in last_topk_idx; a [N, K] forced_topk_idx replaces the
        # selection (the weights are still this gate's renormalised scores of those experts).
        self.last_topk_idx = None
        self.forced_topk_idx = None

    def route(self, x):
        """x: [N, hidden] -> (topk_idx [N, K] int64, topk_weight [N, K] in acc)."""
        acc = acc_dtype(x.dtype)
        N = x.shape[0]
        logits = F.linear(x.to(acc), self.weight.to(acc))  # [N, E]
        scores = torch.sigmoid(logits)
        bias = self.expert_bias
        if self.expert_bias_dtype == "model":
            bias = bias.to(self.weight.dtype)  # HF buffer lives in the model dtype
        routing = scores + bias.to(acc)  # bias used for selection only

        # keep the topk_group groups with the largest sum of their top-2 scores
        group_scores = routing.view(N, self.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [N, n_group]
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = group_mask[:, :, None].expand(N, self.n_group, self.E // self.n_group).reshape(N, self.E)
        masked = routing.masked_fill(~expert_mask.bool(), float("-inf"))
        topk_idx = torch.topk(masked, k=self.K, dim=-1).indices  # [N, K], by descending biased score
        if self.forced_topk_idx is not None:
            topk_idx = self.forced_topk_idx
        self.last_topk_idx = topk_idx

        weight = scores.gather(1, topk_idx)  # unbiased scores
        if self.K > 1:  # HF renormalises whenever top_k > 1 (norm_topk_prob is not read)
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return topk_idx, weight * self.routed_scaling_factor

    def forward(self, x):
        return self.route(x)


class RefMoE(nn.Module):
    """HF BailingMoeV2SparseMoeBlock, inference path (moe_infer) plus the ungated shared expert."""

    def __init__(self, config: dict, dtype, expert_bias_dtype: str = "model", shared_expert_size: str = "hf"):
        super().__init__()
        hidden, moe_I = cfg(config, "hidden_size"), cfg(config, "moe_intermediate_size")
        self.gate = RefGate(config, dtype, expert_bias_dtype)
        self.experts = nn.ModuleList(RefMLP(hidden, moe_I, dtype) for _ in range(cfg(config, "num_experts")))
        n_shared = cfg(config, "num_shared_experts")
        if shared_expert_size == "hf":
            shared_I = moe_I * (n_shared or 0)
        elif shared_expert_size == "explicit":
            # as ring_jax.config: an absent/null explicit size falls back to the HF product
            shared_I = cfg(config, "moe_shared_expert_intermediate_size") or moe_I * n_shared
        else:
            raise ValueError(f"shared_expert_size {shared_expert_size!r}")
        self.shared_experts = RefMLP(hidden, shared_I, dtype) if n_shared else None

    def forward(self, x):  # x: [B, T, hidden]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [N, hidden]
        topk_idx, topk_weight = self.gate.route(x2)  # [N, K], [N, K] acc
        out = x2.new_zeros(*topk_idx.shape, shape[-1])  # [N, K, hidden] in dt
        for e, expert in enumerate(self.experts):
            token, slot = (topk_idx == e).nonzero(as_tuple=True)
            if token.numel():
                out[token, slot] = expert(x2[token])
        y = (out.to(topk_weight.dtype) * topk_weight[..., None]).sum(dim=1).to(x.dtype)  # [N, hidden]
        y = y.reshape(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


# ------------------------------------------------------------------------------------ layers
class RefDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: dict, layer_idx: int, dtype, options: dict):
        super().__init__()
        hidden, eps = cfg(config, "hidden_size"), cfg(config, "rms_norm_eps")
        self.layer_idx = layer_idx
        self.is_softmax = layer_is_softmax(config, layer_idx)
        self.input_layernorm = RefRMSNorm(hidden, eps, dtype)
        if self.is_softmax:
            self.attention = RefSoftmaxAttention(config, dtype)
        else:
            self.attention = RefLinearAttention(config, layer_idx, dtype, options["slope_law"])
        self.post_attention_layernorm = RefRMSNorm(hidden, eps, dtype)
        if layer_is_moe(config, layer_idx):
            self.mlp = RefMoE(config, dtype, options["expert_bias_dtype"], options["shared_expert_size"])
        else:
            self.mlp = RefMLP(hidden, cfg(config, "intermediate_size"), dtype)

    def forward(self, x, cos, sin):  # x: [B, T, hidden]
        x = x + self.attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class RefMTPLayer(nn.Module):
    """HF BailingMoeV2MTPLayer (Ling-V2 file): eh_proj(cat[enorm(emb), hnorm(h)]) -> softmax-attention
    MoE block -> final_layernorm."""

    def __init__(self, config: dict, layer_idx: int, dtype, options: dict):
        super().__init__()
        hidden, eps = cfg(config, "hidden_size"), cfg(config, "rms_norm_eps")
        self.layer_idx = layer_idx
        self.input_layernorm = RefRMSNorm(hidden, eps, dtype)
        self.enorm = RefRMSNorm(hidden, eps, dtype)
        self.eh_proj = RefLinear(2 * hidden, hidden, dtype)
        self.post_attention_layernorm = RefRMSNorm(hidden, eps, dtype)
        self.attention = RefSoftmaxAttention(config, dtype)
        self.mlp = RefMoE(config, dtype, options["expert_bias_dtype"], options["shared_expert_size"])
        self.hnorm = RefRMSNorm(hidden, eps, dtype)
        self.final_layernorm = RefRMSNorm(hidden, eps, dtype)

    def forward(self, input_embeds, hidden_states, cos, sin):  # both [B, T, hidden]
        h = self.eh_proj(torch.cat([self.enorm(input_embeds), self.hnorm(hidden_states)], dim=-1))
        h = h + self.attention(self.input_layernorm(h), cos, sin)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return self.final_layernorm(h)


class RefBackbone(nn.Module):
    """`model.*`: word_embeddings, layers (decoder layers and MTP layers, HF indices), norm."""

    def __init__(self, config: dict, dtype, options: dict):
        super().__init__()
        hidden, L = cfg(config, "hidden_size"), cfg(config, "num_hidden_layers")
        n_mtp = cfg(config, "num_nextn_predict_layers")
        self.num_decoder_layers = L - n_mtp if options["mtp_placement"] == "inside" else L
        self.num_mtp_layers = n_mtp
        self.word_embeddings = _weight_module(cfg(config, "vocab_size"), hidden, dtype)
        layers = [RefDecoderLayer(config, i, dtype, options) for i in range(self.num_decoder_layers)]
        layers += [RefMTPLayer(config, self.num_decoder_layers + k, dtype, options) for k in range(n_mtp)]
        self.layers = nn.ModuleList(layers)
        self.norm = RefRMSNorm(hidden, cfg(config, "rms_norm_eps"), dtype)

    def embed(self, input_ids):  # [B, T] -> [B, T, hidden]
        return F.embedding(input_ids, self.word_embeddings.weight)


def _weight_module(rows: int, cols: int, dtype) -> nn.Module:
    """A module holding just `.weight` [rows, cols] (the embedding table)."""
    module = nn.Module()
    module.weight = _weight(rows, cols, dtype=dtype)
    return module


def roll_left(input_ids: torch.Tensor) -> torch.Tensor:
    """HF roll_tensor(shifts=-1, fill 0): [a, b, c] -> [b, c, 0] along the last axis."""
    rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    rolled[..., -1] = 0
    return rolled


class RefModel(nn.Module):
    """BailingMoeLinearV2ForCausalLM forward. state_dict keys = HF checkpoint names (docs/SPEC.md §9).

    Options (readings docs/SPEC.md leaves open, §13): slope_law "hf" | "engine"; expert_bias_dtype
    "model" | "float32"; mtp_placement "inside" | "after"; shared_expert_size "hf" | "explicit".
    """

    def __init__(self, config: dict, *, dtype=torch.float32, slope_law="hf", expert_bias_dtype="model",
                 mtp_placement="inside", shared_expert_size="hf"):
        super().__init__()
        self.config = dict(config)
        self.dtype = dtype
        self.options = dict(slope_law=slope_law, expert_bias_dtype=expert_bias_dtype,
                            mtp_placement=mtp_placement, shared_expert_size=shared_expert_size)
        for name, value in self.options.items():
            if value not in OPTIONS[name]:
                raise ValueError(f"{name} must be one of {OPTIONS[name]}, got {value!r}")
        self.tie_word_embeddings = bool(cfg(config, "tie_word_embeddings"))
        self.model = RefBackbone(self.config, dtype, self.options)
        if not self.tie_word_embeddings:
            self.lm_head = RefLinear(cfg(config, "hidden_size"), cfg(config, "vocab_size"), dtype)

    def with_dtype(self, dtype) -> "RefModel":
        """A copy with the same weights cast to dtype (expert_bias stays float32), computing with that
        dtype's steps."""
        other = RefModel(self.config, dtype=dtype, **self.options)
        other.load_state_dict(self.state_dict(), strict=True)  # copy_ casts to each target's dtype
        return other

    # --------------------------------------------------------------------------------- forward
    def rope(self, T: int):
        return rope_cos_sin(self.config, torch.arange(T), self.dtype)  # [T, R] each

    def hidden_states(self, input_ids):
        """input_ids [B, T] -> final-normed hidden states [B, T, hidden] in dt."""
        cos, sin = self.rope(input_ids.shape[-1])
        h = self.model.embed(input_ids)
        for layer in self.model.layers[: self.model.num_decoder_layers]:
            h = layer(h, cos, sin)
        return self.model.norm(h)

    def logits(self, hidden):
        """lm_head (or the tied embedding) in dt, then .float() (float64 stays float64)."""
        weight = self.model.word_embeddings.weight if self.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(hidden, weight)
        return logits if logits.dtype == torch.float64 else logits.float()

    def forward(self, input_ids, routing=None):  # [B, T] -> [B, T, V]
        """routing: optional {layer index: topk_idx [B*T, K]} forcing the experts of those MoE layers."""
        with self._forced_routing(routing):
            return self.logits(self.hidden_states(input_ids))

    def forward_with_mtp(self, input_ids, routing=None):
        """(logits [B, T, V], [mtp logits [B, T, V] per MTP layer]) as in the Ling-V2 HF forward."""
        with self._forced_routing(routing):
            return self._forward_with_mtp(input_ids)

    # ------------------------------------------------------------------------- routing hooks
    def moe_gates(self) -> dict[int, RefGate]:
        """{HF layer index: router} of every MoE layer (MTP layers included)."""
        return {i: layer.mlp.gate for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, RefMoE)}

    def routing(self, input_ids) -> dict[int, torch.Tensor]:
        """The experts each MoE layer picks for input_ids: {layer index: topk_idx [B*T, K]}.

        Feed it to another dtype's forward(..., routing=...) to compare dtypes without discrete
        routing flips (a bf16 model picks a different expert near ties; that is not an error).
        """
        gates = self.moe_gates()
        for gate in gates.values():
            gate.last_topk_idx = None
        with torch.no_grad():
            self._forward_with_mtp(input_ids)
        return {i: gate.last_topk_idx for i, gate in gates.items()}

    @contextlib.contextmanager
    def _forced_routing(self, routing):
        gates = self.moe_gates()
        try:
            for i, idx in (routing or {}).items():
                gates[i].forced_topk_idx = idx
            yield
        finally:
            for gate in gates.values():
                gate.forced_topk_idx = None

    def _forward_with_mtp(self, input_ids):
        cos, sin = self.rope(input_ids.shape[-1])
        h = self.hidden_states(input_ids)
        logits = self.logits(h)
        mtp_logits = []
        ids = input_ids
        for layer in self.model.layers[self.model.num_decoder_layers:]:
            ids = roll_left(ids)
            h = layer(self.model.embed(ids), h, cos, sin)
            mtp_logits.append(self.logits(h))
        return logits, mtp_logits
