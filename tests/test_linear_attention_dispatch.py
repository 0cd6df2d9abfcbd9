"""Which linear-attention backend "auto" picks, on a (pretended) Hopper GPU."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import backend as kernel_backend
from pallas_kernels.linear_attention import api


@pytest.mark.parametrize("version, kernel", [((0, 10), False), ((0, 11), True), ((0, 12), True)])
def test_gpu_kernel_needs_jax_0_11(monkeypatch, version, kernel):
    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    monkeypatch.setattr(api, "jax_version", lambda: version)
    q = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
    assert api.linear_attention_backend(q, q) == ("gpu" if kernel else "reference")
    assert api.linear_attention_backend(q.update(dtype=jnp.float32), q.update(dtype=jnp.float32)) == "reference"
    if not kernel:
        with pytest.raises(NotImplementedError, match="JAX >= 0.11"):
            api.linear_attention_backend(q, q, backend="gpu")
