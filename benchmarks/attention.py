"""Softmax attention of a prefill chunk over the cache: cuDNN flash attention against the jnp path.

    python -m benchmarks.attention [--config configs/ring-mini-linear-2.0.json] [--chunk 4096]

One chunk of queries [1, chunk, H, D] (bf16) at slot `cursor` of a cache [1, L, Hkv, D], as a
softmax layer of `generate()` runs it: `attention.flash_cached_attention` (two cuDNN calls merged
by their log-sum-exps; Hopper only) and `attention.cached_attention` (jnp, float32 score blocks,
two passes), in one process. FLOPs: 4 x H x D x chunk x (keys before the chunk + chunk / 2), the
products q k^T and p v of the causal part that is computed. Times: medians of 20 after warm-up.
"""

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from benchmarks.timing import bench_jax
from ring_jax import RingConfig, backends
from ring_jax.cache import KVCache
from ring_jax.layers import attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--chunk", type=int, default=4096, help="queries per call (a prefill chunk)")
    parser.add_argument("--before", type=int, nargs="*", default=[0, 4096, 28672, 126976],
                        help="keys in the cache before the chunk (its cursor)")
    args = parser.parse_args(argv)

    config = RingConfig.from_hf(args.config)
    H, Hkv, D, T = config.num_attention_heads, config.num_key_value_heads, config.head_dim, args.chunk
    flash = backends.flash_attention(jnp.zeros((1, T, H, D), jnp.bfloat16), jnp.zeros((1, 1, Hkv, D), jnp.bfloat16))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; H={H}, Hkv={Hkv}, D={D}, chunk={T}; "
          f"flash attention {'available' if flash else 'not available here (jnp path only)'}", flush=True)
    print("\n| keys before | cache slots | jnp ms | jnp TFLOP/s | flash ms | flash TFLOP/s | jnp / flash | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    start = jnp.zeros((1,), jnp.int32)
    for before in args.before:
        L = -(-(before + T) // 4096) * 4096
        ks = jax.random.split(jax.random.key(before), 3)
        q = jax.random.normal(ks[0], (1, T, H, D), jnp.float32).astype(jnp.bfloat16)
        kv = KVCache(*(jax.random.normal(k, (1, L, Hkv, D), jnp.float32).astype(jnp.bfloat16) for k in ks[1:]))
        cursor = jnp.int32(before)
        flops = 4 * H * D * T * (before + T / 2)
        jnp_path = jax.jit(lambda q, kv, c: attention.cached_attention(q, kv, c + jnp.arange(T, dtype=jnp.int32), start))
        want = jnp_path(q, kv, cursor)
        ms = bench_jax(jnp_path, q, kv, cursor)
        row = f"| {before} | {L} | {ms:.3f} | {flops / ms / 1e9:.0f} |"
        if flash:
            flash_path = jax.jit(lambda q, kv, c: attention.flash_cached_attention(q, kv, c, start))
            got = flash_path(q, kv, cursor)
            fms = bench_jax(flash_path, q, kv, cursor)
            diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                         / jnp.max(jnp.abs(want.astype(jnp.float32))))
            row += f" {fms:.3f} | {flops / fms / 1e9:.0f} | {ms / fms:.1f}x | {diff:.1e} |"
        else:
            row += " n/a | n/a | n/a | n/a |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
