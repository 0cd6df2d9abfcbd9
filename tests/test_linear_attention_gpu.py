"""The Mosaic GPU linear-attention kernel against the jnp reference and float64 (GPU only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from pallas_kernels.linear_attention import api, reference

pytestmark = pytest.mark.gpu


def inputs(seed, B, T, H, D):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(ks[i], (B, T, H, D), jnp.float32).astype(jnp.bfloat16) for i in range(3))
    g = -jax.random.uniform(ks[3], (H,), minval=0.005, maxval=0.8)
    return q, k, v, g, jax.random.normal(ks[4], (B, H, D, D))


@pytest.mark.parametrize("B, T, H", [(1, 1, 1), (1, 63, 3), (2, 64, 2), (1, 65, 16), (1, 1000, 3), (2, 4160, 2),
                                     (1, 20000, 2)])
def test_gpu_kernel_matches_reference(B, T, H):
    q, k, v, g, s0 = inputs(T + H, B, T, H, 128)
    for state in (None, s0):
        o, s = api.linear_attention(q, k, v, g, initial_state=state, backend="gpu")
        ro, rs = reference.linear_attention(q, k, v, g, initial_state=state)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        assert rel_err(o, ro) <= 1e-2 and rel_err(s, rs) <= 5e-3


def test_auto_picks_the_gpu_kernel_and_falls_back():
    q, k, v, g, _ = inputs(0, 1, 128, 2, 128)
    o_auto, _ = jax.jit(api.linear_attention)(q, k, v, g)
    o_gpu, _ = api.linear_attention(q, k, v, g, backend="gpu")
    np.testing.assert_array_equal(np.asarray(o_auto), np.asarray(o_gpu))
    mask = jnp.ones((1, 128), bool)
    with pytest.raises(NotImplementedError):
        api.linear_attention(q, k, v, g, mask=mask, backend="gpu")
    o_masked, _ = api.linear_attention(q, k, v, g, mask=mask)  # auto: the reference takes masks
    assert rel_err(o_masked, o_gpu) <= 1e-2


@pytest.mark.parametrize("B, rotary_dim", [(1, 64), (5, 64), (2, 128)])
def test_decode_kernel_matches_reference_and_float64(B, rotary_dim):
    """The one-token decode kernel at Ring-mini's head shape (16 heads of 128, rotary 64, bf16),
    and with the rotation over the whole head."""
    from test_linear_attention_decode import decode64, operands

    args = operands(B, 16, 128, rotary_dim, jnp.bfloat16, seed=B)
    assert api.linear_attention_decode_backend(args[0], args[6], rotary_dim) == "gpu"
    o, state = api.linear_attention_decode(*args, eps=1e-6)
    ro, rs = api.linear_attention_decode(*args, eps=1e-6, backend="reference")
    want_o, want_state = decode64(*args, eps=1e-6)
    assert rel_err(o, ro) <= 1e-2 and rel_err(state, rs) <= 1e-2
    assert rel_err(o, want_o) <= 2e-2 and rel_err(state, want_state) <= 2e-2
    if B > 1:
        np.testing.assert_array_equal(np.asarray(state[1]), np.asarray(rs[1]))     # padding: decayed only


@pytest.mark.parametrize("T", [300, 4096])
def test_gradient_through_the_kernel_matches_the_references(T):
    """jax.grad through the Mosaic GPU kernel runs three more kernel scans (`backward.py`): within
    bf16 rounding of the reference's gradient, for q, k, v, the decay and the initial state."""
    from test_kernel_gradients import grads

    q, k, v, g, s0 = inputs(7, 1, T, 2, 128)

    def call(backend):
        return lambda q, k, v, g, s0: api.linear_attention(q, k, v, g, initial_state=s0, backend=backend)
    for got, want in zip(grads(call("gpu"), (q, k, v, g, s0), (0, 1, 2, 3, 4)),
                         grads(call("reference"), (q, k, v, g, s0), (0, 1, 2, 3, 4))):
        assert rel_err(got, want) <= 1e-2, rel_err(got, want)
