"""Entry point of the router's expert selection; `backend` picks the implementation.

"auto": on Hopper GPUs the Pallas Triton kernel when it takes the router's sizes (`gpu.fits`);
the jnp reference otherwise.
"""

import jax.numpy as jnp

from pallas_kernels.platform import platform
from pallas_kernels.router import reference

BACKENDS = ("reference", "gpu")


def select_experts(scores, bias, *, top_k, n_group, topk_group, scaling=1.0, backend="auto",
                   interpret=False):
    """The group-limited top-k of SPEC.md §7.1; see `reference.select_experts` for the math.

    scores: [N, E] float32, the sigmoids of the router logits; bias: [E] float32.
    Returns (ids [N, top_k] int32, weights [N, top_k] float32).
    interpret: run the GPU kernel in Pallas interpret mode (CPU tests).
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    N, E = scores.shape
    if scores.dtype != jnp.float32 or bias.dtype != jnp.float32 or bias.shape != (E,):
        raise ValueError(f"select_experts: scores [{N}, {E}] and bias [{E}] must be float32, got "
                         f"{scores.dtype} {scores.shape} and {bias.dtype} {bias.shape}")
    if (n_group < 1 or E % n_group or E // n_group < 2 or not 0 < topk_group <= n_group
            or not 0 < top_k <= topk_group * (E // n_group)):
        raise ValueError(f"select_experts: {E} experts in {n_group} groups (of at least 2) cannot give "
                         f"top_k={top_k} from topk_group={topk_group} groups")
    if N == 0:
        return jnp.zeros((0, top_k), jnp.int32), jnp.zeros((0, top_k), jnp.float32)
    forced = interpret or backend == "gpu"
    if forced or (backend == "auto" and platform() == "hopper"):
        from pallas_kernels.router import gpu

        if gpu.fits(E, top_k, n_group):
            return gpu.select_experts(scores, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                      scaling=float(scaling), interpret=interpret)
        if forced:
            raise NotImplementedError(f"the gpu kernel takes power-of-two group sizes and top_k (got {E} "
                                      f"experts in {n_group} groups, top_k={top_k}); use backend='reference'")
    return reference.select_experts(scores, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                    scaling=scaling)
