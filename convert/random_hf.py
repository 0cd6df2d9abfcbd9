"""A random-weight HF checkpoint of any config, written with the real layout (SPEC.md §9).

For demos, tests and benchmarks: the weights are N(0, 1) / sqrt(fan_in) for projections, N(0, 1)
for embeddings, 1 + 0.1 N(0, 1) for norms and 0.05 N(0, 1) (float32) for the expert bias. Written
one tensor at a time.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from convert.mapping import tensor_table
from convert.safetensors_io import write_hf_weights
from ring_jax.config import RingConfig


def write_random_hf_checkpoint(folder: str, config: dict, *, dtype="bfloat16", seed: int = 0,
                               max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json (torch_dtype = dtype) and random weights for `config` into folder."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    config = dict(config, torch_dtype=np_dtype.name)
    table = tensor_table(RingConfig.from_hf(config))
    layout, kinds = {}, {}
    for spec in table:
        for name in spec.hf_names:
            layout[name] = (np.float32 if spec.float32 else np_dtype, spec.hf_shape)
            kinds[name] = spec
    rng = np.random.default_rng(seed)

    def read(name):
        dtype, shape = layout[name]
        x = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("expert_bias"):
            x *= 0.05
        elif len(shape) == 1:
            x = 1 + 0.1 * x
        elif kinds[name].layout != "same":
            x /= np.sqrt(shape[1])
        return x.astype(dtype)

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_hf_weights(folder, layout, read, max_shard_bytes)
