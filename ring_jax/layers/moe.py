"""The MoE block (docs/SPEC.md §7): sigmoid group-limited router in float32, dropless sort-by-expert
dispatch through a grouped matmul, float32 weighted combine, plus the shared expert.

Expert parallelism: under a mesh whose `expert` axis splits the experts, each device holds whole
experts and sees every token of its batch shard (activations are replicated over `expert`). It
routes all of them and runs only the (token, expert) pairs whose expert it holds, so the dispatch
moves no data. Every pair's output [tokens, top_k, hidden] (model dtype) is nonzero on exactly one
device, and the outputs come back in one of two exact ways:
- few tokens (decode): one psum over `expert`, then the float32 combine on every device: one
  collective, which is what a latency-bound step wants;
- many tokens (prefill): a reduce-scatter over the tokens, the float32 combine of each device's
  token shard, and an all-gather of the combined [tokens, hidden]: (top_k + 1) / (2 top_k) of the
  psum's bytes, and the combine split over the devices.
Both add each pair's output to zeros only, then combine in one device's order: no rounding differs
from an op-by-op evaluation of the layer. The psum way gives the unsharded jitted model's bits; the
scatter way gives the op-by-op evaluation's, which the unsharded jitted layer may miss by a bf16
step where XLA fuses it otherwise (XLA:CPU does from about 130 tokens; tests/test_sharding.py).
(A psum of per-device float32 partial combines would sum in another order, and in bf16 one flipped
rounding can flip a later layer's routing.)
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels.backend import with_reference_gradient
from ring_jax import backends
from ring_jax.config import RingConfig
from ring_jax.layers.linear import float32_matmul, quantized_params
from ring_jax.layers.mlp import MLP, swiglu
from ring_jax.layers.norms import norm_operands
from ring_jax.layers.stack import StackSlice, read, stack_and_index
from ring_jax.quantization import Fp8, scale_name
from ring_jax.sharding import in_mesh, mesh_axis, on_blocks, param


class Router(nnx.Module):
    """HF `BailingMoeV2Gate`: kernel [hidden, E] (model dtype), expert_bias [E] (float32)."""

    def __init__(self, config: RingConfig, *, dtype, rngs: nnx.Rngs):
        E, hidden = config.num_experts, config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.bias_in_model_dtype = config.expert_bias_dtype == "model"
        self.kernel = nnx.Param((jax.random.normal(rngs.params(), (hidden, E)) / hidden ** 0.5).astype(dtype))
        self.expert_bias = nnx.Param(jnp.zeros((E,), jnp.float32))

    def __call__(self, x) -> tuple[jax.Array, jax.Array]:
        """x: [N, hidden], an array or a `Normed` -> (expert ids [N, top_k] int32, weights [N, top_k]
        float32)."""
        kernel = self.kernel.get_value()                     # an array or a StackSlice
        logits = float32_matmul(x, kernel)                   # [N, E] float32
        scores = jax.nn.sigmoid(logits)
        bias, index = stack_and_index(self.expert_bias.get_value())
        return pallas_kernels.select_experts(
            scores, bias, bias_index=index,
            bias_rounding=kernel.dtype if self.bias_in_model_dtype else None, top_k=self.top_k,
            n_group=self.n_group, topk_group=self.topk_group, scaling=self.routed_scaling_factor,
            backend=backends.router_backend())


# Up to this many pairs, `sort_by_expert` ranks them by all-pairs comparison (one fused kernel)
# instead of a sort (several launches, which dominate a decode step's dispatch on GPU).
COMPARE_SORT_MAX_PAIRS = 1024


def sort_by_expert(ids: jax.Array, num_experts: int):
    """ids: [P] expert of each pair -> (order [P]: the pairs sorted by expert, stable; rank [P]:
    each pair's place in that order (the inverse permutation); group_sizes [E] int32)."""
    P = ids.shape[0]
    pairs = jnp.arange(P, dtype=jnp.int32)
    if P <= COMPARE_SORT_MAX_PAIRS:
        before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (pairs[None, :] < pairs[:, None]))
        rank = jnp.sum(before, axis=1, dtype=jnp.int32)
        order = jnp.zeros_like(pairs).at[rank].set(pairs)
        sizes = jnp.sum(ids[:, None] == jnp.arange(num_experts)[None, :], axis=0, dtype=jnp.int32)
    else:
        order = jnp.argsort(ids, stable=True).astype(jnp.int32)
        rank = jnp.zeros_like(pairs).at[order].set(pairs)
        sizes = jnp.bincount(ids, length=num_experts).astype(jnp.int32)
    return order, rank, sizes


