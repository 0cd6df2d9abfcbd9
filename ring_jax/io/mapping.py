"""THE table between HF checkpoint tensors and RingModel parameters (docs/SPEC.md §9).

Conversion both ways, validation and error messages all read `tensor_table(config)`; nothing else
spells a tensor name.

Layouts:
- "same":    the HF tensor is the parameter (norm weights, embeddings, expert bias);
- "linear":  torch Linear weight [out, in] -> kernel [in, out] (transpose);
- "experts": E tensors `...experts.{e}.<proj>.weight` [out, in] -> one stacked [E, in, out].
A "linear" or "experts" parameter may join `parts` projections along its output axis: the SwiGLU
gate and up projections become one `gate_up_proj` [.., in, 2 * out] (gate first), so that one
matmul (one grouped matmul for the experts) computes both.

In the table of an FP8 model (`tensor_table(config, quantize="fp8")`), the parameters of
`ring_jax.quantization.QUANTIZED` are `quantized`: two arrays, the float8 values in the HF
tensors' own [.., out, in] layout (parts joined along out) and their scales [.., out], under the
keys `key` and `key + "_scale"`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ring_jax.errors import CheckpointError
from ring_jax.config import RingConfig
from pallas_kernels.backend import FP8, quantize_rows
from ring_jax.quantization import Fp8, dequantize, quantized_path, scale_name


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    path: tuple[str | int, ...]       # attribute path in RingModel, e.g. ("layers", 3, "mlp", "gate", "kernel")
    hf_names: tuple[str, ...]         # the HF tensors, part by part (and expert by expert within a part)
    layout: str                       # "same" | "linear" | "experts"
    hf_shape: tuple[int, ...]         # shape of each HF tensor
    parts: int = 1                    # projections joined along the output axis
    float32: bool = False             # stays float32 whatever the model dtype
    quantized: bool = False           # FP8 values [.., out, in] and scales [.., out] (module docstring)

    @property
    def key(self) -> str:
        """The parameter's dotted name, e.g. "layers.3.mlp.gate.kernel"."""
        return ".".join(str(p) for p in self.path)

    @property
    def arrays(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """(key, shape, dtype) of each array the parameter is stored as; dtype "model" for the
        model's dtype. One array, or an FP8 parameter's values and scales."""
        if not self.quantized:
            return ((self.key, self.shape, "float32" if self.float32 else "model"),)
        *lead, inp, out = self.shape
        return ((self.key, (*lead, out, inp), FP8.name), (scale_name(self.key), (*lead, out), "float32"))

    @property
    def num_experts(self) -> int:
        return len(self.hf_names) // self.parts if self.layout == "experts" else 1

    @property
    def hf_label(self) -> str:
        """The HF names, with {e} for the experts of a stacked tensor, parts joined by " + "."""
        firsts = self.hf_names[:: self.num_experts]
        return " + ".join(n.replace(".experts.0.", ".experts.{e}.") for n in firsts)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.layout == "same":
            return self.hf_shape
        out, inp = self.hf_shape
        shape = (inp, self.parts * out)
        return shape if self.layout == "linear" else (self.num_experts,) + shape

    def _blocks(self):
        """(HF name, index of its output channels along the parameter's leading axes) of every HF
        tensor: its [out, in] block is param[..., index] transposed, or FP8 values[index]."""
        out = self.hf_shape[0]
        for p in range(self.parts):
            rows = slice(p * out, (p + 1) * out)
            for e in range(self.num_experts):
                yield self.hf_names[p * self.num_experts + e], ((rows,) if self.layout == "linear" else (e, rows))

    def to_param(self, read, dtype) -> tuple[np.ndarray, ...]:
        """The parameter's `arrays`, from `read(hf_name)` -> an np.ndarray or an `Fp8` (an FP8
        checkpoint's tensor): cast to dtype (or float32), or quantized from its dtype cast
        (`pallas_kernels.backend.quantize_rows`, as `RingModel.quantize` quantizes a model of that dtype; an Fp8 tensor
        is taken as it is)."""
        if self.quantized:
            (_, shape, _), (_, scale_shape, _) = self.arrays
            values, scale = np.empty(shape, FP8), np.empty(scale_shape, np.float32)
            for name, index in self._blocks():
                tensor = read(name)
                values[index], scale[index] = tensor if isinstance(tensor, Fp8) else quantize_rows(tensor.astype(dtype))
            return values, scale

        def read_float(name):
            tensor = read(name)
            return dequantize(tensor) if isinstance(tensor, Fp8) else tensor

        dtype = np.float32 if self.float32 else dtype
        if self.layout == "same":
            return (read_float(self.hf_names[0]).astype(dtype, copy=False),)
        param = np.empty(self.shape, dtype)
        for name, index in self._blocks():
            param[(*index[:-1], ..., index[-1])] = read_float(name).T
        return (param,)

    def to_hf(self, *arrays: np.ndarray) -> dict[str, np.ndarray | Fp8]:
        """The HF tensors of the parameter's `arrays` (inverse of to_param without the cast): an
        FP8 parameter's as Fp8 (values [out, in], scale [out])."""
        if self.quantized:
            values, scale = arrays
            return {name: Fp8(np.ascontiguousarray(values[index]), scale[index]) for name, index in self._blocks()}
        (param,) = arrays
        if self.layout == "same":
            return {self.hf_names[0]: param}
        return {name: np.ascontiguousarray(param[(*index[:-1], ..., index[-1])].T) for name, index in self._blocks()}


def tensor_table(config: RingConfig, quantize: str | None = None) -> list[TensorSpec]:
    """Every tensor of the HF checkpoint of `config`, in checkpoint order; quantize="fp8": of
    its FP8 model (module docstring)."""
    c = config
    hidden, D = c.hidden_size, c.head_dim
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    table: list[TensorSpec] = []

    def add(path, hf_name, layout, hf_shape, **kw):
        table.append(TensorSpec(tuple(path), (hf_name,), layout, tuple(hf_shape), **kw))

    def swiglu_in(path, names, layout, out, inp):  # gate and up joined: [.., in, 2 * out]
        path += ("gate_up_proj", "kernel") if layout == "linear" else ("gate_up_proj",)
        table.append(TensorSpec(path, tuple(names), layout, (out, inp), parts=2))

    def norm(path, hf, dim):
        add(path + ("weight",), hf + ".weight", "same", (dim,))

    def linear(path, hf, out, inp):
        add(path + ("kernel",), hf + ".weight", "linear", (out, inp))

    def softmax_attention(path, hf):
        linear(path + ("query_key_value",), hf + ".query_key_value", (H + 2 * Hkv) * D, hidden)
        norm(path + ("query_layernorm",), hf + ".query_layernorm", D)
        norm(path + ("key_layernorm",), hf + ".key_layernorm", D)
        linear(path + ("dense",), hf + ".dense", hidden, H * D)

    def linear_attention(path, hf):
        linear(path + ("query_key_value",), hf + ".query_key_value", 3 * H * D, hidden)
        norm(path + ("query_layernorm",), hf + ".query_layernorm", D)
        norm(path + ("key_layernorm",), hf + ".key_layernorm", D)
        linear(path + ("g_proj",), hf + ".g_proj", H * D, hidden)
        norm(path + ("g_norm",), hf + ".g_norm", H * D)
        linear(path + ("dense",), hf + ".dense", hidden, H * D)

    def mlp(path, hf, intermediate):
        swiglu_in(path, (hf + ".gate_proj.weight", hf + ".up_proj.weight"), "linear", intermediate, hidden)
        linear(path + ("down_proj",), hf + ".down_proj", hidden, intermediate)

    def moe(path, hf):
        E, I = c.num_experts, c.moe_intermediate_size
        linear(path + ("gate",), hf + ".gate", E, hidden)
        add(path + ("gate", "expert_bias"), hf + ".gate.expert_bias", "same", (E,), float32=True)
        def experts(proj):
            return tuple(f"{hf}.experts.{e}.{proj}.weight" for e in range(E))
        swiglu_in(path + ("experts",), experts("gate_proj") + experts("up_proj"), "experts", I, hidden)
        table.append(TensorSpec(path + ("experts", "down_proj"), experts("down_proj"), "experts", (hidden, I)))
        if c.shared_expert_intermediate_size:
            mlp(path + ("shared_experts",), hf + ".shared_experts", c.shared_expert_intermediate_size)

    add(("word_embeddings",), "model.word_embeddings.weight", "same", (c.vocab_size, hidden))
    for i in range(c.num_decoder_layers):
        path, hf = ("layers", i), f"model.layers.{i}"
        norm(path + ("input_layernorm",), hf + ".input_layernorm", hidden)
        if c.is_softmax_layer(i):
            softmax_attention(path + ("attention",), hf + ".attention")
        else:
            linear_attention(path + ("attention",), hf + ".attention")
        norm(path + ("post_attention_layernorm",), hf + ".post_attention_layernorm", hidden)
        if c.is_moe_layer(i):
            moe(path + ("mlp",), hf + ".mlp")
        else:
            mlp(path + ("mlp",), hf + ".mlp", c.intermediate_size)
    for j, i in enumerate(c.mtp_layer_indices):
        path, hf = ("mtp_layers", j), f"model.layers.{i}"
        norm(path + ("enorm",), hf + ".enorm", hidden)
        norm(path + ("hnorm",), hf + ".hnorm", hidden)
        linear(path + ("eh_proj",), hf + ".eh_proj", hidden, 2 * hidden)
        norm(path + ("input_layernorm",), hf + ".input_layernorm", hidden)
        softmax_attention(path + ("attention",), hf + ".attention")
        norm(path + ("post_attention_layernorm",), hf + ".post_attention_layernorm", hidden)
        moe(path + ("mlp",), hf + ".mlp")
        norm(path + ("final_layernorm",), hf + ".final_layernorm", hidden)
    norm(("norm",), "model.norm", hidden)
    if not c.tie_word_embeddings:
        linear(("lm_head",), "lm_head", c.vocab_size, hidden)
    if quantize is None:
        return table
    return [dataclasses.replace(spec, quantized=quantized_path(spec.path)) for spec in table]


TIED_HEAD = "lm_head.weight"  # may sit in a tied checkpoint as a copy of the embeddings


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def check_tensors(table: list[TensorSpec], names: set[str], shape_of, dtype_of, quantization=None) -> None:
    """Raises CheckpointError naming the first missing, unexpected, misshapen or non-float tensor.
    quantization: the checkpoint's `ring_jax.quantization.HFQuantization`, under which a
    projection's or expert's weight may be float8_e4m3fn with its scale tensor beside it."""
    expected, matrices = {}, set()
    for spec in table:
        for name in spec.hf_names:
            expected[name] = spec.hf_shape
            if spec.layout != "same":
                matrices.add(name)
    missing = [n for n in expected if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{more}")
    scales = set()
    for name, shape in expected.items():
        if tuple(shape_of(name)) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(shape_of(name))}, the config needs {list(shape)}")
        dtype = str(dtype_of(name))
        scale = None if quantization is None else name + quantization.scale_suffix
        if quantization is not None and name in matrices and dtype == FP8.name:
            if scale not in names:
                raise CheckpointError(f"tensor {name} is {FP8.name} but its scale {scale} is missing")
            if tuple(shape_of(scale)) != quantization.scale_shape(shape):
                raise CheckpointError(f"tensor {scale} has shape {list(shape_of(scale))}, {name} {list(shape)} needs "
                                      f"{list(quantization.scale_shape(shape))}")
            if str(dtype_of(scale)) not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {scale} is {dtype_of(scale)}; an FP8 weight's scale must be one of "
                                      f"{FLOAT_DTYPES}")
            scales.add(scale)
        elif scale in names and name in matrices:
            raise CheckpointError(f"tensor {name} is {dtype} but has a scale, {scale}: a scaled weight must be "
                                  f"{FP8.name} (a weight dequantized without removing its scale?)")
        elif dtype not in FLOAT_DTYPES:
            why = ("" if dtype != FP8.name else " (FP8 weights need a quantization_config in config.json)"
                   if quantization is None else " (only projection and expert matrices may be FP8)")
            raise CheckpointError(f"tensor {name} is {dtype}; expected one of {FLOAT_DTYPES}{why}")
    unexpected = sorted(names - set(expected) - scales - {TIED_HEAD})
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]}{more}: the config does not use it")
