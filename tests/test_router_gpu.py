"""The router's selection kernel on a Hopper GPU, at the Ring-mini and Ring-flash router sizes:
the reference's experts in its order, and its weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backend import platform
from pallas_kernels.router import gpu, reference
from test_router import tied_router_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(platform() != "hopper", reason="the kernel runs on Hopper")]


@pytest.mark.parametrize("tokens", [1, 8, 4096])
@pytest.mark.parametrize("router", [(256, 8, 4, 8)])
def test_kernel_equals_reference(tokens, router):
    E, G, kept, top_k = router
    rng = np.random.default_rng(tokens)
    args = dict(top_k=top_k, n_group=G, topk_group=kept, scaling=2.5)
    for s, bias in (tied_router_inputs(rng, tokens, E),
                    (jnp.asarray(jax.nn.sigmoid(rng.standard_normal((tokens, E))), jnp.float32),
                     jnp.asarray(rng.standard_normal(E) * 0.01, jnp.float32))):
        ids, weights = gpu.select_experts(s, bias[None], 0, **args)
        want_ids, want_weights = reference.select_experts(s, bias, **args)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(weights, want_weights, rtol=1e-6)
