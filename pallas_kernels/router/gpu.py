"""The router's expert selection on CUDA GPUs: a Pallas kernel through the Triton lowering.

One program per token: it loads the token's scores as [n_group, E / n_group], picks each group's
two best, the best groups, then the best experts one at a time (a maximum, then the lowest index
holding it, over all E as one row), and writes the ids and normalised weights. Every comparison
is on the scores' total order as integers (`reference.order_key`), so the picks are lax.top_k's,
ties included. XLA runs the same selection as 3 sorts (or, for a few tokens, as about 7 chained
reductions), each its own kernel; here it is one launch.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import power_of_two
from pallas_kernels.router.reference import order_key

# One warp: a token's picks are chains of reductions over its E scores, and within one warp each is
# a few shuffles with no barrier; fastest of 1, 2 and 4 at 1 to 4096 tokens (docs/PERFORMANCE.md).
NUM_WARPS = 1
_EXCLUDED = jnp.iinfo(jnp.int32).min     # below every score's key, -inf's included


def fits(E: int, top_k: int, n_group: int) -> bool:
    """Whether the kernel takes this router: Triton blocks need power-of-two sizes."""
    return power_of_two(n_group) and E % n_group == 0 and power_of_two(E // n_group) and power_of_two(top_k)


def _pick(key, index, size):
    """key, index: [a, b] int32 -> [1, 1] int32, the lowest index holding the largest key."""
    best = jnp.max(jnp.max(key, axis=1, keepdims=True), axis=0, keepdims=True)
    return jnp.min(jnp.min(jnp.where(key == best, index, size), axis=1, keepdims=True), axis=0, keepdims=True)


def choose(scores, bias, *, top_k, topk_group, scaling, rounding):
    """scores, bias: [G, g] float32 (one token's, by group; bias rounded to `rounding` and back
    first, unless None) -> (ids [1, top_k] int32, weights [1, top_k] float32), inside a kernel."""
    if rounding is not None:
        bias = bias.astype(rounding).astype(jnp.float32)
    biased = scores + bias
    key = order_key(biased)
    G, g = scores.shape
    column = jnp.arange(g, dtype=jnp.int32)[None, :]                      # [1, g]
    group = jnp.arange(G, dtype=jnp.int32)[:, None]                       # [G, 1]

    # Each group's score: the sum of its two best entries of scores + bias.
    best1 = jnp.max(key, axis=1, keepdims=True)
    first = jnp.min(jnp.where(key == best1, column, g), axis=1, keepdims=True)
    rest = jnp.where(column == first, _EXCLUDED, key)
    best2 = jnp.max(rest, axis=1, keepdims=True)
    second = jnp.min(jnp.where(rest == best2, column, g), axis=1, keepdims=True)
    two = (column == first) | (column == second)
    group_score = jnp.sum(jnp.where(two, biased, 0.0), axis=1, keepdims=True)   # [G, 1]

    # The best groups.
    group_key = order_key(group_score)
    keep = group < 0                                                       # [G, 1] all False
    for _ in range(topk_group):
        chosen = group == _pick(group_key, group, G)
        keep = keep | chosen
        group_key = jnp.where(chosen, _EXCLUDED, group_key)

    # The best experts of those groups, in descending order, on the scores as one row [1, G g]: a
    # pick is two reductions (the largest key, then the lowest index holding it).
    E = G * g
    key = jnp.where(keep, key, order_key(jnp.full_like(scores, -jnp.inf))).reshape(1, E)
    expert = jnp.arange(E, dtype=jnp.int32)[None, :]                     # [1, E]
    slot = jnp.arange(top_k, dtype=jnp.int32)[:, None]                   # [top_k, 1]
    ids = jnp.zeros((top_k, 1), jnp.int32)
    for j in range(top_k):
        best = jnp.max(key, axis=1, keepdims=True)                         # [1, 1]
        pick = jnp.min(jnp.where(key == best, expert, E), axis=1, keepdims=True)
        ids = jnp.where(slot == j, pick, ids)
        key = jnp.where(expert == pick, _EXCLUDED, key)
    # Their scores, all in one reduction: each row holds one expert's score and zeros.
    weights = jnp.sum(jnp.where(expert == ids, scores.reshape(1, E), 0.0), axis=1, keepdims=True)
    ids, weights = ids.reshape(1, top_k), weights.reshape(1, top_k)
    if top_k > 1:
        weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + 1e-20)
    return ids, weights * scaling


def _kernel(scores_ref, bias_ref, index_ref, ids_ref, weights_ref, **selection):
    ids_ref[...], weights_ref[...] = choose(scores_ref[...], bias_ref[index_ref[0]], **selection)   # the layer's bias


@functools.partial(jax.jit, static_argnames=("top_k", "n_group", "topk_group", "scaling", "rounding", "interpret"))
def select_experts(scores, biases, index, *, top_k, n_group, topk_group, scaling, rounding=None, interpret=False):
    """scores: [N, E] float32; biases: [L, E] float32, of which entry index ([] int32) is the bias
    (rounded to `rounding` and back, unless None) -> (ids [N, top_k] int32, weights [N, top_k]
    float32) (api.select_experts)."""
    N, E = scores.shape
    G, g = n_group, E // n_group
    row = pl.BlockSpec((None, G, g), lambda n: (n, 0, 0))
    out = pl.BlockSpec((None, 1, top_k), lambda n: (n, 0, 0))
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    ids, weights = pl.pallas_call(
        functools.partial(_kernel, top_k=top_k, topk_group=topk_group, scaling=scaling,
                          rounding=None if rounding is None else jnp.dtype(rounding)),
        grid=(N,),
        in_specs=[row, anywhere, anywhere],
        out_specs=[out, out],
        out_shape=[jax.ShapeDtypeStruct((N, 1, top_k), jnp.int32),
                   jax.ShapeDtypeStruct((N, 1, top_k), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="select_experts",
    )(scores.reshape(N, G, g), biases.reshape(-1, G, g), jnp.reshape(jnp.asarray(index, jnp.int32), (1,)))
    return ids.reshape(N, top_k), weights.reshape(N, top_k)
