"""FP8 weights (`pallas_kernels.backend.FP8`: float8_e4m3fn [N, K] matrices with a float32 scale
per output channel) in the few-row matmul (kernel in Pallas interpret mode, and its reference) and
the grouped matmul's reference, against float64 of the fp8 values times their scales; and the
row-quantization kernel of FP8 rows against `backend.quantize_rows`, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from conftest import rel_err
from pallas_kernels import backend as kernel_backend
from pallas_kernels.backend import triton_offsets_overflow
from pallas_kernels.matvec import matvec, matvec_backend, reference
from pallas_kernels.moe import reference as moe_reference

FP8 = jnp.float8_e4m3fn

# (X groups of rows, M rows, K, E matrices, N, P output groups, x dtype)
CASES = {
    "one row, one matrix": (1, 1, 256, 1, 128, 1, jnp.bfloat16),
    "3 rows, 8 groups share 2 row groups": (2, 3, 512, 6, 192, 8, jnp.bfloat16),
    "float32 rows, 4 groups": (4, 1, 256, 16, 128, 4, jnp.float32),
    "float32, 2 rows, 6 groups share 1": (1, 2, 512, 3, 256, 6, jnp.float32),
}


def quantized(shape, seed):
    """Random normal weights [..., N, K] quantized per row: (float8_e4m3fn values, float32 scales
    [..., N]), scale = amax / 448 (e4m3's largest value)."""
    w = np.random.default_rng(seed).standard_normal(shape)
    scale = (np.abs(w).max(axis=-1) / 448).astype(np.float32)
    return jnp.asarray(w / scale[..., None], FP8), jnp.asarray(scale)


def dequantized64(values, scale):
    return np.asarray(values, np.float64) * np.asarray(scale, np.float64)[..., None]


def operands(X, M, K, E, N, P, x_dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((X, M, K)), x_dtype)
    values, scale = quantized((E, N, K), seed + 1)
    ids = jnp.asarray(rng.integers(0, E, P), jnp.int32)
    return x, values, scale, ids


def matvec64(x, w, ids):
    """w: float64 [E, N, K] -> out[p] = x[p // (P / X)] @ w[ids[p]].T, [P, M, N]."""
    x, ids = np.asarray(x, np.float64), np.asarray(ids)
    return np.einsum("pmk,pnk->pmn", np.repeat(x, len(ids) // len(x), axis=0), w[ids])


def both(x, w, ids, **kwargs):
    """The kernel (interpret mode) and the reference."""
    return (matvec(x, w, ids, backend="gpu", interpret=True, **kwargs),
            matvec(x, w, ids, backend="reference", **kwargs))


@pytest.mark.parametrize("case", CASES)
def test_matvec_kernel_and_reference_match_float64(case, reads):
    X, M, K, E, N, P, xd = CASES[case]
    x, values, scale, ids = operands(X, M, K, E, N, P, xd, seed=len(case))
    want = matvec64(x, dequantized64(values, scale), ids)
    for out in both(x, values, ids, scale=scale):
        assert out.shape == (P, M, N) and out.dtype == jnp.float32
        assert rel_err(out, want) <= 1e-6


def test_matvec_stacks_of_every_layer_addressed_as_one(reads):
    """The routed experts of 3 layers [3 E, N, K] and their shared experts [3, N, K], as the model
    passes them: ids pick layer 1's experts and its shared expert; the kernel equals its run on
    the concatenation bit for bit."""
    E, K, N = 4, 256, 128
    x = jnp.asarray(np.random.default_rng(20).standard_normal((3, 1, K)), jnp.bfloat16)
    routed, routed_scale = quantized((3 * E, N, K), 21)
    shared, shared_scale = quantized((3, N, K), 22)
    ids = jnp.asarray(np.random.default_rng(23).integers(0, E, 9), jnp.int32) + E      # layer 1's experts
    ids = ids.at[2::3].set(3 * E + 1)                         # every token's last pair: layer 1's shared expert
    w64 = np.concatenate([dequantized64(routed, routed_scale), dequantized64(shared, shared_scale)])
    want = matvec64(x, w64, ids)
    kernel, ref = both(x, (routed, shared), ids, scale=(routed_scale, shared_scale))
    assert rel_err(kernel, want) <= 1e-6 and rel_err(ref, want) <= 1e-6
    together = matvec(x, jnp.concatenate([routed, shared]), ids, scale=jnp.concatenate([routed_scale, shared_scale]),
                      backend="gpu", interpret=True)
    assert np.array_equal(np.asarray(kernel), np.asarray(together))


def test_matvec_rows_normalised_first(reads):
    """norm_weight [L, K] with norm_index: float32 rows against float64, and bf16 rows with the
    reference's roundings (kernel against reference)."""
    rng = np.random.default_rng(30)
    x, values, scale, ids = operands(2, 1, 512, 4, 128, 4, jnp.float32, seed=31)      # 2 K slices
    weights = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    x64 = np.asarray(x, np.float64)
    normed = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-6) * np.asarray(weights[1], np.float64)
    want = matvec64(normed, dequantized64(values, scale), ids)
    norm = dict(norm_weight=weights, norm_index=jnp.int32(1), norm_eps=1e-6)
    for out in both(x, values, ids, scale=scale, **norm):
        assert rel_err(out, want) <= 1e-6

    xb, wnb = x.astype(jnp.bfloat16), weights.astype(jnp.bfloat16)
    kernel, ref = both(xb, values, ids, scale=scale, norm_weight=wnb, norm_index=jnp.int32(2), norm_eps=1e-6)
    assert rel_err(kernel, ref) <= 1e-5
    assert np.array_equal(np.asarray(ref), np.asarray(matvec(reference.rms_norm(xb, wnb[2], 1e-6), values, ids,
                                                             scale=scale)))


def test_one_byte_stacks_of_2_to_4_gib_overflow_the_triton_offsets():
    S = jax.ShapeDtypeStruct
    assert triton_offsets_overflow(S((15 * 256, 2048, 512), FP8))         # Ring-mini's linear layers' down, 4.0 GB
    assert triton_offsets_overflow(S((4 * 256, 4096, 1024), FP8))         # Ring-flash's softmax layers' down, 2^32 B
    assert not triton_offsets_overflow(S((4 * 256, 2048, 1024), FP8))     # 2^31 bytes: every offset below 2^31
    assert not triton_offsets_overflow(S((15 * 256, 1024, 2048), FP8))    # 8 GB: addressed in 64 bits
    assert not triton_offsets_overflow(S((15 * 256, 2048, 512), jnp.bfloat16))


def test_matvec_scale_errors_and_backend(monkeypatch):
    x, values, scale, ids = operands(2, 1, 256, 3, 128, 2, jnp.bfloat16, seed=40)
    bf16 = values.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="need their scale"):
        matvec(x, values, ids)
    with pytest.raises(ValueError, match="scale is for FP8"):
        matvec(x, jnp.swapaxes(bf16, 1, 2), ids, scale=scale)
    with pytest.raises(ValueError, match=r"must be float32 \[E, N\]"):
        matvec(x, values, ids, scale=scale[:, :64])
    with pytest.raises(ValueError, match=r"must be float32 \[E, N\]"):
        matvec(x, values, ids, scale=scale.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="in a tuple where w is one"):
        matvec(x, (values, values), ids, scale=scale)
    with pytest.raises(ValueError, match="K differs"):
        matvec(x, jnp.swapaxes(values, 1, 2)[:, :128], ids, scale=scale)
    with pytest.raises(NotImplementedError, match="K % 256"):         # 256 one-byte values per 16 KB tile
        matvec(x[:, :, :128], values[:, :, :128], ids, scale=scale, backend="gpu", interpret=True)
    monkeypatch.setattr(kernel_backend, "platform", lambda: "other")
    assert matvec_backend(x, values, scale=scale) == "reference"
    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    assert matvec_backend(x, values, scale=scale) == "gpu"
    assert matvec_backend(x, values) == "reference"                  # FP8 weights only with their scale
    S = jax.ShapeDtypeStruct                                        # an LM head: FP8 takes the kernel, bf16 XLA
    row, head, head_scale = S((1, 1, 2048), jnp.bfloat16), S((1, 157184, 2048), FP8), S((1, 157184), jnp.float32)
    assert matvec_backend(row, head, scale=head_scale) == "gpu"
    assert matvec_backend(row, S((1, 2048, 157184), jnp.bfloat16)) == "reference"


def test_matvec_gradient_matches_float64():
    """LoRA over an FP8 base: the gradient through the kernel reaches the rows and the norm's
    weights (float64 answers of the sum's gradient); the FP8 weights get none."""
    x, values, scale, ids = operands(2, 2, 256, 3, 128, 6, jnp.float32, seed=50)
    w64, ids64, x64 = dequantized64(values, scale), np.asarray(ids), np.asarray(x, np.float64)
    columns = w64[ids64].sum(axis=1)                               # [P, K]: d sum(out[p]) / d row
    per_group = columns.reshape(2, 3, 256).sum(axis=1)             # output groups 3 g .. 3 g + 2 take x[g]

    def total(x, w, norm_weight=None):
        norm = {} if norm_weight is None else dict(norm_weight=norm_weight, norm_index=jnp.int32(1), norm_eps=1e-6)
        return jnp.sum(matvec(x, w, ids, scale=scale, backend="gpu", interpret=True, **norm))

    dx, dw = jax.jit(jax.grad(total, (0, 1)))(x, values)
    assert rel_err(dx, np.broadcast_to(per_group[:, None], x.shape)) <= 1e-6
    assert dw.dtype == FP8 and not np.asarray(dw, np.float32).any()

    weights = jnp.asarray(np.random.default_rng(51).standard_normal((2, 256)), jnp.float32)
    normed = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-6)     # [2, 2, K]
    want = np.zeros((2, 256))
    want[1] = (normed.sum(axis=1)[:, None] * columns.reshape(2, 3, 256)).sum(axis=(0, 1))
    assert rel_err(jax.jit(jax.grad(total, 2))(x, values, weights), want) <= 1e-6


