"""LoRA adapters: a low-rank update beside a frozen projection, y = x W + (alpha / r) (x A) B.

`attach` gives the chosen `Linear` projections of every decoder layer an adapter (`LoRA`) with
float32 factors A [in, r] (random, scaled by 1 / sqrt(in)) and B [r, out] (zeros, so the model is
unchanged until it trains). The decoder's layers are stacked per kind (`ring_jax.layers.stack`),
so the factors are stacked too: [n, in, r] and [n, r, out] with the logical axis "layers" first,
and they reach a layer as StackSlices like every other weight. `merge` folds the updates into the
projections' weights and removes the adapters: the merged model is a plain model that
`ring_jax.save_model` writes and `load_model`, `generate` and `python -m convert jax2hf` take.

Targets name the projections by their place in a decoder layer:
- "attention": the attention's fused q/k/v projection, its output projection (`dense`) and, in
  the linear layers, the output gate's projection (`g_proj`);
- "shared_expert": the MoE's shared expert (gate_up_proj, down_proj) and the dense MLP of the
  leading dense layers;
- "experts" is not offered: the routed experts are stacks read by id by the MoE kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ring_jax.layers.linear import Linear, bf16_parts
from ring_jax.layers.stack import read
from ring_jax.sharding import model_mesh, spec

TARGETS = {
    "attention": (("attention", "query_key_value"), ("attention", "dense"), ("attention", "g_proj")),
    "shared_expert": (("mlp", "shared_experts", "gate_up_proj"), ("mlp", "shared_experts", "down_proj"),
                      ("mlp", "gate_up_proj"), ("mlp", "down_proj")),
}
DEFAULT_TARGETS = ("attention", "shared_expert")


class LoRA(nnx.Module):
    """The adapter of one projection, or of a stack of them, whose output y it updates by (alpha /
    rank) (x a) b: a [..., in, r], b [..., r, out] float32, the leading axes those of the
    projection's kernel stack."""

    def __init__(self, a: jax.Array, b: jax.Array, alpha: float, axes):
        rank = a.shape[-1]
        self.scale = alpha / rank
        lead = ("layers",) * (a.ndim - 2)
        self.a = nnx.LoRAParam(a, out_sharding=lead + (axes[0], None), eager_sharding=False)
        self.b = nnx.LoRAParam(b, out_sharding=lead + (None, axes[1]), eager_sharding=False)

    def __call__(self, y: jax.Array, x) -> jax.Array:
        """y: [..., out] the projection's output, x: [..., in] its input (an array or a `Normed`) ->
        y plus the update, summed in float32 and rounded to y's dtype (as PEFT adds float32
        adapters to a bf16 layer)."""
        return _adapted(y, read(x), read(self.a), read(self.b), self.scale)

    def delta(self) -> jax.Array:
        """The update of the weights, (alpha / rank) a b: [..., in, out] float32."""
        return self.scale * jnp.matmul(read(self.a), read(self.b), precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _adapted(y, x, a, b, scale: float) -> jax.Array:
    """round(y + scale (x a) b), the sum and the update in float32: y [..., out], x [..., in] (bf16
    or float32), a [in, r], b [r, out] float32 -> [..., out] in y's dtype.

    The products over the wide axes, x a and those of the gradients, have one narrow operand of r
    columns (`_narrow_product`): with a bf16 operand they run on the bf16 tensor cores at float32
    precision. The gradients are written out so that each is one pass over the wide arrays: the
    backward pass keeps x in its own dtype and the narrow x a [..., r], where autodiff would keep
    x's float32 copy (or, under jax.checkpoint, make x a again). a and b are one layer's factors
    (`LoRA.__call__` reads a stack's layer). (A custom VJP: forward-mode autodiff, jax.jvp, does not
    go through it.)"""
    return _adapted_forward(y, x, a, b, scale)[0]


def _matmul(x, y):
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def _narrow_product(x, w) -> jax.Array:
    """x [..., K] @ w [K, n] -> [..., n] float32 at float32 precision: w float32, n narrow (the rank),
    K wide. Where x is bf16 the product runs on the bf16 tensor cores, w as its three bf16 parts
    (`bf16_parts`) side by side: one product of 3 n columns. Float32 precision passes on a float32
    x would instead read x as float32 in a product of n columns, slow on a GPU."""
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.bfloat16):
        return _matmul(x.astype(jnp.float32), w)
    parts = jnp.concatenate(bf16_parts(jnp.asarray(w)), axis=-1)                      # [K, 3 n]
    y = jnp.matmul(x, parts, preferred_element_type=jnp.float32)
    return jnp.sum(y.reshape(*y.shape[:-1], 3, w.shape[-1]), axis=-2)


