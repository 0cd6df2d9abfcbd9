"""Entry points of the linear-attention kernels; `backend` picks the implementation.

"auto": on TPU the Mosaic TPU kernels (any T, masks, bf16 or f32); on Hopper or newer GPUs the
Mosaic GPU prefill kernel when the inputs are what it handles (bf16, D % 64 == 0, Dv % 128 == 0, no
mask) on JAX 0.11 or newer; the jnp reference otherwise. "reference", "gpu" and "tpu" force one (an
input a kernel does not handle is then an error).
"""

import jax

from pallas_kernels.linear_attention import reference
from pallas_kernels.platform import platform

BACKENDS = ("reference", "gpu", "tpu")

# JAX 0.10's Mosaic GPU layout inference finds no layout for the prefill kernel (lowering it for
# CUDA on a CPU with JAX 0.10.2 fails); it is built and measured on JAX 0.11.
GPU_MIN_JAX = (0, 11)


def _gpu_handles(q, v, mask) -> bool:
    return (mask is None and q.dtype == "bfloat16" and v.dtype == "bfloat16"
            and q.shape[-1] % 64 == 0 and v.shape[-1] % 128 == 0 and _jax_version() >= GPU_MIN_JAX)


def _jax_version() -> tuple[int, int]:
    return tuple(int(part) for part in jax.__version__.split(".")[:2])


def _resolve(backend: str, q, v, mask) -> str:
    if backend == "auto":
        if platform() == "tpu":
            return "tpu"
        return "gpu" if platform() == "hopper" and _gpu_handles(q, v, mask) else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    if backend == "gpu" and not _gpu_handles(q, v, mask):
        raise NotImplementedError("the gpu backend takes bf16 q/k/v with D % 64 == 0, "
                                  "Dv % 128 == 0 and no mask, on JAX >= 0.11; use backend='reference'")
    return backend


def linear_attention(q, k, v, log_decay, *, scale=None, initial_state=None, mask=None, chunk_size=64,
                     backend="auto", interpret=False):
    """Causal Lightning attention: see `reference.linear_attention` for shapes and math.

    interpret: run the TPU kernel in interpret mode (False, True or `pltpu.InterpretParams()`).
    The GPU kernel always uses chunks of 64 tokens.
    """
    kind = _resolve(backend, q, v, mask)
    if kind == "gpu":
        from pallas_kernels.linear_attention import gpu

        return gpu.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state)
    if kind == "tpu":
        from pallas_kernels.linear_attention import tpu

        return tpu.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                    mask=mask, chunk_size=chunk_size, interpret=interpret)
    return reference.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                      mask=mask, chunk_size=chunk_size)


def linear_attention_step(q, k, v, log_decay, state, *, scale=None, backend="auto", interpret=False):
    """A few tokens continuing from `state`: see `reference.linear_attention_step`.

    "auto" takes the TPU kernel on TPU and the jnp recurrence elsewhere (XLA fuses it inside a
    jitted decode loop).
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    if backend == "tpu" or (backend == "auto" and platform() == "tpu"):
        from pallas_kernels.linear_attention import tpu

        return tpu.linear_attention_step(q, k, v, log_decay, state, scale=scale, interpret=interpret)
    if backend == "gpu":
        raise NotImplementedError("no GPU decode kernel: the jnp step ('reference') is what runs on GPU")
    return reference.linear_attention_step(q, k, v, log_decay, state, scale=scale)
