"""Entry point of the few-row matmul kernel; `backend` picks the implementation.

A decode step multiplies a handful of rows by each weight matrix. XLA:GPU rewrites a product of a
vector and a matrix under 10M elements into a multiply and a reduce, and runs the larger ones
through GEMM tilings built for many rows; both stream the weights well below the copy bandwidth
(docs/PERFORMANCE.md). The GPU kernel streams them with the whole chip. With `ids`, each row
group reads its own matrix of a stack: a decode step's routed experts without sorting the pairs.

Backends (`pallas_kernels.backend`): "gpu", the Pallas Triton kernel, which "auto" takes on Hopper
GPUs for at most `gpu.MAX_ROWS` rows and matrices of at most `gpu.MAX_WEIGHT_ELEMENTS`; and the jnp
reference (on a TPU too, where XLA's own matrix-vector products are used).
"""

import jax.numpy as jnp

from pallas_kernels.backend import Kernel, resolve, with_reference_gradient
from pallas_kernels.matvec import reference


def _gpu(x, w):
    def answer():
        from pallas_kernels.matvec import gpu

        if not gpu.fits(x, w):
            stacks = w if isinstance(w, tuple) else (w,)
            K, N = stacks[0].shape[-2:]
            return Kernel(f"takes bf16 or float32 operands with K % {gpu.block_k(stacks[0].dtype)} == 0 and N % "
                          f"{gpu.BLOCK_N} == 0 (got {x.dtype} x {stacks[0].dtype}, K={K}, N={N})")
        return Kernel(auto=gpu.supports(x, w))
    return answer


def matvec_backend(x, w, backend="auto") -> str:
    """The backend `matvec` runs for these operands (w: a stack or a tuple of stacks): "gpu" or
    "reference"."""
    return resolve(backend, gpu=_gpu(x, w))


def matvec(x, w, ids=None, *, backend="auto", interpret=False):
    """Row groups times weight matrices, accumulated in float32.

    x: [X, M, K], X groups of M rows (M small: a decode step's tokens); w: [E, K, N], or a tuple of
    such stacks (one K, N and dtype), which ids address as one stack of their concatenation
    without concatenating them (the routed experts and the shared expert in one call);
    ids: [P] int32 in [0, E) (others are undefined: each backend does something else), the
    matrix of each output group, P a multiple of X; output group p takes the rows x[p // (P / X)]
    (so a token's top-k experts share its row). None: one output group per x group, and w must
    hold one matrix.
    Returns [P, M, N] float32: out[p] = x[p // (P / X)] @ w[ids[p]]. Products of bf16 are exact
    in float32; a float32 operand makes it a full-precision float32 product. The caller rounds.

    backend, interpret: `pallas_kernels.backend`.
    """
    stacks = w if isinstance(w, tuple) else (w,)
    X, M, K = x.shape
    E, K_w, N = stacks[0].shape
    if K_w != K:
        raise ValueError(f"matvec: x is [{X}, {M}, {K}] but w is [{E}, {K_w}, {N}]: K differs")
    if any(s.shape[1:] != (K, N) or s.dtype != stacks[0].dtype for s in stacks):
        raise ValueError(f"matvec: the stacks {[(s.shape, str(s.dtype)) for s in stacks]} differ in K, N or dtype")
    E = sum(s.shape[0] for s in stacks)
    if ids is None:
        if E != 1:
            raise ValueError(f"matvec: w stacks {E} matrices; pass ids")
        ids = jnp.zeros((X,), jnp.int32)
    if ids.ndim != 1 or (ids.shape[0] % X if X else ids.shape[0]):
        raise ValueError(f"matvec: ids must be [P] with P a multiple of {X}, got {ids.shape}")
    ids = ids.astype(jnp.int32)
    kind = resolve(backend, interpret, gpu=_gpu(x, w))
    if ids.shape[0] == 0:
        return jnp.zeros((0, M, N), jnp.float32)
    if kind == "gpu":
        from pallas_kernels.matvec import gpu

        def kernel(x, w, ids):
            return gpu.matvec(x, w, ids, interpret=interpret)
        return with_reference_gradient(kernel, reference.matvec)(x, w, ids)
    return reference.matvec(x, w, ids)
