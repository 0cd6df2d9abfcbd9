"""The residual add + RMSNorm (`pallas_kernels.add_rms_norm`): the GPU kernel in Pallas interpret
mode against the jnp reference and float64, and the model's use of it."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from pallas_kernels.norm import add_rms_norm, gpu, reference


def operands(shape, dtype, seed, with_delta=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
    delta = jnp.asarray(rng.standard_normal(shape), dtype) if with_delta else None
    weight = jnp.asarray(1 + 0.1 * rng.standard_normal(shape[-1]), dtype)
    return x, delta, weight


def norm64(x, delta, weight, eps):
    s = np.asarray(x, np.float64) + (0 if delta is None else np.asarray(delta, np.float64))
    return s, np.asarray(weight, np.float64) * s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 2, 512), (5, 64)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_kernel_matches_reference_and_float64(shape, dtype, with_delta):
    x, delta, weight = operands(shape, dtype, seed=shape[0], with_delta=with_delta)
    total, normed = add_rms_norm(x, delta, weight, eps=1e-6, interpret=True)
    want_total, want_normed = reference.add_rms_norm(x, delta, weight, eps=1e-6)
    assert total.dtype == normed.dtype == dtype and total.shape == normed.shape == shape
    np.testing.assert_array_equal(total, want_total)                 # the add rounds once, as XLA's
    # On the CPU the kernel's sum of squares runs through XLA's reduction as the reference's does:
    # float32 results may differ in the last bit; bf16 ones come out equal, which checks every
    # rounding step of the reference (the GPU test allows a rare bf16 step).
    if dtype == jnp.bfloat16:
        np.testing.assert_array_equal(normed, want_normed)
    assert rel_err(normed, want_normed) <= 1e-6
    assert rel_err(normed, norm64(x, delta, weight, 1e-6)[1]) <= (1e-6 if dtype == jnp.float32 else 2 ** -7)


def test_errors_and_backend_choice():
    x, delta, weight = operands((2, 256), jnp.bfloat16, 0)
    with pytest.raises(ValueError, match="delta must match"):
        add_rms_norm(x, delta[:1], weight, eps=1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, delta, weight[:8], eps=1e-6)
    with pytest.raises(ValueError, match="backend"):
        add_rms_norm(x, delta, weight, eps=1e-6, backend="cuda")
    with pytest.raises(NotImplementedError, match="power-of-two"):
        add_rms_norm(x[:, :200], delta[:, :200], weight[:200], eps=1e-6, interpret=True)
    assert gpu.fits(x, weight) and not gpu.fits(x[:, :200], weight[:200])
    assert not gpu.fits(x, weight.astype(jnp.float32))
    total, _ = add_rms_norm(x, delta, weight, eps=1e-6)
    np.testing.assert_array_equal(total, x + delta)
    total, normed = add_rms_norm(x[:0], delta[:0], weight, eps=1e-6, interpret=True)   # no rows
    assert total.shape == normed.shape == (0, 256)


def test_auto_takes_the_kernel_for_decode_rows_on_hopper(monkeypatch):
    """With MAX_ROWS at its intended setting (it is 0 until the kernel has run on a GPU)."""
    from pallas_kernels.norm import api

    calls = []
    monkeypatch.setattr(api, "platform", lambda: "hopper")
    monkeypatch.setattr(gpu, "MAX_ROWS", gpu.DECODE_ROWS)
    monkeypatch.setattr(gpu, "add_rms_norm", lambda x, *a, **k:
                        calls.append(x.shape) or reference.add_rms_norm(x, *a, eps=k["eps"]))
    for rows in (1, gpu.MAX_ROWS, gpu.MAX_ROWS + 1):
        x, delta, weight = operands((rows, 256), jnp.bfloat16, rows)
        add_rms_norm(x, delta, weight, eps=1e-6)
    assert calls == [(1, 256), (gpu.MAX_ROWS, 256)]
