"""The kernels of a decode step against the jnp references (XLA): the router's expert selection,
the linear-attention layer's one-token step and the softmax layer's attention over the cache.

    python -m benchmarks.decode_kernels [--config configs/ring-mini-linear-2.0.json] [--tokens 1 8 64 4096]
                                        [--batch 1 8 64]

Each moves little (a few KB per token; the step reads and writes a 1 MB float32 state per sequence
and layer at Ring-mini's shape), so its floor is one kernel's latency, where XLA runs several
kernels. Timed as the GPU kernels' own time per call (`timing.device_ms`, from a profiler trace of
20 calls), which is what each adds to a step; without a GPU, wall-clock medians of the kernels in
interpret mode (a smoke run).
- router selection: the sigmoid scores [tokens, experts] float32 and the expert bias -> each
  token's top-k ids and normalised weights (docs/SPEC.md §7.1); "agreement" says whether the ids are the same.
- linear-attention step: qkv [batch, 3 H D] bf16 and the state -> q/k norms, RoPE, the output and
  the new state (`pallas_kernels.linear_attention_decode`); "agreement" is the largest difference
  of the outputs over their largest value.
- softmax attention: one token per sequence over `context` cached slots of a layer's keys and
  values, entry `slot` of the stack of every softmax layer's cache [S, B, L, Hkv, D] bf16
  (`pallas_kernels.softmax_attention_decode`); the reference, as XLA runs it inside the scanned
  decoder, slices the layer's cache out of the stack first. It reads 4 B context Hkv D bytes of
  keys and values: the floor at the copy bandwidth is printed beside it.
"""

import argparse
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import ring_jax  # noqa: E402,F401  (sets XLA's rounding flag before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import bench_jax, copy_bandwidth, device_ms, traced_gpu_ms  # noqa: E402
import pallas_kernels  # noqa: E402
from pallas_kernels.linear_attention import reference as la_reference  # noqa: E402
from pallas_kernels.router import gpu as router_gpu, reference as router_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_us(f, *args):
    on_gpu = jax.devices()[0].platform == "gpu"
    return (device_ms(f, *args) if on_gpu else bench_jax(f, *args, n=3)) * 1e3


def threaded_us(step, args, n=20):
    """Microseconds per call of step(*args) -> (o, state), the state (the last argument, donated)
    fed back in as a decode loop does, so that the kernel updates it in place without a copy."""
    args = list(args)

    def run(count):
        for _ in range(count):
            _, args[-1] = step(*args)
        jax.block_until_ready(args[-1])

    run(1)
    if jax.devices()[0].platform == "gpu":
        return traced_gpu_ms(lambda: run(n), n) * 1e3
    t = time.perf_counter()
    run(3)
    return (time.perf_counter() - t) / 3 * 1e6


