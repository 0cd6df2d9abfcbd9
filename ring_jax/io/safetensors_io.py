"""Reading and writing the safetensors format with numpy, bfloat16 included.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the raw
little-endian bytes. Reading goes one tensor at a time, so a caller holds only the tensors it asks
for; every header entry is checked against the file's size when the folder is opened.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from ring_jax.errors import CheckpointError

DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_header(path: str) -> dict:
    """The JSON header of one safetensors file, without `__metadata__`: every entry's dtype, shape
    and byte range checked (a range past the end of the file: a truncated file)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name}")
        info["offset"] = 8 + n
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(_count(d) for d in shape) and isinstance(offsets, list)
                and len(offsets) == 2 and all(map(_count, offsets)) and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name} (shape {shape!r:.40}, "
                                  f"data_offsets {offsets!r:.40})")
        if info["offset"] + offsets[1] > size:
            raise CheckpointError(f"{path}: tensor {name} ends at byte {info['offset'] + offsets[1]}, past the "
                                  f"end of the file ({size} bytes): a truncated file")
    return header


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFolder:
    """The tensors of an HF checkpoint folder: `model.safetensors`, or a sharded set listed by
    `model.safetensors.index.json`. Names map to (file, dtype, shape, byte range)."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                try:
                    index = json.load(f)
                except ValueError as e:
                    raise CheckpointError(f"{index_path} is not valid JSON ({e})") from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: no weight_map of tensor names to file names")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} is there")
        self._entries: dict[str, tuple[str, dict]] = {}
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise CheckpointError(f"{INDEX_FILE} lists {file}, which is missing from {folder}")
            for name, info in read_header(path).items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # not the copy the index points to
                self._entries[name] = (path, info)
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._entries))
            if absent:
                raise CheckpointError(f"{INDEX_FILE} maps {absent[0]} to {weight_map[absent[0]]}, "
                                      f"which does not hold it" + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name][1]["dtype"]]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh numpy array (its own memory, nothing kept mapped)."""
        path, info = self._entries[name]
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes, its shape {list(shape)} "
                                  f"and dtype {info['dtype']} need {int(np.prod(shape)) * dtype.itemsize}")
        out = np.empty(shape, dtype)
        with open(path, "rb") as f:
            f.seek(info["offset"] + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise CheckpointError(f"{path}: truncated while reading {name}")
        return out


def write_safetensors(path: str, layout: dict[str, tuple[np.dtype, tuple]], read) -> None:
    """Writes one safetensors file: `layout` maps name -> (dtype, shape), and `read(name)` gives
    each array when its turn comes, so only one tensor is held at a time."""
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {name}: dtype {dtype} has no safetensors name")
        size = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (dtype, shape) in layout.items():
            a = np.ascontiguousarray(read(name))
            if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
                raise CheckpointError(f"tensor {name} is {a.dtype}{list(a.shape)}, expected {np.dtype(dtype)}{list(shape)}")
            f.write(a.reshape(-1).view(np.uint8).data)


def write_hf_weights(folder: str, layout: dict[str, tuple[np.dtype, tuple]], read,
                     max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes `model.safetensors`, or shards of at most max_shard_bytes plus the index when the
    tensors do not fit one. Returns the file names."""
    if not max_shard_bytes > 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0")
    shards: list[dict] = [{}]
    size = 0
    for name, (dtype, shape) in layout.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dtype, shape)
        size += nbytes
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)])
    for file, shard in zip(files, shards):
        write_safetensors(os.path.join(folder, file), shard, read)
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * np.dtype(d).itemsize for d, s in layout.values())
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
