"""Random Ring-linear-2.0 checkpoints in the HF layout (config.json + safetensors), made with RefModel."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file

from .model import RefModel

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64",
               torch.float16: "float16"}
NAME_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def random_weights(model: RefModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic, well-conditioned values (float32) for every state_dict entry, drawn in name order:

    embedding N(0,1); Linear weights (router included) N(0,1)/sqrt(fan_in); norm weights
    1 + 0.1 N(0,1); expert_bias 0.05 N(0,1).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in sorted(model.state_dict().items()):
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
        if name.endswith("expert_bias"):
            out[name] = 0.05 * noise
        elif name == "model.word_embeddings.weight":
            out[name] = noise
        elif tensor.dim() == 1:  # every other 1-D tensor is an RMSNorm weight
            out[name] = 1 + 0.1 * noise
        else:  # Linear [out, in]
            out[name] = noise / math.sqrt(tensor.shape[1])
    return out


def make_hf_checkpoint(path, config: dict, *, dtype=torch.float32, seed=0, shards=1, **ref_options) -> RefModel:
    """Builds a RefModel with random weights (`random_weights`), writes it under `path` in the HF
    layout and returns it.

    Files: config.json (the dict with torch_dtype = dtype's name); weights in dtype (expert_bias
    float32) as model.safetensors, or for shards > 1 model-0000k-of-0000n.safetensors plus
    model.safetensors.index.json, the tensors split across the shards in name order.
    """
    model = RefModel(config, dtype=dtype, **ref_options)
    model.load_state_dict(random_weights(model, seed), strict=True)  # cast to dtype on copy

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config, torch_dtype=DTYPE_NAMES[dtype]), f, indent=2)

    tensors = {name: t.detach().contiguous() for name, t in sorted(model.state_dict().items())}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return model

    names = list(tensors)
    assert 1 <= shards <= len(names), (shards, len(names))
    weight_map = {}
    start = 0
    for k in range(shards):
        stop = start + len(names) // shards + (1 if k < len(names) % shards else 0)
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names[start:stop]}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names[start:stop]})
        start = stop
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
    return model


def load_hf_checkpoint(path, *, dtype=None, **ref_options) -> RefModel:
    """Reads a checkpoint written in the HF layout (single file or sharded) into a RefModel.

    dtype defaults to config.json's torch_dtype (float32 when absent).
    """
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if dtype is None:
        dtype = NAME_DTYPES.get(config.get("torch_dtype") or config.get("dtype") or "float32", torch.float32)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for file in files:
        state.update(load_file(os.path.join(path, file)))
    model = RefModel(config, dtype=dtype, **ref_options)
    model.load_state_dict(state, strict=True)
    return model
