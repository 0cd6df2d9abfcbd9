"""Entry point of the few-row matmul kernel; `backend` picks the implementation.

A decode step multiplies a handful of rows by each weight matrix. XLA:GPU rewrites a product of a
vector and a matrix under 10M elements into a multiply and a reduce, and runs the larger ones
through GEMM tilings built for many rows; both stream the weights well below the copy bandwidth
(docs/PERFORMANCE.md). The GPU kernel streams them with the whole chip. With `ids`, each row
group reads its own matrix of a stack: a decode step's routed experts without sorting the pairs.
With `scale`, the weights are FP8 (`pallas_kernels.backend.FP8`): half the bytes to stream.

Backends (`pallas_kernels.backend`): "gpu", the Pallas Triton kernel, which "auto" takes on Hopper
GPUs for at most `gpu.MAX_ROWS` rows and matrices of at most `gpu.MAX_WEIGHT_ELEMENTS` (FP8 ones of
any size); and the jnp reference (on a TPU too, where XLA's own matrix-vector products are used).
"""

import jax.numpy as jnp

from pallas_kernels.backend import FP8, Kernel, matrix_shape, resolve, with_reference_gradient
from pallas_kernels.matvec import reference


def _gpu(x, w, norm_weight=None, scale=None):
    def answer():
        from pallas_kernels.matvec import gpu

        if not gpu.fits(x, w, norm_weight, scale):
            stacks = w if isinstance(w, tuple) else (w,)
            K, N = matrix_shape(stacks[0])
            norm = "" if norm_weight is None else f", with a norm K a power of two and its weight of x's dtype " \
                                                   f"(got {norm_weight.dtype})"
            scaled = "" if scale is None else " with a scale"
            return Kernel(f"takes bf16 or float32 operands, or FP8 weights with their scale, with K % "
                          f"{gpu.block_k(stacks[0].dtype)} == 0 and N % {gpu.BLOCK_N} == 0{norm} "
                          f"(got {x.dtype} x {stacks[0].dtype}{scaled}, K={K}, N={N})")
        return Kernel(auto=gpu.supports(x, w, norm_weight, scale))
    return answer


def matvec_backend(x, w, norm_weight=None, backend="auto", scale=None) -> str:
    """The backend `matvec` runs for these operands (w: a stack or a tuple of stacks; norm_weight:
    None, or the norm's weight or stack of weights; scale: None, or FP8 weights' scales): "gpu" or
    "reference"."""
    return resolve(backend, gpu=_gpu(x, w, norm_weight, scale))


