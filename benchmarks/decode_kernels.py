"""The small kernels of a decode step against the jnp references (XLA): the router's expert
selection.

    python benchmarks/decode_kernels.py [--config configs/ring-mini-linear-2.0.json] [--tokens 1 8 64 4096]

It moves a few KB per token, so its floor is one kernel's latency; XLA runs it as several kernels
(chained reductions for a few tokens, sorts for many). Timed as the GPU kernels' own time per call (`timing.device_ms`, from a profiler
trace of 20 calls), which is what each adds to a step; without a GPU, wall-clock medians of the
kernels in interpret mode (a smoke run).
The sigmoid scores [tokens, experts] float32 and the expert bias -> each token's top-k ids and
normalised weights (SPEC.md §7.1). "same" compares the ids.
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ring_jax  # noqa: E402,F401  (sets XLA's rounding flag before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import bench_jax, device_ms  # noqa: E402
from pallas_kernels.router import gpu as router_gpu, reference as router_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_us(f, *args):
    on_gpu = jax.devices()[0].platform == "gpu"
    return (device_ms(f, *args) if on_gpu else bench_jax(f, *args, n=3)) * 1e3


def row(name, tokens, kernel, xla, args, same):
    t_kernel, t_xla = timed_us(kernel, *args), timed_us(xla, *args)
    print(f"| {name} | {tokens} | {t_kernel:.1f} | {t_xla:.1f} | {t_xla / t_kernel:.1f}x | {same} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 4096])
    args = parser.parse_args(argv)
    config = ring_jax.RingConfig.from_hf(args.config)
    interpret = jax.devices()[0].platform != "gpu"
    E = config.num_experts
    route = dict(top_k=config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
                 scaling=config.routed_scaling_factor)
    print(f"device: {jax.devices()[0].device_kind}; {os.path.basename(args.config)}: {E} experts in "
          f"{config.n_group} groups, top {config.topk_group} groups, top-{config.num_experts_per_tok}; "
          f"{'wall clock, interpret mode (smoke run)' if interpret else 'kernel time from a trace'}")
    print("| kernel | tokens | kernel us | jnp reference us | reference / kernel | same |")
    print("|---|---|---|---|---|---|")
    select = jax.jit(lambda s, b: router_gpu.select_experts(s, b, interpret=interpret, **route))
    select_xla = jax.jit(lambda s, b: router_reference.select_experts(s, b, **route))
    rng = np.random.default_rng(0)
    for N in args.tokens:
        s = jnp.asarray(jax.nn.sigmoid(rng.standard_normal((N, E))), jnp.float32)
        bias = jnp.asarray(rng.standard_normal(E) * 0.01, jnp.float32)
        same = bool(np.array_equal(select(s, bias)[0], select_xla(s, bias)[0]))
        row("router selection", N, select, select_xla, (s, bias), same)


if __name__ == "__main__":
    main()
