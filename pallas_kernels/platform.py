"""Which accelerator the kernels run on: the backends' "auto" choice starts here."""

import functools

import jax


@functools.cache
def platform() -> str:
    """"tpu", "hopper" (a CUDA GPU of compute capability 9.0 or newer) or "other"."""
    device = jax.devices()[0]
    if device.platform == "tpu":
        return "tpu"
    if device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 9.0:
        return "hopper"
    return "other"