def matvec(x, w, ids=None, *, scale=None, norm_weight=None, norm_index=None, norm_eps=None, backend="auto",
           interpret=False):
    """Row groups times weight matrices, accumulated in float32; optionally x's rows RMS-normalised
    first.

    x: [X, M, K], X groups of M rows (M small: a decode step's tokens); w: [E, K, N], or a tuple of
    such stacks (one K, N and dtype), which ids address as one stack of their concatenation
    without concatenating them (the routed experts and the shared expert in one call);
    ids: [P] int32 in [0, E) (others are undefined: each backend does something else), the
    matrix of each output group, P a multiple of X; output group p takes the rows x[p // (P / X)]
    (so a token's top-k experts share its row). None: one output group per x group, and w must
    hold one matrix.
    Returns [P, M, N] float32: out[p] = x[p // (P / X)] @ w[ids[p]]. Products of bf16 are exact
    in float32; a float32 operand makes it a full-precision float32 product. The caller rounds.
    scale: None; or FP8 weights (`pallas_kernels.backend.FP8`): every stack of w is float8_e4m3fn
    [E, N, K] (K-major) and scale is its [E, N] float32 scales (a tuple of stacks like w's,
    addressed by ids as one); out[p] = (x[p // (P / X)] @ w[ids[p]].T, accumulated in float32) *
    scale[ids[p]]. The fp8 values are exact in x's dtype, so only the scale rounds (in float32).
    norm_weight: None; or [K] (or a stack [L, K] of which entry norm_index, [] int32, is used), and
    the product takes `reference.rms_norm(x, weight, norm_eps)` in place of x: HF RMSNorm, every
    step rounded to x's dtype as the reference rounds it (the kernel takes a weight of x's dtype).

    backend, interpret: `pallas_kernels.backend`.
    """
    stacks = w if isinstance(w, tuple) else (w,)
    X, M, K = x.shape
    K_w, N = matrix_shape(stacks[0])
    if K_w != K:
        layout = "[E, N, K], FP8" if jnp.dtype(stacks[0].dtype) == FP8 else "[E, K, N]"
        raise ValueError(f"matvec: x is [{X}, {M}, {K}] but w is {list(stacks[0].shape)} ({layout}): K differs")
    if any(s.shape[1:] != stacks[0].shape[1:] or s.dtype != stacks[0].dtype for s in stacks):
        raise ValueError(f"matvec: the stacks {[(s.shape, str(s.dtype)) for s in stacks]} differ in K, N or dtype")
    _check_scale(w, scale)
    E = sum(s.shape[0] for s in stacks)
    if ids is None:
        if E != 1:
            raise ValueError(f"matvec: w stacks {E} matrices; pass ids")
        ids = jnp.zeros((X,), jnp.int32)
    if ids.ndim != 1 or (ids.shape[0] % X if X else ids.shape[0]):
        raise ValueError(f"matvec: ids must be [P] with P a multiple of {X}, got {ids.shape}")
    ids = ids.astype(jnp.int32)
    norm = ()
    if norm_weight is not None:
        if norm_eps is None:
            raise ValueError("matvec: a norm needs its norm_eps")
        weights = norm_weight[None] if norm_index is None else norm_weight
        if weights.ndim != 2 or weights.shape[1] != K:
            raise ValueError(f"matvec: norm_weight {norm_weight.shape} must be [{K}], or a stack [L, {K}] with norm_index")
        norm = (weights, jnp.asarray(0 if norm_index is None else norm_index, jnp.int32))
    kind = resolve(backend, interpret, gpu=_gpu(x, w, norm_weight, scale))
    if ids.shape[0] == 0:
        return jnp.zeros((0, M, N), jnp.float32)

    def ref(x, w, ids, scale, *norm):
        return reference.matvec(x, w, ids, *norm, scale=scale, eps=norm_eps)
    if kind == "gpu":
        from pallas_kernels.matvec import gpu

        def kernel(x, w, ids, scale, *norm):
            return gpu.matvec(x, w, ids, *norm, scale=scale, eps=norm_eps, interpret=interpret)
        return with_reference_gradient(kernel, ref)(x, w, ids, scale, *norm)
    return ref(x, w, ids, scale, *norm)


def _check_scale(w, scale):
    """A ValueError unless w is FP8 with scale its float32 [E, N] scales (a tuple of stacks like
    w's), or w is not FP8 and scale is None."""
    stacks = w if isinstance(w, tuple) else (w,)
    fp8 = jnp.dtype(stacks[0].dtype) == FP8
    if scale is None:
        if fp8:
            raise ValueError("matvec: FP8 (float8_e4m3fn) weights need their scale: pass scale, [E, N] float32")
        return
    if not fp8:
        raise ValueError(f"matvec: scale is for FP8 (float8_e4m3fn) weights, not {stacks[0].dtype}")
    scales = scale if isinstance(scale, tuple) else (scale,)
    if (isinstance(scale, tuple) != isinstance(w, tuple) or len(scales) != len(stacks)
            or any(c.shape != s.shape[:2] or jnp.dtype(c.dtype) != jnp.float32 for c, s in zip(scales, stacks))):
        raise ValueError(f"matvec: scale {[(c.shape, str(c.dtype)) for c in scales]} must be float32 [E, N] for "
                         f"each stack of w {[s.shape for s in stacks]}, in a tuple where w is one")
