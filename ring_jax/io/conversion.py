"""Conversion between an HF safetensors checkpoint and a ring_jax model folder (Orbax), both ways:
`python -m convert hf2jax|jax2hf` runs these. HF -> ring_jax streams one tensor at a time."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from ring_jax.checkpoint import ParamReader, ParamWriter
from ring_jax.config import RingConfig
from ring_jax.io.hf import AUX_FILES, open_hf_checkpoint, parse_dtype
from ring_jax.io.mapping import tensor_table
from ring_jax.io.safetensors_io import write_hf_weights
from ring_jax.progress import Progress
from ring_jax.quantization import FBGEMM, Fp8, check_method, fbgemm_config
from ring_jax.staging import staged_folder


def progress_line(i: int, n: int, label: str, done_bytes: int, seconds: float) -> str:
    """The plain-text progress record of tensor i of n (`ring_jax.progress.Progress`)."""
    return f"[{i:>5}/{n}] {done_bytes / 2**30:8.2f} GiB {seconds:7.1f} s  {label}"


def convert_hf_to_jax(hf_dir: str, out_dir: str, dtype=None, progress: bool = True, quantize: str | None = None) -> None:
    """Converts an HF folder into a ring_jax model folder at out_dir (which must not exist).
    quantize: "fp8" writes the FP8 model (`ring_jax.quantization`), quantized tensor by tensor;
    None the model as stored (FBGEMM's per-channel FP8 as FP8; block-scaled FP8 dequantized to
    dtype).

    Every tensor's name, shape, dtype and byte range is checked before anything is written (an FP8
    scale's values as it is read); the output is built in a temporary folder
    beside out_dir and renamed into place at the end (`ring_jax.staging`), so a failure leaves
    nothing behind, and a later run removes what a killed one left.
    """
    check_method(quantize)
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; choose a new output folder")
    config = RingConfig.from_hf(hf_dir)
    source, dtype = open_hf_checkpoint(hf_dir, config, parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    quantize = source.model_quantization(quantize, config)
    table = tensor_table(config, quantize)
    nbytes = [sum(int(np.prod(shape)) * (dtype if kind == "model" else np.dtype(kind)).itemsize
                  for _, shape, kind in spec.arrays) for spec in table]
    bar, done = Progress(sum(nbytes), unit="B", in_bytes=True) if progress else None, 0
    with staged_folder(out_dir) as tmp:
        writer = ParamWriter(tmp)
        for i, (spec, size) in enumerate(zip(table, nbytes), 1):
            writer.add_param(spec, spec.to_param(source.read, dtype))
            done += size
            if bar:
                label = f"{spec.hf_label} -> {spec.key} {list(spec.arrays[0][1])}"
                bar.update(size, progress_line(i, len(table), label, done, bar.seconds), note=spec.key)
        if bar:
            bar.close()
        writer.close(dtype, quantize)
        with open(os.path.join(hf_dir, "config.json")) as f:
            config_json = json.load(f)
        # Every other key as the HF folder has it, but the dtype (newer transformers write `dtype`
        # beside or instead of torch_dtype) and the quantization, which the manifest holds.
        config_json["torch_dtype"] = dtype.name
        if "dtype" in config_json:
            config_json["dtype"] = dtype.name
        config_json.pop("quantization_config", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        for name in AUX_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy(os.path.join(hf_dir, name), os.path.join(tmp, name))
    if progress:
        print(f"wrote {out_dir}: {len(table)} parameters, {done / 2**30:.2f} GiB {quantize or dtype.name}, "
              f"{bar.seconds:.1f} s", file=sys.stderr)


def convert_jax_to_hf(model_dir: str, out_dir: str, max_shard_bytes: int = 5 * 2**30,
                      progress: bool = True) -> None:
    """Writes the HF layout of a converted folder: `model.safetensors` or shards of at most
    max_shard_bytes with their index, config.json and the aux files.

    The parameters are restored whole onto the default device (its memory must hold the model)
    and checked against their checksums first."""
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; choose a new output folder")
    config = RingConfig.from_hf(model_dir)
    start = time.time()
    reader = ParamReader(model_dir, config, verify=True)
    params, quantize = reader.restore(list(reader.expected)), reader.quantize
    if progress:
        print(f"read and verified {model_dir} in {time.time() - start:.1f} s", file=sys.stderr, flush=True)
    tensors, table, done = {}, tensor_table(config, quantize), 0
    bar = Progress(sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in params.values()), unit="B",
                   in_bytes=True) if progress else None
    for i, spec in enumerate(table, 1):
        arrays = [np.asarray(params.pop(key)) for key, *_ in spec.arrays]
        for name, tensor in spec.to_hf(*arrays).items():
            if isinstance(tensor, Fp8):     # FBGEMM's layout: the weight and its scales [out, 1]
                tensors[name], tensors[name + FBGEMM.scale_suffix] = tensor.values, tensor.scale[:, None]
            else:
                tensors[name] = tensor
        size = sum(a.nbytes for a in arrays)
        done += size
        if bar:
            bar.update(size, progress_line(i, len(table), f"{spec.key} -> {spec.hf_label}", done,
                                           time.time() - start), note=spec.key)
    if bar:
        bar.close()
    with staged_folder(out_dir) as tmp:
        files = write_hf_weights(tmp, {n: (t.dtype, t.shape) for n, t in tensors.items()},
                                 tensors.__getitem__, max_shard_bytes)
        for name in AUX_FILES:
            if os.path.isfile(os.path.join(model_dir, name)):
                shutil.copy(os.path.join(model_dir, name), os.path.join(tmp, name))
        with open(os.path.join(model_dir, "config.json")) as f:
            config_json = json.load(f)
        if quantize is not None:
            routers = [spec.hf_label.removesuffix(".weight") for spec in table
                       if spec.layout == "linear" and not spec.quantized]
            config_json["quantization_config"] = fbgemm_config(routers)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
    if progress:
        print(f"wrote {out_dir}: {len(tensors)} tensors in {len(files)} file(s)", file=sys.stderr)
