"""HF safetensors checkpoint -> ring_jax model folder (Orbax), streaming one tensor at a time."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

from convert.mapping import TIED_HEAD, check_tensors, tensor_table
from convert.safetensors_io import CheckpointError, SafetensorsFolder
from ring_jax.checkpoint import ParamWriter, parse_dtype
from ring_jax.config import RingConfig
from ring_jax.progress import Progress
from ring_jax.staging import staged_folder

# Files beside the weights that a model folder keeps (tokenizer, chat template, generation defaults).
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "generation_config.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
             "vocab.json", "merges.txt")


def open_hf_checkpoint(hf_dir: str, config: RingConfig, dtype=None) -> tuple[SafetensorsFolder, np.dtype]:
    """The folder's tensors, checked against the config's table; and the parameter dtype to use
    (given, else the config's torch_dtype, else the stored embedding dtype)."""
    source = SafetensorsFolder(hf_dir)
    table = tensor_table(config)
    check_tensors(table, source.names, source.shape, source.dtype)
    if config.tie_word_embeddings and TIED_HEAD in source.names:
        if not np.array_equal(source.read(TIED_HEAD), source.read(table[0].hf_names[0])):
            raise CheckpointError(f"unexpected tensor {TIED_HEAD}: the config ties the head to the "
                                  "embeddings but the checkpoint's head differs from them")
    if dtype is None and config.torch_dtype not in (None, "auto"):
        try:
            dtype = parse_dtype(config.torch_dtype)
        except ValueError as e:
            raise CheckpointError(f"config.json torch_dtype: {e}") from None
    if dtype is None:
        dtype = source.dtype(table[0].hf_names[0])
    return source, np.dtype(dtype)


def progress_line(i: int, n: int, label: str, done_bytes: int, seconds: float) -> str:
    """The plain-text progress record of tensor i of n (`ring_jax.progress.Progress`)."""
    return f"[{i:>5}/{n}] {done_bytes / 2**30:8.2f} GiB {seconds:7.1f} s  {label}"


def convert_hf_to_jax(hf_dir: str, out_dir: str, dtype=None, progress: bool = True) -> None:
    """Converts an HF folder into a ring_jax model folder at out_dir (which must not exist).

    Every tensor is checked before anything is written; the output is built in a temporary folder
    beside out_dir and renamed into place at the end (`ring_jax.staging`), so a failure leaves
    nothing behind, and a later run removes what a killed one left.
    """
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; choose a new output folder")
    config = RingConfig.from_hf(hf_dir)
    source, dtype = open_hf_checkpoint(hf_dir, config, parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    table = tensor_table(config)
    nbytes = [int(np.prod(spec.shape)) * (4 if spec.float32 else dtype.itemsize) for spec in table]
    bar, done = Progress(sum(nbytes), unit="B", in_bytes=True) if progress else None, 0
    with staged_folder(out_dir) as tmp:
        writer = ParamWriter(tmp)
        for i, (spec, size) in enumerate(zip(table, nbytes), 1):
            writer.add(spec.key, spec.to_param(source.read, dtype))
            done += size
            if bar:
                label = f"{spec.hf_label} -> {spec.key} {list(spec.shape)}"
                bar.update(size, progress_line(i, len(table), label, done, bar.seconds), note=spec.key)
        if bar:
            bar.close()
        writer.close(dtype)
        with open(os.path.join(hf_dir, "config.json")) as f:
            config_json = json.load(f)
        config_json["torch_dtype"] = dtype.name  # every other key as the HF folder has it
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        for name in AUX_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy(os.path.join(hf_dir, name), os.path.join(tmp, name))
    if progress:
        print(f"wrote {out_dir}: {len(table)} parameters, {done / 2**30:.2f} GiB {dtype.name}, "
              f"{bar.seconds:.1f} s", file=sys.stderr)