def expert_outputs(tokens, ids, gate_up, down, expert_axis=None, gathered=None, fp8_rows=False):
    """Each (token, expert) pair through its expert: out[n, j] = expert_{ids[n, j]}(tokens[n]).

    tokens: [N, hidden]; ids: [N, k] int32; gate_up: [E, hidden, 2 I] and down: [E, I, hidden], the
    experts held here (arrays, or `StackSlice`s of every layer's experts; FP8: `Fp8`s of them,
    [E, 2 I, hidden] and [E, hidden, I] with their scales, `Experts.weights`). expert_axis: inside
    shard_map, the mesh axis the experts are split over (this device holds experts [i E, (i + 1) E),
    i its index on the axis; pairs whose expert is elsewhere come back as zeros). fp8_rows: with FP8
    weights, the grouped matmuls quantize their rows to FP8 (`pallas_kernels.gmm`'s lhs_scale; the
    gathered products stay weight-only). Returns [N, k, hidden] in tokens' dtype.

    The pairs run sorted by expert through grouped matmuls (dropless), or, for few pairs, each
    through its chosen expert's weights (`backends.experts_gather`; inside shard_map the caller
    decides from the global pairs and passes `gathered`).
    """
    if gathered is None:
        gathered = backends.experts_gather(tokens, ids, gate_up, down, expert_parallel=expert_axis is not None)
    if expert_axis is None:
        return gathered_outputs(tokens, ids, gate_up, down) if gathered else grouped_outputs(
            tokens, ids, gate_up, down, fp8_rows)
    E = _count(gate_up)
    local = ids - jax.lax.axis_index(expert_axis) * E
    here = (local >= 0) & (local < E)
    ids = jnp.where(here, local, E)                          # elsewhere: a group past the last
    if gathered:
        return jnp.where(here[..., None], gathered_outputs(tokens, jnp.minimum(ids, E - 1), gate_up, down), 0)
    return grouped_outputs(tokens, ids, gate_up, down, fp8_rows)


def _count(w) -> int:
    """The number of matrices of a stack (or of an Fp8 stack)."""
    return (w.values if isinstance(w, Fp8) else w).shape[0]


def _one_stack(w):
    """A layer's matrices [G, K, N] (an array, or a StackSlice of every layer's [n, G, K, N]; or an
    Fp8 of such values and scales) as (one stack [n G, K, N] that the kernels take whole, the
    layer's first matrix in it)."""
    if isinstance(w, Fp8):
        (values, first), (scale, _) = _one_stack(w.values), _one_stack(w.scale)
        return Fp8(values, scale), first
    if isinstance(w, StackSlice):
        return w.stack.reshape((-1,) + w.shape[1:]), w.index * w.shape[0]
    return w, 0


def _kernel_operands(*stacks):
    """Stacks (arrays, or Fp8s of them) -> (the weights: one stack or a tuple of them, the
    kernels' keyword arguments: the scales of FP8 stacks)."""
    if not isinstance(stacks[0], Fp8):
        return (stacks[0] if len(stacks) == 1 else stacks), {}
    values, scales = tuple(s.values for s in stacks), tuple(s.scale for s in stacks)
    return (values[0], dict(scale=scales[0])) if len(stacks) == 1 else (values, dict(scale=scales))


