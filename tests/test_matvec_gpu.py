"""The matvec kernel on a Hopper GPU: against float64 at Ring-mini decode shapes (bf16, float32 and
FP8 weights), and a decode step that takes it against the full forward and against the same step
through XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ring_jax
from conftest import rel_err
from pallas_kernels.matvec import gpu, reference
from pallas_kernels.backend import platform, triton_offsets_overflow
from test_fp8 import decode_config
from test_fp8_kernels import dequantized64, matvec64 as fp8_matvec64, operands as fp8_operands
from test_matvec import decode_logits, matvec64, model_with_kernel_shapes, operands

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(platform() != "hopper", reason="the kernel runs on Hopper")]

# Ring-mini's decode products: projections, router (float32 rows), 8 of 256 experts, a 3-row call.
CASES = [(1, 1, 2048, 1, 6144, 1, jnp.bfloat16, jnp.bfloat16),
         (1, 1, 2048, 1, 2048, 1, jnp.bfloat16, jnp.bfloat16),
         (1, 1, 2048, 1, 256, 1, jnp.float32, jnp.bfloat16),
         (1, 1, 2048, 256, 1024, 8, jnp.bfloat16, jnp.bfloat16),
         (8, 1, 512, 256, 2048, 8, jnp.bfloat16, jnp.bfloat16),
         (2, 3, 512, 6, 192, 8, jnp.float32, jnp.float32)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_float64(case):
    x, w, ids = operands(*CASES[case], seed=100 + case)
    out = gpu.matvec(x, w, ids)
    assert not np.isnan(np.asarray(out)).any()
    assert rel_err(out, matvec64(x, w, ids)) <= 1e-6


def test_stacks_in_one_launch_match_float64_and_the_concatenation():
    """Ring-mini's routed experts and its shared expert in one call: 8 pairs and the shared one."""
    x, w, ids = operands(1, 1, 2048, 256, 1024, 9, jnp.bfloat16, jnp.bfloat16, seed=7)
    ids = ids.at[8].set(256)
    extra = jnp.asarray(np.random.default_rng(8).standard_normal((1, 2048, 1024)), jnp.bfloat16)
    both = jnp.concatenate([w, extra])
    out = gpu.matvec(x, (w, extra), ids)
    assert rel_err(out, matvec64(x, both, ids)) <= 1e-6
    assert np.array_equal(np.asarray(out), np.asarray(gpu.matvec(x, both, ids)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_normalised_in_the_kernel_match_the_reference(dtype):
    """Ring-mini's qkv product after the layer's input norm, its weight in a stack of 15: float32
    against float64, bf16 against the reference's roundings."""
    x, w, ids = operands(1, 1, 2048, 1, 6144, 1, dtype, dtype, seed=12)
    weights = jnp.asarray(np.random.default_rng(13).standard_normal((15, 2048)), dtype)
    out = gpu.matvec(x, w, ids, weights, jnp.int32(9), eps=1e-6)
    ref = reference.matvec(x, w, ids, weights, jnp.int32(9), eps=1e-6)
    if dtype == jnp.float32:
        x64 = np.asarray(x, np.float64)
        normed = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-6) * np.asarray(weights[9], np.float64)
        assert rel_err(out, matvec64(normed, w, ids)) <= 1e-6
    # bf16: a normalised value may round a step apart where the statistics' last float32 bit differs
    assert rel_err(out, ref) <= (1e-5 if dtype == jnp.float32 else 2e-3)


def test_decode_through_kernel_matches_forward_and_xla(monkeypatch):
    calls = []
    monkeypatch.setattr(gpu, "matvec", lambda *a, _f=gpu.matvec, **k: calls.append(
        tuple(s.shape for s in a[1]) if isinstance(a[1], tuple) else a[1].shape) or _f(*a, **k))
    p = np.random.default_rng(3).integers(2, 256, 24)
    model = model_with_kernel_shapes(jnp.float32)
    got = decode_logits(model, p, 4)
    # the experts (the layers' 64 each, and the shared one, as one call) and qkv took it, in stacks
    assert any(isinstance(c[0], tuple) and c[0][0] % 64 == 0 and c[0][1:] == (256, 256) for c in calls)
    assert any(not isinstance(c[0], tuple) and c[1:] == (256, 768) for c in calls)
    assert rel_err(got, model(p[None])[0, -4:]) <= 1e-5

    bf16 = model_with_kernel_shapes(jnp.bfloat16)
    calls.clear()
    got = decode_logits(bf16, p, 4)
    assert calls
    calls.clear()
    monkeypatch.setattr(gpu, "supports", lambda *a: False)          # every product through XLA
    jax.clear_caches()
    want = decode_logits(bf16, p, 4)
    assert not calls
    assert rel_err(got, want) <= 2e-2


# Ring-mini's FP8 decode products (K-major values [E, N, K] and scales [E, N]): qkv, 8 of 256
# experts' gate_up and down, the LM head.
FP8_CASES = [(2048, 1, 6144, 1), (2048, 256, 1024, 8), (512, 256, 2048, 8), (2048, 1, 157184, 1)]


@pytest.mark.parametrize("case", range(len(FP8_CASES)))
def test_fp8_kernel_matches_float64(case):
    """The kernel reads e4m3 values as e4m3fn (not e4m3fnuz: a factor of 2 off) and applies each
    output channel's scale: against float64 of the dequantized weights."""
    K, E, N, P = FP8_CASES[case]
    x, values, scale, ids = fp8_operands(1, 1, K, E, N, P, jnp.bfloat16, seed=200 + case)
    out = gpu.matvec(x, values, ids, scale=scale)
    assert rel_err(out, fp8_matvec64(x, dequantized64(values, scale), ids)) <= 1e-6
    # two float32 summation orders, each within 1e-6 of float64
    assert rel_err(out, reference.matvec(x, values, ids, scale=scale)) <= 2e-6


def test_fp8_decode_through_kernel_matches_forward(monkeypatch):
    """An FP8 model's batch-1 decode on the GPU (the matvec kernel for every FP8 product) equals its
    full forward."""
    calls = []
    monkeypatch.setattr(gpu, "matvec", lambda *a, _f=gpu.matvec, **k: calls.append(k.get("scale") is not None)
                        or _f(*a, **k))
    model = ring_jax.RingModel(decode_config(), dtype=jnp.float32, rngs=nnx.Rngs(1)).quantize()
    p = np.random.default_rng(3).integers(2, 256, 12)
    got = decode_logits(model, p, 2)
    assert any(calls)
    assert rel_err(got, model(p[None])[0, -2:]) <= 1e-5


def test_fp8_stack_of_2_to_4_gib_matches_the_reference():
    """Ring-mini's linear layers' experts' down as the model stacks them (15 x 256 matrices [2048,
    512], 4.0 GB: past the Triton lowering's 32-bit offsets) with their shared experts, in one
    call: the kernel reads them as uint16 pairs and gives the reference's numbers, the stack's
    last matrices included."""
    def stack(E, seed):                       # random bytes, e4m3fn's NaNs (0x7f, 0xff) cleared
        def draw(key):
            bits = jax.random.bits(key, (E, 2048, 512), jnp.uint8)
            return jax.lax.bitcast_convert_type(jnp.where(bits & 0x7F == 0x7F, 0, bits), jnp.float8_e4m3fn)
        key = jax.random.key(seed)
        return jax.jit(draw)(key), jax.random.uniform(key, (E, 2048), jnp.float32, 1e-4, 1e-3)

    (routed, routed_scale), (shared, shared_scale) = stack(15 * 256, 0), stack(15, 1)
    assert triton_offsets_overflow(routed)
    x = jax.random.normal(jax.random.key(2), (9, 1, 512), jnp.bfloat16)
    ids = jnp.asarray([15 * 256 - 1, 15 * 256 - 2, 3000, 2100, 2048, 2047, 5, 0, 15 * 256 + 14], jnp.int32)
    w, scale = (routed, shared), (routed_scale, shared_scale)
    got = gpu.matvec(x, w, ids, scale=scale)
    assert rel_err(got, jax.jit(reference.matvec)(x, w, ids, scale=scale)) <= 2e-6


@pytest.mark.parametrize("norm", [False, True])
def test_fp8_read_either_way_matches_the_reference(norm, reads):
    """8 of 256 experts' gate_up of Ring-mini's shape read as their values and as uint16 pairs (as a
    stack of 2-4 GiB is read; here forced on a small one), with and without the rows normalised in
    the kernel: the reference's numbers (bf16 rows: within the norm's roundings)."""
    x, values, scale, ids = fp8_operands(1, 1, 2048, 256, 1024, 8, jnp.bfloat16, seed=300)
    norm = ((jnp.asarray(np.random.default_rng(301).standard_normal((3, 2048)), jnp.bfloat16), jnp.int32(2))
            if norm else ())
    out = gpu.matvec(x, values, ids, *norm, scale=scale, eps=1e-6 if norm else None)
    want = reference.matvec(x, values, ids, *norm, scale=scale, eps=1e-6 if norm else None)
    assert rel_err(out, want) <= (2e-3 if norm else 2e-6)
