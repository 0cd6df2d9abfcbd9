"""Lightning linear attention on one GPU: our Pallas Mosaic GPU kernel, the jnp reference, and fla's
`chunk_simple_gla` (Triton, PyTorch) measured side by side in one process.

    pip install --no-deps fla_core-*.whl   # fla-core, pure Python
    python benchmarks/linear_attention.py [--quick]

Prints, per shape, milliseconds, the q,k,v,o bytes over the time and its share of the measured
device-to-device copy bandwidth; then the decode step inside a jitted loop. Also checks our kernel
against the jnp reference on every shape (relative error). Timing: ours and fla alternate for
ROUNDS rounds of 20 runs each after warm-up; each figure is the lowest round median, so a
transient slowdown of the shared machine hits neither side alone.
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import bench_jax, copy_bandwidth
from pallas_kernels.linear_attention import api, gpu, reference

ROUNDS = 3
SHAPES = [(1, 4096, 16, 128), (1, 32768, 16, 128), (1, 131072, 16, 128), (8, 4096, 16, 128),
          (1, 32768, 32, 128), (8, 4096, 32, 128)]


def bench_torch(fn, n=20):
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[n // 2]


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="first two shapes only")
    args = p.parse_args()
    try:
        import torch
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        print(f"# fla not available ({e}); its column stays empty", file=sys.stderr)
        chunk_simple_gla = None
    ours = jax.jit(gpu.linear_attention)
    ref = jax.jit(reference.linear_attention)
    print("| check B, T, H, D | initial state | o rel err | state rel err |")
    print("|---|---|---|---|")
    for B, T, H, D in [(1, 1000, 3, 128), (2, 4160, 2, 128), (1, 64, 1, 128), (1, 20000, 2, 128)]:
        ks = jax.random.split(jax.random.PRNGKey(T), 5)
        q, k, v = (jax.random.normal(ks[i], (B, T, H, D), jnp.float32).astype(jnp.bfloat16) for i in range(3))
        g = -jax.random.uniform(ks[3], (H,), minval=0.01, maxval=0.8)
        s0 = jax.random.normal(ks[4], (B, H, D, D))
        o, s = ours(q, k, v, g, initial_state=s0)
        ro, rs = ref(q, k, v, g, initial_state=s0)
        print(f"| {B}, {T}, {H}, {D} | yes | {rel_err(o, ro):.1e} | {rel_err(s, rs):.1e} |", flush=True)
    hbm = copy_bandwidth()
    print(f"# {jax.devices()[0].device_kind} | jax {jax.__version__} | copy bandwidth {hbm / 1e12:.2f} TB/s")
    print("| B | T | H | D | ours ms | GB/s | % copy | jnp ref ms | fla ms | fla / ours | max rel err vs ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, T, H, D in SHAPES[:2] if args.quick else SHAPES:
        ks = jax.random.split(jax.random.PRNGKey(T + H), 4)
        q, k, v = (jax.random.normal(ks[i], (B, T, H, D), jnp.float32).astype(jnp.bfloat16) for i in range(3))
        g = -(2.0 ** (-8.0 * (jnp.arange(H) + 1) / H))
        io = 4 * B * T * H * D * 2
        o, s = ours(q, k, v, g)
        ro, rs = ref(q, k, v, g)
        err = max(rel_err(o, ro), rel_err(s, rs))
        t_ref = bench_jax(ref, q, k, v, g)
        t_ours = t_fla = float("inf")
        if chunk_simple_gla is not None:
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            tg = torch.from_dlpack(g.astype(jnp.float32))
        for _ in range(ROUNDS):
            t_ours = min(t_ours, bench_jax(ours, q, k, v, g))
            if chunk_simple_gla is not None:
                t_fla = min(t_fla, bench_torch(lambda: chunk_simple_gla(tq, tk, tv, g_gamma=tg, output_final_state=True)))
        print(f"| {B} | {T} | {H} | {D} | {t_ours:.3f} | {io / t_ours / 1e6:.0f} | {100 * io / (t_ours * 1e-3) / hbm:.0f}% "
              f"| {t_ref:.3f} | {t_fla:.3f} | {t_fla / t_ours:.2f}x | {err:.1e} |", flush=True)
    decode_table(hbm)


def decode_table(hbm):
    """The decode step of 16 layers inside a jitted loop of 64 tokens: us per step per layer."""
    H, D, steps, layers = 16, 128, 64, 16
    print("\n| decode B | H | D | us per step per layer | state bytes read+written | floor us | floor / time |")
    print("|---|---|---|---|---|---|---|")
    for B in (1, 64):
        ks = jax.random.split(jax.random.PRNGKey(B), 4)
        q, k, v = (jax.random.normal(ks[i], (steps, B, 1, H, D), jnp.float32).astype(jnp.bfloat16) for i in range(3))
        g = -(2.0 ** (-8.0 * (jnp.arange(H) + 1) / H))
        states = tuple(jax.random.normal(jax.random.fold_in(ks[3], i), (B, H, D, D)) for i in range(layers))

        @jax.jit
        def loop(states, q, k, v):
            def token(t, carry):
                states, total = carry
                new = []
                for state in states:  # one step per layer, as the engine runs them
                    o, state = api.linear_attention_step(q[t], k[t], v[t], g, state)
                    total += o[:, 0, :, 0].astype(jnp.float32)
                    new.append(state)
                return tuple(new), total
            return jax.lax.fori_loop(0, steps, token, (states, jnp.zeros((B, H))))

        ms = bench_jax(loop, states, q, k, v)
        nbytes = 2 * B * H * D * D * 4
        floor = nbytes / hbm * 1e6
        us = ms * 1e3 / steps / layers
        print(f"| {B} | {H} | {D} | {us:.1f} | {nbytes / 1e6:.1f} MB | {floor:.1f} | {floor / us:.0%} |", flush=True)


if __name__ == "__main__":
    main()
