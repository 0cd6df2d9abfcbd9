"""Ring-mini at its full shape with random weights (`benchmarks.generate.make_model`) on a Hopper
GPU: each decoder layer's decode token through the kernels against the same token through XLA.

A deep random model is chaotic (its decode and its own forward differ by most of the largest
logit: docs/PERFORMANCE.md, "FP8 end to end"), so the layers are compared one at a time, each on
the same input and the same random cache. Each layer reads its weights in the model's stacks of
every layer of its kind and its cache entry in the cache's stacks, as the decode loop does: an
addressing error that only arrays of the full size meet (an FP8 stack of 2-4 GiB, docs/FP8.md)
shows as a layer whose update is off, where tiny models cannot show it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from pallas_kernels import backend as kernel_backend
from pallas_kernels.backend import platform, triton_offsets_overflow
from pallas_kernels.matvec import gpu as matvec_gpu
from ring_jax import RingConfig
from ring_jax.cache import Cache, cache_length, init_cache
from ring_jax.layers.rope import rope_tables
from ring_jax.layers.stack import layer_view
from ring_jax.schedule import cache_slot, kind_index

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(platform() != "hopper", reason="the kernels run on Hopper")]


def layer_updates(model, context: int, seed: int) -> list:
    """Each decoder layer's update (output minus input, float32 [1, 1, hidden]) of one decode token
    at position `context`, on one random input row and a random cache of `context` tokens."""
    config, B = model.config, 1
    keys = jax.random.split(jax.random.key(seed), 4)
    empty = init_cache(config, B, cache_length(context + 1), np.zeros(B, np.int32), model.dtype)
    cache = Cache(0.01 * jax.random.normal(keys[0], empty.states.shape, empty.states.dtype),
                  jax.random.normal(keys[1], empty.keys.shape, empty.keys.dtype),
                  jax.random.normal(keys[2], empty.values.shape, empty.values.dtype),
                  empty.start, jnp.int32(context))
    cos, sin = rope_tables(config, jnp.full((B, 1), context, jnp.int32), model.dtype)
    # A small x: the layer normalises its input, so its update is the same, and out - x keeps the
    # update's own bf16 resolution instead of x's.
    x = (1e-3 * jax.random.normal(keys[3], (B, 1, config.hidden_size), jnp.float32)).astype(model.dtype)

    graphdef, state = nnx.split(model)

    # The weights go in as arguments and only the update comes out (an nnx.jit of the model would
    # return every weight as well: twice the model's 33 GB). One compile per kind of layer.
    @functools.partial(jax.jit, static_argnums=3)
    def update(state, x, cache, kind, index, slot):
        layer = layer_view(getattr(nnx.merge(graphdef, state), kind), index)
        out, _ = layer(x, cos, sin, cache, slot, jnp.ones((B, 1), bool))
        return out.astype(jnp.float32) - x.astype(jnp.float32)
    return [update(state, x, cache, kind, jnp.int32(index), jnp.int32(cache_slot(config, i)))
            for i in range(config.num_decoder_layers) for kind, index in [kind_index(config, i)]]


@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_each_layer_decodes_through_the_kernels_as_through_xla(quantize, monkeypatch):
    """bf16 and FP8 weights: every layer's update through the decode kernels (the matvec products,
    the router's selection, the linear and softmax decode attention) within bf16 roundings of its
    update through the references; the kernels read every FP8 stack, the 4.03 GB one of the
    linear layers' experts' down included."""
    from benchmarks.generate import make_model

    config = RingConfig.from_hf("configs/ring-mini-linear-2.0.json")
    model = make_model(config, quantize=quantize)
    overflowing = []                        # per matvec call: whether a stack needs the uint16 pairs
    monkeypatch.setattr(matvec_gpu, "matvec", lambda x, w, *a, _f=matvec_gpu.matvec, **k: overflowing.append(
        any(map(triton_offsets_overflow, w if isinstance(w, tuple) else (w,)))) or _f(x, w, *a, **k))
    got = layer_updates(model, 4096, seed=0)
    assert overflowing and any(overflowing) == (quantize is not None)
    monkeypatch.setattr(kernel_backend, "platform", lambda: "other")            # every computation in XLA
    jax.clear_caches()
    want = layer_updates(model, 4096, seed=0)
    jax.clear_caches()
    errors = [rel_err(g, w) for g, w in zip(got, want)]
    print(f"{quantize or 'bf16'}: rel err of each layer's update, kernels against XLA:",
          " ".join(f"{e:.1e}" for e in errors))
    # The two ways differ by float32 roundings, which flip the layer's bf16 roundings (inside it and
    # of its output) here and there: a step of 2^-8 to 2^-7 of an element, a few steps at most, and
    # in many layers none. A stack read at the wrong place is off by the update's own scale.
    assert max(errors) <= 2e-2
