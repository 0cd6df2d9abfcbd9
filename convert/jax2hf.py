"""ring_jax model folder -> HF safetensors checkpoint (the layout `hf2jax` reads)."""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np

from convert.hf2jax import AUX_FILES, progress_line
from convert.mapping import tensor_table
from convert.safetensors_io import write_hf_weights
from ring_jax.checkpoint import restore_params
from ring_jax.config import RingConfig
from ring_jax.progress import Progress
from ring_jax.staging import staged_folder


def convert_jax_to_hf(model_dir: str, out_dir: str, max_shard_bytes: int = 5 * 2**30,
                      progress: bool = True) -> None:
    """Writes the HF layout of a converted folder: `model.safetensors` or shards of at most
    max_shard_bytes with their index, config.json and the aux files.

    The parameters are restored whole (host memory of the model's size) and checked against
    their checksums first."""
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; choose a new output folder")
    config = RingConfig.from_hf(model_dir)
    start = time.time()
    params, _ = restore_params(model_dir, config, verify=True)
    if progress:
        print(f"read and verified {model_dir} in {time.time() - start:.1f} s", file=sys.stderr, flush=True)
    tensors, table, done = {}, tensor_table(config), 0
    bar = Progress(sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in params.values()), unit="B",
                   in_bytes=True) if progress else None
    for i, spec in enumerate(table, 1):
        param = np.asarray(params.pop(spec.key))
        tensors.update(spec.to_hf(param))
        done += param.nbytes
        if bar:
            bar.update(param.nbytes, progress_line(i, len(table), f"{spec.key} -> {spec.hf_label}", done,
                                                   time.time() - start), note=spec.key)
    if bar:
        bar.close()
    with staged_folder(out_dir) as tmp:
        files = write_hf_weights(tmp, {n: (t.dtype, t.shape) for n, t in tensors.items()},
                                 tensors.__getitem__, max_shard_bytes)
        for name in ("config.json",) + AUX_FILES:
            if os.path.isfile(os.path.join(model_dir, name)):
                shutil.copy(os.path.join(model_dir, name), os.path.join(tmp, name))
    if progress:
        print(f"wrote {out_dir}: {len(tensors)} tensors in {len(files)} file(s)", file=sys.stderr)