def combined_outputs(tokens, ids, weights, gate_up, down, fp8_rows=False, gathered=None):
    """combine(expert_outputs(tokens, ids, gate_up, down, gathered=gathered, fp8_rows=fp8_rows),
    weights) -> [N, hidden], every expert held here (no expert axis): the grouped matmuls' outputs
    are combined where they lie, in expert order (`_combine_in_expert_order`), with no token-order
    copy of them."""
    if backends.experts_gather(tokens, ids, gate_up, down) if gathered is None else gathered:
        return combine(gathered_outputs(tokens, ids, gate_up, down), weights)
    return _combine_in_expert_order(*_outputs_in_expert_order(tokens, ids, gate_up, down, fp8_rows), weights)


def grouped_outputs(tokens, ids, gate_up, down, fp8_rows=False):
    """-> [N, k, hidden]; pairs with ids == E (experts held elsewhere) give zeros. fp8_rows: FP8
    weights multiply FP8 rows (`expert_outputs`)."""
    N, k = ids.shape
    out, order, rank = _outputs_in_expert_order(tokens, ids, gate_up, down, fp8_rows)
    return _permuted(out, rank, order).reshape(N, k, -1)


def _outputs_in_expert_order(tokens, ids, gate_up, down, fp8_rows):
    """-> (out [N k, hidden]: the pairs' outputs sorted by expert, order [N k]: the pairs in that
    order, rank [N k]: its inverse, where pair n k + j's output is)."""
    E = _count(gate_up)
    order, rank, group_sizes = sort_by_expert(ids.reshape(-1), E + 1)
    group_sizes = group_sizes[:E]                           # rows past their sum come back as zeros
    (gate_up, first), (down, _) = _one_stack(gate_up), _one_stack(down)
    operands = (tokens, order, rank, group_sizes, jnp.asarray(first, jnp.int32), gate_up, down)
    if fp8_rows and isinstance(gate_up, Fp8):   # the gradient passes the rows' rounding straight through
        return with_reference_gradient(_fp8_row_products, _products)(*operands), order, rank
    return _products(*operands), order, rank


def _products(tokens, order, rank, group_sizes, first, gate_up, down):
    """tokens [N, hidden] -> [N k, hidden]: the pairs in expert order (`_dispatch`; group_sizes [E]
    rows per expert) through the experts' gate_up and SwiGLU and down grouped matmuls, reading the
    experts at `first` in their stacks (arrays, or Fp8s of them: weight-only)."""
    rows = _dispatch(tokens, order, rank)
    (gate_up, gate_up_scale), (down, down_scale) = _kernel_operands(gate_up), _kernel_operands(down)
    out = pallas_kernels.gmm_swiglu(rows, gate_up, group_sizes, group_offset=first, **gate_up_scale)
    return pallas_kernels.gmm(out, down, group_sizes, group_offset=first, **down_scale)


