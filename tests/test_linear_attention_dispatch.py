"""Which linear-attention backend "auto" picks, on a (pretended) Hopper GPU."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.linear_attention import api


@pytest.mark.parametrize("version, kernel", [((0, 10), False), ((0, 11), True), ((0, 12), True)])
def test_gpu_kernel_needs_jax_0_11(monkeypatch, version, kernel):
    monkeypatch.setattr(api, "platform", lambda: "hopper")
    monkeypatch.setattr(api, "_jax_version", lambda: version)
    q = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
    assert api._resolve("auto", q, q, None) == ("gpu" if kernel else "reference")
    assert api._resolve("auto", q.update(dtype=jnp.float32), q.update(dtype=jnp.float32), None) == "reference"
    if not kernel:
        with pytest.raises(NotImplementedError, match="JAX >= 0.11"):
            api._resolve("gpu", q, q, None)
