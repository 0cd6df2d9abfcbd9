"""Device meshes and the logical-axis rules that place parameters, activations and the cache.

The mesh has three named axes:
- `data`: the batch (each data shard decodes its own sequences);
- `expert`: the routed experts, whole experts per device (the intermediate dim is never split);
- `tensor`: attention heads (the linear-attention scan, the KV cache and the states), the
  row-parallel output projections, the vocabulary.

Parameters carry logical axis names as NNX metadata (`out_sharding`, e.g. `("experts", "embed",
None)` for the stacked experts); `RULES` maps each logical name to a mesh axis. A logical axis whose
mesh axis does not divide the dimension (4 KV heads over 8 devices) stays replicated, so any mesh
is valid for any config. The fused projections ([q | k | v], [gate | up]) are replicated over
`tensor`: their outputs would otherwise split along the fused dimension, not along heads.

Kernels (Pallas calls, which XLA cannot partition, and the cuDNN attention calls) run under
`shard_map` on local blocks: the linear-attention scan and the attention kernels per (batch, head)
block (`on_blocks`), the experts per (batch, expert) block. Everything else is partitioned by XLA from the
parameter layouts and the constraints in the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "expert", "tensor")

# logical axis -> mesh axis (None: replicated)
RULES = {
    "layers": None,      # the stacked layers of one kind (`ring_jax.layers.stack`)
    "batch": "data",
    "experts": "expert",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "embed": None,
    "fused": None,       # [q | k | v] and [gate | up] output dims
    "expert_mlp": None,  # an expert's intermediate dim: never split
}


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """An nnx.Param annotated with logical axis names, one per dimension."""
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} axis names {tuple(axes)} for a {value.ndim}-d parameter")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def parse_mesh(text: str) -> dict[str, int | None]:
    """"data=1,expert=8,tensor=1" -> {"data": 1, "expert": 8, "tensor": 1}: `make_mesh`'s
    arguments (data and tensor default to 1, expert to the devices they leave)."""
    sizes = {"data": 1, "expert": None, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in AXES:
            raise ValueError(f"{text!r}: {part!r} is not AXIS=SIZE with AXIS one of {AXES}")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"{text!r}: size {value!r} of {name.strip()} is not an integer") from None
        if sizes[name.strip()] < 1:
            raise ValueError(f"{text!r}: the size of {name.strip()} must be >= 1")
    return sizes


def make_mesh(data: int = 1, expert: int | None = None, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh ("data", "expert", "tensor") over `devices` (default: every device of every
    process). expert=None takes the devices that data x tensor leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if expert is None:
        if len(devices) % (data * tensor):
            raise ValueError(f"{len(devices)} devices do not split into data={data} x tensor={tensor}")
        expert = len(devices) // (data * tensor)
    if data * expert * tensor != len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} x tensor={tensor} = {data * expert * tensor} "
                         f"devices, but there are {len(devices)}")
    return jax.make_mesh((data, expert, tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_mesh(config, mesh: jax.sharding.Mesh) -> None:
    """Refuses a mesh whose `expert` axis does not split the experts evenly: they would be
    replicated on every device instead (the whole model per device)."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (ring_jax.make_mesh(data=..., expert=...)), got "
                        f"{type(mesh).__name__} {mesh!r:.80}")
    experts = mesh.shape.get("expert", 1)
    if experts > 1 and config.num_experts % experts:
        raise ValueError(f"mesh axis expert={experts} does not divide num_experts={config.num_experts}: "
                         "choose an expert size that divides it")


def mesh_axis(name: str | None, dim: int, mesh=None) -> str | None:
    """The mesh axis that logical axis `name` of size `dim` is split over (in `mesh`, default the
    mesh in context), or None: no mesh, an axis of size 1, or one that does not divide `dim`."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    axis = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
        raise KeyError(f"no sharding rule for logical axis {name!r}")
    if axis is None or mesh.empty or axis not in mesh.shape:
        return None
    size = mesh.shape[axis]
    return axis if size > 1 and dim % size == 0 else None


def spec(names: Sequence[str | None], shape: Sequence[int], mesh=None) -> P:
    """The PartitionSpec of an array of `shape` with logical axes `names`, without trailing Nones
    (as XLA writes its outputs' specs: P(None) and P() are one layout but two jit cache keys)."""
    axes = [mesh_axis(n, d, mesh) for n, d in zip(names, shape)]
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x laid out by its logical axes over the mesh in context (no-op without a mesh)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(names, x.shape))


def in_mesh() -> bool:
    """True while tracing under a mesh with more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and math.prod(mesh.shape.values()) > 1


def on_blocks(fn, *args, layouts: Sequence[str], out, batch: int | None = None, heads: int | None = None,
              kv_heads: int | None = None, experts: int | None = None):
    """fn(*args) on each device's block under the mesh in context (`jax.shard_map`), as kernels
    that XLA cannot partition run, and as the MoE runs its experts; outside a mesh, fn(*args).

    layouts: one string per argument, one letter per axis: "b" the batch (split over `data`), "h"
    the heads (over `tensor`), "e" the experts (over `expert`), "." an axis every device takes
    whole; e.g. "b.h." for [B, T, H, D], "bh.." for states [B, H, D, D], ".e.." for a stack of
    expert matrices [L, E, K, N], "" for a scalar. out: the outputs' layouts (a string, or a tuple
    of them). batch, heads, experts: the sizes the split must divide (a letter whose size is not
    given is not split). With kv_heads (GQA), the heads are split only when the kv heads split
    alike, so that a group stays on one device."""
    if not in_mesh():
        return fn(*args)
    b, h, e = (None if n is None else mesh_axis(name, n)
               for name, n in (("batch", batch), ("heads", heads), ("experts", experts)))
    if kv_heads is not None and h != mesh_axis("kv_heads", kv_heads):
        h = None
    axes = {"b": b, "h": h, "e": e, ".": None}

    def layout(letters: str) -> P:
        return P(*(axes[c] for c in letters))

    out_specs = layout(out) if isinstance(out, str) else tuple(layout(o) for o in out)
    return jax.shard_map(fn, in_specs=tuple(layout(x) for x in layouts), out_specs=out_specs,
                         check_vma=False)(*args)


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """The state's structure with each Variable's value replaced by its NamedSharding on `mesh`
    (state: a model's parameters, abstract or concrete)."""
    def sharding(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        return variable.replace(NamedSharding(mesh, spec(names, variable.shape, mesh)))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Places model's parameters (a RingModel or any module of it) on `mesh` by their annotations
    (in place; returns model)."""
    if hasattr(model, "config"):
        check_mesh(model.config, mesh)
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def model_mesh(model: nnx.Module) -> jax.sharding.Mesh | None:
    """The mesh a model's parameters were placed on, of any size (None: placed on one device
    without a mesh). A model on a mesh runs its steps under it, so that the steps' inputs and
    outputs keep one kind of sharding and a second call finds the first one's compilation."""
    return sharding_mesh(getattr(first_array(model), "sharding", None))


def sharding_mesh(sharding) -> jax.sharding.Mesh | None:
    """The mesh of a NamedSharding; None for any other placement."""
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def first_array(model: nnx.Module) -> jax.Array:
    """The value of the model's first variable (all are placed alike), found without collecting
    the whole state (that takes tens of milliseconds at a full model's size)."""
    return next(node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable))[...]


def put(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array (the same on every process) as a global array laid out by `sharding`; each
    process places only its own devices' blocks."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