def _dispatch(tokens, order, rank):
    """tokens [N, hidden], order [N k] (the pairs in expert order, pair n k + j token n's j-th) and
    its inverse rank -> [N k, hidden]: row p is the token of pair order[p] (`take_rows`). The
    gradient gathers where autodiff's would scatter-add (atomics on the GPU): token n's is the
    float32 sum of its pairs' rows' gradients, found at rank[n k + j]."""
    return _copies_in_order(tokens, order, rank, order.shape[0] // tokens.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _copies_in_order(tokens, order, rank, k: int):
    return pallas_kernels.take_rows(tokens, order // k)


def _dispatch_forward(tokens, order, rank, k):
    return _copies_in_order(tokens, order, rank, k), rank


def _dispatch_backward(k, rank, cotangent):
    pairs = cotangent[rank].reshape(-1, k, cotangent.shape[-1]).astype(jnp.float32)
    return jnp.sum(pairs, axis=1).astype(cotangent.dtype), None, None


_copies_in_order.defvjp(_dispatch_forward, _dispatch_backward)


@jax.custom_vjp
def _permuted(x, permutation, inverse):
    """x [P, ...] -> x[permutation], with the gradient gathered through the inverse permutation
    (autodiff's would scatter)."""
    return x[permutation]


_permuted.defvjp(lambda x, permutation, inverse: (x[permutation], inverse),
                 lambda inverse, cotangent: (cotangent[inverse], None, None))


def _fp8_row_products(tokens, order, rank, group_sizes, first, gate_up, down):
    """`_products` with FP8 weights (Fp8s) multiplying FP8 rows: each token quantized once, before
    its top_k copies (which then move half the bytes), and the SwiGLU output per row (bf16, the
    kernel's SwiGLU epilogue). Down's sums are rounded to bf16 for a bf16 model, else to float32
    and then to tokens' dtype (the kernel writes bf16 or float32)."""
    values, row_scale = pallas_kernels.quantize_rows(tokens)
    source = order // (order.shape[0] // tokens.shape[0])
    rows = pallas_kernels.take_rows(values, source)
    out = pallas_kernels.gmm_swiglu(rows, gate_up.values, group_sizes, group_offset=first, scale=gate_up.scale,
                                    lhs_scale=row_scale[source])
    values, row_scale = pallas_kernels.quantize_rows(out)
    out = pallas_kernels.gmm(values, down.values, group_sizes, group_offset=first, scale=down.scale,
                             lhs_scale=row_scale, preferred_element_type=jnp.promote_types(tokens.dtype, jnp.bfloat16))
    return out.astype(tokens.dtype)


def gathered_outputs(tokens, ids, gate_up, down):
    """-> [N, k, hidden], reading only the chosen experts' weights (pair n k + j takes token n)."""
    (gate_up, first), (down, _) = _one_stack(gate_up), _one_stack(down)
    return _matvecs(tokens, ids + first, gate_up, down)


def _matvecs(tokens, ids, gate_up, down):
    """-> [N, k, hidden]: pair n k + j through matrices ids[n, j] of gate_up and down: stacks, or
    lists of stacks that ids address as one (`pallas_kernels.matvec` takes them as a tuple); each
    an array or an Fp8 of them. tokens: an array or a `Normed` (the kernel normalises the rows)."""
    N, k = ids.shape
    pairs = ids.reshape(-1)
    rows, norm = norm_operands(tokens)
    (gate_up, gate_up_scale), (down, down_scale) = (_kernel_operands(*w) if isinstance(w, list) else
                                                    _kernel_operands(w) for w in (gate_up, down))
    out = pallas_kernels.matvec(rows[:, None], gate_up, pairs, **gate_up_scale, **norm).astype(tokens.dtype)
    out = pallas_kernels.matvec(swiglu(out), down, pairs, **down_scale).astype(tokens.dtype)   # [N k, 1, hidden]
    return out.reshape(N, k, out.shape[-1])


def _as_stack(w):
    """A matrix [K, N] (an array or a StackSlice; or an Fp8 of them) as one of a stack: [1, K, N],
    or the StackSlice of [n, 1, K, N]."""
    if isinstance(w, Fp8):
        return Fp8(_as_stack(w.values), _as_stack(w.scale))
    if isinstance(w, StackSlice):
        return StackSlice(w.stack[:, None], w.index)
    return w[None]


class Experts(nnx.Module):
    """The routed experts, stacked: gate_up_proj [E, hidden, 2 I] (gate then up); down_proj [E, I,
    hidden]. After `quantize`: FP8 values [E, 2 I, hidden] and [E, hidden, I] with their scales
    gate_up_proj_scale [E, 2 I] and down_proj_scale [E, hidden] (`ring_jax.quantization`); fp8_rows:
    then the grouped matmuls quantize their rows too (`expert_outputs`)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs,
                 fp8_rows: bool = False):
        self.fp8_rows = fp8_rows
        def init(shape, fan_in, axes):
            return param((jax.random.normal(rngs.params(), shape) / fan_in ** 0.5).astype(dtype), axes)

        self.gate_up_proj = init((num_experts, hidden, 2 * intermediate), hidden, ("experts", "embed", "expert_mlp"))
        self.down_proj = init((num_experts, intermediate, hidden), intermediate, ("experts", "expert_mlp", "embed"))
        self.gate_up_proj_scale = nnx.data(None)
        self.down_proj_scale = nnx.data(None)

    def quantize(self) -> None:
        """Makes both stacks FP8 (`ring_jax.layers.linear.quantized_params`), in place."""
        for name in ("gate_up_proj", "down_proj"):
            variable = getattr(self, name)
            values, scale = quantized_params(variable, variable.get_metadata()["out_sharding"])
            setattr(self, name, values)
            setattr(self, scale_name(name), scale)

    def weights(self) -> tuple:
        """(gate_up, down): each the stack's value (an array or a StackSlice), or after `quantize`
        an Fp8 of the values and scales."""
        if self.gate_up_proj_scale is None:
            return self.gate_up_proj.get_value(), self.down_proj.get_value()
        return tuple(Fp8(getattr(self, name).get_value(), getattr(self, scale_name(name)).get_value())
                     for name in ("gate_up_proj", "down_proj"))

    def __call__(self, tokens: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
        """tokens: [N, hidden]; ids, weights: [N, k] -> the weighted sum of each token's pairs'
        outputs [N, hidden] (`combined_outputs`; with experts split over a mesh axis,
        `expert_outputs` and `combine`). Under a mesh: per (batch shard, expert
        shard) block, the pairs' outputs brought together over `expert` (module docstring)."""
        gate_up, down = self.weights()
        if not in_mesh():
            return combined_outputs(tokens, ids, weights, gate_up, down, self.fp8_rows)
        arrays = [gate_up, down] if self.gate_up_proj_scale is None else [gate_up.values, gate_up.scale,
                                                                          down.values, down.scale]
        index = arrays[0].index if isinstance(arrays[0], StackSlice) else 0
        stacks = [a.stack if isinstance(a, StackSlice) else a[None] for a in arrays]   # one layer: a stack of one
        E = stacks[0].shape[1]
        axis = mesh_axis("experts", E)

        def layer(stacks, index):
            entries = [StackSlice(s, index) for s in stacks]
            return entries if len(entries) == 2 else [Fp8(*entries[:2]), Fp8(*entries[2:])]

        gathered = backends.experts_gather(tokens, ids, *layer(stacks, index), expert_parallel=axis is not None)

        def block(tokens, ids, weights, index, *stacks):
            if axis is None:
                return combined_outputs(tokens, ids, weights, *layer(stacks, index), self.fp8_rows, gathered)
            out = expert_outputs(tokens, ids, *layer(stacks, index), expert_axis=axis, gathered=gathered,
                                 fp8_rows=self.fp8_rows)
            if tokens.shape[0] < SCATTER_MIN_TOKENS:
                return combine(jax.lax.psum(out, axis), weights)
            return scattered_combine(out, weights, axis)

        return on_blocks(block, tokens, ids, weights, jnp.asarray(index, jnp.int32), *stacks,
                         layouts=("b.", "b.", "b.", "") + tuple(".e" + "." * (s.ndim - 2) for s in stacks),
                         out="b.", batch=tokens.shape[0], experts=E)


# From this many tokens per device block, the pairs' outputs come back by reduce-scatter, combine
# and all-gather instead of a psum (module docstring): where the scatter was measured faster on two
# GPUs (docs/PERFORMANCE.md).
SCATTER_MIN_TOKENS = 256


@jax.checkpoint          # the backward pass upcasts out again rather than keep its float32 copy
def combine(out: jax.Array, weights: jax.Array) -> jax.Array:
    """out: [N, k, hidden]; weights: [N, k] float32 -> [N, hidden] in out's dtype: the weighted sum
    in float32, then rounded once (HF moe_infer)."""
    return jnp.sum(out.astype(jnp.float32) * weights[..., None], axis=1).astype(out.dtype)


@jax.custom_vjp
def _combine_in_expert_order(out, order, rank, weights):
    """combine(out[rank].reshape(N, k, hidden), weights): out [N k, hidden] in expert order, order
    and rank as `_outputs_in_expert_order`'s; weights [N, k]. The backward pass keeps out as it is,
    in expert order, and its gradients gather: out's, [N k, hidden], in expert order from the
    cotangent's rows; the weights', from out's rows in token order. Autodiff would keep a token-order
    copy of out and scatter. (A custom VJP: forward-mode autodiff, jax.jvp, does not go through it.)"""
    N, k = weights.shape
    return combine(out[rank].reshape(N, k, -1), weights)


def _combine_in_expert_order_forward(out, order, rank, weights):
    return _combine_in_expert_order(out, order, rank, weights), (out, order, rank, weights)


def _combine_in_expert_order_backward(residuals, cotangent):
    out, order, rank, weights = residuals
    N, k = weights.shape
    g = cotangent.astype(jnp.float32)                                                   # [N, hidden]
    d_weights = jnp.sum(g[:, None] * out[rank].reshape(N, k, -1).astype(jnp.float32), axis=-1)
    d_out = (g[order // k] * weights.reshape(-1)[order, None]).astype(out.dtype)       # [N k, hidden]
    return d_out, None, None, d_weights.astype(weights.dtype)


_combine_in_expert_order.defvjp(_combine_in_expert_order_forward, _combine_in_expert_order_backward)


def scattered_combine(out, weights, axis):
    """Inside shard_map: out [N, k, hidden] (each pair nonzero on one device of `axis`), weights
    [N, k] -> [N, hidden]: reduce-scatter over the tokens, combine, all-gather."""
    N, n = out.shape[0], jax.lax.axis_size(axis)
    pad = -N % n
    out = jnp.pad(out, ((0, pad), (0, 0), (0, 0)))
    shard = jax.lax.psum_scatter(out, axis, scatter_dimension=0, tiled=True)           # [(N + pad) / n, k, hidden]
    rows = shard.shape[0]
    weights = jax.lax.dynamic_slice_in_dim(jnp.pad(weights, ((0, pad), (0, 0))), jax.lax.axis_index(axis) * rows, rows)
    return jax.lax.all_gather(combine(shard, weights), axis, axis=0, tiled=True)[:N]


class MoE(nnx.Module):
    """Routed experts plus the shared expert (if any); HF names: gate, experts, shared_experts."""

    def __init__(self, config: RingConfig, *, dtype, rngs: nnx.Rngs):
        self.gate = Router(config, dtype=dtype, rngs=rngs)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                               dtype=dtype, rngs=rngs, fp8_rows=config.fp8_activations == "grouped")
        width = config.shared_expert_intermediate_size
        self.shared_experts = MLP(config.hidden_size, width, dtype=dtype, rngs=rngs) if width else None

    def __call__(self, x) -> jax.Array:
        """x: [B, T, hidden], an array or a `Normed` -> [B, T, hidden]."""
        tokens = x.reshape(-1, x.shape[-1])                                          # [N, hidden]
        ids, weights = self.gate(tokens)                                             # [N, k]
        gate_up, down = self.experts.weights()
        shared = self.shared_experts
        plain = shared is not None and shared.gate_up_proj.lora is None and shared.down_proj.lora is None
        if backends.shared_expert_joins(tokens, ids, gate_up, down, (
                shared.gate_up_proj.weight(), shared.down_proj.weight()) if plain else None):
            # One matvec call per product for the routed pairs and the shared expert: pair k of
            # each token reads the shared matrix, which follows every routed one in the tuples.
            (gate_up, first), (down, _) = _one_stack(gate_up), _one_stack(down)
            (shared_gate_up, mine), (shared_down, _) = (_one_stack(_as_stack(w.weight()))
                                                         for w in (shared.gate_up_proj, shared.down_proj))
            ids = jnp.concatenate([ids + first, jnp.full((ids.shape[0], 1), _count(gate_up) + mine, ids.dtype)],
                                  axis=1)
            out = _matvecs(tokens, ids, [gate_up, shared_gate_up], [down, shared_down])   # [N, k + 1, hidden]
            return (combine(out[:, :-1], weights) + out[:, -1]).reshape(x.shape)
        tokens = read(tokens)
        routed = self.experts(tokens, ids, weights)                                  # [N, hidden]
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(tokens)
        return routed.reshape(x.shape)
