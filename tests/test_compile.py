"""Compile time does not grow with depth: the decoder runs as scans over stacked layers."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ring_jax
from ring_jax import RingConfig


def first_call_seconds(layers: int) -> float:
    """Seconds of the first `model(ids)` (trace, lower, compile and run) of the tiny config with
    `layers` decoder layers."""
    config = RingConfig.from_hf("configs/tiny.json", num_hidden_layers=layers)
    model = ring_jax.RingModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 16))
    jax.block_until_ready(model(ids[:, :8]))         # warms what does not depend on the model
    jax.clear_caches()
    t = time.perf_counter()
    jax.block_until_ready(model(ids))
    return time.perf_counter() - t


def test_forty_layers_compile_about_as_fast_as_ten():
    """The issue's bound: 40 layers at most 1.5 times 10 (unrolled, it was about 4 times). A miss
    is measured again, each depth's smaller time kept, so a busy neighbour on the CPU does not
    decide it."""
    ten, forty = first_call_seconds(10), first_call_seconds(40)
    if forty > 1.5 * ten:
        ten, forty = min(ten, first_call_seconds(10)), min(forty, first_call_seconds(40))
    assert forty <= 1.5 * ten, (ten, forty)
