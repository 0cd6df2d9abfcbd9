"""Plain-jnp reference of `select_experts`: the group-limited top-k of docs/SPEC.md §7.1.

Small inputs (a decode step) compare all pairs of scores, a few fused reductions; larger ones call
`lax.top_k`. Both give lax.top_k's picks in its order.
"""

import jax
import jax.numpy as jnp

# Up to this many comparisons (rows x n x n: a decode step of up to 16 tokens) the selections
# compare all pairs of scores instead of calling lax.top_k, which XLA:GPU lowers to a sort per
# selection. Past it the comparisons cost more than the sorts (and compile slowly at prefill's row
# counts).
COMPARE_TOP_K_MAX = 1 << 20


def select_experts(scores, bias, *, top_k, n_group, topk_group, scaling):
    """scores: [N, E] float32 (the router's sigmoids); bias: [E] float32 -> (ids [N, top_k] int32,
    weights [N, top_k] float32).

    The experts are chosen on scores + bias: the `topk_group` groups (of E / n_group contiguous
    experts) whose two best entries sum highest, then the `top_k` best experts inside them, in
    descending order, ties to the lower index. The weights are the chosen experts' scores without
    the bias, divided by their sum plus 1e-20 when top_k > 1, times `scaling`.
    """
    s = scores + bias
    N, E = s.shape
    grouped = s.reshape(N, n_group, E // n_group)
    group_score = jnp.sum(jnp.where(in_top_k(grouped, 2), grouped, 0.0), axis=-1)       # [N, n_group]
    keep = in_top_k(group_score, topk_group)
    masked = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(N, E)
    ids = top_k_indices(masked, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if top_k > 1:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return ids, weights * scaling


def order_key(s: jax.Array) -> jax.Array:
    """float32 -> int32 in the total order of floats (-0.0 below +0.0) as signed integers."""
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def ranks(s: jax.Array) -> jax.Array:
    """s: [..., n] float32 -> [..., n] int32, each entry's place in lax.top_k's order: descending
    in the total order of floats, ties to the lower index."""
    key = order_key(s)
    i = jnp.arange(s.shape[-1])
    other, this = key[..., None, :], key[..., :, None]
    ahead = (other > this) | ((other == this) & (i[None, :] < i[:, None]))
    return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


def _by_comparison(s: jax.Array) -> bool:
    return s.size * s.shape[-1] <= COMPARE_TOP_K_MAX


def in_top_k(s: jax.Array, k: int) -> jax.Array:
    """s: [..., n] float32 -> [..., n] bool, the entries lax.top_k(s, k) picks."""
    if _by_comparison(s):
        return ranks(s) < k
    picked = jax.nn.one_hot(jax.lax.top_k(s, k)[1], s.shape[-1], dtype=jnp.int32)   # [..., k, n]
    return jnp.sum(picked, axis=-2) > 0


def top_k_indices(s: jax.Array, k: int) -> jax.Array:
    """s: [..., n] float32 -> [..., k] int32, lax.top_k(s, k)[1]."""
    if not _by_comparison(s):
        return jax.lax.top_k(s, k)[1].astype(jnp.int32)
    places = ranks(s)[..., None, :] == jnp.arange(k)[:, None]                         # [..., k, n]
    return jnp.sum(jnp.where(places, jnp.arange(s.shape[-1]), 0), axis=-1, dtype=jnp.int32)
