"""Orbax checkpoints of RingModel: writing piece by piece, restoring, and `load_model()`.

A converted model folder holds:

    config.json          the HF config, as converted
    ring_jax.json        manifest: format version, parameter dtype, every parameter's shape, dtype
                         and checksum (`checksum`; `load_model(verify=True)` checks them)
    params/              an Orbax PyTree checkpoint, {"layers": {"3": {"mlp": ...}}, ...}
    tokenizer files      copied from the HF folder when present

The parameter names are those of `ring_jax.io.mapping.tensor_table`, joined by dots.

With a mesh, every parameter is restored straight into its sharded layout (`ring_jax.sharding`):
Orbax reads, on each process, only the blocks of that process's devices.
"""

from __future__ import annotations

import functools
import json
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
from ring_jax.model import RingModel
from ring_jax.schedule import kind_index
from ring_jax.staging import staged_folder

FORMAT_VERSION = 2  # 2: SwiGLU gate and up joined into gate_up_proj
MANIFEST = "ring_jax.json"
PARAMS_DIR = "params"


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


# ------------------------------------------------------------------------------- model <-> tensors
def locate(model: RingModel, spec: TensorSpec) -> tuple[nnx.Variable, int | None]:
    """The Variable that holds parameter `spec` and, for a decoder layer's parameter, its index in
    that Variable's stack (`ring_jax.schedule`: a layer's kind and index; the names on disk keep
    the HF layer numbers)."""
    path, index, obj = spec.path, None, model
    if path[0] == "layers":
        kind, index = kind_index(model.config, path[1])
        obj, path = getattr(model, kind), path[2:]
    for part in path:
        obj = obj[part] if isinstance(part, int) else getattr(obj, part)
    return obj, index


def get_param(model: RingModel, spec: TensorSpec) -> jax.Array:
    variable, index = locate(model, spec)
    return variable[...] if index is None else variable.get_value()[index]


@functools.partial(jax.jit, donate_argnums=0)
def _set_entry(stack, value, index):
    return jax.lax.dynamic_update_index_in_dim(stack, value, index, 0)


def _piece(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    """The sharding of one entry of a stack laid out by `sharding` (its first axis unsplit)."""
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))


