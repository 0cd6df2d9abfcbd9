"""Sharding: a model split over a mesh of the 8 CPU devices (conftest) computes what the unsharded
model computes: forward logits, generate, stream and sampling, loaded straight into the layout."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ring_jax
from ring_jax import backends
from conftest import rel_err
from ring_jax.io.conversion import convert_hf_to_jax
from ring_jax.io.random_checkpoint import write_random_hf_checkpoint
from ring_jax.cache import init_cache
from ring_jax.layers.moe import MoE
from ring_jax.sharding import make_mesh, parse_mesh
from ring_jax.steps import decode_loop, prefill_step

# The meshes are of the 8 host devices that conftest asks for; on a GPU host the default devices
# are the GPUs (the sharded GPU run is benchmarks/sharded.py).
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="needs the 8 CPU devices as default devices")

F32_TOL = 1e-5
MESHES = [(1, 8, 1), (2, 2, 2), (4, 1, 2), (1, 1, 8)]   # (data, expert, tensor); (1, 1, 8): 4 heads over 8


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_dict_module):
    folder = tmp_path_factory.mktemp("sharding")
    write_random_hf_checkpoint(str(folder / "hf"), tiny_dict_module, dtype="float32", seed=7)
    convert_hf_to_jax(str(folder / "hf"), str(folder / "jax"), progress=False)
    return str(folder / "jax")


@pytest.fixture(scope="module")
def tiny_dict_module():
    """The tiny config with three layers, one of each kind (linear attention with the dense MLP,
    linear attention with the MoE, softmax attention with the MoE): what a mesh splits is each
    kind's parameters, activations and cache. The tiny model's six layers run more layer bodies,
    which every sharded program compiles again; they run over meshes in the command lines' tests
    (tests/test_eval.py, tests/test_job.py, tests/test_cli_notebook.py)."""
    from conftest import load_config_dict

    return dict(load_config_dict("tiny.json"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def load(converted):
    """load(sizes=None, dtype=None) -> the converted model, on make_mesh(*sizes) or unsharded: one
    load per mesh and dtype in the module, shared by its tests (a load builds the model and
    compiles the placement of every parameter)."""
    models = {}

    def load(sizes=None, dtype=None):
        if (sizes, dtype) not in models:
            models[sizes, dtype] = ring_jax.load_model(converted, dtype=dtype,
                                                       mesh=None if sizes is None else make_mesh(*sizes))
        return models[sizes, dtype]
    return load


@pytest.fixture(scope="module")
def unsharded(load):
    return load()


def full_spec(x: jax.Array) -> tuple:
    """x's PartitionSpec with one entry per dimension (trailing Nones written out)."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def prompts(vocab):
    rng = np.random.default_rng(3)
    # 3 prompts, one batch bucket of 4 (the filler row also fills data=2), in one 16-token bucket:
    # 64 prefill tokens, under the ~130 from which XLA:CPU fuses the unsharded MoE layer otherwise
    # than its op-by-op evaluation (ring_jax/layers/moe.py).
    return [rng.integers(2, vocab, n).tolist() for n in (5, 13, 9)]


def test_mesh_arguments():
    assert parse_mesh("data=2, expert=4") == {"data": 2, "expert": 4, "tensor": 1}
    assert dict(make_mesh(**parse_mesh("data=2")).shape) == {"data": 2, "expert": 4, "tensor": 1}
    for bad, message in [("data=2,pipe=2", "not AXIS=SIZE"), ("expert=x", "not an integer"), ("data=0", ">= 1")]:
        with pytest.raises(ValueError, match=message):
            parse_mesh(bad)
    assert dict(make_mesh(2, tensor=2).shape) == {"data": 2, "expert": 2, "tensor": 2}
    with pytest.raises(ValueError, match="there are 8"):
        make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="do not split"):
        make_mesh(3)


def test_experts_must_split_evenly(converted):
    with pytest.raises(ValueError, match="expert=3 does not divide num_experts=16"):
        ring_jax.load_model(converted, mesh=make_mesh(2, 3, 1, devices=jax.devices()[:6]))


