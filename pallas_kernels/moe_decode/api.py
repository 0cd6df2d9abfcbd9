"""Entry point of one decode token's MoE block in one kernel; `backend` picks the implementation.

A batch-1 decode step runs each MoE layer as about eight small dependent launches (the router's
product with its norm, its sums and sigmoids, the selection, the routed and shared experts' gate_up
and down matvecs and the sums and SwiGLU and combine between them). Backends
(`pallas_kernels.backend`): "gpu", a persistent Pallas Triton kernel that runs them all in one
launch (`gpu.py`) for FP8 experts (`pallas_kernels.backend.FP8`); and the jnp reference. "auto"
takes the reference: on an H100 the kernel streams the experts more slowly than the launches it
replaces (docs/PERFORMANCE.md, "One decode token's MoE block in one kernel"), so the model does
not call it yet, and it runs when named (backend="gpu").
"""

import jax.numpy as jnp

from pallas_kernels.backend import FP8, Kernel, resolve, with_reference_gradient
from pallas_kernels.moe_decode import reference


def _gpu(K, I, E, router_dtype, top_k, n_group):
    def answer():
        from pallas_kernels.moe_decode import gpu

        if gpu.fits(K, I, E, router_dtype, top_k, n_group):
            return Kernel(auto=False)
        return Kernel(f"takes power-of-two sizes (hidden {K}, expert width {I}, {E} experts in {n_group} groups, "
                      f"top_k {top_k}), the width a multiple of {gpu.TILES.block_n} and the hidden size of "
                      f"{gpu.TILES.block_d} and of the router tile's rows")
    return answer


def moe_decode_backend(router, gate_up, top_k, n_group, backend="auto") -> str:
    """The backend `moe_decode` runs for these operands: "gpu" or "reference"."""
    K, E = router.shape[-2:]
    return resolve(backend, gpu=_gpu(K, gate_up[0].shape[1] // 2, E, router.dtype, top_k, n_group))


def moe_decode(x, norm_weight, router, bias, gate_up, gate_up_scale, down, down_scale, index, *, eps, top_k,
               n_group, topk_group, scaling=1.0, bias_rounding=None, backend="auto", interpret=False):
    """One token's MoE block: RMSNorm, the router's sigmoid group-limited selection, the chosen
    experts and the shared expert, the weighted combine (docs/SPEC.md §7), each step rounded as the
    model rounds it op by op (`reference.moe_decode`).

    x: [1, K], the hidden state before the block's RMSNorm; norm_weight: [L, K]; router: [L, K, E]
    (model dtype); bias: [L, E] float32 (rounded to bias_rounding and back first, unless None).
    gate_up: (routed [R, 2 I, K], shared [S, 2 I, K]) and down: (routed [R, K, I], shared [S, K,
    I]), FP8 stacks (K-major, every layer's experts), with their scales gate_up_scale ([R, 2 I],
    [S, 2 I]) and down_scale ([R, K], [S, K]) float32. index: [5] int32: the layer's entries in
    norm_weight, router and bias; its first expert in the routed stacks; its shared expert's matrix
    in the shared stacks; the chosen experts' entries (first plus an id) must lie in the routed
    stacks (others are undefined: the kernel does not check them).
    Returns (out [1, K] in x's dtype: the routed experts' combine plus the shared expert, before
    the residual add; ids [top_k] int32 and weights [top_k] float32, the selection).
    backend, interpret: `pallas_kernels.backend`.
    """
    K = x.shape[-1]
    L, _, E = router.shape
    R, I2, _ = gate_up[0].shape
    expect = {"x": ((1, K), x.shape), "norm_weight": ((L, K), norm_weight.shape), "router": ((L, K, E), router.shape),
              "bias": ((L, E), bias.shape), "gate_up routed": ((R, I2, K), gate_up[0].shape),
              "gate_up shared": ((gate_up[1].shape[0], I2, K), gate_up[1].shape),
              "down routed": ((R, K, I2 // 2), down[0].shape),
              "down shared": ((gate_up[1].shape[0], K, I2 // 2), down[1].shape),
              "gate_up_scale": (((R, I2), (gate_up[1].shape[0], I2)), tuple(s.shape for s in gate_up_scale)),
              "down_scale": (((R, K), (gate_up[1].shape[0], K)), tuple(s.shape for s in down_scale)),
              "index": ((5,), jnp.shape(index))}
    for name, (want, got) in expect.items():
        if tuple(want) != tuple(got):
            raise ValueError(f"moe_decode: {name} must be {want}, got {got}")
    if any(jnp.dtype(w.dtype) != FP8 for w in (*gate_up, *down)) or any(
            jnp.dtype(s.dtype) != jnp.float32 for s in (*gate_up_scale, *down_scale, bias)):
        raise ValueError("moe_decode: the experts must be FP8 (float8_e4m3fn) with float32 scales, and the bias "
                         "float32")
    kind = resolve(backend, interpret, gpu=_gpu(K, I2 // 2, E, router.dtype, top_k, n_group))
    settings = dict(eps=eps, top_k=top_k, n_group=n_group, topk_group=topk_group, scaling=float(scaling),
                    rounding=bias_rounding)
    operands = (x, norm_weight, router, bias, tuple(gate_up), tuple(gate_up_scale), tuple(down), tuple(down_scale),
                jnp.asarray(index, jnp.int32))

    def ref(*args):
        return reference.moe_decode(*args, **settings)
    if kind == "gpu":
        from pallas_kernels.moe_decode import gpu

        def kernel(*args):
            return gpu.moe_decode(*args, **settings, interpret=interpret)
        return with_reference_gradient(kernel, ref)(*operands)
    return ref(*operands)
