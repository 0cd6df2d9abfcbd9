"""The Pallas Mosaic TPU linear-attention kernels, run on CPU in TPU interpret mode.

Held to a float64 numpy recurrence and to the jnp reference on fresh random inputs. Interpret mode
fills the rows of a partial block past T with NaN, so a chunk that lets them leak fails here. The
last tests lower the kernels for TPU (the Pallas -> Mosaic step, no TPU needed).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from conftest import recurrence64, rel_err
from pallas_kernels.linear_attention import reference, scan_tpu

INTERPRET = pltpu.InterpretParams()


def random_inputs(seed, B, T, H, D, Dv=None, dtype=jnp.float32):
    """q, k [B, T, H, D], v [B, T, H, Dv] in dtype; log decays in [-0.8, -0.005]; a state."""
    Dv = D if Dv is None else Dv
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (B, T, H, D)).astype(dtype)
    k = jax.random.normal(keys[1], (B, T, H, D)).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, H, Dv)).astype(dtype)
    g = -jax.random.uniform(keys[3], (H,), minval=0.005, maxval=0.8)
    s0 = jax.random.normal(keys[4], (B, H, D, Dv))
    return q, k, v, g, s0


# A covering set, not the product: every T in {1, 63, 64, 65, 1000}, H in {1, 3, 16} and D in
# {64, 128}, heads per block 1, 2 and all (D = 64 with H odd), with and without a state, Dv != D.
PREFILL_CASES = [  # B, T, H, D, Dv, with_state
    (2, 1, 3, 64, 64, True),
    (2, 63, 1, 128, 128, False),
    (1, 64, 16, 64, 64, True),
    (2, 65, 3, 128, 128, True),
    (1, 65, 16, 128, 128, False),
    (2, 130, 2, 64, 128, True),
    (1, 1000, 3, 64, 64, True),
    (1, 1000, 1, 128, 128, False),
]


@pytest.mark.parametrize("B, T, H, D, Dv, with_state", PREFILL_CASES)
def test_prefill_matches_float64_and_reference(B, T, H, D, Dv, with_state):
    q, k, v, g, s0 = random_inputs(T * 31 + H * 7 + D, B, T, H, D, Dv)
    state = s0 if with_state else None
    o, s = scan_tpu.linear_attention(q, k, v, g, initial_state=state, interpret=INTERPRET)
    assert o.shape == (B, T, H, Dv) and o.dtype == jnp.float32
    assert s.shape == (B, H, D, Dv) and s.dtype == jnp.float32
    o64, s64 = recurrence64(q, k, v, g, state)
    assert rel_err(o, o64) <= 1e-5 and rel_err(s, s64) <= 1e-5
    o_ref, s_ref = reference.linear_attention(q, k, v, g, initial_state=state)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


@pytest.mark.parametrize("chunk_size", [8, 16, 128])
def test_chunk_size_does_not_change_the_result(chunk_size):
    q, k, v, g, s0 = random_inputs(40 + chunk_size, 1, 200, 3, 64)
    o, s = scan_tpu.linear_attention(q, k, v, g, initial_state=s0, chunk_size=chunk_size,
                                interpret=INTERPRET)
    o64, s64 = recurrence64(q, k, v, g, s0)
    assert rel_err(o, o64) <= 1e-5 and rel_err(s, s64) <= 1e-5


def test_explicit_scale_and_strong_decay():
    """scale is honoured; a decay of exp(-20) per token underflows to 0 without inf or NaN."""
    q, k, v, _, s0 = random_inputs(8, 2, 100, 2, 64)
    g = jnp.array([-20.0, -1e-4])
    o, s = scan_tpu.linear_attention(q, k, v, g, scale=0.3, initial_state=s0, interpret=INTERPRET)
    o64, s64 = recurrence64(q, k, v, g, s0, scale=0.3)
    assert rel_err(o, o64) <= 1e-5 and rel_err(s, s64) <= 1e-5


@pytest.mark.parametrize("B, T, H, D", [(2, 130, 3, 64), (1, 1000, 16, 128), (2, 65, 16, 64)])
def test_prefill_bf16_inputs(B, T, H, D):
    q, k, v, g, s0 = random_inputs(T + H, B, T, H, D, dtype=jnp.bfloat16)
    o, s = scan_tpu.linear_attention(q, k, v, g, initial_state=s0, interpret=INTERPRET)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o64, s64 = recurrence64(q, k, v, g, s0)  # from the same bf16 inputs
    assert rel_err(o, o64) <= 1e-2 and rel_err(s, s64) <= 1e-2
    o_ref, s_ref = reference.linear_attention(q, k, v, g, initial_state=s0)
    assert rel_err(o, o_ref) <= 1e-2 and rel_err(s, s_ref) <= 1e-2


def padding_mask(side, lengths, T):
    pos = np.arange(T)[None]
    lengths = np.asarray(lengths)[:, None]
    return (pos < lengths) if side == "right" else (pos >= T - lengths)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("B, T, H, D, lengths, dtype", [
    (4, 130, 3, 64, [130, 65, 1, 0], jnp.float32),
    (3, 70, 2, 128, [70, 64, 33], jnp.float32),
    (2, 100, 16, 64, [100, 37], jnp.bfloat16),
])
def test_padding_mask(side, B, T, H, D, lengths, dtype):
    """Padded outputs are exactly 0; valid outputs and the final state are those of the valid
    tokens alone (a sequence with no valid token keeps its initial state)."""
    q, k, v, g, s0 = random_inputs(len(side) * 13 + T, B, T, H, D, dtype=dtype)
    mask = padding_mask(side, lengths, T)
    o, s = scan_tpu.linear_attention(q, k, v, g, initial_state=s0, mask=jnp.asarray(mask),
                                interpret=INTERPRET)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for b, n in enumerate(lengths):
        assert not np.any(np.asarray(o[b], np.float32)[~mask[b]])
        if n == 0:
            np.testing.assert_array_equal(np.asarray(s[b]), np.asarray(s0[b]))
            continue
        valid = mask[b]
        o64, s64 = recurrence64(q[b:b + 1, valid], k[b:b + 1, valid], v[b:b + 1, valid], g,
                                s0[b:b + 1])
        assert rel_err(o[b:b + 1, valid], o64) <= tol and rel_err(s[b:b + 1], s64) <= tol
    o_ref, s_ref = reference.linear_attention(q, k, v, g, initial_state=s0, mask=jnp.asarray(mask))
    assert rel_err(o, o_ref) <= tol and rel_err(s, s_ref) <= tol


def test_scattered_mask_matches_reference():
    """Masked tokens anywhere (not just at the ends), across chunk borders."""
    q, k, v, g, s0 = random_inputs(99, 2, 150, 3, 64)
    mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.6, (2, 150))
    o, s = scan_tpu.linear_attention(q, k, v, g, initial_state=s0, mask=mask, interpret=INTERPRET)
    o_ref, s_ref = reference.linear_attention(q, k, v, g, initial_state=s0, mask=mask)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
    assert not np.any(np.asarray(o)[~np.asarray(mask)])


def test_parallel_axes_in_any_order_on_two_cores():
    """Batch and head blocks may run in any order and on either of two TensorCores (each with its
    own state scratch); only the chunks of one (batch, head block) must run in order."""
    visits = []

    def record(token, grid_point, core):
        visits.append((tuple(int(x) for x in grid_point), int(core)))
        return token

    params = pltpu.InterpretParams(random_seed=3, num_cores_or_threads=2,
                                   grid_point_recorder=record)
    q, k, v, g, s0 = random_inputs(61, 3, 150, 4, 64)
    o, s = scan_tpu.linear_attention(q, k, v, g, initial_state=s0, interpret=params)
    o_ref, s_ref = reference.linear_attention(q, k, v, g, initial_state=s0)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
    assert {core for _, core in visits} == {0, 1}
    for b in range(3):
        for h in range(2):  # D = 64: two heads per block
            steps = [(c, core) for (bb, hh, c), core in visits if (bb, hh) == (b, h)]
            assert [c for c, _ in steps] == [0, 1, 2] and len({core for _, core in steps}) == 1


@pytest.mark.parametrize("S, B, H, D, Dv",
                         [(1, 2, 3, 64, 64), (5, 1, 16, 64, 128), (8, 2, 1, 128, 128)])
def test_step_matches_float64_and_reference(S, B, H, D, Dv):
    q, k, v, g, s0 = random_inputs(S * 17 + H, B, S, H, D, Dv)
    o, s = scan_tpu.linear_attention_step(q, k, v, g, s0, interpret=INTERPRET)
    assert o.shape == (B, S, H, Dv) and s.shape == (B, H, D, Dv)
    o64, s64 = recurrence64(q, k, v, g, s0)
    assert rel_err(o, o64) <= 1e-5 and rel_err(s, s64) <= 1e-5
    o_ref, s_ref = reference.linear_attention_step(q, k, v, g, s0)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


def test_step_bf16_inputs():
    q, k, v, g, s0 = random_inputs(77, 2, 4, 3, 128, dtype=jnp.bfloat16)
    o, s = scan_tpu.linear_attention_step(q, k, v, g, s0, interpret=INTERPRET)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o64, s64 = recurrence64(q, k, v, g, s0)
    assert rel_err(o, o64) <= 1e-2 and rel_err(s, s64) <= 1e-2


@pytest.mark.parametrize("H, D, with_state", [(3, 64, True), (16, 128, False)])
def test_decode_after_prefill_equals_one_prefill(H, D, with_state):
    """Prefill 65 tokens, then a step of 1 and a step of 5: the same as prefilling all 71."""
    q, k, v, g, s0 = random_inputs(H + D, 2, 71, H, D)
    state = s0 if with_state else None
    o_all, s_all = scan_tpu.linear_attention(q, k, v, g, initial_state=state, interpret=INTERPRET)
    o1, s1 = scan_tpu.linear_attention(q[:, :65], k[:, :65], v[:, :65], g, initial_state=state,
                                  interpret=INTERPRET)
    o2, s2 = scan_tpu.linear_attention_step(q[:, 65:66], k[:, 65:66], v[:, 65:66], g, s1,
                                       interpret=INTERPRET)
    o3, s3 = scan_tpu.linear_attention_step(q[:, 66:], k[:, 66:], v[:, 66:], g, s2, interpret=INTERPRET)
    assert rel_err(jnp.concatenate([o1, o2, o3], axis=1), o_all) <= 1e-5
    assert rel_err(s3, s_all) <= 1e-5
    o64, s64 = recurrence64(q, k, v, g, state)
    assert rel_err(o_all, o64) <= 1e-5 and rel_err(s3, s64) <= 1e-5


def test_decode_after_padded_prefill():
    """A left-padded prefill hands decode the state of its valid tokens only."""
    q, k, v, g, s0 = random_inputs(123, 2, 70, 3, 64)
    mask = padding_mask("left", [65, 20], 65)
    _, s1 = scan_tpu.linear_attention(q[:, :65], k[:, :65], v[:, :65], g, initial_state=s0,
                                 mask=jnp.asarray(mask), interpret=INTERPRET)
    o2, s2 = scan_tpu.linear_attention_step(q[:, 65:], k[:, 65:], v[:, 65:], g, s1, interpret=INTERPRET)
    for b in range(2):
        keep = np.concatenate([mask[b], np.ones(5, bool)])
        o64, s64 = recurrence64(q[b:b + 1, keep], k[b:b + 1, keep], v[b:b + 1, keep], g,
                                s0[b:b + 1])
        assert rel_err(o2[b:b + 1], o64[:, -5:]) <= 1e-5 and rel_err(s2[b:b + 1], s64) <= 1e-5


def test_bad_chunk_size_is_an_error():
    q, k, v, g, _ = random_inputs(0, 1, 16, 1, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        scan_tpu.linear_attention(q, k, v, g, chunk_size=12, interpret=INTERPRET)


def _lower_for_tpu(fn, *specs):
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("T, H, D", [(1000, 16, 128), (65, 3, 64), (4096, 16, 64), (1, 1, 64)])
def test_kernels_lower_to_mosaic_tpu(dtype, T, H, D):
    """The Pallas -> Mosaic TPU lowering accepts both kernels (block shapes, ops, precision)."""
    q = jax.ShapeDtypeStruct((2, T, H, D), dtype)
    g = jax.ShapeDtypeStruct((H,), jnp.float32)
    state = jax.ShapeDtypeStruct((2, H, D, D), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, T), jnp.bool_)
    prefill = lambda q, k, v, g, s, m: scan_tpu.linear_attention(q, k, v, g, initial_state=s, mask=m)
    assert "tpu_custom_call" in _lower_for_tpu(prefill, q, q, q, g, state, mask)
    assert "tpu_custom_call" in _lower_for_tpu(scan_tpu.linear_attention, q, q, q, g)
    step_q = jax.ShapeDtypeStruct((2, 5, H, D), dtype)
    text = _lower_for_tpu(scan_tpu.linear_attention_step, step_q, step_q, step_q, g, state)
    assert "tpu_custom_call" in text and "output_operand_aliases" in text


def test_api_routes_to_the_tpu_kernel():
    from pallas_kernels.linear_attention import api

    q, k, v, g, s0 = random_inputs(77, 1, 70, 2, 128)
    mask = jnp.arange(70)[None] < 50
    o, s = api.linear_attention(q, k, v, g, initial_state=s0, mask=mask, backend="tpu", interpret=INTERPRET)
    ro, rs = reference.linear_attention(q, k, v, g, initial_state=s0, mask=mask)
    assert rel_err(o, ro) <= 1e-5 and rel_err(s, rs) <= 1e-5
    o1, s1 = api.linear_attention_step(q[:, :1], k[:, :1], v[:, :1], g, s0, backend="tpu", interpret=INTERPRET)
    r1, rs1 = reference.linear_attention_step(q[:, :1], k[:, :1], v[:, :1], g, s0)
    assert rel_err(o1, r1) <= 1e-5 and rel_err(s1, rs1) <= 1e-5
