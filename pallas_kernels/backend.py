"""How every kernel entry point picks its implementation: one meaning of `backend` and `interpret`
across the package.

backend: "auto" (the default) runs the kernel written for this device (a Mosaic TPU kernel on a
TPU, a Pallas GPU kernel on a Hopper or newer GPU) where the entry point has one and "auto" takes
it for the operands, and the jnp reference elsewhere. "reference", "gpu" or "tpu" force one; a
forced kernel that cannot take the operands is a NotImplementedError that says why.

interpret: run the kernel in Pallas interpret mode, on any device (the CPU tests): True, or for a
TPU kernel a `pltpu.InterpretParams()`. It needs the kernel named: backend "gpu" or "tpu". Pallas
Triton kernels run in Pallas's interpreter; Mosaic GPU kernels in JAX's Mosaic GPU interpreter
(`gpu_interpreter`), where it runs their primitives (the linear-attention prefill kernel's are not
all there yet: it has no interpret mode).

FP8 weights (`FP8`), where an entry point takes them: float8_e4m3fn matrices stored K-major, [N, K]
(the contracting axis last, as torch stores Linear weights and as Hopper's FP8 tensor cores take
them), with one float32 scale per output channel [N]; the matrix is values * scale[:, None]. The
product takes the values exactly in the activations' dtype (every e4m3 value is a bf16 value),
accumulates in float32 and only then multiplies by the scale. FP8 rows (the grouped matmul's
`lhs_scale`) are quantized per row the same way (`quantize_rows`) and multiplied on FP8 tensor
cores, both scales applied after the float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = float(jnp.finfo(FP8).max)     # 448


def quantize_rows(x):
    """x [..., K] (numpy or jax, any float dtype) -> (values [..., K] float8_e4m3fn, scale [...]
    float32), of x's kind: each row's scale is its largest magnitude times float32(1 / 448)
    (`row_scale`), its values x times the float32 reciprocal of the scale, rounded to the nearest
    e4m3 value; values * scale[..., None] approximates x.

    Only multiplies by reciprocals, so that numpy and XLA give the same bits: XLA rewrites a
    division by a broadcast value into a multiply by its reciprocal where it sees fit, which can
    round differently. XLA on a Hopper GPU misrounds, rarely, at one e4m3 midpoint
    (`pallas_kernels/moe/quantize_gpu.py`, whose kernel gives numpy's bits there)."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = x.astype(np.float32)
    scale = row_scale(xp.max(xp.abs(x), axis=-1), xp)
    inverse = (np.float32(1) / scale).astype(np.float32)
    return (x * inverse[..., None]).astype(FP8), scale


# A row whose largest magnitude is under this quantizes to zeros, with scale 1. Its scale would be
# subnormal or zero (a reciprocal of inf, values of NaN), and numpy keeps subnormals where XLA
# flushes them to zero; from it up, scales are normal and subnormal elements round to zero both ways.
ZERO_ROW = np.float32(2.0 ** -64)


def row_scale(amax, xp=np):
    """The FP8 scales of rows whose largest magnitudes are amax (float32, numpy or jax: xp):
    amax times float32(1 / 448); 1 for a row of zeros or of magnitudes all under `ZERO_ROW`."""
    return xp.where(amax >= ZERO_ROW, amax * np.float32(1 / FP8_MAX), np.float32(1)).astype(np.float32)


def matrix_shape(w) -> tuple[int, int]:
    """(K, N) of the matrices of w: [..., K, N], or [..., N, K] for FP8 weights (K-major)."""
    rows, cols = w.shape[-2:]
    return (cols, rows) if jnp.dtype(w.dtype) == FP8 else (rows, cols)


def triton_offsets_overflow(a) -> bool:
    """Whether Pallas's Triton lowering would address array `a` (or its shape and dtype) past 2^31
    elements: it computes element offsets in signed 32 bits for arrays of at most 2^32 bytes, so a
    1-byte array of 2-4 GiB is read and written at negative offsets (JAX 0.10-0.11,
    `_compute_offsets_from_indices`). Such an array is handed to a Triton kernel in 2-byte units
    (`as_pairs`)."""
    return a.size > 2**31 and a.size * jnp.dtype(a.dtype).itemsize <= 2**32


def as_pairs(a):
    """A 1-byte array [..., K] (K even) -> uint16 [..., K / 2], each element the values at positions
    2j (low byte) and 2j + 1 (high byte): the same bytes, in units Pallas's Triton lowering
    addresses without overflow (`triton_offsets_overflow`). XLA computes it as a copy of the array
    (a convert, shift and OR-reduce fusion), not as a bitcast (docs/PERFORMANCE.md, "One decode
    token's MoE block in one kernel")."""
    return jax.lax.bitcast_convert_type(a.reshape(*a.shape[:-1], a.shape[-1] // 2, 2), jnp.uint16)


def e4m3(byte):
    """Unsigned bytes (in a wider integer type: one byte of `as_pairs`) -> their float8_e4m3fn
    values as float32, inside a kernel."""
    return jax.lax.bitcast_convert_type(byte.astype(jnp.uint8), FP8).astype(jnp.float32)


def reciprocal(x, interpret: bool):
    """1 / x, float32, correctly rounded, inside a Pallas Triton kernel (the lowering's own float32
    division is approximate; the interpreter's is correctly rounded)."""
    if interpret:
        return np.float32(1) / x
    from jax.experimental.pallas import triton as pltriton

    [inverse] = pltriton.elementwise_inline_asm("rcp.rn.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                                result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return inverse


def power_of_two(n: int) -> bool:
    """Whether n is a positive power of two (a Triton block's sizes must be)."""
    return n > 0 and n & (n - 1) == 0


def sm_count() -> int:
    """The streaming multiprocessors of the first device (an H100's or H200's 132 where the device
    does not say: interpret mode on the CPU)."""
    return getattr(jax.devices()[0], "core_count", 132)


@functools.cache
def platform() -> str:
    """"tpu", "hopper" (a CUDA GPU of compute capability 9.0 or newer) or "other"."""
    device = jax.devices()[0]
    if device.platform == "tpu":
        return "tpu"
    if device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 9.0:
        return "hopper"
    return "other"


def gpu_interpreter():
    """The `interpret=` value that runs a Mosaic GPU kernel in JAX's Mosaic GPU interpreter: on the
    CPU, shared memory, warpgroups, barriers, TMA copies and wgmma are simulated. A TMA load of a
    box that passes the array's end is legal on the GPU (the kernels' last row tiles do it; those
    rows are never stored): the interpreter reads them as uninitialized (NaN) instead of raising."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:  # JAX 0.10 has the interpreter but does not export it
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params(out_of_bounds_reads="uninitialized")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel's answer for the caller's operands: why it cannot take them (None: it can), whether
    "auto" takes it where it can (False where the reference is as fast or faster), and whether it
    runs in interpret mode (True; or False, or a string that says why not)."""
    refusal: str | None = None
    auto: bool = True
    interprets: bool | str = True


DEVICE_KERNEL = {"tpu": "tpu", "hopper": "gpu"}


def resolve(backend: str, interpret=False, **kernels: Callable[[], Kernel]) -> str:
    """The implementation an entry point runs: "reference" or one of `kernels` ("gpu", "tpu": each
    a function of no arguments that answers for the caller's operands)."""
    choices = ("reference", *kernels)
    if backend not in ("auto", *choices):
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {choices}")
    if interpret and backend not in kernels:
        raise ValueError(f"interpret runs a Pallas kernel in interpret mode: name it with backend= one of "
                         f"{tuple(kernels)}, not {backend!r}")
    if backend == "auto":
        kind = DEVICE_KERNEL.get(platform())
        if kind in kernels:
            answer = kernels[kind]()
            if answer.refusal is None and answer.auto:
                return kind
        return "reference"
    if backend != "reference":
        answer = kernels[backend]()
        if answer.refusal is not None:
            raise NotImplementedError(f"the {backend} kernel {answer.refusal}; use backend='reference' or 'auto'")
        if interpret and answer.interprets is not True:
            why = f" ({answer.interprets})" if isinstance(answer.interprets, str) else ""
            raise ValueError(f"the {backend} kernel has no interpret mode{why}")
    return backend


def with_reference_gradient(kernel: Callable, reference: Callable) -> Callable:
    """kernel, differentiable: f(*args) = kernel(*args), with the gradient of reference(*args)
    (`jax.vjp` of the jnp reference, which recomputes the forward in jnp in the backward pass).
    Pallas kernels have no autodiff rule of their own, so an entry point's kernel branch goes
    through this unless it has a backward of kernels (the grouped matmul's rows, the linear-
    attention scan): `jax.grad` works through any backend, at the reference's cost in the
    backward pass. args: pytrees of arrays (integer ones get no gradient, nor do float8 ones: quantized
    weights, not trained); static settings go in by closure."""
    @jax.custom_vjp
    def f(*args):
        return kernel(*args)

    def forward(*args):
        return kernel(*args), args

    def backward(args, cotangent):
        leaves, tree = jax.tree.flatten(args)
        trained = [not _float8(leaf) for leaf in leaves]

        def of_trained(*values):              # the reference as a function of the trained leaves
            given = iter(values)
            return reference(*tree.unflatten([next(given) if t else leaf for leaf, t in zip(leaves, trained)]))
        grads = iter(jax.vjp(of_trained, *[leaf for leaf, t in zip(leaves, trained) if t])[1](cotangent))
        return tuple(tree.unflatten([next(grads) if t else None for t in trained]))    # None: a zero cotangent

    f.defvjp(forward, backward)
    return f


def _float8(x) -> bool:
    """Whether x is an array of a float8 dtype, which gets no cotangent: rounded to 8 bits it would
    be noise, and the reference's backward pass would scatter it into a stack of every layer's
    weights for nothing."""
    dtype = jnp.dtype(jnp.result_type(x))
    return dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating)
