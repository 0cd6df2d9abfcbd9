"""FP8 quality at a full model shape with random weights: the next-token distributions of the bf16
and the FP8 model against the float32 model's.

    python -m benchmarks.fp8_quality [--config configs/ring-mini-linear-2.0.json] [--tokens 512]

One random bf16 model (`benchmarks.generate.make_model`); the float32 model holds the same weights
cast up, and the FP8 model is the bf16 one quantized (`RingModel.quantize`), run with bf16 activations
(weight-only) and with FP8 rows into the experts (`fp8_activations="grouped"`). Each runs the same
random prompt through its full forward; the table gives, per model, the max and mean over the
positions of KL(float32 || model) and how often its top token is float32's.

A deep random model is chaotic (a rounding flips an expert choice, and the flip carries to the
end), so a second table takes the layers one at a time: each layer of each model is fed the float32
model's input to that layer (cast to the model's dtype), and its update (output minus input) is
compared with the float32 layer's: |update - float32 update| / |float32 update| over the positions,
and an MoE layer's expert choices with the float32 layer's (the share of the choices changed).

The models are made and dropped one after the other, the bf16 weights held on the host meanwhile,
so that one model is on the device at a time. Ring-mini's float32 copy alone is 66 GB, and its
forward's temporaries (the reference grouped matmul) add more: the benchmark lets JAX take 95% of
the device memory.
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
from ring_jax.layers.moe import MoE
from ring_jax.layers.rope import rope_tables
from ring_jax.schedule import cache_slot


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


def layer_runner(model, T: int):
    """(i, x [1, T, hidden] in the model's dtype) -> (decoder layer i's output, its expert choices
    [T, top_k] or None for a dense MLP): the layer on its own."""
    cos, sin = rope_tables(model.config, jnp.arange(T), model.dtype)

    def step(layer, x, slot):
        out = layer(x, cos, sin, None, slot)[0]
        if not isinstance(layer.mlp, MoE):
            return out, None
        # The layer's call does not return its router's choices: the router again on its input as
        # `DecoderLayer` makes it (the attention's output added, normalised), in the same program.
        h = x + layer.attention(layer.input_layernorm.deferred(x), cos, sin, None, slot)[0]
        return out, layer.mlp.gate(layer.post_attention_layernorm.deferred(h).reshape(-1, h.shape[-1]))[0]
    step = nnx.jit(step, static_argnums=2)
    return lambda i, x: step(model.layer(i), x, cache_slot(model.config, i))


def float32_layers(model, ids):
    """The float32 model's input to each decoder layer, that layer's update (output minus input)
    and its expert choices: lists of float32 [1, T, hidden], of the same, and of int32 [T, top_k]
    (None for a dense MLP)."""
    run = layer_runner(model, ids.shape[1])
    x = jnp.take(model.word_embeddings[...], jnp.asarray(ids), axis=0)
    inputs, updates, choices = [], [], []
    for i in range(model.config.num_decoder_layers):
        y, chosen = run(i, x)
        inputs.append(np.asarray(x))
        updates.append(np.asarray(y - x))
        choices.append(None if chosen is None else np.asarray(chosen))
        x = y
    return inputs, updates, choices


def layer_updates(model, inputs):
    """Each decoder layer on its float32 input inputs[i] [1, T, hidden], cast to the model's
    dtype: (its updates, float32 [1, T, hidden], and expert choices, as `float32_layers`)."""
    run = layer_runner(model, inputs[0].shape[1])
    updates, choices = [], []
    for i, x in enumerate(inputs):
        x = jnp.asarray(x).astype(model.dtype)
        y, chosen = run(i, x)
        updates.append(np.asarray(y, np.float32) - np.asarray(x, np.float32))
        choices.append(None if chosen is None else np.asarray(chosen))
    return updates, choices


def changed(got, want) -> float:
    """The share of the expert choices in got [T, top_k] that are not among want's for the token."""
    return 1 - np.mean([np.intersect1d(g, w).size / w.size for g, w in zip(got, want)])


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
    inputs, want_updates, want_choices = float32_layers(f32_model, ids)
    del f32_model
    model = on_device(graphdef, host)
    layers = {"bf16": layer_updates(model, inputs)}
    model.quantize()
    fp8 = model(ids)[0]
    layers["fp8 weights"] = layer_updates(model, inputs)
    rows_config = dataclasses.replace(config, fp8_activations="grouped")
    rows_graphdef = nnx.split(nnx.eval_shape(
        lambda: RingModel(rows_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).quantize()))[0]
    rows_model = nnx.merge(rows_graphdef, nnx.split(model)[1])
    fp8_rows = rows_model(ids)[0]
    layers["fp8 weights and rows"] = layer_updates(rows_model, inputs)
    print("\n| weights | max KL from float32 | mean KL | top-1 agreement |")
    print("|---|---|---|---|")
    for name, got in (("bf16", bf16), ("fp8 weights (bf16 activations)", fp8), ("fp8 weights and rows", fp8_rows)):
        kl_max, kl_mean, top1 = (float(x) for x in _figures(want, got))
        print(f"| {name} | {kl_max:.2e} | {kl_mean:.2e} | {top1:.1%} |", flush=True)
    print("\n| layer | kind | " + " | ".join(f"{name}: update rel. err, experts changed" for name in layers) + " |")
    print("|---|---|" + "---|" * len(layers))
    errors = {name: [np.linalg.norm(got - want) / np.linalg.norm(want) for got, want in zip(updates, want_updates)]
              for name, (updates, _) in layers.items()}
    for i in range(config.num_decoder_layers):
        moe = want_choices[i] is not None
        kind = f"{'softmax' if config.is_softmax_layer(i) else 'linear'}, {'MoE' if moe else 'dense'}"
        cells = [f"{errors[name][i]:.2e}" + (f", {changed(choices[i], want_choices[i]):.1%}" if moe else "")
                 for name, (_, choices) in layers.items()]
        print(f"| {i} | {kind} | " + " | ".join(cells) + " |")
    print("| median | | " + " | ".join(f"{np.median(errors[name]):.2e}" for name in layers) + " |", flush=True)


if __name__ == "__main__":
    main()
