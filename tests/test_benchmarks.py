"""Helpers of the benchmarks that the CPU can check."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.fp8_quality import float32_layers
from benchmarks.train import op_sources
from ring_jax import RingConfig, RingModel
from conftest import load_config_dict, rel_err


def inner(x):
    return jnp.sin(x) @ x


def outer(x):
    return inner(x) * 2


def test_op_sources_name_each_instruction_with_its_python_frames():
    """A profile's kernels are attributed through the compiled HLO's instruction names: the dot
    of `inner`, called from `outer`, reads as dot_general at inner's line < outer's line."""
    hlo = jax.jit(outer).lower(jnp.ones((8, 8))).compile().as_text()
    sources = op_sources(hlo, depth=2)
    body = lambda f: f"tests/test_benchmarks.py:{inspect.getsourcelines(f)[1] + 1}"     # its return line
    dots = [where for where in sources.values() if where.startswith("dot_general @ ")]
    assert dots and all(where == f"dot_general @ {body(inner)} < {body(outer)}" for where in dots), sources


def test_fp8_quality_layers_one_at_a_time_make_the_forward():
    """The per-layer table feeds each layer the float32 model's input to it: run one at a time
    (`model.layer(i)` at its cache slot), the layers must give the model's own hidden states, and
    each MoE layer its expert choices."""
    config = RingConfig.from_hf(load_config_dict("tiny.json"), num_hidden_layers=3)   # linear, linear, softmax
    model = RingModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 12))
    inputs, updates, choices = float32_layers(model, ids)
    assert len(inputs) == config.num_decoder_layers
    assert [None if c is None else c.shape for c in choices] == [
        (12, config.num_experts_per_tok) if config.is_moe_layer(i) else None for i in range(config.num_decoder_layers)]
    assert rel_err(model.norm(inputs[-1] + updates[-1]), model.hidden_states(jnp.asarray(ids))) <= 1e-6
