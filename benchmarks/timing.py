"""Timing helpers shared by the benchmarks: medians after warm-up, device time from a trace, and
the copy-bandwidth ceiling."""

import glob
import tempfile
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


def device_ms(f, *args, n=20):
    """Milliseconds of GPU kernel time per call of f(*args): the kernels' own durations summed over
    a profiler trace of n calls after one warm-up call, without host dispatch or launch gaps
    (which dominate wall-clock timing of microsecond kernels). None where there is no GPU."""
    if jax.devices()[0].platform != "gpu":
        return None
    from jax.profiler import ProfileData

    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            for _ in range(n):
                out = f(*args)
            jax.block_until_ready(out)
        data = ProfileData.from_file(glob.glob(f"{trace}/**/*.xplane.pb", recursive=True)[0])
        ns = sum(event.duration_ns for plane in data.planes if plane.name.startswith("/device:GPU")
                 for line in plane.lines if line.name.startswith("Stream") for event in line.events)
    return ns / n / 1e6
