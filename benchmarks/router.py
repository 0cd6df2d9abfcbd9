"""The router's expert selection: the Pallas kernel against the jnp reference (XLA).

    python benchmarks/router.py [--config configs/ring-mini-linear-2.0.json] [--tokens 1 8 64 4096]

Input: the sigmoid scores [tokens, experts] float32 and the expert bias; output: each token's
top-k expert ids and normalised weights (SPEC.md §7.1). Timed as the GPU kernels' own time per
call (`timing.device_ms`, from a profiler trace of 20 calls), which is what the selection adds to
a step where it runs between other kernels; without a GPU, wall-clock medians (a smoke run). The
work is tiny (tokens x experts x 4 bytes read), so the floor is one kernel launch's latency; the
reference runs the selection as several chained reductions (a few tokens) or sorts (many).
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import bench_jax, device_ms
from pallas_kernels.router import gpu, reference
from ring_jax import RingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 4096])
    args = parser.parse_args(argv)
    config = RingConfig.from_hf(args.config)
    E = config.num_experts
    route = dict(top_k=config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
                 scaling=config.routed_scaling_factor)
    on_gpu = jax.devices()[0].platform == "gpu"
    print(f"device: {jax.devices()[0].device_kind}; {E} experts in {config.n_group} groups, "
          f"top {config.topk_group} groups, top-{config.num_experts_per_tok}; "
          f"{'kernel time from a trace' if on_gpu else 'wall clock, interpret mode (smoke run)'}")
    kernel = jax.jit(lambda s, b: gpu.select_experts(s, b, interpret=not on_gpu, **route))
    xla = jax.jit(lambda s, b: reference.select_experts(s, b, **route))
    print("| tokens | kernel us | jnp reference us | reference / kernel | same ids |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for N in args.tokens:
        s = jnp.asarray(jax.nn.sigmoid(rng.standard_normal((N, E))), jnp.float32)
        bias = jnp.asarray(rng.standard_normal(E) * 0.01, jnp.float32)
        same = bool(np.array_equal(kernel(s, bias)[0], xla(s, bias)[0]))
        t_kernel = (device_ms(kernel, s, bias) if on_gpu else bench_jax(kernel, s, bias, n=3)) * 1e3
        t_xla = (device_ms(xla, s, bias) if on_gpu else bench_jax(xla, s, bias, n=3)) * 1e3
        print(f"| {N} | {t_kernel:.1f} | {t_xla:.1f} | {t_xla / t_kernel:.1f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
