"""Entry point of the grouped-matmul kernels and of the dispatch's row gather; `backend` picks the
implementation (`pallas_kernels.backend`).

`gmm`: "tpu", the Mosaic TPU kernel (`gmm_tpu.py`); "gpu", the Mosaic GPU kernel (`gmm_gpu.py`: bf16,
K % 64 == 0, N % 256 == 0); and the jnp reference. FP8 weights (`pallas_kernels.backend.FP8`): the
GPU kernel reads the K-major FP8 tiles, converts them to bf16 in SMEM and multiplies by the scales
in its epilogue; given FP8 rows too (`lhs_scale`), it multiplies both on the FP8 tensor cores
(K % 128 == 0). The TPU kernel takes no FP8 (int8 on the TPU is a later step), so
they run through the reference there. `take_rows`, the gather of the tokens' rows in expert order before the
grouped matmuls: "gpu", a Pallas Triton kernel (`gather_gpu.py`), and XLA's gather. `quantize_rows`,
the FP8 rows of `fp8_activations="grouped"` (`pallas_kernels.backend.quantize_rows`): "gpu", a
Pallas Triton kernel that reads each row once (`quantize_gpu.py`), and XLA's reduction and fusion.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from pallas_kernels.backend import FP8, Kernel, resolve, with_reference_gradient
from pallas_kernels.moe import reference

# Below this many rows per group on average, the GPU kernel uses 64-row tiles (decode-sized steps
# compute less of the rows no token fills); above it, 128-row tiles (twice the work per byte).
GPU_SMALL_TILE_ROWS = 64


def _gmm_gpu(lhs, rhs, preferred_element_type, swiglu=False):
    def answer():
        from pallas_kernels.moe import gmm_gpu

        out_dtype = jnp.dtype(preferred_element_type or _out_dtype(lhs))
        fp8 = jnp.dtype(rhs.dtype) == FP8
        return Kernel(None if gmm_gpu.supports(lhs, rhs, out_dtype, swiglu=swiglu) else
                      f"takes bf16 lhs (K % 64 == 0) with bf16 [G, K, N] or FP8 [G, N, K] rhs, or FP8 lhs and rhs "
                      f"(K % 128 == 0), N % 256 == 0 and a bf16 or float32 output, got {lhs.dtype} {lhs.shape} x "
                      f"{rhs.dtype} {rhs.shape} -> {out_dtype}",
                      interprets="its FP8 tiles are transposed wgmma operands, which JAX's Mosaic GPU interpreter "
                                 "does not read" if fp8 else True)
    return answer


def _out_dtype(lhs):
    return jnp.bfloat16 if jnp.dtype(lhs.dtype) == FP8 else lhs.dtype


def _gpu_kernel(lhs, group_sizes, **settings):
    """The GPU kernel as a function of (lhs, rhs, group_sizes, group_offset, scale, lhs_scale), for
    the gradient wrappers: rhs (and FP8 weights' scales) read in place at group_offset."""
    from pallas_kernels.moe import gmm_gpu

    settings["tile_m"] = 128 if settings.get("swiglu") else _gpu_tile_m(lhs, group_sizes)

    def kernel(lhs, rhs, group_sizes, group_offset, scale, lhs_scale):
        return gmm_gpu.gmm(lhs, rhs, group_sizes, group_offset=group_offset, scale=scale, lhs_scale=lhs_scale,
                           **settings)
    return kernel


def _with_kernel_gradient(kernel, G: int, swiglu: bool, interpret: bool):
    """kernel(lhs, rhs, group_sizes, group_offset, None, None) for bf16 weights, differentiable
    through grouped matmuls: the rows' gradient is the output's gradient (through SwiGLU's) times
    the transposed weights, the GPU kernel reading the weights K-major where it takes the shapes
    (XLA's ragged_dot transpose, which the reference's gradient would run, expands to a dense
    product of every row with every group's weights on the GPU; in interpret mode, whose
    interpreter reads no transposed operands, the reference's); the weights' gradient is the
    reference's, and only it reads the rows: where the weights do not train, the backward pass
    keeps none. Under differentiation SwiGLU runs after the kernel rather than in its epilogue
    (`reference.swiglu`, whose roundings the epilogue keeps but for rare last bits,
    tests/test_gmm_gpu.py), so that its gradient reads the kept [M, 2 I] product rather than
    making it again (where the weights train, the rows are kept beside it)."""
    from pallas_kernels.moe import gmm_gpu

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def f(rows_dtype, lhs, rhs, group_sizes, group_offset):
        return kernel(lhs, rhs, group_sizes, group_offset, None, None)

    def forward(rows_dtype, lhs, rhs, group_sizes, group_offset):
        keep_rows = rhs.perturbed                       # only the weights' gradient reads the rows
        lhs, rhs, group_sizes, group_offset = (x.value for x in (lhs, rhs, group_sizes, group_offset))
        product = None
        if swiglu:
            product = gmm_gpu.gmm(lhs, rhs, group_sizes, group_offset=group_offset,
                                  tile_m=_gpu_tile_m(lhs, group_sizes), interpret=interpret)
            out = reference.swiglu(product)
        else:
            out = f(rows_dtype, lhs, rhs, group_sizes, group_offset)
        return out, (lhs if keep_rows else None, rhs, group_sizes, group_offset, product)

    def backward(rows_dtype, residuals, cotangent):
        lhs, rhs, group_sizes, group_offset, product = residuals
        if isinstance(cotangent, SymbolicZero):
            return None, None, None, None
        grad = cotangent if product is None else jax.vjp(reference.swiglu, product)[1](cotangent)[0]
        rows = jax.ShapeDtypeStruct((grad.shape[0], rhs.shape[1]), rows_dtype)
        tile_m = _gpu_tile_m(rows, group_sizes)
        if not interpret and gmm_gpu.supports(grad, rhs, rows_dtype, k_major=True):
            d_lhs = gmm_gpu.gmm(grad, rhs, group_sizes, group_offset=group_offset, k_major=True,
                                preferred_element_type=rows_dtype, tile_m=tile_m, interpret=interpret)
        else:
            d_lhs = jax.linear_transpose(lambda x: reference.gmm(x, _groups(rhs, group_offset, G), group_sizes,
                                                                 preferred_element_type=grad.dtype), rows)(grad)[0]
        d_rhs = None if lhs is None else jax.vjp(
            lambda r: reference.gmm(lhs, _groups(r, group_offset, G), group_sizes,
                                    preferred_element_type=grad.dtype), rhs)[1](grad)[0]
        return d_lhs, d_rhs, None, None

    f.defvjp(forward, backward, symbolic_zeros=True)
    return lambda lhs, rhs, group_sizes, group_offset, scale, lhs_scale: f(jnp.dtype(lhs.dtype), lhs, rhs,
                                                                          group_sizes, group_offset)


def _tpu(rhs):
    def answer():
        if jnp.dtype(rhs.dtype) == FP8:
            return Kernel("takes no FP8 weights (float8_e4m3fn rhs): they run through the reference for now "
                          "(int8 weights on the TPU are a later step)")
        return Kernel()
    return answer


def gmm_backend(lhs, rhs, preferred_element_type=None, backend="auto") -> str:
    """The backend `gmm` runs for these operands: "gpu", "tpu" or "reference" (FP8 rhs: the GPU
    kernel on Hopper, the reference elsewhere)."""
    return resolve(backend, gpu=_gmm_gpu(lhs, rhs, preferred_element_type), tpu=_tpu(rhs))


def gmm(lhs, rhs, group_sizes, *, group_offset=0, scale=None, lhs_scale=None, preferred_element_type=None,
        backend="auto", interpret=False):
    """Grouped matmul, `jax.lax.ragged_dot` semantics: lhs [M, K], rhs [G, K, N], group_sizes [G]
    int32 (sum <= M; rows past the sum come back as zeros) -> [M, N] in preferred_element_type
    (default lhs.dtype; bf16 for FP8 lhs), accumulated in float32. Empty groups read none of their
    rhs in the kernels.

    group_offset: int or [] int32: group g multiplies rhs[group_offset + g] of a longer stack
    [>= group_offset + G, K, N] (one layer's experts in the stack of every layer's: the GPU kernel
    reads them in place; the TPU kernel and the reference take a slice of the stack first).
    scale: None; or FP8 weights (`pallas_kernels.backend.FP8`): rhs is float8_e4m3fn [G', N, K]
    (K-major) and scale [G', N] float32, read at group_offset like rhs; group g's rows are
    (rows @ rhs[group_offset + g].T, accumulated in float32) * scale[group_offset + g], rounded
    once. The GPU kernel and the reference take them.
    lhs_scale: None; or with FP8 weights, FP8 rows (`pallas_kernels.backend.quantize_rows`) and
    their [M] float32 scales: `reference.gmm`'s lhs_scale product, which the GPU kernel runs on the
    FP8 tensor cores. FP8 lhs gets no gradient (as FP8 weights get none): a caller that trains
    through it passes the rows' rounding straight through itself (`ring_jax.layers.moe`).

    backend, interpret: `pallas_kernels.backend`.
    """
    _check_scale(lhs, rhs, scale, lhs_scale)
    kind = resolve(backend, interpret, gpu=_gmm_gpu(lhs, rhs, preferred_element_type), tpu=_tpu(rhs))
    G, out_dtype = group_sizes.shape[0], jnp.dtype(preferred_element_type or _out_dtype(lhs))

    def ref(lhs, rhs, group_sizes, group_offset, scale, lhs_scale):
        return reference.gmm(lhs, _groups(rhs, group_offset, G), group_sizes, preferred_element_type=out_dtype,
                             scale=None if scale is None else _groups(scale, group_offset, G), lhs_scale=lhs_scale)

    if kind == "gpu":
        kernel = _gpu_kernel(lhs, group_sizes, preferred_element_type=preferred_element_type,
                             interpret=bool(interpret))
    elif kind == "tpu":
        from pallas_kernels.moe import gmm_tpu

        def kernel(lhs, rhs, group_sizes, group_offset, scale, lhs_scale):   # scales: None, no FP8 on the TPU
            return gmm_tpu.gmm(lhs, _groups(rhs, group_offset, G), group_sizes,
                               preferred_element_type=preferred_element_type, interpret=interpret)
    else:
        return ref(lhs, rhs, group_sizes, group_offset, scale, lhs_scale)
    if kind == "gpu" and scale is None:
        kernel = _with_kernel_gradient(kernel, G, False, bool(interpret))
    else:
        kernel = with_reference_gradient(kernel, ref)
    # The scales are arguments, not closure constants: inside a scan over layers they are tracers.
    return kernel(lhs, rhs, group_sizes, jnp.asarray(group_offset, jnp.int32), scale, lhs_scale)


def gmm_swiglu(lhs, rhs, group_sizes, *, group_offset=0, scale=None, lhs_scale=None, backend="auto",
               interpret=False):
    """`reference.swiglu(gmm(lhs, rhs, group_sizes, group_offset=..., scale=..., lhs_scale=...))`:
    the experts' gate and up products (rhs [G, K, 2 I], gate columns then up; FP8 with scale: [G,
    2 I, K]) and SwiGLU -> [M, I] in lhs.dtype (bf16 for FP8 lhs). Where the GPU kernel runs with
    128-row tiles, SwiGLU runs in its epilogue, so the [M, 2 I] product is never written."""
    _check_scale(lhs, rhs, scale, lhs_scale)
    kind = resolve(backend, interpret, gpu=_gmm_gpu(lhs, rhs, None, swiglu=True), tpu=_tpu(rhs))
    if kind == "gpu" and _gpu_tile_m(lhs, group_sizes) == 128:
        G = group_sizes.shape[0]
        kernel = _gpu_kernel(lhs, group_sizes, swiglu=True, interpret=bool(interpret))

        def ref(lhs, rhs, group_sizes, group_offset, scale, lhs_scale):
            return reference.gmm_swiglu(lhs, _groups(rhs, group_offset, G), group_sizes, lhs_scale=lhs_scale,
                                        scale=None if scale is None else _groups(scale, group_offset, G))
        if scale is None:
            kernel = _with_kernel_gradient(kernel, G, True, bool(interpret))
        else:
            kernel = with_reference_gradient(kernel, ref)
        return kernel(lhs, rhs, group_sizes, jnp.asarray(group_offset, jnp.int32), scale, lhs_scale)
    return reference.swiglu(gmm(lhs, rhs, group_sizes, group_offset=group_offset, scale=scale, lhs_scale=lhs_scale,
                                backend=backend, interpret=interpret))


def _check_scale(lhs, rhs, scale, lhs_scale=None):
    """A ValueError unless rhs is FP8 [G', N, K] with K lhs's and scale its float32 [G', N] scales
    (and lhs of the model's dtype, or FP8 with lhs_scale its float32 [M] scales), or nothing is FP8
    and both scales are None."""
    fp8 = jnp.dtype(rhs.dtype) == FP8
    if (jnp.dtype(lhs.dtype) == FP8) != (lhs_scale is not None):
        raise ValueError(f"gmm: FP8 (float8_e4m3fn) lhs goes with lhs_scale and only with it; got {lhs.dtype} lhs, "
                         f"lhs_scale {None if lhs_scale is None else lhs_scale.shape}")
    if lhs_scale is not None and (not fp8 or lhs_scale.shape != lhs.shape[:1]
                                  or jnp.dtype(lhs_scale.dtype) != jnp.float32):
        raise ValueError(f"gmm: FP8 lhs {lhs.shape} multiplies FP8 weights with lhs_scale float32 [{lhs.shape[0]}]; "
                         f"got {rhs.dtype} rhs and lhs_scale {lhs_scale.dtype} {lhs_scale.shape}")
    if scale is None:
        if fp8:
            raise ValueError("gmm: FP8 (float8_e4m3fn) rhs needs its scale: pass scale, [G, N] float32")
        return
    if not fp8:
        raise ValueError(f"gmm: scale is for FP8 (float8_e4m3fn) rhs, not {rhs.dtype}")
    if rhs.ndim != 3 or rhs.shape[2] != lhs.shape[-1]:
        raise ValueError(f"gmm: FP8 rhs {rhs.shape} must be K-major, [G, N, K] with K = {lhs.shape[-1]} (lhs's)")
    if scale.shape != rhs.shape[:2] or jnp.dtype(scale.dtype) != jnp.float32:
        raise ValueError(f"gmm: scale is {scale.dtype} {scale.shape}; FP8 rhs {rhs.shape} needs float32 [G, N] = "
                         f"{rhs.shape[:2]}")


def _groups(stack, group_offset, G: int):
    """stack[group_offset : group_offset + G]: the groups' rhs, or their FP8 scales."""
    if isinstance(group_offset, int) and group_offset == 0 and stack.shape[0] == G:
        return stack
    return lax.dynamic_slice_in_dim(stack, group_offset, G)


def _gpu_tile_m(lhs, group_sizes) -> int:
    return 64 if lhs.shape[0] <= GPU_SMALL_TILE_ROWS * group_sizes.shape[0] else 128


def take_rows(x, idx, *, backend="auto", interpret=False):
    """x [R, H], idx [N] integer in [0, R) -> [N, H]: out[n] = x[idx[n]] (the dispatch's rows in
    expert order). Indices outside [0, R) are undefined (the reference follows jnp indexing; the
    kernel reads outside x).

    backend, interpret: `pallas_kernels.backend`; "auto" takes the kernel where it takes the operands.
    """
    if resolve(backend, interpret, gpu=_gather_gpu(x, idx)) == "gpu":
        from pallas_kernels.moe import gather_gpu

        def kernel(x, idx):
            return gather_gpu.take_rows(x, idx, interpret=interpret)
        return with_reference_gradient(kernel, reference.take_rows)(x, idx)
    return reference.take_rows(x, idx)


def _gather_gpu(x, idx):
    def answer():
        from pallas_kernels.moe import gather_gpu

        return Kernel(None if gather_gpu.fits(x, idx) else
                      f"takes a 2-D x [R > 0, H] with H % {gather_gpu.MIN_BLOCK_H} == 0 "
                      f"({2 * gather_gpu.MIN_BLOCK_H} for 1-byte rows) and an integer idx [N] with N a positive "
                      f"multiple of {gather_gpu.ROWS} (got {x.dtype} {x.shape} and {idx.dtype} {idx.shape})")
    return answer


def quantize_rows(x, *, backend="auto", interpret=False):
    """x [M, K] bf16 or float32 -> (values [M, K] float8_e4m3fn, scale [M] float32): the FP8 rows
    of `pallas_kernels.backend.quantize_rows` (which the reference is, for x [..., K] of any float
    dtype). The kernel gives numpy's bits (`backend.quantize_rows` on the host) but for the rows
    `quantize_gpu.py` names; XLA's program for it on a Hopper GPU misrounds at one e4m3 midpoint
    (`quantize_gpu.py`). Gradients: the reference's.

    backend, interpret: `pallas_kernels.backend`; "auto" takes the kernel on Hopper where it takes x.
    """
    if resolve(backend, interpret, gpu=_quantize_gpu(x)) == "gpu":
        from pallas_kernels.moe import quantize_gpu

        def kernel(x):
            return quantize_gpu.quantize_rows(x, interpret=bool(interpret))
        return with_reference_gradient(kernel, reference.quantize_rows)(x)
    return reference.quantize_rows(x)


def _quantize_gpu(x):
    def answer():
        from pallas_kernels.moe import quantize_gpu

        return Kernel(None if quantize_gpu.fits(x) else
                      f"takes bf16 or float32 x [M > 0, K] with K a power of two from {quantize_gpu.MIN_K} to "
                      f"{quantize_gpu.BLOCK_ELEMENTS}, M x K outside (2^31, 2^32] (got {x.dtype} {x.shape})")
    return answer
