"""Entry points of the linear-attention kernels; `backend` picks the implementation.

"auto" takes the Mosaic GPU kernel on Hopper or newer GPUs when the inputs are what it handles
(bf16, D % 64 == 0, Dv % 128 == 0, no mask), and the jnp reference otherwise. "gpu" and
"reference" force one (an input the GPU kernel does not handle is then an error).
"""

import functools

import jax

from pallas_kernels.linear_attention import reference

BACKENDS = ("reference", "gpu")


@functools.cache
def _hopper_gpu() -> bool:
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    capability = getattr(device, "compute_capability", "0")
    return float(capability) >= 9.0


def _gpu_handles(q, v, mask) -> bool:
    return (mask is None and q.dtype == "bfloat16" and v.dtype == "bfloat16"
            and q.shape[-1] % 64 == 0 and v.shape[-1] % 128 == 0)


def _resolve(backend: str, q, v, mask) -> str:
    if backend == "auto":
        return "gpu" if _hopper_gpu() and _gpu_handles(q, v, mask) else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    if backend == "gpu" and not _gpu_handles(q, v, mask):
        raise NotImplementedError("the gpu backend takes bf16 q/k/v with D % 64 == 0, "
                                  "Dv % 128 == 0 and no mask; use backend='reference'")
    return backend


def linear_attention(q, k, v, log_decay, *, scale=None, initial_state=None, mask=None, chunk_size=64,
                     backend="auto"):
    """Causal Lightning attention: see `reference.linear_attention` for shapes and math."""
    if _resolve(backend, q, v, mask) == "gpu":
        from pallas_kernels.linear_attention import gpu

        return gpu.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state)
    return reference.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                      mask=mask, chunk_size=chunk_size)


def linear_attention_step(q, k, v, log_decay, state, *, scale=None, backend="auto"):
    """A few tokens continuing from `state`: see `reference.linear_attention_step`."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    return reference.linear_attention_step(q, k, v, log_decay, state, scale=scale)
