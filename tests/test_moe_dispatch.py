"""sort_by_expert: both ways of ordering the (token, expert) pairs agree with a stable sort."""

import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.layers import moe


@pytest.mark.parametrize("pairs", [1, 8, 64, 1024, 1025, 5000])
def test_sort_by_expert(pairs):
    ids = np.random.default_rng(pairs).integers(0, 16, pairs)
    order, rank, sizes = moe.sort_by_expert(jnp.asarray(ids, jnp.int32), 16)
    np.testing.assert_array_equal(order, np.argsort(ids, kind="stable"))
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(rank)], np.arange(pairs))
    np.testing.assert_array_equal(sizes, np.bincount(ids, minlength=16))
