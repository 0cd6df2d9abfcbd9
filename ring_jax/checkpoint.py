"""Orbax checkpoints of RingModel: writing piece by piece, restoring, and `load_model()`.

A converted model folder holds:

    config.json          the HF config, as converted
    ring_jax.json        manifest: format version, parameter dtype, quantization ("fp8", or absent),
                         every array's shape, dtype and checksum (`checksum`;
                         `load_model(verify=True)` checks them)
    params/              an Orbax PyTree checkpoint, {"layers": {"3": {"mlp": ...}}, ...}
    tokenizer files      copied from the HF folder when present

The parameter names are those of `ring_jax.io.mapping.tensor_table`, joined by dots; an FP8
parameter is two arrays, its values under its name and its scales under name + "_scale"
(`TensorSpec.arrays`).

With a mesh, every parameter is restored straight into its sharded layout (`ring_jax.sharding`):
Orbax reads, on each process, only the blocks of that process's devices.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ring_jax import sharding
from ring_jax.config import RingConfig
from ring_jax.errors import CheckpointError, one_line, quiet_closed_event_loops
from ring_jax.io.hf import open_hf_checkpoint, parse_dtype
from ring_jax.io.mapping import TensorSpec, tensor_table
from ring_jax.layers.stack import set_entry
from ring_jax.model import RingModel
from ring_jax.quantization import METHODS, check_method, quantize_kernel
from ring_jax.schedule import kind_index
from ring_jax.staging import staged_folder

FORMAT_VERSION = 2  # the layout of params/: each SwiGLU's gate and up projections as one gate_up_proj
MANIFEST = "ring_jax.json"
PARAMS_DIR = "params"


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


# ------------------------------------------------------------------------------- model <-> tensors
def locate(model: RingModel, spec: TensorSpec) -> list[tuple[nnx.Variable, int | None]]:
    """For each of the parameter's `arrays`, the Variable that holds it and, for a decoder layer's
    parameter, its index in that Variable's stack (`ring_jax.schedule`: a layer's kind and index;
    the names on disk keep the HF layer numbers)."""
    found = []
    for key, *_ in spec.arrays:
        path, index, obj = tuple(int(p) if p.isdigit() else p for p in key.split(".")), None, model
        if path[0] == "layers":
            kind, index = kind_index(model.config, path[1])
            obj, path = getattr(model, kind), path[2:]
        for part in path:
            obj = obj[part] if isinstance(part, int) else getattr(obj, part)
        found.append((obj, index))
    return found


def get_param(model: RingModel, spec: TensorSpec) -> tuple[jax.Array, ...]:
    """The parameter's `arrays`, from the model."""
    return tuple(variable[...] if index is None else variable.get_value()[index]
                 for variable, index in locate(model, spec))


def abstract_model(config: RingConfig, dtype, quantize: str | None = None) -> RingModel:
    """The model's structure and shapes, without values (quantize: `RingModel.quantize`)."""
    def build():
        model = RingModel(config, dtype=dtype)
        return model if quantize is None else model.quantize(quantize)
    return nnx.eval_shape(build)


@functools.cache
def _zeros(shapes: tuple[tuple[tuple[int, ...], np.dtype], ...], where: tuple):
    """A jitted maker of zero arrays of `shapes` ((shape, dtype) each) laid out by `where` (one
    sharding each): one compilation for all of a model's stacks."""
    return jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes), out_shardings=where)


def _home() -> jax.sharding.SingleDeviceSharding:
    """Where a model loaded without a mesh lives: the default device (`jax.default_device`, else
    the first device)."""
    return jax.sharding.SingleDeviceSharding(jnp.zeros(()).device)


def _allocate_stacks(model: RingModel, config: RingConfig, quantize: str | None, mesh) -> None:
    """Sets each stacked parameter of the abstract `model` to zeros, laid out by its annotation on
    mesh (without one, on the default device), for `model_from_tensors` to fill entry by entry."""
    stacks = {}
    for spec in tensor_table(config, quantize):
        for variable, index in locate(model, spec):
            if index is not None:
                stacks[id(variable)] = variable
    variables = list(stacks.values())
    shapes = tuple((v.get_value().shape, np.dtype(v.get_value().dtype)) for v in variables)
    if mesh is None:
        where = (_home(),) * len(shapes)
    else:
        where = tuple(jax.sharding.NamedSharding(mesh, sharding.spec(v.get_metadata()["out_sharding"], shape, mesh))
                      for v, (shape, _) in zip(variables, shapes))
    for variable, zeros in zip(variables, _zeros(shapes, where)()):
        variable.set_value(zeros)


