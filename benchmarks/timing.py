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


def back_to_back_ms(f, *args, n=20):
    """Milliseconds per call of n calls of f(*args) queued back to back, one wait at the end: the
    throughput of a stream of calls, without the per-call host round trip of `bench_jax`."""
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


def copy_bandwidth():
    """Device bytes read + written per second by a 2 GiB elementwise pass (the memory ceiling),
    from its GPU time (a per-call host clock would add a round trip to every call); the median wall
    clock where there is no GPU."""
    x = jnp.ones((2 * 1024**3 // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    return 2 * x.nbytes / ((device_ms(f, x) or bench_jax(f, x)) * 1e-3)


def traced_kernels(run, by_op: bool = False) -> dict:
    """The GPU work of run() in a JAX profiler trace: {kernel, memset or copy name: (total ns,
    count)}; by_op: keyed (name, the XLA instruction that launched it, "" if none) instead. The
    trace is CUPTI's, process-wide, so it holds the GPU work of other libraries (PyTorch) too; one
    profiler at a time, so this one serves both (torch.profiler and JAX's cannot both subscribe to
    CUPTI in one process)."""
    from jax.profiler import ProfileData

    kernels = {}
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            run()
        data = ProfileData.from_file(glob.glob(f"{trace}/**/*.xplane.pb", recursive=True)[0])
        for plane in data.planes:
            if plane.name.startswith("/device:GPU"):
                for line in plane.lines:
                    if line.name.startswith("Stream"):
                        for event in line.events:
                            key = (event.name, dict(event.stats).get("hlo_op", "")) if by_op else event.name
                            ns, count = kernels.get(key, (0, 0))
                            kernels[key] = (ns + event.duration_ns, count + 1)
    return kernels


def traced_gpu_ms(run, n):
    """Milliseconds per call of GPU time in run() (n calls and a wait for them): the durations of
    every kernel, memset and copy in a profiler trace (`traced_kernels`)."""
    ns = sum(total for total, _ in traced_kernels(run).values())
    if not ns:
        raise RuntimeError("the profiler trace holds no GPU work")
    return ns / n / 1e6


def device_ms(f, *args, n=20):
    """Milliseconds of GPU kernel time per call of f(*args): the kernels' own durations summed over
    a profiler trace of n calls after one warm-up call, without host dispatch or launch gaps
    (which dominate wall-clock timing of microsecond kernels). None where there is no GPU."""
    if jax.devices()[0].platform != "gpu":
        return None
    jax.block_until_ready(f(*args))

    def run():
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
    return traced_gpu_ms(run, n)


def _torch_warm_up(fn):
    """Three calls of a PyTorch callable (Triton compiles and autotunes), then a wait."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()


def torch_device_ms(fn, n=20):
    """`device_ms` for a PyTorch callable on the GPU, after three warm-up calls."""
    import torch

    _torch_warm_up(fn)

    def run():
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return traced_gpu_ms(run, n)


def torch_back_to_back_ms(fn, n=20):
    """`back_to_back_ms` for a PyTorch callable, timed by CUDA events around the n calls."""
    import torch

    _torch_warm_up(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n
