"""FP8 quality at a full model shape with random weights: the next-token distributions of the bf16
and the FP8 model against the float32 model's.

    python -m benchmarks.fp8_quality [--config configs/ring-mini-linear-2.0.json] [--tokens 512]

One random bf16 model (`benchmarks.generate.make_model`); the float32 model holds the same weights
cast up, and the FP8 model is the bf16 one quantized (`RingModel.quantize`), run with bf16 activations
(weight-only) and with FP8 rows into the experts (`fp8_activations="grouped"`). Each runs the same
random prompt through its full forward; the table gives, per model, the max and mean over the
positions of KL(float32 || model) and how often its top token is float32's. The models are made
and dropped one after the other, the bf16 weights held on the host meanwhile, so that one model is
on the device at a time. Ring-mini's float32 copy alone is 66 GB, and its forward's temporaries
(the reference grouped matmul) add more: the benchmark lets JAX take 95% of the device memory.
"""

import argparse
import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")    # JAX's default leaves a quarter unused

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.generate import ROOT, make_model
from ring_jax import RingConfig, RingModel


def on_device(graphdef, host_state, dtype=None):
    """The model of `graphdef` with `host_state`'s arrays put on the device, its bf16 ones cast to
    `dtype` there (None: kept), one array at a time."""
    def put(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if dtype is not None and x.dtype == jnp.bfloat16 else x
    return nnx.merge(graphdef, jax.tree.map(put, host_state))


@jax.jit
def _figures(want, got):
    p, q = jax.nn.log_softmax(want, -1), jax.nn.log_softmax(got, -1)
    kl = jnp.sum(jnp.exp(p) * (p - q), axis=-1)
    return jnp.max(kl), jnp.mean(kl), jnp.mean(jnp.argmax(want, -1) == jnp.argmax(got, -1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--tokens", type=int, default=512, help="prompt length (the positions measured)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = RingConfig.from_hf(args.config)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, config {os.path.basename(args.config)}, "
          f"{args.tokens} positions", flush=True)
    ids = np.random.default_rng(args.seed).integers(0, config.vocab_size, (1, args.tokens))
    model = make_model(config, args.seed)
    bf16 = model(ids)[0]
    graphdef, state = nnx.split(model)
    host = jax.device_get(state)              # the bf16 weights wait on the host while the float32 model runs
    del model, state
    f32_model = on_device(graphdef, host, jnp.float32)
    want = f32_model(ids)[0]
    del f32_model
    fp8_model = on_device(graphdef, host).quantize()
    fp8 = fp8_model(ids)[0]
    rows_config = dataclasses.replace(config, fp8_activations="grouped")
    rows_graphdef = nnx.split(nnx.eval_shape(
        lambda: RingModel(rows_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).quantize()))[0]
    fp8_rows = nnx.merge(rows_graphdef, nnx.split(fp8_model)[1])(ids)[0]
    print("\n| weights | max KL from float32 | mean KL | top-1 agreement |")
    print("|---|---|---|---|")
    for name, got in (("bf16", bf16), ("fp8 weights (bf16 activations)", fp8), ("fp8 weights and rows", fp8_rows)):
        kl_max, kl_mean, top1 = (float(x) for x in _figures(want, got))
        print(f"| {name} | {kl_max:.2e} | {kl_mean:.2e} | {top1:.1%} |", flush=True)


if __name__ == "__main__":
    main()