_set_entry = jax.jit(set_entry, donate_argnums=0)            # in place: the stack's buffer is reused


def _piece(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    """The sharding of one entry of a stack laid out by `sharding` (its first axis unsplit)."""
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))


def param_shardings(config: RingConfig, dtype, mesh, quantize: str | None = None) -> dict[str, jax.sharding.NamedSharding]:
    """{dotted array key: its NamedSharding on mesh} (a decoder layer's parameter: its entry of the
    stack), from the model's axis annotations."""
    model = abstract_model(config, dtype, quantize)
    nnx.update(model, sharding.param_shardings(nnx.state(model), mesh))
    out = {}
    for spec in tensor_table(config, quantize):
        for (key, *_), (variable, index) in zip(spec.arrays, locate(model, spec)):
            out[key] = variable.get_value() if index is None else _piece(variable.get_value())
    return out


def model_from_tensors(config: RingConfig, tensors, dtype, mesh=None, quantize: str | None = None) -> RingModel:
    """A RingModel whose parameters come from `tensors(spec)` -> the parameter's `arrays` of the
    table of `quantize` (or, for a quantized parameter, its unquantized array, quantized here on
    the device), without random init; on `mesh`, each laid out by its annotation (host arrays
    are split, device arrays moved to their layout). A stacked parameter is filled entry by entry in place:
    what is held at once is the model's stacks and the entry being written."""
    if quantize is None and config.fp8_activations != "none":
        raise ValueError(f"fp8_activations={config.fp8_activations!r} needs FP8 weights: pass quantize='fp8' or "
                         "load an FP8 folder")
    model = abstract_model(config, dtype, quantize)
    placement = None if mesh is None else param_shardings(config, dtype, mesh, quantize)
    _allocate_stacks(model, config, quantize, mesh)
    home = _home()
    for spec in tensor_table(config, quantize):
        values = tuple(tensors(spec))
        if spec.quantized and len(values) == 1:
            values = tuple(quantize_kernel(jnp.asarray(values[0])))
        for value, (key, shape, kind), (variable, index) in zip(values, spec.arrays, locate(model, spec)):
            want = np.dtype(dtype if kind == "model" else kind)
            if len(values) != len(spec.arrays) or value.shape != shape or value.dtype != want:
                got = ", ".join(f"{np.dtype(v.dtype).name}{list(v.shape)}" for v in values)
                raise CheckpointError(f"parameter {key} is {got}, the model needs {want.name}{list(shape)}")
            if placement is None:
                value = jax.device_put(value, home)
            elif not isinstance(value, jax.Array):
                value = sharding.put(value, placement[key])
            elif value.sharding != placement[key]:
                value = jax.device_put(value, placement[key])
            if index is None:
                variable.set_value(value)
                continue
            variable.set_value(_set_entry(variable.get_value(), jnp.int32(index), value))
    return model


# ------------------------------------------------------------------------------------ checksums
# A parameter's checksum: sum over its elements of bits[i] * (2 i + 1), modulo 2**32 (bits: the
# element's raw 8, 16 or 32 bits). Any change of one element changes it (the factors are odd, so
# invertible modulo 2**32); modular sums do not depend on the order of summation, so the host
# (numpy, when written) and the device (jnp, when loaded, over any sharding) agree bit for bit.
_CHUNK = 1 << 24


def _bits(dtype):
    return {1: np.uint8, 2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]


def checksum(array: np.ndarray) -> int:
    """The checksum of a host array (8-, 16- or 32-bit elements), in chunks of bounded memory."""
    flat = np.ascontiguousarray(array).reshape(-1).view(_bits(array.dtype))
    total = 0
    for at in range(0, flat.size, _CHUNK):
        bits = flat[at:at + _CHUNK]
        factors = np.arange(bits.size, dtype=np.uint32)                  # 2 i + 1, modulo 2**32
        factors *= np.uint32(2)
        factors += np.uint32((2 * at + 1) % 2**32)
        total += int(np.sum(np.multiply(factors, bits, out=factors), dtype=np.uint32))
    return total % 2**32