def _stacked(piece: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of a stack whose entries are laid out by `piece` (inverse of `_piece`)."""
    if isinstance(piece, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(piece.mesh, jax.sharding.PartitionSpec(None, *piece.spec))
    return piece


def param_shardings(config: RingConfig, dtype, mesh) -> dict[str, jax.sharding.NamedSharding]:
    """{dotted key: the parameter's NamedSharding on mesh} (a decoder layer's parameter: its entry
    of the stack), from the model's axis annotations."""
    model = nnx.eval_shape(lambda: RingModel(config, dtype=dtype))
    nnx.update(model, sharding.param_shardings(nnx.state(model), mesh))
    out = {}
    for spec in tensor_table(config):
        variable, index = locate(model, spec)
        out[spec.key] = variable.get_value() if index is None else _piece(variable.get_value())
    return out


def model_from_tensors(config: RingConfig, tensors, dtype, mesh=None) -> RingModel:
    """A RingModel whose parameters come from `tensors(spec) -> array`, without random init; on
    `mesh`, each laid out by its annotation (host arrays are split, device arrays must be). A
    stacked parameter is filled entry by entry in place: what is held at once is the stacks built
    so far and the entry being written."""
    model = nnx.eval_shape(lambda: RingModel(config, dtype=dtype))
    placement = None if mesh is None else param_shardings(config, dtype, mesh)
    for spec in tensor_table(config):
        value = tensors(spec)
        want = jnp.float32 if spec.float32 else dtype
        if value.shape != spec.shape or value.dtype != want:
            raise CheckpointError(f"parameter {spec.key} is {value.dtype}{list(value.shape)}, "
                                  f"the model needs {np.dtype(want).name}{list(spec.shape)}")
        if placement is None:
            value = jnp.asarray(value)
        elif not isinstance(value, jax.Array):
            value = sharding.put(value, placement[spec.key])
        elif value.sharding != placement[spec.key]:
            value = jax.device_put(value, placement[spec.key])
        variable, index = locate(model, spec)
        if index is None:
            variable.set_value(value)
            continue
        stack = variable.get_value()
        if not isinstance(stack, jax.Array):                    # the first entry: allocate the stack
            where = _stacked(value.sharding) if mesh is None else jax.sharding.NamedSharding(
                mesh, sharding.spec(variable.get_metadata()["out_sharding"], stack.shape, mesh))
            stack = jax.jit(functools.partial(jnp.zeros, stack.shape, stack.dtype), out_shardings=where)()
        variable.set_value(_set_entry(stack, value, jnp.int32(index)))
    return model


# ------------------------------------------------------------------------------------ checksums
# A parameter's checksum: sum over its elements of bits[i] * (2 i + 1), modulo 2**32 (bits: the
# element's raw 16 or 32 bits). Any change of one element changes it (the factors are odd, so
# invertible modulo 2**32); modular sums do not depend on the order of summation, so the host
# (numpy, when written) and the device (jnp, when loaded, over any sharding) agree bit for bit.
_CHUNK = 1 << 24


def _bits(dtype):
    return {2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]


def checksum(array: np.ndarray) -> int:
    """The checksum of a host array (16- or 32-bit elements), in chunks of bounded memory."""
    flat = np.ascontiguousarray(array).reshape(-1).view(_bits(array.dtype))
    total = 0
    for at in range(0, flat.size, _CHUNK):
        bits = flat[at:at + _CHUNK]
        factors = np.arange(bits.size, dtype=np.uint32)                  # 2 i + 1, modulo 2**32
        factors *= np.uint32(2)
        factors += np.uint32((2 * at + 1) % 2**32)
        total += int(np.sum(np.multiply(factors, bits, out=factors), dtype=np.uint32))
    return total % 2**32


@jax.jit
def device_checksum(x: jax.Array) -> jax.Array:
    """`checksum` on the device, in x's layout (the flat index from iotas: no reshape)."""
    bits = jax.lax.bitcast_convert_type(x, _bits(x.dtype)).astype(jnp.uint32)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):
        index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


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

    def close(self, dtype) -> None:
        """Finalizes and writes the manifest: the folder is then a complete checkpoint."""
        self._flush()
        self._partial.finalize(self._orbax_dir)
        os.rename(os.path.join(self._orbax_dir, "state"), os.path.join(self._folder, PARAMS_DIR))
        shutil.rmtree(self._orbax_dir)
        with open(os.path.join(self._folder, MANIFEST), "w") as f:
            json.dump({"format": FORMAT_VERSION, "dtype": dtype_name(dtype), "params": self.manifest}, f, indent=1)


def save_model(model: RingModel, folder: str) -> None:
    """Writes model (config.json, manifest, Orbax params) to a new folder, atomically
    (`ring_jax.staging`)."""
    with staged_folder(folder) as tmp:
        writer = ParamWriter(tmp)
        for spec in tensor_table(model.config):
            writer.add(spec.key, np.asarray(get_param(model, spec)))
        writer.close(model.dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config.to_hf_dict(), f, indent=2)


# ------------------------------------------------------------------------------------ restoring
def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise _damaged(folder, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("params"), dict):
        raise _damaged(folder, f"{MANIFEST} lacks its parameter list")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this ring_jax reads {FORMAT_VERSION}")
    return manifest