def gmm64(lhs, w, sizes):
    """w: float64 [G, N, K]: row group g of lhs times w[g].T; rows past the groups zeros."""
    lhs = np.asarray(lhs, np.float64)
    out, start = np.zeros((lhs.shape[0], w.shape[1])), 0
    for g, n in enumerate(sizes):
        out[start:start + n] = lhs[start:start + n] @ w[g].T
        start += n
    return out


def swiglu64(gate_up):
    gate, up = np.split(np.asarray(gate_up, np.float64), 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("lhs_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("sizes, offset", [([5, 0, 12, 3, 9], 0), ([0, 17, 1, 0, 2], 2), ([0, 0, 0, 0, 0], 1)])
def test_gmm_reference_matches_float64(sizes, offset, lhs_dtype):
    """Uneven groups (empty ones too) of a layer's experts at group_offset in a longer stack, rows
    past the sum zeros; a bf16 output is the float32 one rounded once."""
    M, K, N = 40, 256, 128
    lhs = jnp.asarray(np.random.default_rng(60 + offset).standard_normal((M, K)), lhs_dtype)
    values, scale = quantized((len(sizes) + 3, N, K), 61 + offset)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    want = gmm64(lhs, dequantized64(values, scale)[offset:], sizes)
    out = pallas_kernels.gmm(lhs, values, group_sizes, group_offset=jnp.int32(offset), scale=scale,
                             preferred_element_type=jnp.float32, backend="reference")
    assert out.shape == (M, N) and out.dtype == jnp.float32
    assert not np.asarray(out)[sum(sizes):].any()
    if sum(sizes):
        assert rel_err(out, want) <= 1e-6
    rounded = pallas_kernels.gmm(lhs, values, group_sizes, group_offset=offset, scale=scale, backend="reference")
    assert rounded.dtype == lhs_dtype
    assert np.array_equal(np.asarray(rounded), np.asarray(out.astype(lhs_dtype)))


def test_gmm_swiglu_reference_matches_float64():
    sizes, M, K, I = [9, 0, 4, 20], 40, 256, 64
    lhs = jnp.asarray(np.random.default_rng(70).standard_normal((M, K)), jnp.float32)
    values, scale = quantized((6, 2 * I, K), 71)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = pallas_kernels.gmm_swiglu(lhs, values, group_sizes, group_offset=1, scale=scale, backend="reference")
    assert out.shape == (M, I) and out.dtype == jnp.float32
    assert rel_err(out, swiglu64(gmm64(lhs, dequantized64(values, scale)[1:], sizes))) <= 1e-6
    assert not np.asarray(out)[sum(sizes):].any()
    bf16 = lhs.astype(jnp.bfloat16)
    np.testing.assert_array_equal(
        pallas_kernels.gmm_swiglu(bf16, values, group_sizes, group_offset=1, scale=scale, backend="reference"),
        moe_reference.swiglu(moe_reference.gmm(bf16, values[1:5], group_sizes, scale=scale[1:5])))


def test_gmm_fp8_backends(monkeypatch):
    """"auto" takes the GPU kernel for FP8 rhs where it takes the values in bf16, and the reference
    on a TPU (forcing the TPU kernel is a NotImplementedError that names FP8); the scale is checked.
    (The GPU kernel's FP8 numbers: tests/test_gmm_gpu.py, in the interpreter.)"""
    lhs = jnp.asarray(np.random.default_rng(80).standard_normal((256, 256)), jnp.bfloat16)
    values, scale = quantized((4, 512, 256), 81)
    sizes = jnp.asarray([100, 0, 56, 100], jnp.int32)
    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    assert pallas_kernels.gmm_backend(lhs, values) == "gpu"
    assert pallas_kernels.gmm_backend(lhs.astype(jnp.float32), values) == "reference"   # the kernel takes bf16 rows
    monkeypatch.setattr(kernel_backend, "platform", lambda: "tpu")
    assert pallas_kernels.gmm_backend(lhs, jnp.swapaxes(values, 1, 2).astype(jnp.bfloat16)) == "tpu"
    assert pallas_kernels.gmm_backend(lhs, values) == "reference"
    for entry in (pallas_kernels.gmm, pallas_kernels.gmm_swiglu):
        with pytest.raises(NotImplementedError, match="FP8"):
            entry(lhs, values, sizes, scale=scale, backend="tpu")
    out = pallas_kernels.gmm(lhs, values, sizes, scale=scale)
    assert np.array_equal(np.asarray(out), np.asarray(moe_reference.gmm(lhs, values, sizes, scale=scale)))
    with pytest.raises(ValueError, match="needs its scale"):
        pallas_kernels.gmm(lhs, values, sizes)
    with pytest.raises(ValueError, match="scale is for FP8"):
        pallas_kernels.gmm(lhs, jnp.swapaxes(values, 1, 2).astype(jnp.bfloat16), sizes, scale=scale)
    with pytest.raises(ValueError, match="needs float32"):
        pallas_kernels.gmm(lhs, values, sizes, scale=scale[:, :256])
    with pytest.raises(ValueError, match="K-major"):
        pallas_kernels.gmm(lhs, jnp.swapaxes(values, 1, 2), sizes, scale=scale)


def rows_to_quantize(M, K, dtype, seed):
    """x [M, K]: normal values spread over 2^-12 of their row's range (many land in e4m3's
    subnormals), rows scaled by 2^-20 to 2^20, row 1 of zeros (M > 2), rows 2 and 3 (M > 4) of
    magnitudes just under and just over `backend.ZERO_ROW` (2^-64: zeros with scale 1 under it),
    and a last row whose largest magnitude appears twice with both signs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)) * np.exp2(rng.uniform(-12, 0, (M, K)) + rng.uniform(-20, 20, (M, 1)))
    if M > 2:
        x[1] = 0
    if M > 4:
        x[2:4] = x[2:4] / np.abs(x[2:4]).max(-1, keepdims=True) * np.array([[2.0 ** -65], [2.0 ** -63]])
    x[-1, :2] = [3.5, -3.5]
    x[-1, 2:] = np.clip(x[-1, 2:], -3, 3)
    return jnp.asarray(x, dtype)


def same_bits(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


@pytest.mark.parametrize("M, K, dtype", [(37, 512, jnp.bfloat16), (5, 2048, jnp.float32), (3, 8192, jnp.bfloat16),
                                         (100, 128, jnp.bfloat16), (16, 512, jnp.float32)])
def test_quantize_rows_kernel_gives_the_reference_bits(M, K, dtype):
    """The row-quantization kernel (interpret mode) against `backend.quantize_rows`: values and
    scales bit for bit, in blocks of 16 rows at K = 512 (M = 37: a last block of 5 rows, the rest
    masked), of 64 at K = 128 (a last block of 36), one row per program at K = 8192, rows of zeros."""
    x = rows_to_quantize(M, K, dtype, M + K)
    same_bits(pallas_kernels.quantize_rows(x, backend="gpu", interpret=True), kernel_backend.quantize_rows(x))


def test_quantize_rows_kernel_refusals_and_cuda_lowering(monkeypatch):
    """Shapes the kernel does not take name themselves, and "auto" runs XLA's quantization on them
    as on a Hopper GPU; on CUDA the kernel lowers with the correctly rounded reciprocal of the
    scales."""
    from pallas_kernels.moe import quantize_gpu

    for x, why in ((jnp.ones((4, 96 * 4)), "K a power of two"), (jnp.ones((2, 4, 256)), r"\(2, 4, 256\)"),
                   (jnp.ones((4, 16384)), "from 128 to 8192"), (jnp.ones((4, 64)), "from 128"),
                   (jnp.ones((4, 256), jnp.float16), "float16")):
        with pytest.raises(NotImplementedError, match=why):
            pallas_kernels.quantize_rows(x, backend="gpu")
    assert quantize_gpu.fits(jax.ShapeDtypeStruct((2**17, 8192), jnp.bfloat16))          # 2^30 values
    assert not quantize_gpu.fits(jax.ShapeDtypeStruct((2**18 + 1, 8192), jnp.bfloat16))  # past 2^31
    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    for x in (jnp.ones((2, 4, 256)), rows_to_quantize(8, 96, jnp.bfloat16, 0)):
        same_bits(pallas_kernels.quantize_rows(x), kernel_backend.quantize_rows(x))
    lowered = jax.jit(quantize_gpu.quantize_rows).trace(jax.ShapeDtypeStruct((1000, 512), jnp.bfloat16))
    assert "rcp.rn.f32" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
def test_gpu_quantize_rows_kernel_gives_numpy_bits():
    """On the GPU the kernel's values and scales are numpy's bits (XLA's own program there misrounds
    at one e4m3 midpoint: `quantize_gpu.py`): at a 4096-token prefill chunk's FP8-rows shapes
    (Ring-mini: the tokens, hidden 2048; the SwiGLU output, top-8 x 512), Ring-flash's hidden 4096,
    and row counts that leave the last block partly masked (1 and 37 rows, 2404 of width 256 in
    blocks of 32, 4097 of 4096)."""
    from pallas_kernels.backend import platform

    assert platform() == "hopper", "the kernel runs on Hopper GPUs only"
    for M, K in ((4096, 2048), (32768, 512), (1000, 4096), (1, 2048), (37, 512), (2404, 256), (4097, 4096)):
        x = rows_to_quantize(M, K, jnp.bfloat16, M + K)
        got = jax.jit(lambda x: pallas_kernels.quantize_rows(x, backend="gpu"))(x)
        same_bits(got, kernel_backend.quantize_rows(np.asarray(x.astype(jnp.float32))))
