"""FP8 weights: which parameters are quantized, the quantization itself, and the HF layouts of
quantized checkpoints.

An FP8 parameter is `Fp8(values, scale)`: float8_e4m3fn values in K-major layout [..., out, in]
(torch's layout: Hopper's FP8 tensor cores take only K-major operands) and one float32 scale per
output channel [..., out]; the weight is values * scale[..., None]. The products read it as
weight-only FP8: x times the values converted to x's dtype (exact: every e4m3 value is a bf16
value), accumulated in float32, then times the scale (`ring_jax.layers.linear.matmul`). With the
config's `fp8_activations="grouped"` the routed experts' grouped products quantize their rows to
FP8 as well (`ring_jax.layers.moe`).

What is quantized is `QUANTIZED`: every projection and expert matrix and the LM head. The
embeddings, norms, the router (its kernel and expert_bias: the expert choice is discrete and
cheap) and the linear-attention state keep their precision.

HF layouts read (`quantization_config` of config.json, `hf_quantization`):
- "fbgemm_fp8": `<module>.weight` float8_e4m3fn [out, in] and `<module>.weight_scale` float32
  [out, 1], one scale per output channel: ring_jax's own layout, which `jax2hf` writes; read as is.
- "fp8" with `weight_block_size` [bo, bi] (DeepSeek-style): `<module>.weight` float8_e4m3fn and
  `<module>.weight_scale_inv` float32 [ceil(out / bo), ceil(in / bi)], one scale per block. Read
  dequantized (each value times its block's scale in float32, as torch computes it), then cast to
  the model dtype (and with quantize="fp8" quantized per output channel from that).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend
from ring_jax.config import ConfigError

METHODS = ("fp8",)

# The quantized parameters, by the end of their path in RingModel (`ring_jax.io.mapping`).
QUANTIZED = (
    ("attention", "query_key_value", "kernel"),
    ("attention", "g_proj", "kernel"),
    ("attention", "dense", "kernel"),
    ("mlp", "gate_up_proj", "kernel"),
    ("mlp", "down_proj", "kernel"),
    ("experts", "gate_up_proj"),
    ("experts", "down_proj"),
    ("shared_experts", "gate_up_proj", "kernel"),
    ("shared_experts", "down_proj", "kernel"),
    ("eh_proj", "kernel"),
    ("lm_head", "kernel"),
)


def quantized_path(path: tuple) -> bool:
    """Whether the parameter at `path` (a RingModel attribute path) is quantized."""
    return any(tuple(path[-len(end):]) == end for end in QUANTIZED)


def scale_name(name: str) -> str:
    """The attribute (or dotted key) of a quantized parameter's scale: "kernel" -> "kernel_scale"."""
    return name + "_scale"


def fp8_axes(axes: tuple) -> tuple[tuple, tuple]:
    """The logical axes of a parameter [..., in, out] -> those of its FP8 values [..., out, in] and
    of its scales [..., out]."""
    return (*axes[:-2], axes[-1], axes[-2]), (*axes[:-2], axes[-1])


def check_method(quantize: str | None) -> None:
    if quantize is not None and quantize not in METHODS:
        raise ValueError(f"quantize={quantize!r}: choose None or one of {METHODS}")


class Fp8(NamedTuple):
    """values [..., out, in] float8_e4m3fn; scale [..., out] float32."""
    values: np.ndarray | jax.Array
    scale: np.ndarray | jax.Array


def quantize_kernel(kernel: jax.Array) -> Fp8:
    """A parameter in the model's layout [..., in, out] -> its Fp8 [..., out, in]
    (`pallas_kernels.backend.quantize_rows`, compiled). A stack of the experts' stacks [L, E, in,
    out] one layer at a time: XLA materialises the transpose (a transpose and a reduction do not
    fuse on a GPU, and its autotuner allocates the transpose's output again to time it), so that a
    whole stack's would add twice its bytes."""
    if kernel.ndim > 3:
        return Fp8(*(jnp.stack(parts) for parts in zip(*(_quantized_matrices(entry) for entry in kernel))))
    return _quantized_matrices(kernel)


@jax.jit
def _quantized_matrices(kernel):
    return Fp8(*backend.quantize_rows(jnp.swapaxes(kernel, -1, -2)))


def dequantize(q: Fp8):
    """Fp8 -> the float32 weight [..., out, in]."""
    return q.values.astype(np.float32) * q.scale[..., None]


# ------------------------------------------------------------------------------ HF checkpoints
@dataclasses.dataclass(frozen=True)
class HFQuantization:
    """How an HF checkpoint stores its quantized modules."""
    method: str                               # "fbgemm_fp8" | "fp8"
    block: tuple[int, int] | None = None      # "fp8": [bo, bi] rows and columns per scale

    @property
    def scale_suffix(self) -> str:
        return "_scale" if self.method == "fbgemm_fp8" else "_scale_inv"

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        out, inp = shape
        if self.block is None:
            return (out, 1)
        return (-(-out // self.block[0]), -(-inp // self.block[1]))

    def read(self, values: np.ndarray, scale: np.ndarray):
        """One module's stored weight -> Fp8 (per channel, as stored) or the dequantized float32
        weight (per block)."""
        if self.block is None:
            return Fp8(values, scale[:, 0].astype(np.float32))
        bo, bi = self.block
        full = np.repeat(np.repeat(scale.astype(np.float32), bo, axis=0), bi, axis=1)
        return values.astype(np.float32) * full[:values.shape[0], :values.shape[1]]


FBGEMM = HFQuantization("fbgemm_fp8")


def hf_quantization(qc) -> HFQuantization | None:
    """The `quantization_config` of an HF config.json -> HFQuantization (None: not quantized); a
    layout ring_jax does not read is a ConfigError that names it."""
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"quantization_config must be an object, got {qc!r:.80}")
    method = qc.get("quant_method")
    if method == "fbgemm_fp8":
        return FBGEMM
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"quantization_config fmt {qc['fmt']!r}: ring_jax reads e4m3 FP8 checkpoints")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(f"quantization_config activation_scheme {qc['activation_scheme']!r}: ring_jax reads "
                              "FP8 checkpoints with dynamic activations (no stored input scales)")
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
            raise ConfigError(f"quantization_config weight_block_size {block!r}: ring_jax reads FP8 checkpoints "
                              "with one scale per [rows, columns] block, e.g. [128, 128]")
        return HFQuantization("fp8", tuple(block))
    raise ConfigError(f"quantization_config quant_method {method!r:.40}: ring_jax reads 'fbgemm_fp8' (per-channel) "
                      "and 'fp8' (block-scaled) FP8 checkpoints, or unquantized ones")


def fbgemm_config(not_converted: list[str]) -> dict:
    """The `quantization_config` that `jax2hf` writes for an FP8 model (`not_converted`: the
    Linear modules left unquantized, the routers)."""
    return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": not_converted}
