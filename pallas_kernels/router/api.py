"""Entry point of the router's expert selection; `backend` picks the implementation.

Backends (`pallas_kernels.backend`): "gpu", the Pallas Triton kernel, which "auto" takes on Hopper
GPUs when it takes the router's sizes (`gpu.fits`); and the jnp reference.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.backend import Kernel, resolve, with_reference_gradient
from pallas_kernels.router import reference


def _gpu(E: int, top_k: int, n_group: int):
    def answer():
        from pallas_kernels.router import gpu

        return Kernel(None if gpu.fits(E, top_k, n_group) else
                      f"takes power-of-two group sizes and top_k (got {E} experts in {n_group} groups, top_k={top_k})")
    return answer


def select_experts(scores, bias, *, top_k, n_group, topk_group, scaling=1.0, bias_index=None, bias_rounding=None,
                   backend="auto", interpret=False):
    """The group-limited top-k of docs/SPEC.md §7.1; see `reference.select_experts` for the math.

    scores: [N, E] float32, the sigmoids of the router logits; bias: [E] float32, or with
    bias_index (an int or [] int32) a stack [L, E] of which that entry is the layer's (the GPU
    kernel reads it in the stack: inside a scanned decoder a slice would be one more launch per
    layer). bias_rounding: a dtype the bias is rounded to (and back to float32) before use, or None.
    Returns (ids [N, top_k] int32, weights [N, top_k] float32).
    backend, interpret: `pallas_kernels.backend`.
    """
    N, E = scores.shape
    biases = bias if bias_index is not None else bias[None]
    if scores.dtype != jnp.float32 or biases.dtype != jnp.float32 or biases.ndim != 2 or biases.shape[1] != E:
        raise ValueError(f"select_experts: scores [{N}, {E}] and bias [{E}] (or a stack [L, {E}] with bias_index) "
                         f"must be float32, got {scores.dtype} {scores.shape} and {bias.dtype} {bias.shape}")
    if (n_group < 1 or E % n_group or E // n_group < 2 or not 0 < topk_group <= n_group
            or not 0 < top_k <= topk_group * (E // n_group)):
        raise ValueError(f"select_experts: {E} experts in {n_group} groups (of at least 2) cannot give "
                         f"top_k={top_k} from topk_group={topk_group} groups")
    kind = resolve(backend, interpret, gpu=_gpu(E, top_k, n_group))
    if N == 0:
        return jnp.zeros((0, top_k), jnp.int32), jnp.zeros((0, top_k), jnp.float32)
    index = jnp.asarray(0 if bias_index is None else bias_index, jnp.int32)

    def ref(scores, biases, index):
        bias = jax.lax.dynamic_index_in_dim(biases, index, keepdims=False)
        if bias_rounding is not None:
            bias = bias.astype(bias_rounding).astype(jnp.float32)
        return reference.select_experts(scores, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                        scaling=scaling)

    if kind == "gpu":
        from pallas_kernels.router import gpu

        def kernel(scores, biases, index):
            return gpu.select_experts(scores, biases, index, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                      scaling=float(scaling), rounding=bias_rounding, interpret=interpret)
        return with_reference_gradient(kernel, ref)(scores, biases, index)
    return ref(scores, biases, index)
