"""Lightning linear attention on one GPU: our Pallas Mosaic GPU kernel, the jnp reference, and fla's
`chunk_simple_gla` (Triton, PyTorch) measured side by side in one process.

    pip install --no-deps fla_core-*.whl   # fla-core, pure Python
    python -m benchmarks.linear_attention [--quick]

Prints, per shape, the GPU time of ours and of fla, each the sum of its kernels' durations in a
profiler trace (`timing.device_ms`, `timing.torch_device_ms`), the q,k,v,o bytes over our time
and its share of the measured device-to-device copy bandwidth; then both sides as a stream of calls
queued back to back (host launch work included, one wait at the end); then a training step's
forward and backward (ours: the kernel's gradient as three more kernel scans, against autodiff of
the jnp reference, timed once, and fla's Triton backward); then the decode step inside a jitted
loop. Also checks our kernel against the jnp reference on every shape (relative error). Ours and
fla alternate for ROUNDS rounds; each figure is the lowest round, so a transient slowdown of the
shared machine hits neither side alone.
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import (back_to_back_ms, bench_jax, copy_bandwidth, device_ms, torch_back_to_back_ms,
                               torch_device_ms)
from pallas_kernels.linear_attention import api, scan_gpu, reference

ROUNDS = 3
SHAPES = [(1, 4096, 16, 128), (1, 32768, 16, 128), (1, 131072, 16, 128), (8, 4096, 16, 128),
          (1, 32768, 32, 128), (8, 4096, 32, 128)]


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
    ours = jax.jit(scan_gpu.linear_attention)
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
    print("| B | T | H | D | ours GPU ms | fla GPU ms | fla / ours | GB/s | % copy | ours back-to-back ms "
          "| fla back-to-back ms | fla / ours | jnp ref ms | max rel err vs ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for B, T, H, D in SHAPES[:2] if args.quick else SHAPES:
        ks = jax.random.split(jax.random.PRNGKey(T + H), 4)
        q, k, v = (jax.random.normal(ks[i], (B, T, H, D), jnp.float32).astype(jnp.bfloat16) for i in range(3))
        g = -(2.0 ** (-8.0 * (jnp.arange(H) + 1) / H))
        io = 4 * B * T * H * D * 2
        o, s = ours(q, k, v, g)
        ro, rs = ref(q, k, v, g)
        err = max(rel_err(o, ro), rel_err(s, rs))
        t_ref = bench_jax(ref, q, k, v, g)
        gpu_ours = b2b_ours = gpu_fla = b2b_fla = float("inf")
        if chunk_simple_gla is not None:
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            tg = torch.from_dlpack(g.astype(jnp.float32))
            fla = lambda: chunk_simple_gla(tq, tk, tv, g_gamma=tg, output_final_state=True)  # noqa: E731
        for _ in range(ROUNDS):
            gpu_ours = min(gpu_ours, device_ms(ours, q, k, v, g) or bench_jax(ours, q, k, v, g))
            b2b_ours = min(b2b_ours, back_to_back_ms(ours, q, k, v, g))
            if chunk_simple_gla is not None:
                gpu_fla = min(gpu_fla, torch_device_ms(fla))
                b2b_fla = min(b2b_fla, torch_back_to_back_ms(fla))
        fla_cells = (f"{gpu_fla:.3f} | {gpu_fla / gpu_ours:.2f}x", f"{b2b_fla:.3f} | {b2b_fla / b2b_ours:.2f}x") \
            if chunk_simple_gla is not None else ("n/a | n/a",) * 2
        print(f"| {B} | {T} | {H} | {D} | {gpu_ours:.3f} | {fla_cells[0]} | {io / gpu_ours / 1e6:.0f} "
              f"| {100 * io / (gpu_ours * 1e-3) / hbm:.0f}% | {b2b_ours:.3f} | {fla_cells[1]} | {t_ref:.3f} | {err:.1e} |",
              flush=True)
    gradient_table(args.quick, chunk_simple_gla)
    decode_table(hbm)


def gradient_table(quick, chunk_simple_gla):
    """Forward and backward of sum(o * r) with respect to q, k and v, GPU ms."""
    print("\n| gradient B | T | H | D | ours GPU ms | jnp ref GPU ms | fla GPU ms | fla / ours | max rel err vs ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, T, H, D in [(1, 4096, 16, 128), (8, 4096, 16, 128), (1, 32768, 16, 128)][:2 if quick else 3]:
        ks = jax.random.split(jax.random.PRNGKey(T + B), 4)
        q, k, v, r = (jax.random.normal(ks[i], (B, T, H, D), jnp.float32).astype(jnp.bfloat16) for i in range(4))
        g = -(2.0 ** (-8.0 * (jnp.arange(H) + 1) / H))

        def grad(backend):
            def loss(q, k, v):
                o, _ = api.linear_attention(q, k, v, g, backend=backend)
                return jnp.sum(o.astype(jnp.float32) * r)
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        ours, ref = grad("gpu"), grad("reference")
        err = max(rel_err(a, b) for a, b in zip(ours(q, k, v), ref(q, k, v)))
        t_ours = min(device_ms(ours, q, k, v) for _ in range(ROUNDS))
        t_ref = device_ms(ref, q, k, v)
        t_fla, fla_cell = float("nan"), "n/a | n/a"
        if chunk_simple_gla is not None:
            import torch

            tq, tk, tv = (torch.from_dlpack(x).detach().requires_grad_() for x in (q, k, v))
            tg, tr = torch.from_dlpack(g.astype(jnp.float32)), torch.from_dlpack(r).float()

            def fla():
                o, _ = chunk_simple_gla(tq, tk, tv, g_gamma=tg, output_final_state=True)
                return torch.autograd.grad((o.float() * tr).sum(), (tq, tk, tv))
            t_fla = min(torch_device_ms(fla) for _ in range(ROUNDS))
            fla_cell = f"{t_fla:.3f} | {t_fla / t_ours:.2f}x"
        print(f"| {B} | {T} | {H} | {D} | {t_ours:.3f} | {t_ref:.3f} | {fla_cell} | {err:.1e} |", flush=True)


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
