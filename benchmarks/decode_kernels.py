"""The small kernels of a decode step against the jnp references (XLA): the router's expert
selection and the residual add + RMSNorm.

    python benchmarks/decode_kernels.py [--config configs/ring-mini-linear-2.0.json] [--tokens 1 8 64 4096]

Both move a few KB per token, so their floor is one kernel's latency; XLA runs each as several
kernels (the selection as chained reductions for a few tokens or sorts for many; the add and the
norm as three). Timed as the GPU kernels' own time per call (`timing.device_ms`, from a profiler
trace of 20 calls), which is what each adds to a step; without a GPU, wall-clock medians of the
kernels in interpret mode (a smoke run).
- Router: the sigmoid scores [tokens, experts] float32 and the expert bias -> each token's top-k
  ids and normalised weights (SPEC.md §7.1). "same" compares the ids.
- Norm: [tokens, hidden] bf16 rows and the output to add -> their sum and its RMSNorm (up to
  `gpu.DECODE_ROWS` rows, decode steps). "same" gives the largest difference of the
  normalised rows in bf16 steps (the sums of squares may round differently).
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
from pallas_kernels.norm import gpu as norm_gpu, reference as norm_reference  # noqa: E402
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
    E, K = config.num_experts, config.hidden_size
    route = dict(top_k=config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
                 scaling=config.routed_scaling_factor)
    print(f"device: {jax.devices()[0].device_kind}; {os.path.basename(args.config)}: {E} experts in "
          f"{config.n_group} groups, top {config.topk_group} groups, top-{config.num_experts_per_tok}; hidden {K}; "
          f"{'wall clock, interpret mode (smoke run)' if interpret else 'kernel time from a trace'}")
    print("| kernel | tokens | kernel us | jnp reference us | reference / kernel | same |")
    print("|---|---|---|---|---|---|")
    select = jax.jit(lambda s, b: router_gpu.select_experts(s, b, interpret=interpret, **route))
    select_xla = jax.jit(lambda s, b: router_reference.select_experts(s, b, **route))
    eps = config.rms_norm_eps
    norm = jax.jit(lambda x, d, w: norm_gpu.add_rms_norm(x, d, w, eps=eps, interpret=interpret))
    norm_xla = jax.jit(lambda x, d, w: norm_reference.add_rms_norm(x, d, w, eps=eps))
    rng = np.random.default_rng(0)
    for N in args.tokens:
        s = jnp.asarray(jax.nn.sigmoid(rng.standard_normal((N, E))), jnp.float32)
        bias = jnp.asarray(rng.standard_normal(E) * 0.01, jnp.float32)
        same = bool(np.array_equal(select(s, bias)[0], select_xla(s, bias)[0]))
        row("router selection", N, select, select_xla, (s, bias), same)
        if N <= norm_gpu.DECODE_ROWS:
            x, d = (jnp.asarray(rng.standard_normal((N, K)), jnp.bfloat16) for _ in range(2))
            w = jnp.asarray(1 + 0.1 * rng.standard_normal(K), jnp.bfloat16)
            got, want = (np.asarray(f(x, d, w)[1], np.float32) for f in (norm, norm_xla))
            steps = float(np.max(np.abs(got - want) / np.maximum(np.abs(want) * 2 ** -7, 1e-30)))
            row("add + RMSNorm", N, norm, norm_xla, (x, d, w), f"{steps:.2f} steps")


if __name__ == "__main__":
    main()