def device_checksum(x: jax.Array) -> jax.Array:
    """`checksum` on the device, in x's layout (the flat index from iotas: no reshape). XLA:CPU
    writes the [x.shape] uint32 products out before it sums them (4x the bytes of a 1-byte array),
    so an array on one CPU device is summed in blocks of whole rows of its leading axis, at most
    _CHUNK elements each where a row allows, from its bits taken apart first (inside the loop's
    program XLA:CPU would widen a whole FP8 array to f16); elsewhere in one fused reduction (a
    block's slice of an array split over devices would gather it)."""
    devices = x.sharding.device_set
    if x.ndim > 1 and x.size > _CHUNK and len(devices) == 1 and next(iter(devices)).platform == "cpu":
        bits = jax.lax.bitcast_convert_type(x, _bits(x.dtype))
        return _checksum_in_blocks(bits, _block_rows(x.shape[0], _CHUNK // math.prod(x.shape[1:])))
    return _checksum(x)


def _block_rows(rows: int, most: int) -> int:
    """The largest divisor of rows that is at most max(most, 1)."""
    pairs = [(d, rows // d) for d in range(1, math.isqrt(rows) + 1) if rows % d == 0]
    return max(d for pair in pairs for d in pair if d <= max(most, 1))


def _products(x, first_index):
    """x's uint32 bits times 2 i + 1, i = first_index + x's flat index (modulo 2**32)."""
    bits = jax.lax.bitcast_convert_type(x, _bits(x.dtype)).astype(jnp.uint32)
    index, stride = jnp.zeros(x.shape, jnp.uint32) + first_index, 1
    for axis in reversed(range(x.ndim)):
        index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    return bits * (index * jnp.uint32(2) + jnp.uint32(1))


@jax.jit
def _checksum(x):
    return jnp.sum(_products(x, jnp.uint32(0)), dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnums=1)
def _checksum_in_blocks(x, rows: int):
    block = rows * math.prod(x.shape[1:]) % 2**32

    def add(i, total):
        part = jax.lax.dynamic_slice_in_dim(x, i * rows, rows)
        return total + jnp.sum(_products(part, i.astype(jnp.uint32) * jnp.uint32(block)), dtype=jnp.uint32)
    return jax.lax.fori_loop(0, x.shape[0] // rows, add, jnp.uint32(0))


def _damaged(folder: str, what: str) -> CheckpointError:
    return CheckpointError(f"damaged or incomplete checkpoint {folder}: {what}; convert it again")


# ------------------------------------------------------------------------------------- writing
def _nested(key: str, value) -> dict:
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def _merge(into: dict, tree: dict) -> None:
    for k, v in tree.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v


class ParamWriter:
    """Writes parameters into `<folder>/params` by Orbax partial saves, so that what is held at once
    is at most one large parameter, or small ones up to FLUSH_BYTES, and Orbax's copy of them while
    it writes. (Each partial save also reads the metadata of everything saved before, so a save per
    small parameter would make writing a model quadratic in its number of parameters.)"""

    FLUSH_BYTES = 64 * 2**20

    def __init__(self, folder: str):
        from orbax.checkpoint.experimental import v1 as ocp_v1

        self._partial = ocp_v1.partial
        self._folder = folder
        self._orbax_dir = os.path.join(folder, "orbax_partial")  # no leading dot: Orbax skips those
        self._pending: dict = {}
        self._pending_bytes = 0
        self.manifest: dict[str, list] = {}

    def add(self, key: str, array: np.ndarray) -> None:
        _merge(self._pending, _nested(key, array))
        self._pending_bytes += array.nbytes
        self.manifest[key] = [list(array.shape), dtype_name(array.dtype), checksum(array)]
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._partial.save(self._orbax_dir, self._pending)
        self._pending, self._pending_bytes = {}, 0

    def add_param(self, spec: TensorSpec, arrays) -> None:
        """The parameter's `arrays`, each under its key."""
        for (key, *_), array in zip(spec.arrays, arrays, strict=True):
            self.add(key, np.asarray(array))

    def close(self, dtype, quantize: str | None = None) -> None:
        """Finalizes and writes the manifest: the folder is then a complete checkpoint."""
        self._flush()
        self._partial.finalize(self._orbax_dir)
        os.rename(os.path.join(self._orbax_dir, "state"), os.path.join(self._folder, PARAMS_DIR))
        shutil.rmtree(self._orbax_dir)
        manifest = {"format": FORMAT_VERSION, "dtype": dtype_name(dtype)}
        if quantize is not None:
            manifest["quantize"] = quantize
        with open(os.path.join(self._folder, MANIFEST), "w") as f:
            json.dump(dict(manifest, params=self.manifest), f, indent=1)


def save_model(model: RingModel, folder: str) -> None:
    """Writes model (config.json, manifest, Orbax params) to a new folder, atomically
    (`ring_jax.staging`)."""
    with staged_folder(folder) as tmp:
        writer = ParamWriter(tmp)
        for spec in tensor_table(model.config, model.quantization):
            writer.add_param(spec, get_param(model, spec))
        writer.close(model.dtype, model.quantization)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config.to_hf_dict(), f, indent=2)


# ------------------------------------------------------------------------------------ restoring
def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} is not a converted ring_jax folder (it has no {MANIFEST}; "
                              f"`python -m convert hf2jax` writes one)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise _damaged(folder, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("params"), dict):
        raise _damaged(folder, f"{MANIFEST} lacks its parameter list")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this ring_jax reads {FORMAT_VERSION}")
    if manifest.get("dtype") not in ("bfloat16", "float32", "float16"):
        raise _damaged(folder, f"{MANIFEST} names no model dtype (bfloat16, float32 or float16): "
                               f"{manifest.get('dtype')!r:.40}")
    for key, entry in manifest["params"].items():       # [shape, dtype name, checksum (optional)]
        if not (isinstance(entry, list) and len(entry) in (2, 3) and isinstance(entry[0], list)
                and all(isinstance(d, int) and d >= 0 for d in entry[0]) and isinstance(entry[1], str)):
            raise _damaged(folder, f"{MANIFEST}: the entry of parameter {key} is malformed ({entry!r:.60})")
    return manifest


class ParamReader:
    """The parameters of a converted folder, checked against the config's table when opened and
    restored on demand: onto the default device, or laid out over `mesh` (each process reads only
    its devices' blocks).

    Opening checks the manifest (a missing, unexpected or misshapen array is an error naming it).
    `restore(keys)` restores those arrays by one Orbax partial restore, cast to `dtype` (default:
    the stored dtype; expert_bias and FP8 values and scales stay as stored), and with verify
    checks each one's checksum on the device against the manifest's (a mismatch names it). Files
    that cannot be read are a CheckpointError that says the folder is damaged.
    """

    def __init__(self, folder: str, config: RingConfig, dtype=None, mesh=None, verify: bool = False):
        manifest = read_manifest(folder)
        stored, self.quantize = manifest["params"], manifest.get("quantize")
        if self.quantize is not None and self.quantize not in METHODS:
            raise CheckpointError(f"{folder}: {MANIFEST}: quantize {self.quantize!r:.40} is not one this ring_jax "
                                  f"reads ({', '.join(METHODS)})")
        self.folder, self.table = folder, tensor_table(config, self.quantize)
        self.expected = {key: (shape, kind) for spec in self.table for key, shape, kind in spec.arrays}
        for key in self.expected:
            if key not in stored:
                raise CheckpointError(f"{folder}: parameter {key} is missing")
        for key, (shape, stored_as, *_) in stored.items():
            if key not in self.expected:
                raise CheckpointError(f"{folder}: unexpected parameter {key}")
            want_shape, kind = self.expected[key]
            if tuple(shape) != want_shape:
                raise CheckpointError(f"{folder}: parameter {key} has shape {shape}, the config needs "
                                      f"{list(want_shape)}")
            if kind != "model" and stored_as != kind:              # fixed dtypes: FP8 values, scales, biases
                raise CheckpointError(f"{folder}: parameter {key} is stored as {stored_as}; the model holds it "
                                      f"in {kind}")
        self.stored_dtype = np.dtype(parse_dtype(manifest["dtype"]))
        self.dtype = np.dtype(self.stored_dtype if dtype is None else dtype)
        self.sums = {key: entry[2] for key, entry in stored.items() if len(entry) > 2} if verify else {}
        if verify and len(self.sums) < len(stored):
            warnings.warn(f"{folder}: no checksums recorded (converted by an older ring_jax): not verified", stacklevel=3)
        self.placement = (dict.fromkeys(self.expected, _home())
                          if mesh is None else param_shardings(config, self.dtype, mesh, self.quantize))
        self.params_dir = os.path.abspath(os.path.join(folder, PARAMS_DIR))
        if not os.path.isdir(self.params_dir):
            raise _damaged(folder, f"no {PARAMS_DIR}/ folder")

    def _want(self, key: str) -> np.dtype:
        """The dtype a key is restored in (the stored bits, where they are verified)."""
        kind = self.expected[key][1]
        return (self.stored_dtype if self.sums else self.dtype) if kind == "model" else np.dtype(kind)

    def groups(self, limit: int) -> list[list[str]]:
        """Every key, in table order, in consecutive groups of about `limit` bytes at most (a larger
        array: a group of its own)."""
        groups, size = [[]], 0
        for key, (shape, _) in self.expected.items():
            nbytes = int(np.prod(shape)) * self._want(key).itemsize
            if groups[-1] and size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(key)
            size += nbytes
        return groups

    def restore(self, keys) -> dict[str, jax.Array]:
        """{key: array} of `keys` (class docstring)."""
        import orbax.checkpoint as ocp

        target: dict = {}
        for key in keys:
            struct = jax.ShapeDtypeStruct(self.expected[key][0], self._want(key), sharding=self.placement[key])
            _merge(target, _nested(key, struct))
        try:
            tree = ocp.PyTreeCheckpointer().restore(self.params_dir, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        except Exception as e:              # TensorStore and Orbax report damage as many kinds of error
            quiet_closed_event_loops()
            raise _damaged(self.folder, f"{PARAMS_DIR}/ cannot be read ({one_line(e, limit=200)})") from None
        out = {}
        for key in keys:
            node = tree
            for part in key.split("."):
                node = node[part]
            if key in self.sums and int(device_checksum(node)) != self.sums[key]:
                raise _damaged(self.folder, f"parameter {key} does not match its checksum")
            out[key] = node if self.expected[key][1] != "model" or node.dtype == self.dtype else node.astype(self.dtype)
        return out


# A converted folder loads this many bytes of parameters per Orbax restore: what is held beside
# the model's own stacks while it loads (a restore per parameter would read the tree's metadata
# thousands of times).
LOAD_GROUP_BYTES = 2 * 2**30


def load_model(path: str, dtype=None, mesh=None, verify: bool = False, quantize: str | None = None,
               **config_overrides) -> RingModel:
    """Loads a model folder written by `python -m convert hf2jax`, or an HF folder directly.

    path: a converted folder (config.json + params/) or an HF folder (config.json + safetensors,
    converted in memory; FP8 HF layouts: `ring_jax.quantization`). dtype: parameter dtype
    ("bfloat16", "float32", a numpy dtype), default as stored. mesh: shard the model over this
    mesh (`ring_jax.make_mesh`); a converted folder is restored straight into the sharded layout,
    no host holding the whole model (an HF folder is read whole on every process, then split).
    A converted folder is restored LOAD_GROUP_BYTES at a time, an HF folder tensor by tensor: the
    devices hold the model and one group or tensor more.
    quantize: "fp8" quantizes the model as it loads (`RingModel.quantize`); None loads it as stored
    (an HF folder in FBGEMM's FP8 layout as FP8, a block-scaled one dequantized:
    `ring_jax.quantization`). config_overrides:
    RingConfig fields to change (e.g. slope_law="engine"). verify: check every parameter of a
    converted folder against the checksum its manifest records (on the device; the command lines
    do); a damaged parameter is a CheckpointError naming it.
    """
    check_method(quantize)
    if dtype is not None:                   # a name or a dtype object, by the same rule
        dtype = parse_dtype(dtype if isinstance(dtype, str) else dtype_name(dtype))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")
    config = RingConfig.from_hf(path, **config_overrides)
    if mesh is not None:
        sharding.check_mesh(config, mesh)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        reader = ParamReader(path, config, dtype, mesh, verify)
        stored_specs = {spec.key: spec for spec in reader.table}
        groups, restored = iter(reader.groups(LOAD_GROUP_BYTES)), {}

        def tensors(spec):                    # the table's order: each group restored when reached
            keys = [key for key, *_ in stored_specs[spec.key].arrays]
            while keys[-1] not in restored:
                restored.update(reader.restore(next(groups)))
            return tuple(restored.pop(key) for key in keys)
        return model_from_tensors(config, tensors, reader.dtype, mesh, quantize or reader.quantize)
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        raise _damaged(path, f"{PARAMS_DIR}/ but no {MANIFEST} (the conversion did not finish)")

    source, dtype = open_hf_checkpoint(path, config, dtype)
    return model_from_tensors(config, lambda spec: spec.to_param(source.read, dtype), dtype, mesh,
                              source.model_quantization(quantize, config))