def test_load_places_every_parameter_and_the_cache(converted):
    mesh = make_mesh(1, 2, 4)
    model = ring_jax.load_model(converted, mesh=mesh)
    layer = model.linear_moe                     # the stack of linear-attention MoE layers [n, ...]
    specs = {
        "experts": layer.mlp.experts.gate_up_proj, "g_proj": layer.attention.g_proj.kernel,
        "dense": layer.attention.dense.kernel, "qkv": layer.attention.query_key_value.kernel,
        "router": layer.mlp.gate.kernel, "embed": model.word_embeddings, "head": model.lm_head.kernel,
        "mlp_down": model.linear_dense.mlp.down_proj.kernel,
    }
    got = {name: full_spec(v[...]) for name, v in specs.items()}
    assert got == {"experts": (None, "expert", None, None), "g_proj": (None, None, "tensor"),
                   "dense": (None, "tensor", None), "qkv": (None, None, None), "router": (None, None, None),
                   "embed": ("tensor", None), "head": (None, "tensor"), "mlp_down": (None, "tensor", None)}
    # Every device holds 1/2 of the experts, not all of them.
    shard = layer.mlp.experts.gate_up_proj[...].addressable_shards[0].data
    assert shard.shape[1] == model.config.num_experts // 2
    cache = init_cache(model.config, 4, 64, np.zeros(4, np.int32), model.dtype, mesh)
    assert full_spec(cache.states) == (None, None, "tensor", None, None)      # 4 heads over tensor=4
    assert full_spec(cache.keys) == (None, None, None, None, None)            # 2 KV heads: replicated


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "data%d-expert%d-tensor%d" % s)
def test_sharded_forward_equals_unsharded(load, unsharded, sizes):
    model = load(sizes)
    # 3 rows do not divide over `data`: the batch stays whole. (With data=1 it is never split, and
    # 3 rows run as 4 do.)
    for B in (4, 3) if sizes[0] > 1 else (4,):
        ids = np.random.default_rng(B).integers(0, unsharded.config.vocab_size, (B, 13))
        assert rel_err(model(ids), unsharded(ids)) <= F32_TOL


@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 8, 1)], ids=lambda s: "data%d-expert%d-tensor%d" % s)
def test_sharded_generate_equals_unsharded(load, unsharded, sizes):
    model = load(sizes)
    batch = prompts(model.config.vocab_size)
    kwargs = dict(max_new_tokens=6, eos_token_id=[])
    want = ring_jax.generate(unsharded, batch, **kwargs)
    got = ring_jax.generate(model, batch, **kwargs)
    assert got.shape == (3, 6) and (got == want).all()
    streamed = np.concatenate(list(ring_jax.stream(model, batch, steps_per_call=4, **kwargs)), axis=1)
    assert (streamed == want).all()
    sampled = dict(kwargs, temperature=1.0, top_k=5, seed=11)
    assert (ring_jax.generate(model, batch, **sampled) == ring_jax.generate(unsharded, batch, **sampled)).all()


def test_flash_attention_path_runs_per_block(load, unsharded, monkeypatch):
    """The GPU's flash-attention path under a mesh: its calls run on each device's (batch, heads)
    block (data=2, tensor=2: 2 of the 4 query heads with 1 of the 2 KV heads). On the CPU the
    cuDNN calls are swapped for the jnp attention they stand for, so the sharded model gives the
    unsharded model's logits and tokens."""
    from ring_jax.layers import attention

    ids = np.random.default_rng(4).integers(0, unsharded.config.vocab_size, (2, 20))
    batch, kwargs = prompts(unsharded.config.vocab_size), dict(max_new_tokens=4, eos_token_id=[])
    # The unsharded model's results, before the swap (its generate steps are the ones the other
    # tests compiled: max_new_tokens=4 is in their buckets).
    want_logits, want_tokens = unsharded(ids), ring_jax.generate(unsharded, batch, **kwargs)

    seen = []

    def cached(q, kv, cursor, start):
        seen.append(q.shape)
        return attention.cached_attention(q, kv, cursor + jnp.arange(q.shape[1], dtype=jnp.int32), start)

    monkeypatch.setattr(backends, "flash_attention", lambda q, k: q.shape[1] > backends.FLASH_MIN_TOKENS)
    monkeypatch.setattr(attention, "flash_cached_attention", cached)
    monkeypatch.setattr(attention, "flash_causal_attention", lambda q, k, v: seen.append(q.shape) or attention.causal_attention(q, k, v))
    model = load((2, 2, 2))
    # a forward shape and a cache length no other test runs on this mesh: the sharded steps are
    # traced afresh, with the swapped functions
    assert rel_err(model(ids), want_logits) <= F32_TOL
    assert (ring_jax.generate(model, batch, cache_len=512, **kwargs) == want_tokens).all()
    assert (1, 20, 2, 16) in seen                     # the forward: 2 rows over data=2
    assert (2, 16, 2, 16) in seen                     # the prefill chunk: 3 prompts + 1 filler over data=2
    assert all(shape[2] == 2 for shape in seen)