def restore_params(folder: str, config: RingConfig, dtype=None, mesh=None,
                   verify: bool = False) -> tuple[dict[str, jax.Array], np.dtype]:
    """Restores every parameter of a converted folder onto the default device, or laid out over
    `mesh` (each process reads only its devices' blocks).

    Checks the manifest against the config's table first (a missing, unexpected or misshapen
    parameter is an error naming it). verify: each parameter's checksum, on the device, against
    the manifest's (a mismatch names the parameter). Returns ({dotted key: array}, dtype) with the
    parameters cast to dtype (default: the stored dtype); expert_bias stays float32. Files that
    cannot be read are a CheckpointError that says the folder is damaged.
    """
    import orbax.checkpoint as ocp

    manifest = read_manifest(folder)
    stored = manifest["params"]
    table = tensor_table(config)
    expected = {spec.key: spec for spec in table}
    for key in expected:
        if key not in stored:
            raise CheckpointError(f"{folder}: parameter {key} is missing")
    for key, (shape, *_) in stored.items():
        if key not in expected:
            raise CheckpointError(f"{folder}: unexpected parameter {key}")
        if tuple(shape) != expected[key].shape:
            raise CheckpointError(f"{folder}: parameter {key} has shape {shape}, the config needs {list(expected[key].shape)}")
    stored_dtype = np.dtype(parse_dtype(manifest["dtype"]))
    dtype = np.dtype(stored_dtype if dtype is None else dtype)
    sums = {key: entry[2] for key, entry in stored.items() if len(entry) > 2} if verify else {}
    if verify and len(sums) < len(stored):
        warnings.warn(f"{folder}: no checksums recorded (converted by an older ring_jax): not verified", stacklevel=2)
    placement = (dict.fromkeys(expected, jax.sharding.SingleDeviceSharding(jax.devices()[0])) if mesh is None
                 else param_shardings(config, dtype, mesh))
    target: dict = {}
    for spec in table:
        want = np.float32 if spec.float32 else (stored_dtype if sums else dtype)   # verify the stored bits
        _merge(target, _nested(spec.key, jax.ShapeDtypeStruct(spec.shape, want, sharding=placement[spec.key])))
    params_dir = os.path.abspath(os.path.join(folder, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise _damaged(folder, f"no {PARAMS_DIR}/ folder")
    try:
        tree = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:                  # TensorStore and Orbax report damage as many kinds of error
        quiet_closed_event_loops()
        raise _damaged(folder, f"{PARAMS_DIR}/ cannot be read ({one_line(e, limit=200)})") from None
    flat = {}
    for spec in table:
        node = tree
        for part in spec.key.split("."):
            node = node[part]
        if spec.key in sums and int(device_checksum(node)) != sums[spec.key]:
            raise _damaged(folder, f"parameter {spec.key} does not match its checksum")
        flat[spec.key] = node if spec.float32 or node.dtype == dtype else node.astype(dtype)
    return flat, dtype


def load_model(path: str, dtype=None, mesh=None, verify: bool = False, **config_overrides) -> RingModel:
    """Loads a model folder written by `python -m convert hf2jax`, or an HF folder directly.

    path: a converted folder (config.json + params/) or an HF folder (config.json + safetensors,
    converted in memory). dtype: parameter dtype ("bfloat16", "float32", a numpy dtype), default
    as stored. mesh: shard the model over this mesh (`ring_jax.make_mesh`); a converted folder is
    restored straight into the sharded layout, no host holding the whole model (an HF folder is
    read whole on every process, then split). config_overrides: RingConfig fields to change
    (e.g. slope_law="engine"). verify: check every parameter of a converted folder against the
    checksum its manifest records (on the device; the command lines do); a damaged parameter is a
    CheckpointError naming it.
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")
    config = RingConfig.from_hf(path, **config_overrides)
    if mesh is not None:
        sharding.check_mesh(config, mesh)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        params, dtype = restore_params(path, config, dtype, mesh, verify)
        return model_from_tensors(config, lambda spec: params[spec.key], dtype)
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        raise _damaged(path, f"{PARAMS_DIR}/ but no {MANIFEST} (the conversion did not finish)")

    source, dtype = open_hf_checkpoint(path, config, dtype)
    return model_from_tensors(config, lambda spec: spec.to_param(source.read, dtype), dtype, mesh)