def row(name, tokens, t_kernel, t_xla, agreement):
    print(f"| {name} | {tokens} | {t_kernel:.1f} | {t_xla:.1f} | {t_xla / t_kernel:.1f}x | {agreement} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 4096], help="router selection")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64],
                        help="linear-attention step and softmax attention")
    parser.add_argument("--context", type=int, nargs="+", default=[4096, 32768], help="softmax attention")
    args = parser.parse_args(argv)
    config = ring_jax.RingConfig.from_hf(args.config)
    interpret = jax.devices()[0].platform != "gpu"
    E = config.num_experts
    route = dict(top_k=config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
                 scaling=config.routed_scaling_factor)
    print(f"device: {jax.devices()[0].device_kind}; {os.path.basename(args.config)}: {E} experts in "
          f"{config.n_group} groups, top {config.topk_group} groups, top-{config.num_experts_per_tok}; "
          f"{'wall clock, interpret mode (smoke run)' if interpret else 'kernel time from a trace'}")
    print("| kernel | tokens | kernel us | jnp reference us | reference / kernel | agreement |")
    print("|---|---|---|---|---|---|")
    select = jax.jit(lambda s, b: router_gpu.select_experts(s, b[None], 0, interpret=interpret, **route))
    select_xla = jax.jit(lambda s, b: router_reference.select_experts(s, b, **route))
    rng = np.random.default_rng(0)
    for N in args.tokens:
        s = jnp.asarray(jax.nn.sigmoid(rng.standard_normal((N, E))), jnp.float32)
        bias = jnp.asarray(rng.standard_normal(E) * 0.01, jnp.float32)
        same = bool(np.array_equal(select(s, bias)[0], select_xla(s, bias)[0]))
        row("router selection", N, timed_us(select, s, bias), timed_us(select_xla, s, bias), f"same ids: {same}")

    H, D, r = config.num_attention_heads, config.head_dim, config.rotary_dim
    constants = dict(eps=config.rms_norm_eps, scale=D ** -0.5)
    # (qkv, q_weight, k_weight, cos, sin, log_decay, valid, state): the state last, to be donated
    step = jax.jit(lambda *a: pallas_kernels.linear_attention_decode(*a[:6], a[7], a[6], backend="gpu",
                                                                     interpret=interpret, **constants))
    step_xla = jax.jit(lambda *a: la_reference.decode_step(*a[:6], a[7], a[6], **constants))
    for B in args.batch:
        qkv = jnp.asarray(rng.standard_normal((B, 3 * H * D)), jnp.bfloat16)
        weights = tuple(jnp.asarray(1 + 0.1 * rng.standard_normal(D), jnp.bfloat16) for _ in range(2))
        angles = np.tile(rng.uniform(0, 6.3, (B, r // 2)), 2)
        rope = (jnp.asarray(np.cos(angles), jnp.bfloat16), jnp.asarray(np.sin(angles), jnp.bfloat16))
        g = jnp.asarray(-rng.uniform(0.01, 0.9, H), jnp.float32)
        state = jnp.asarray(rng.standard_normal((B, H, D, D)), jnp.float32)
        a = (qkv, *weights, *rope, g, jnp.ones((B,), bool), state)
        diffs = [np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))) / np.max(np.abs(np.asarray(y, np.float64)))
                 for x, y in zip(step(*a), step_xla(*a))]
        donated = (jax.jit(step, donate_argnums=len(a) - 1), jax.jit(step_xla, donate_argnums=len(a) - 1))
        times = [threaded_us(f, [jnp.copy(x) for x in a]) for f in donated]
        row("linear-attention step", B, *times, f"o {diffs[0]:.1e}, state {diffs[1]:.1e}")

    Hkv = config.num_key_value_heads
    S = sum(config.is_softmax_layer(i) for i in range(config.num_decoder_layers))
    bandwidth = None if interpret else copy_bandwidth()
    attend = jax.jit(lambda *a: pallas_kernels.softmax_attention_decode(*a[:5], slot=a[5], backend="gpu",
                                                                        interpret=interpret))
    attend_xla = jax.jit(lambda *a: pallas_kernels.softmax_attention_decode(*a[:5], slot=a[5], backend="reference"))
    for context in args.context:
        for B in args.batch:
            L = context + 4096                                   # the cache holds the context and more
            q = jnp.asarray(rng.standard_normal((B, 1, H, D)), jnp.bfloat16)
            key = jax.random.key(context + B)
            keys, values = (jax.random.normal(k, (S, B, L, Hkv, D), jnp.bfloat16) for k in jax.random.split(key))
            a = (q, keys, values, jnp.zeros((B,), jnp.int32), jnp.int32(context - 1), jnp.int32(S - 1))
            got, want = attend(*a), attend_xla(*a)
            agreement = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                              / jnp.max(jnp.abs(want.astype(jnp.float32))))
            floor = "" if bandwidth is None else f", floor {4 * B * context * Hkv * D / bandwidth * 1e6:.1f} us"
            row(f"softmax attention, context {context}", B, timed_us(attend, *a), timed_us(attend_xla, *a),
                f"{agreement:.1e}{floor}")
            del keys, values, a

if __name__ == "__main__":
    main()
