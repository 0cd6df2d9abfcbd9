"""Timing helpers shared by the benchmarks: medians after warm-up, and the copy-bandwidth ceiling."""

import time

import jax
import jax.numpy as jnp


def bench_jax(f, *args, n=20):
    """Median milliseconds of n calls of f(*args) after one warm-up call."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def copy_bandwidth():
    """Device bytes read + written per second by a 2 GiB elementwise pass (the memory ceiling)."""
    x = jnp.ones((2 * 1024**3 // 4,), jnp.float32)
    return 2 * x.nbytes / (bench_jax(jax.jit(lambda a: a + 1), x) * 1e-3)