def test_bf16_expert_parallel_model_is_bit_exact(converted, load):
    """bf16 over data and expert axes: every pair's output comes from one device and the float32
    combine runs as on one device, so logits and tokens are the unsharded model's bits. (From the
    HF folder: the host arrays are split on load.)"""
    model = ring_jax.load_model(os.path.join(os.path.dirname(converted), "hf"), dtype="bfloat16",
                                mesh=make_mesh(2, 4, 1))
    single = load(dtype="bfloat16")
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 24))
    assert (np.asarray(model(ids)) == np.asarray(single(ids))).all()
    batch = prompts(model.config.vocab_size)
    greedy = ring_jax.generate(single, batch, max_new_tokens=8, eos_token_id=[])
    assert (ring_jax.generate(model, batch, max_new_tokens=8, eos_token_id=[]) == greedy).all()
    # Early stops: with every sequence's first token as an end token, each ends there (the filler
    # row starts finished), and the stream's first call gives those tokens and stops.
    eos = [int(t) for t in greedy[:, 0]]
    got = list(ring_jax.stream(model, batch, max_new_tokens=8, eos_token_id=eos, steps_per_call=2))
    assert len(got) == 1 and (got[0] == greedy[:, :1]).all()


def test_bf16_scattered_combine_is_exact(load, monkeypatch):
    """The prefill way back (reduce-scatter, combine on token shards, all-gather) on 8 expert
    shards. Forced at every size: the unsharded model's bits at 3 x 21 tokens (not a multiple of
    8). At 300 tokens (the default way there), the MoE layer equals its op-by-op evaluation, the
    rounding PyTorch does. (The unsharded jitted layer does not, there: from about 130 tokens XLA:CPU
    fuses it so that about 30% of its outputs are one bf16 step off op by op.)"""
    from ring_jax.layers import moe

    mesh = make_mesh(1, 8, 1)
    model, single = load((1, 8, 1), "bfloat16"), load(dtype="bfloat16")
    layer = model.layer(1).mlp
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(5), (1, 300, model.config.hidden_size)).astype(jnp.bfloat16)
    with jax.disable_jit():
        want = np.asarray(single.layer(1).mlp(x))
    with jax.set_mesh(mesh):
        assert (np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)) == want).all()

    monkeypatch.setattr(moe, "SCATTER_MIN_TOKENS", 1)   # read when tracing: a shape no other test runs
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, (3, 21))
    assert (np.asarray(model(ids)) == np.asarray(single(ids))).all()


@pytest.mark.parametrize("tokens, want", [
    (8, ["all-reduce"]),                                 # gathered experts' weights
    (32, ["all-reduce"]),                                # grouped matmuls
    (300, ["reduce-scatter", "all-gather"]),             # 300 >= SCATTER_MIN_TOKENS, 300 % 8 != 0
], ids=["gathered", "grouped", "scattered"])
def test_expert_parallel_moe_moves_only_the_pairs_outputs(tiny_dict, tokens, want):
    """Under an expert mesh the MoE layer's collectives move the pairs' outputs [tokens, top_k,
    hidden] (and, scattered, the combined [tokens, hidden]): no expert weights or tokens."""
    from ring_jax.layers import moe

    config = ring_jax.RingConfig.from_hf(tiny_dict)
    mesh = make_mesh(1, 8, 1)
    layer = ring_jax.shard_model(MoE(config, dtype=jnp.float32, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(0), (1, tokens, config.hidden_size))
    assert (tokens * config.num_experts_per_tok <= backends.GATHER_MAX_PAIRS) == (tokens == 8)
    assert (tokens >= moe.SCATTER_MIN_TOKENS) == (tokens == 300)
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile().as_text()
    collectives = re.findall(r"= (\S+) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)\(", hlo)
    k, hidden, padded = config.num_experts_per_tok, config.hidden_size, -(-tokens // 8) * 8
    shapes = {"all-reduce": f"f32[{tokens},{k},{hidden}]", "reduce-scatter": f"f32[{padded // 8},{k},{hidden}]",
              "all-gather": f"f32[{padded},{hidden}]"}
    assert [(shape.split("{")[0], op) for shape, op in collectives] == [(shapes[op], op) for op in want]


def test_one_device_mesh_compiles_each_step_once(converted, unsharded):
    """A model loaded on a mesh of one device (the job's default on a one-GPU host) generates as
    the unsharded model does, and compiles its prefill and decode steps once: the stream's later
    decode calls and a later generate() hit the cache. It also runs inside the caller's jit."""
    model = ring_jax.load_model(converted, mesh=make_mesh(devices=jax.devices()[:1]))
    batch = prompts(model.config.vocab_size)
    kwargs = dict(max_new_tokens=6, eos_token_id=[])
    want = ring_jax.generate(unsharded, batch, **kwargs)
    before = prefill_step._cache_size(), decode_loop._cache_size()
    assert (np.concatenate(list(ring_jax.stream(model, batch, steps_per_call=2, **kwargs)), axis=1) == want).all()
    assert (ring_jax.generate(model, batch, **kwargs) == want).all()
    assert (prefill_step._cache_size(), decode_loop._cache_size()) == (before[0] + 1, before[1] + 1)
    ids = np.arange(12).reshape(2, 6)
    assert rel_err(jax.jit(lambda i: model(i))(ids), unsharded(ids)) <= F32_TOL
