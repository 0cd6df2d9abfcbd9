"""The cache and generate(): cached forwards equal full forwards, generate equals the argmax loop,
batching and padding change nothing, sampling is reproducible and restricted as asked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ring_jax
from conftest import rel_err
from pallas_kernels import backend as kernel_backend
from ring_jax import cache as cache_module
from ring_jax.cache import KVCache, cache_bytes, init_cache
from ring_jax.config import RingConfig
from ring_jax.cache import cache_length
from ring_jax.generate import generate, stream
from ring_jax.batching import Plan, batch_bucket, prefill_steps, token_bucket
from ring_jax.sampling import Sampling, sample
from ring_jax.steps import decode_loop, prefill_step
from ring_jax import backends
from ring_jax.layers import attention
from ring_jax.layers.attention import cached_attention, causal_attention


@pytest.fixture(scope="module")
def model():
    """The tiny config (2 softmax + 4 linear layers, MoE), float32, random expert biases."""
    config = RingConfig.from_hf("configs/tiny.json")
    return with_random_biases(RingModel(config))


def with_random_biases(m):
    """m with random expert biases in every MoE stack (they are zeros at init)."""
    rng = np.random.default_rng(7)
    for kind, _ in m.schedule.counts:
        if kind.endswith("_moe"):
            bias = getattr(m, kind).mlp.gate.expert_bias
            bias[...] = jnp.asarray(rng.normal(0, 0.1, bias[...].shape), jnp.float32)
    return m


def RingModel(config, dtype=jnp.float32):
    return ring_jax.RingModel(config, dtype=dtype, rngs=nnx.Rngs(3))


def prompt(length, seed, vocab=256):
    return np.random.default_rng(seed).integers(2, vocab, size=length)


def argmax_loop(model, ids, n):
    """Greedy tokens by full forwards, one at a time (over one buffer: the forward is causal, so
    the tokens after position t do not change the logits at t)."""
    T = len(ids)
    buf = np.zeros((1, T + n), np.int32)
    buf[0, :T] = ids
    for t in range(T, T + n):
        buf[0, t] = int(jnp.argmax(model(buf)[0, t - 1]))
    return buf[0, T:].tolist()


@jax.jit
def _extend(params, ids, cache):
    model = nnx.merge(*params)
    hidden, cache = model.extend(ids, cache)
    return model.logits(hidden), cache


def extend(model, ids, cache):
    """Jitted `model.extend` -> (logits [B, T, V], cache)."""
    return _extend(nnx.split(model), jnp.asarray(ids), cache)


@pytest.fixture(scope="module")
def deep():
    """14 layers: leading dense layers over one and a third groups (a softmax_dense layer among
    them), two repeated groups that run as one scan, and a tail of two softmax layers."""
    config = RingConfig.from_hf("configs/tiny.json", num_hidden_layers=14, first_k_dense_replace=4)
    return with_random_biases(RingModel(config))


@pytest.mark.parametrize("name", ["model", "deep"])
def test_cached_forward_equals_full_forward(name, request):
    """Chunked prefill of a left-padded batch, then one token at a time: every position's logits
    equal the full forward of that sequence alone (float32, <= 1e-5 relative)."""
    model = request.getfixturevalue(name)
    a, b = prompt(21, 0), prompt(13, 1)
    new = np.stack([prompt(4, 2), prompt(4, 3)])
    cache = init_cache(model.config, 2, 256, [3, 11], jnp.float32)
    ids = np.zeros((2, 24), np.int32)
    ids[0, 3:], ids[1, 11:] = a, b
    logits = []
    for c in range(0, 24, 8):
        out, cache = extend(model, ids[:, c:c + 8], cache)
        logits.append(out)
    for t in range(4):
        out, cache = extend(model, new[:, t:t + 1], cache)
        logits.append(out)
    logits = jnp.concatenate(logits, axis=1)
    np.testing.assert_array_equal(cache.lengths, [25, 17])
    for row, (p, first) in enumerate([(a, 3), (b, 11)]):
        want = model(np.concatenate([p, new[row]])[None])[0]
        assert rel_err(logits[row, first:], want) <= 1e-5


def test_cached_attention_blocks(monkeypatch):
    """Several key blocks (the running max and sum), a sequence whose first token lies beyond the
    first block, and padding queries: equal to the full causal attention of each sequence."""
    monkeypatch.setattr(attention, "ATTENTION_BLOCK", 16)
    monkeypatch.setattr(attention, "SCORE_BYTES", 0)
    rng = np.random.default_rng(0)
    B, L, H, Hkv, D, T = 2, 64, 4, 2, 8, 5
    keys, values = (jnp.asarray(rng.normal(size=(B, L, Hkv, D)), jnp.float32) for _ in range(2))
    start = jnp.asarray([0, 37])
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    slots = jnp.arange(T) + 44
    got = cached_attention(q, KVCache(keys, values), slots, start)
    assert np.isfinite(np.asarray(got)).all()
    for b in range(B):
        s0 = int(start[b])
        full_q = jnp.zeros((1, 49 - s0, H, D)).at[:, -T:].set(q[b:b + 1])
        want = causal_attention(full_q, keys[b:b + 1, s0:49], values[b:b + 1, s0:49])[0, -T:]
        assert rel_err(got[b], want) <= 1e-6


class _StandInMask:
    PADDING, PADDING_CAUSAL = "padding", "padding_causal"


def _cudnn_stand_in(q, k, v, *, q_seqlen, kv_seqlen, scale, mask_type, return_residual):
    """What the cuDNN call computes, in jnp: q [B, T, N, D], k, v [B, S, K, D]; row t of sequence
    b reads keys s < kv_seqlen[b] (and s <= t when causal, top-left aligned). Returns the output
    and the natural-log log-sum-exps [B, N, T] of the scaled scores. Rows t >= q_seqlen[b] are
    NaN, output and log-sum-exp: the caller must not read them."""
    assert return_residual
    B, T, N, _ = q.shape
    S, G = k.shape[1], N // k.shape[2]
    kk, vv = (jnp.repeat(x, G, axis=2).astype(jnp.float32) for x in (k, v))
    scores = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float32), kk) * scale
    rows, cols = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    seen = (cols[None] < kv_seqlen[:, None, None]) & (rows[None] < q_seqlen[:, None, None])
    if mask_type == _StandInMask.PADDING_CAUSAL:
        seen &= (cols <= rows)[None]
    scores = jnp.where(seen[:, None], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)
    out = jnp.einsum("bnts,bsnd->btnd", jnp.exp(scores - lse[..., None]), vv)
    real = jnp.arange(T)[None] < q_seqlen[:, None]                                   # [B, T]
    return (jnp.where(real[:, :, None, None], out, jnp.nan).astype(q.dtype),
            jnp.where(real[:, None, :], lse, jnp.nan))


@pytest.mark.parametrize("T, cursor", [(16, 0), (16, 16), (12, 20), (9, 5)])
def test_flash_cached_attention_indexing(T, cursor, monkeypatch):
    """The flash path's shifts, sequence lengths and log-sum-exp merge (the GPU tests run the real
    cuDNN calls): with a jnp stand-in for cuDNN (NaN in every row it must not read), equal to
    `cached_attention` for sequences starting before, at, inside, at the end of, and after the
    chunk, and for one with nothing before it."""
    monkeypatch.setattr(backends, "cudnn_attention", lambda: (_cudnn_stand_in, _StandInMask))
    L, H, Hkv, D = 64, 4, 2, 8
    start = jnp.asarray([0, 3, cursor, cursor + T // 2, cursor + T - 1, cursor + T + 5], jnp.int32)
    B = start.shape[0]
    rng = np.random.default_rng(T + cursor)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    kv = KVCache(*(jnp.asarray(rng.normal(size=(B, L, Hkv, D)), jnp.float32) for _ in range(2)))
    got = jax.jit(attention.flash_cached_attention)(q, kv, jnp.int32(cursor), start)
    want = cached_attention(q, kv, cursor + jnp.arange(T, dtype=jnp.int32), start)
    assert np.isfinite(np.asarray(got)).all()
    assert rel_err(got, want) <= 1e-5


def test_long_padding_across_attention_blocks(model, monkeypatch):
    """A cache of several attention blocks with left padding longer than a block."""
    monkeypatch.setattr(attention, "ATTENTION_BLOCK", 16)
    monkeypatch.setattr(attention, "SCORE_BYTES", 0)
    monkeypatch.setattr(cache_module, "ATTENTION_BLOCK", 16)
    short, long = prompt(5, 4), prompt(40, 5)
    got = generate(model, [short, long], max_new_tokens=6, eos_token_id=[], prefill_chunk=16)
    assert got[0].tolist() == argmax_loop(model, short, 6)
    assert got[1].tolist() == argmax_loop(model, long, 6)


def test_greedy_generate_equals_argmax_loop(model):
    p = prompt(11, 6)
    assert generate(model, p, max_new_tokens=12, eos_token_id=[])[0].tolist() == argmax_loop(model, p, 12)


@pytest.mark.parametrize("padding", ["list", "left", "right"])
def test_batch_of_different_lengths_equals_each_alone(model, padding):
    prompts = [prompt(n, 10 + n) for n in (3, 17, 9)]
    if padding == "list":
        kwargs = {"input_ids": prompts}
    else:
        ids, mask = np.zeros((3, 17), np.int64), np.zeros((3, 17), np.int64)
        for b, p in enumerate(prompts):
            cols = slice(17 - len(p), 17) if padding == "left" else slice(0, len(p))
            ids[b, cols], mask[b, cols] = p, 1
        kwargs = {"input_ids": ids, "attention_mask": mask}
    got = generate(model, max_new_tokens=8, eos_token_id=[], prefill_chunk=16, **kwargs)
    for b, p in enumerate(prompts):
        assert got[b].tolist() == generate(model, p, max_new_tokens=8, eos_token_id=[])[0].tolist()


def test_prefill_compiles_once_per_bucket(model):
    generate(model, prompt(5, 0), max_new_tokens=2)
    compiled = prefill_step._cache_size()
    for n in (6, 9, 16):                  # all in the 16-token bucket
        generate(model, prompt(n, n), max_new_tokens=2)
    assert prefill_step._cache_size() == compiled
    for n in (40, 70):                    # later chunks of 16 run the first chunk's compilation
        generate(model, prompt(n, n), max_new_tokens=2, prefill_chunk=16, cache_len=256)
    assert prefill_step._cache_size() == compiled


def test_batch_and_token_buckets_compile_nothing_new(model):
    """3 and 4 prompts run one bucket (4 rows, the fourth finished from the start); a new
    max_new_tokens within its token bucket and cache length compiles nothing either."""
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert batch_bucket(1, 2) == 2 and batch_bucket(5, 3) == 9
    assert [token_bucket(n) for n in (1, 16, 17, 200)] == [16, 16, 32, 256]
    assert [cache_length(n) for n in (1, 257, 4096, 4097)] == [256, 512, 4096, 8192]
    three = [prompt(7, 60 + b) for b in range(3)]
    got = generate(model, three, max_new_tokens=3, eos_token_id=[])
    programs = decode_loop._cache_size(), prefill_step._cache_size()
    four = generate(model, three + [prompt(5, 63)], max_new_tokens=9, eos_token_id=[])
    assert (decode_loop._cache_size(), prefill_step._cache_size()) == programs
    assert got.shape == (3, 3) and four.shape == (4, 9)
    np.testing.assert_array_equal(got, four[:3, :3])            # greedy: the same first tokens


def test_warmup_compiles_what_generate_runs(model):
    """After warmup() of two batch sizes and two prompt lengths, generate() with prompts in those
    buckets compiles nothing."""
    from ring_jax.generate import warmup

    assert warmup(model, batch_sizes=(1, 3, 4), prompt_lengths=(5, 20), max_new_tokens=6) == 4
    programs = decode_loop._cache_size(), prefill_step._cache_size()
    generate(model, [prompt(12, 70 + b) for b in range(3)], max_new_tokens=5)
    generate(model, prompt(30, 74), max_new_tokens=6)
    assert (decode_loop._cache_size(), prefill_step._cache_size()) == programs
    with pytest.raises(ValueError, match="exceeds max_len"):
        warmup(model, prompt_lengths=(600,))


def test_prefill_steps_and_default_chunk(monkeypatch, model):
    """Whole chunks after one power-of-two step of the rest; 32768 tokens per step where the
    prefill attention is cuDNN's (a bf16 model on Hopper), else 4096; more prompts than chunk
    tokens still take 16-token steps."""
    assert prefill_steps(5, 4096) == [16] and prefill_steps(4096, 4096) == [4096] and prefill_steps(3000, 4096) == [4096]
    assert prefill_steps(33000, 32768) == [256, 32768] and prefill_steps(131008, 32768) == [32768] * 4
    assert prefill_steps(70, 16) == [16] * 5 and prefill_steps(100, 32) == [16, 32, 32, 32]
    assert Plan(1, (16, 32, 32)).chunks() == [(0, 16), (16, 32), (48, 32)] and Plan(1, (16, 32, 32)).length == 80
    bf16 = RingModel(model.config, dtype=jnp.bfloat16)
    def default_chunk(m):
        return backends.prefill_chunk(m.config, m.dtype)
    assert default_chunk(bf16) == default_chunk(model) == 4096
    with monkeypatch.context() as patched:
        patched.setattr(kernel_backend, "platform", lambda: "hopper")
        assert default_chunk(bf16) == (32768 if backends.cudnn_attention() is not None else 4096)
        assert default_chunk(model) == 4096                  # float32: the jnp attention
    prompts = [prompt(3, 40 + b) for b in range(17)]
    got = generate(model, prompts, max_new_tokens=1, eos_token_id=[], prefill_chunk=16)
    assert got.shape == (17, 1)


def test_eos_and_stop_sequences(model):
    p = prompt(9, 20)
    free = argmax_loop(model, p, 10)
    got = generate(model, p, max_new_tokens=10, eos_token_id=free[3], pad_token_id=0)[0].tolist()
    k = free.index(free[3])
    assert got == free[:k + 1] + [0] * (9 - k)
    never = next(t for t in range(model.config.vocab_size) if t not in free)
    got = generate(model, p, max_new_tokens=10, eos_token_id=[], stop=[[free[5], free[6]], [never]],
                   pad_token_id=0)[0].tolist()
    assert got[:7] == free[:7] and got[7:] == [0, 0, 0]


def test_stream_equals_generate(model):
    prompts = [prompt(4, 30), prompt(12, 31)]
    kwargs = dict(max_new_tokens=11, temperature=0.8, top_k=20, seed=5)
    pieces = list(stream(model, prompts, steps_per_call=4, **kwargs))
    assert [p.shape[1] for p in pieces] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), generate(model, prompts, **kwargs))


def test_sampling_reproducible_and_restricted(model):
    p = prompt(7, 40)
    kwargs = dict(max_new_tokens=6, eos_token_id=[], temperature=1.0)
    a = generate(model, p, seed=1, **kwargs)
    np.testing.assert_array_equal(a, generate(model, p, seed=1, **kwargs))
    # Seeds are taken mod 2**32, as jax.random.key takes them.
    np.testing.assert_array_equal(generate(model, p, seed=-1, **kwargs), generate(model, p, seed=2**32 - 1, **kwargs))
    assert any((generate(model, p, seed=s, **kwargs) != a).any() for s in range(2, 6))
    greedy = generate(model, p, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(generate(model, p, seed=9, top_k=1, **kwargs), greedy)
    np.testing.assert_array_equal(generate(model, p, seed=9, top_p=1e-6, **kwargs), greedy)
    # The support: 200 draws of the sampler that generate() runs (one vmapped call), on the full
    # forward's logits at the prompt's last position.
    logits = np.asarray(model(p[None])[0, -1])
    keys = jax.random.split(jax.random.key(0), 200)

    def firsts(sampling):
        return set(np.asarray(jax.vmap(lambda key: sample(jnp.asarray(logits)[None], key, sampling))(keys)).ravel().tolist())

    top3 = set(np.argsort(-logits)[:3].tolist())
    got = firsts(Sampling(temperature=5.0, top_k=3))
    assert got <= top3 and len(got) > 1
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    nucleus = set(np.argsort(-probs)[: int(np.searchsorted(np.cumsum(np.sort(probs)[::-1]), 0.5)) + 1].tolist())
    assert firsts(Sampling(temperature=1.0, top_p=0.5)) <= nucleus
    assert len(firsts(Sampling(temperature=1.0))) > len(nucleus)    # unrestricted: more tokens than that
    # and generate() samples with them: its first token is one of the support's
    assert int(generate(model, p, seed=3, max_new_tokens=1, temperature=5.0, top_k=3)[0, 0]) in top3


def test_bfloat16_decode_follows_forward():
    """bf16 prefill and decode within bf16 tolerance of the full forward (dense MLPs: in a bf16
    MoE, rounding noise flips near-tie expert choices, as it does between torch runs)."""
    model = RingModel(RingConfig.from_hf("configs/tiny.json", first_k_dense_replace=6), dtype=jnp.bfloat16)
    p = prompt(20, 50)
    cache = init_cache(model.config, 1, 256, [0], jnp.bfloat16)
    prefill, cache = extend(model, p[None, :16], cache)
    step, cache = extend(model, p[None, 16:17], cache)
    want = model(p[None, :17])[0]
    assert rel_err(prefill[0], want[:16]) <= 3e-2
    assert rel_err(step[0, 0], want[16]) <= 3e-2


def test_scanned_stack_equals_the_layers_one_by_one(deep):
    """The schedule's scans (head runs, repeated groups, tail) against each layer run on its own
    in order with its own slot, in one program of its own: the same function of the input (float32,
    <= 1e-5 relative)."""
    from ring_jax.layers.rope import rope_tables
    from ring_jax.schedule import cache_slot

    schedule = deep.schedule
    assert schedule.repeats == 2 and len(schedule.tail) == 1 and schedule.tail[0].length == 2
    assert dict(schedule.counts) == {"linear_dense": 3, "linear_moe": 5, "softmax_dense": 1, "softmax_moe": 5}
    ids = jnp.asarray(np.random.default_rng(1).integers(0, deep.config.vocab_size, (2, 19)))
    x = jnp.take(deep.word_embeddings[...], ids, axis=0)
    cos, sin = rope_tables(deep.config, jnp.arange(19), x.dtype)

    def one_by_one(m, x):
        for i in range(m.config.num_decoder_layers):
            x = m.layer(i)(x, cos, sin, slot=cache_slot(m.config, i))[0]
        return m.norm(x)

    assert rel_err(jax.jit(lambda m, ids: m.hidden_states(ids))(deep, ids), jax.jit(one_by_one)(deep, x)) <= 1e-5


def test_misuse_raises_clear_errors(model):
    with pytest.raises(ValueError, match="exceeds max_len"):
        generate(model, prompt(500, 0), max_new_tokens=20)       # tiny: max_position_embeddings 512
    with pytest.raises(ValueError, match="holes"):
        generate(model, np.ones((1, 4), int), attention_mask=[[1, 0, 1, 1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 2, 300]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token id 99999999999999999999, outside the vocabulary"):
        generate(model, [[1, 99999999999999999999]], max_new_tokens=2)     # beyond int64
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(TypeError, match="max_new_tokens must be an integer, got 2.5"):
        generate(model, [[1, 2]], max_new_tokens=2.5)
    with pytest.raises(TypeError, match="prompts are token ids, not text: encode it first"):
        generate(model, "Hello", max_new_tokens=2)
    with pytest.raises(TypeError, match="seed must be an integer, got 'a'"):
        generate(model, [[1, 2]], max_new_tokens=2, seed="a")
    with pytest.raises(ValueError, match="prompt 0 is empty: it needs at least one token"):
        generate(model, np.ones((1, 3), int), attention_mask=[[0, 0, 0]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 1 is not a flat list of token ids \(shape \(2, 1\)\)"):
        generate(model, [np.ones(2, int), np.ones((2, 1), int)], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=1.5)


def test_cache_memory():
    """Linear layers hold a constant state; only the softmax layers' KV grows with the context."""
    mini = RingConfig.from_hf("configs/ring-mini-linear-2.0.json")
    short, long = cache_bytes(mini, 1, 4096), cache_bytes(mini, 1, 131072)
    assert short["linear"] == long["linear"] == 16 * 16 * 128 * 128 * 4
    assert long["softmax"] == 32 * short["softmax"] == 4 * 2 * 131072 * 4 * 128 * 2
    jax.eval_shape(lambda: init_cache(mini, 1, 8192, [0], jnp.bfloat16))
    with pytest.raises(ValueError, match="multiple"):
        init_cache(mini, 1, 5000, [0], jnp.bfloat16)
