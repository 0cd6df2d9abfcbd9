"""Entry point of the grouped-matmul kernels; `backend` picks the implementation.

"auto": on TPU the Mosaic TPU kernel; on Hopper or newer GPUs the Mosaic GPU kernel when it takes
the operands (bf16, K % 64 == 0, N % 256 == 0); the jnp reference otherwise. "reference", "gpu" and
"tpu" force one (operands a kernel does not take are then an error).

`take_rows`, the dispatch's row gather before the grouped matmuls, has a Pallas Triton kernel on
Hopper GPUs and is XLA's gather elsewhere.
"""

import jax.numpy as jnp
from jax import lax

from pallas_kernels.moe import reference
from pallas_kernels.platform import platform

BACKENDS = ("reference", "gpu", "tpu")

# Below this many rows per group on average, the GPU kernel uses 64-row tiles (decode-sized steps
# compute less of the rows no token fills); above it, 128-row tiles (twice the work per byte).
GPU_SMALL_TILE_ROWS = 64


def gmm_backend(lhs, rhs, preferred_element_type=None, backend="auto") -> str:
    """The backend `gmm` runs for these operands: "gpu", "tpu" or "reference"."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    if backend != "auto":
        return backend
    if platform() == "tpu":
        return "tpu"
    if platform() == "hopper":
        from pallas_kernels.moe import gpu

        if gpu.supports(lhs, rhs, preferred_element_type or lhs.dtype):
            return "gpu"
    return "reference"


def gmm(lhs, rhs, group_sizes, *, group_offset=0, preferred_element_type=None, backend="auto",
        interpret=False):
    """Grouped matmul, `jax.lax.ragged_dot` semantics: lhs [M, K], rhs [G, K, N], group_sizes [G]
    int32 (sum <= M; rows past the sum come back as zeros) -> [M, N] in preferred_element_type
    (default lhs.dtype), accumulated in float32. Empty groups read none of their rhs in the kernels.

    group_offset: int or [] int32: group g multiplies rhs[group_offset + g] of a longer stack
    [>= group_offset + G, K, N] (one layer's experts in the stack of every layer's: the GPU kernel
    reads them in place; the TPU kernel and the reference take a slice of the stack first).

    interpret: run the TPU kernel in interpret mode (False, True or `pltpu.InterpretParams()`).
    """
    kind = gmm_backend(lhs, rhs, preferred_element_type, backend)
    if kind == "gpu":
        from pallas_kernels.moe import gpu

        return gpu.gmm(lhs, rhs, group_sizes, group_offset=group_offset,
                       preferred_element_type=preferred_element_type, tile_m=_gpu_tile_m(lhs, group_sizes))
    rhs = _groups(rhs, group_offset, group_sizes.shape[0])
    if kind == "tpu":
        from pallas_kernels.moe import tpu

        return tpu.gmm(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type,
                       interpret=interpret)
    return reference.gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.dtype(
        preferred_element_type or lhs.dtype))


def gmm_swiglu(lhs, rhs, group_sizes, *, group_offset=0, backend="auto", interpret=False):
    """`reference.swiglu(gmm(lhs, rhs, group_sizes, group_offset=...))`: the experts' gate and up
    products (rhs [G, K, 2 I], gate columns then up) and SwiGLU -> [M, I] in lhs.dtype. Where the
    GPU kernel runs with 128-row tiles, SwiGLU runs in its epilogue, so the [M, 2 I] product is
    never written."""
    if gmm_backend(lhs, rhs, None, backend) == "gpu" and _gpu_tile_m(lhs, group_sizes) == 128:
        from pallas_kernels.moe import gpu

        return gpu.gmm(lhs, rhs, group_sizes, group_offset=group_offset, swiglu=True)
    return reference.swiglu(gmm(lhs, rhs, group_sizes, group_offset=group_offset, backend=backend,
                                interpret=interpret))


def _groups(rhs, group_offset, G: int):
    """rhs[group_offset : group_offset + G]."""
    if isinstance(group_offset, int) and group_offset == 0 and rhs.shape[0] == G:
        return rhs
    return lax.dynamic_slice_in_dim(rhs, group_offset, G)


def _gpu_tile_m(lhs, group_sizes) -> int:
    return 64 if lhs.shape[0] <= GPU_SMALL_TILE_ROWS * group_sizes.shape[0] else 128


def take_rows(x, idx, *, backend="auto", interpret=False):
    """x [R, H], idx [N] integer in [0, R) -> [N, H]: out[n] = x[idx[n]] (the dispatch's rows in
    expert order). Indices outside [0, R) are undefined (the reference follows jnp indexing; the
    kernel reads outside x).

    "auto": on Hopper GPUs the Pallas Triton kernel when it takes the operands (`rows_gpu.fits`),
    XLA's gather otherwise; "gpu" forces the kernel. interpret: the kernel in interpret mode (CPU).
    """
    if backend not in ("auto", "reference", "gpu"):
        raise ValueError(f"backend={backend!r}: choose 'auto', 'reference' or 'gpu'")
    from pallas_kernels.moe import rows_gpu

    forced = backend == "gpu" or (interpret and backend == "auto")
    if forced or (backend == "auto" and platform() == "hopper" and rows_gpu.fits(x, idx)):
        if not rows_gpu.fits(x, idx):
            raise NotImplementedError(f"the gpu kernel takes a 2-D x [R > 0, H] with H % {rows_gpu.MIN_BLOCK_H} == 0 "
                                      f"and an integer idx [N] with N a positive multiple of {rows_gpu.ROWS} (got "
                                      f"{x.shape} and {idx.dtype} {idx.shape}); use backend='reference'")
        return rows_gpu.take_rows(x, idx, interpret=interpret)
    return reference.take_rows(x, idx)
