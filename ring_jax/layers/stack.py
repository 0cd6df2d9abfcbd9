"""Layers stacked over a leading layer axis, for `lax.scan`, and one layer's entry of a stack.

The decoder runs layers of one kind (`ring_jax.schedule`) as one scanned body, so their
parameters are stacked: each Variable of a stacked module holds [n, ...] with the logical axis
"layers" first. Inside the scan a layer must not slice its weights out of the stack before it
uses them: a dynamic slice that feeds a kernel or a GEMM is a copy of the weights (on a GPU a
decode step would read every weight twice more). So a layer's Variables hold a `StackSlice`
(the stack and the layer's index) there; the products that stream weights (`pallas_kernels.matvec`,
`gmm`, the linear-attention decode step) take the stack and the index, and every other use reads
the slice (`read`), which XLA fuses into its consumer. The cache's stacks (linear states, keys and
values) are addressed the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class StackSlice:
    """Entry `index` of `stack` [n, ...] along its first axis, not yet read. index: an int or a
    traced [] int32 (a scan's layer)."""

    def __init__(self, stack: jax.Array, index):
        self.stack = stack
        self.index = index

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[1:]

    @property
    def dtype(self):
        return self.stack.dtype

    @property
    def ndim(self) -> int:
        return self.stack.ndim - 1

    def read(self) -> jax.Array:
        """The entry as an array."""
        if isinstance(self.index, int):
            return self.stack[self.index]
        return jax.lax.dynamic_index_in_dim(self.stack, self.index, keepdims=False)

    def __getitem__(self, key):
        return self.read()[key]

    def indices(self) -> jax.Array:
        """[1] int32: the index, as `pallas_kernels.matvec` takes matrix ids."""
        return jnp.reshape(jnp.asarray(self.index, jnp.int32), (1,))


def read(x):
    """An array, or a value not yet computed (a StackSlice, a `norms.Normed`) computed into one."""
    return x.read() if hasattr(x, "read") else x


def stack_and_index(x) -> tuple[jax.Array, object]:
    """For the kernels that read a layer's entry in its stack: a StackSlice as (its stack, its
    index), an array as (itself, None)."""
    return (x.stack, x.index) if isinstance(x, StackSlice) else (x, None)


def slice_in_dim(x, start, size: int, axis: int) -> jax.Array:
    """`lax.dynamic_slice_in_dim` of an array or a StackSlice (sliced in its stack: only the
    block is read)."""
    if not isinstance(x, StackSlice):
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis)
    starts = [jnp.asarray(x.index, jnp.int32)] + [jnp.int32(0)] * x.ndim
    starts[axis + 1] = jnp.asarray(start, jnp.int32)
    sizes = (1,) + x.shape[:axis] + (size,) + x.shape[axis + 1:]
    return jax.lax.dynamic_slice(x.stack, starts, sizes)[0]


def set_entry(stack: jax.Array, index, value: jax.Array) -> jax.Array:
    """stack with entry `index` replaced by value (in place inside a jitted loop's carry)."""
    return jax.lax.dynamic_update_index_in_dim(stack, value.astype(stack.dtype), index, 0)


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module of the same structure whose Variables stack those of `modules` (all alike) on a
    new first axis, with the logical axis "layers" prepended to their sharding names."""
    graphdef, _ = nnx.split(modules[0])
    stacked = jax.tree.map(lambda *values: jnp.stack(values), *[nnx.state(m) for m in modules])

    def named(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * (variable.ndim - 1)
        return variable.replace(variable.get_value(), out_sharding=("layers",) + tuple(names))

    return nnx.merge(graphdef, jax.tree.map(named, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def layer_view(module: nnx.Module, index):
    """The stacked `module` as one layer: each Variable holds StackSlice(its stack, index)."""
    arrays, treedef = jax.tree.flatten(module)
    return jax.tree.unflatten(treedef, [StackSlice(a, index) for a in arrays])
