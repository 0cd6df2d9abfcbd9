"""Entry point of the router's expert selection; `backend` picks the implementation.

"auto": on Hopper GPUs the Pallas Triton kernel when it takes the router's sizes (`gpu.fits`);
the jnp reference otherwise.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.platform import platform
from pallas_kernels.router import reference

BACKENDS = ("reference", "gpu")


def select_experts(scores, bias, *, top_k, n_group, topk_group, scaling=1.0, bias_index=None, bias_rounding=None,
                   backend="auto", interpret=False):
    """The group-limited top-k of docs/SPEC.md §7.1; see `reference.select_experts` for the math.

    scores: [N, E] float32, the sigmoids of the router logits; bias: [E] float32, or with
    bias_index (an int or [] int32) a stack [L, E] of which that entry is the layer's (the GPU
    kernel reads it in the stack: inside a scanned decoder a slice would be one more launch per
    layer). bias_rounding: a dtype the bias is rounded to (and back to float32) before use, or None.
    Returns (ids [N, top_k] int32, weights [N, top_k] float32).
    interpret: run the GPU kernel in Pallas interpret mode (CPU tests).
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    N, E = scores.shape
    biases = bias if bias_index is not None else bias[None]
    if scores.dtype != jnp.float32 or biases.dtype != jnp.float32 or biases.ndim != 2 or biases.shape[1] != E:
        raise ValueError(f"select_experts: scores [{N}, {E}] and bias [{E}] (or a stack [L, {E}] with bias_index) "
                         f"must be float32, got {scores.dtype} {scores.shape} and {bias.dtype} {bias.shape}")
    if (n_group < 1 or E % n_group or E // n_group < 2 or not 0 < topk_group <= n_group
            or not 0 < top_k <= topk_group * (E // n_group)):
        raise ValueError(f"select_experts: {E} experts in {n_group} groups (of at least 2) cannot give "
                         f"top_k={top_k} from topk_group={topk_group} groups")
    if N == 0:
        return jnp.zeros((0, top_k), jnp.int32), jnp.zeros((0, top_k), jnp.float32)
    index = 0 if bias_index is None else bias_index
    forced = interpret or backend == "gpu"
    if forced or (backend == "auto" and platform() == "hopper"):
        from pallas_kernels.router import gpu

        if gpu.fits(E, top_k, n_group):
            return gpu.select_experts(scores, biases, index, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                      scaling=float(scaling), rounding=bias_rounding, interpret=interpret)
        if forced:
            raise NotImplementedError(f"the gpu kernel takes power-of-two group sizes and top_k (got {E} "
                                      f"experts in {n_group} groups, top_k={top_k}); use backend='reference'")
    bias = jax.lax.dynamic_index_in_dim(biases, jnp.asarray(index, jnp.int32), keepdims=False)
    if bias_rounding is not None:
        bias = bias.astype(bias_rounding).astype(jnp.float32)
    return reference.select_experts(scores, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                    scaling=scaling)