def _adapted_forward(y, x, a, b, scale):
    """-> (the adapted output [..., out], residuals: x [..., in], a, b, u = x a [..., r] float32)."""
    u = _narrow_product(x, a)                                                          # [..., r]
    return (y.astype(jnp.float32) + scale * _matmul(u, b)).astype(y.dtype), (x, a, b, u)


def _adapted_backward(scale, residuals, cotangent):
    """cotangent [..., out] in y's dtype -> the gradients of y, x (in their dtypes), a and b."""
    x, a, b, u = residuals
    flat = lambda v: v.reshape(-1, v.shape[-1])
    d_u = scale * _narrow_product(cotangent, b.T)                                      # [..., r]
    d_a = _narrow_product(flat(x).T, flat(d_u))
    d_b = scale * _narrow_product(flat(cotangent).T, flat(u)).T
    return cotangent, _matmul(d_u, a.T).astype(x.dtype), d_a, d_b


_adapted.defvjp(_adapted_forward, _adapted_backward)


def _find(module, path):
    for name in path:
        module = getattr(module, name, None)
        if module is None:
            return None
    return module if isinstance(module, Linear) else None


def projections(model, targets=DEFAULT_TARGETS) -> list[tuple[str, Linear]]:
    """The (name, Linear) projections of every stack of decoder layers that `targets` choose."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: choose from {sorted(TARGETS)}")
    found = []
    for kind, _ in model.schedule.counts:
        stack = getattr(model, kind)
        for target in targets:
            for path in TARGETS[target]:
                linear = _find(stack, path)
                if linear is not None:
                    found.append((".".join((kind,) + path), linear))
    return found


def attach(model, rank: int, alpha: float, targets=DEFAULT_TARGETS, seed: int = 0) -> list[str]:
    """Gives the `targets` projections of `model` LoRA adapters of this rank (in place; placed on
    the model's mesh, if any). Returns the names of the adapted projections."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    mesh = model_mesh(model)
    names = []
    for i, (name, linear) in enumerate(projections(model, targets)):
        if linear.lora is not None:
            raise ValueError(f"{name} has a LoRA adapter already")
        (*lead, fan_in, fan_out), axes = linear.layout()
        rng = np.random.default_rng((seed, i))
        a = jnp.asarray(rng.standard_normal((*lead, fan_in, rank)) / np.sqrt(fan_in), jnp.float32)
        b = jnp.zeros((*lead, rank, fan_out), jnp.float32)
        adapter = LoRA(a, b, alpha, axes[-2:])
        if mesh is not None:
            for factor in (adapter.a, adapter.b):
                value = factor.get_value()
                where = NamedSharding(mesh, spec(factor.get_metadata()["out_sharding"], value.shape, mesh))
                factor.set_value(jax.device_put(value, where))
        linear.lora = adapter
        names.append(name)
    return names


def merge(model) -> int:
    """Folds every adapter's update into its projection's weights (rounded once to their dtype)
    and removes the adapters, in place. Returns how many were merged."""
    merged = 0
    for kind, _ in model.schedule.counts:
        for _, linear in nnx.iter_graph(getattr(model, kind)):
            if isinstance(linear, Linear) and linear.lora is not None:
                if linear.quantized:
                    raise ValueError("LoRA adapters merge into an unquantized model: merge into the base "
                                     "model's bf16 or HF folder (merge --model), then quantize the result")
                kernel = linear.kernel.get_value()
                linear.kernel.set_value((kernel.astype(jnp.float32) + linear.lora.delta()).astype(kernel.dtype))
                linear.lora = None
                merged += 1
    return merged
