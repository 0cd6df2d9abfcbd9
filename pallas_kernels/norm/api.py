"""Entry point of the residual add + RMSNorm; `backend` picks the implementation.

"auto": on Hopper GPUs the Pallas Triton kernel for up to `gpu.MAX_ROWS` rows when it takes the
operands (`gpu.fits`); the jnp reference otherwise (XLA fuses it well enough for many rows).
"""

import math

from pallas_kernels.norm import reference
from pallas_kernels.platform import platform

BACKENDS = ("reference", "gpu")


def add_rms_norm(x, delta, weight, *, eps, backend="auto", interpret=False):
    """The residual add and RMSNorm of a pre-norm block: see `reference.add_rms_norm`.

    x: [..., K]; delta: [..., K] or None (then x itself is normalised); weight: [K].
    Returns (x + delta, weight * normalize(x + delta)): the sum in x's dtype, the norm in the
    promoted dtype of x and weight (x's where they match; the kernel requires that).
    interpret: run the GPU kernel in Pallas interpret mode (CPU tests).
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    K = x.shape[-1]
    if weight.shape != (K,) or (delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype)):
        raise ValueError(f"add_rms_norm: x {x.shape} {x.dtype}, delta "
                         f"{None if delta is None else (delta.shape, delta.dtype)}, weight {weight.shape}: "
                         f"delta must match x and weight must be [{K}]")
    rows = math.prod(x.shape[:-1])
    forced = interpret or backend == "gpu"
    if rows and (forced or (backend == "auto" and platform() == "hopper")):
        from pallas_kernels.norm import gpu

        if forced and not gpu.fits(x, weight):
            raise NotImplementedError(f"the gpu kernel takes bf16 or float32 rows of a power-of-two length with "
                                      f"a weight of their dtype (got {x.dtype} [{K}], weight {weight.dtype}); "
                                      f"use backend='reference'")
        if forced or (rows <= gpu.MAX_ROWS and gpu.fits(x, weight)):
            return gpu.add_rms_norm(x, delta, weight, eps=float(eps), interpret=interpret)
    return reference.add_rms_norm(x, delta, weight, eps=eps)
