"""An HF folder of a Ring-linear-2.0 checkpoint, read: its safetensors checked against the config's
tensor table (`ring_jax.io.mapping`), its FP8 weights paired with their scales
(`ring_jax.quantization`), and the dtype its parameters take."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from ring_jax.config import RingConfig
from ring_jax.errors import CheckpointError
from ring_jax.io.mapping import TIED_HEAD, check_tensors, tensor_table
from ring_jax.io.safetensors_io import SafetensorsFolder
from pallas_kernels.backend import FP8
from ring_jax.quantization import FBGEMM, HFQuantization, hf_quantization

# Files beside the weights that a model folder keeps (tokenizer, chat template, generation defaults).
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "generation_config.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
             "vocab.json", "merges.txt")


class HFTensors:
    """The tensors of an HF folder as the tensor table reads them: `read(name)` gives an FP8
    weight as `quantization.HFQuantization.read` does (an Fp8, or its dequantized float32), every
    other tensor as stored."""

    def __init__(self, folder: SafetensorsFolder, quantization: HFQuantization | None):
        self.folder, self.quantization = folder, quantization
        self.names = folder.names

    @property
    def stored_quantization(self) -> str | None:
        """The quantization ring_jax holds these weights in as stored: "fp8" for per-channel FP8
        (FBGEMM's layout); None otherwise (block-scaled FP8 is dequantized: ring_jax has no block
        layout)."""
        return "fp8" if self.quantization == FBGEMM else None

    def read(self, name: str):
        tensor = self.folder.read(name)
        if self.quantization is None or tensor.dtype != FP8:
            return tensor
        scale_name = name + self.quantization.scale_suffix
        scale = self.folder.read(scale_name).astype(np.float32)
        if not np.all(np.isfinite(scale) & (scale > 0)):      # a damaged scale would pass as numbers
            raise CheckpointError(f"tensor {scale_name} holds scales that are not finite and positive (NaN, inf, "
                                  "0 or negative): a damaged checkpoint?")
        return self.quantization.read(tensor, scale)

    def model_quantization(self, quantize: str | None, config: RingConfig) -> str | None:
        """The quantization of the model read from here: `quantize`, or as stored. As stored, an
        FP8 model (FBGEMM's layout) holds every matrix of `ring_jax.quantization.QUANTIZED` in FP8:
        one the checkpoint keeps unquantized (`modules_to_not_convert`, often the LM head) would
        be quantized as it loads, so it is refused unless `quantize` asks for it."""
        if quantize is not None or self.stored_quantization is None:
            return quantize or self.stored_quantization
        for spec in tensor_table(config, self.stored_quantization):
            for name in spec.hf_names if spec.quantized else ():
                if self.folder.dtype(name) != FP8:
                    raise CheckpointError(
                        f"tensor {name} is {self.folder.dtype(name)} in an FP8 checkpoint "
                        f"({self.quantization.method}); a ring_jax FP8 model holds every projection, expert and "
                        "the LM head in FP8: pass quantize='fp8' (--quantize fp8) to quantize it as it loads")
        return self.stored_quantization


def open_hf_checkpoint(hf_dir: str, config: RingConfig, dtype=None) -> tuple[HFTensors, np.dtype]:
    """The folder's tensors, checked against the config's table; and the parameter dtype to use
    (given, else the config's torch_dtype, else the stored embedding dtype)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        quantization = hf_quantization(json.load(f).get("quantization_config"))
    folder = SafetensorsFolder(hf_dir)
    source = HFTensors(folder, quantization)
    table = tensor_table(config)
    check_tensors(table, folder.names, folder.shape, folder.dtype, quantization)
    embedding = table[0].hf_names[0]
    if config.tie_word_embeddings and TIED_HEAD in source.names:     # a copy of the embeddings, as stored
        if (folder.dtype(TIED_HEAD) != folder.dtype(embedding)
                or not np.array_equal(folder.read(TIED_HEAD), folder.read(embedding))):
            raise CheckpointError(f"unexpected tensor {TIED_HEAD} ({folder.dtype(TIED_HEAD)}): the config ties "
                                  f"the head to the embeddings ({folder.dtype(embedding)}) but the checkpoint's head "
                                  "differs from them")
    if dtype is None and config.torch_dtype not in (None, "auto"):
        try:
            dtype = parse_dtype(config.torch_dtype)
        except ValueError as e:
            raise CheckpointError(f"config.json torch_dtype: {e}") from None
    if dtype is None:
        dtype = folder.dtype(embedding)
    return source, np.dtype(dtype)


def parse_dtype(name: str):
    """"bfloat16", "float32" or "float16" (a config's torch_dtype, a --dtype) -> numpy dtype."""
    if name not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be bfloat16, float32 or float16, got {name!r}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
