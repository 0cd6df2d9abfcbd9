"""The residual add + RMSNorm kernel on a Hopper GPU at decode sizes of the Ring models' hidden
widths: the sum exact, the norm equal to the reference's but for rare single bf16 steps."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from pallas_kernels.norm import gpu, reference
from pallas_kernels.platform import platform
from test_norm import norm64, operands

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(platform() != "hopper", reason="the kernel runs on Hopper")]


@pytest.mark.parametrize("shape", [(1, 1, 2048), (8, 1, 2048), (64, 4096)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_kernel_matches_reference(shape, with_delta):
    x, delta, weight = operands(shape, jnp.bfloat16, seed=shape[0], with_delta=with_delta)
    total, normed = gpu.add_rms_norm(x, delta, weight, eps=1e-6)
    want_total, want_normed = reference.add_rms_norm(x, delta, weight, eps=1e-6)
    np.testing.assert_array_equal(total, want_total)
    got, want = np.asarray(normed, np.float32), np.asarray(want_normed, np.float32)
    # The sums of squares may round differently (another order): a bf16 step at most, and rarely.
    assert np.all(np.abs(got - want) <= np.abs(want) * 2 ** -7)
    assert np.mean(got == want) >= 0.99
    assert rel_err(normed, norm64(x, delta, weight, 1e-6)[1]) <= 2 ** -7
