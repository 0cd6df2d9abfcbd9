"""The Mosaic GPU grouped matmul: its work table, its lowering and the kernel in JAX's Mosaic GPU
interpreter on the CPU (small shapes), the kernel on a Hopper GPU.

The kernel is held to a float64 numpy loop over groups (`gmm64`) and to the jnp reference, on
fresh random inputs: group sizes with zeros, an empty first and last group, one group holding
every row, groups of 1-3 rows (many per tile), rows past the sum (must come back as zeros), M not
a multiple of 8 or of the tile, both tile heights, bf16 and float32 outputs. The kernel with SwiGLU
in its epilogue is held to the kernel without it followed by the jnp SwiGLU. FP8 weights (K-major
tiles converted in SMEM, scales in the epilogue) are held to the reference; in the interpreter
through a test shim that lets it read the transposed operands (`transposed_wgmma_operands`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_if_on_hopper, load_config_dict, rel_err
from pallas_kernels.backend import FP8, quantize_rows
from pallas_kernels.moe import api, gmm_gpu, reference
from test_kernel_references import gmm64, swiglu64


def random_sizes(rng, M, G, total=None):
    total = M if total is None else total
    cuts = np.sort(rng.integers(0, total + 1, G - 1))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)


@pytest.mark.parametrize("tile_m", [64, 128])
@pytest.mark.parametrize("seed", range(6))
def test_work_items_cover_every_row_once(tile_m, seed):
    rng = np.random.default_rng(seed)
    M, G = int(rng.integers(1, 3000)), int(rng.integers(1, 40))
    sizes = random_sizes(rng, M, G, total=int(rng.integers(0, M + 1)))
    sizes[rng.random(G) < 0.3] = 0
    items, counts = gmm_gpu.work_items(jnp.asarray(sizes), M, tile_m)
    items, (products, count) = np.asarray(items), np.asarray(counts)
    assert products <= count <= items.shape[1]
    assert (items[0, :products] < G).all() and (items[0, products:count] == G).all()   # the zeros' items last
    owner = np.full(M, -1)
    for group, row, first, end in items[:, :count].T:
        assert row % 8 == 0 and row <= first < end <= row + tile_m
        assert (owner[first:end] == -1).all()
        owner[first:end] = group
    expected = np.concatenate([np.repeat(np.arange(G), sizes), np.full(M - sizes.sum(), G)])
    np.testing.assert_array_equal(owner, expected)


@pytest.mark.parametrize("fp8", [False, True, "rows"])
@pytest.mark.parametrize("swiglu, tile_m", [(False, 64), (False, 128), (True, 128)])
def test_kernel_lowers_for_cuda_on_any_machine(swiglu, tile_m, fp8):
    """The Mosaic GPU kernel lowers (layout inference, pipelines, TMA boxes) without a GPU: bf16
    weights, FP8 tiles converted in SMEM with the column scales in the epilogue, and FP8 rows with
    their row scales on the FP8 tensor cores."""
    S = jax.ShapeDtypeStruct
    rhs = S((8, 512, 256), FP8) if fp8 else S((8, 256, 512), jnp.bfloat16)
    scale = S((8, 512), jnp.float32) if fp8 else None
    lhs, lhs_scale = S((1000, 256), jnp.bfloat16), None
    if fp8 == "rows":
        lhs, lhs_scale = S((1000, 256), FP8), S((1000,), jnp.float32)
    f = jax.jit(lambda a, b, s, c, d: gmm_gpu.gmm(a, b, s, scale=c, lhs_scale=d, swiglu=swiglu, tile_m=tile_m))
    exported = jax.export.export(f, platforms=["cuda"])(lhs, rhs, S((8,), jnp.int32), scale, lhs_scale)
    assert exported.out_avals[0].shape == (1000, 256 if swiglu else 512)


@pytest.mark.parametrize("K, N, sizes, stages", [(64, 256, [0, 120, 0, 80], 4),          # one unit per SM
                                                  (256, 512, [0, 100, 0, 40, 50, 0], 2),    # a sequence per SM
                                                  (64, 512, [0, 100, 0, 40, 50, 0], 4)])    # ... over one slot
def test_kernel_in_the_interpreter_matches_float64(K, N, sizes, stages):
    """The kernel itself on the CPU (JAX's Mosaic GPU interpreter: warpgroups, TMA, barriers and
    wgmma simulated): 128-row tiles, M not a multiple of 8, bf16 out against float64, a layer's
    groups read at an offset in a longer stack, zeros past the sum; each of the 2 simulated SMs
    runs one unit as a pipeline of its own, or a sequence of them (START, STEADY, STOP) over a
    ring of 2 slots that each unit goes round twice, or over a ring of one slot (K in one step).
    (64-row tiles, tiny groups and float32 out: the FP8 cases below.)"""
    M, G, offset = 203, len(sizes), len(sizes)
    lhs, stack, group_sizes = operands(M, M, K, N, sizes + sizes)
    group_sizes, total = group_sizes[:G], sum(sizes)
    got = gmm_gpu.gmm(lhs, stack, group_sizes, group_offset=offset, tile_m=128, stages=stages, interpret=True)
    assert got.dtype == jnp.bfloat16 and got.shape == (M, N)
    assert rel_err(got[:total], gmm64(lhs, stack[offset:offset + G], group_sizes)[:total]) <= 5e-3
    assert not np.asarray(got[total:]).any()


def fp8_operands(seed, M, K, N, G, offset):
    """lhs [M, K] bf16, FP8 weights of offset + G groups ([offset + G, N, K] values, [offset + G, N]
    scales)."""
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((M, K), np.float32), jnp.bfloat16)
    values, scale = quantize_rows(jnp.asarray(rng.standard_normal((offset + G, N, K), np.float32) / K ** 0.5))
    return lhs, values, scale


@pytest.fixture
def transposed_wgmma_operands(monkeypatch):
    """JAX's Mosaic GPU interpreter (0.10) reads wgmma operands through index transforms only, and
    the kernel passes FP8 weight tiles (K-major, converted to bf16 in SMEM) as transposed operands
    (`plgpu.transpose_ref`). Test-only: the interpreter's wgmma is replaced by one that reads such
    an operand without its last transform and transposes the values read, and reads any other
    operand as the interpreter does (the GPU runs the instruction itself)."""
    from jax._src.pallas.mosaic.interpret import utils
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as callbacks
    from jax._src.state.types import TransposeTransform

    def region(transforms):
        return utils.to_range(jax.tree.map(int, callbacks._remove_noop_transforms(tuple(transforms))))

    def read(memory, key, transforms, thread, info):
        transpose = transforms[-1] if transforms and isinstance(transforms[-1], TransposeTransform) else None
        value, _, _ = memory.get_buffer_content(callbacks.HostAllocationKey.from_array(key),
                                                region(transforms[:-1] if transpose else transforms),
                                                thread, logging_info=info)
        return value if transpose is None else np.transpose(value, transpose.permutation)

    def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
              acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
              source_info=None):
        memory = callbacks._get_shared_memory()
        thread = memory.get_global_thread_id(int(device_id), int(thread_id))
        info = utils.GPULoggingInfo(device_id=int(device_id), thread_id=int(thread_id), source_info=source_info,
                                    grid_point_coords=tuple(int(x) for x in grid_point_coords))
        a = read(memory, a_allocation_key_as_array, a_transforms, thread, info)
        b = read(memory, b_allocation_key_as_array, b_transforms, thread, info)
        key, where = callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array), region(acc_transforms)
        acc, _, _ = memory.get_buffer_content(key, where, thread, logging_info=info)
        memory.store_buffer_content(key, where, acc + np.matmul(a, b, dtype=acc_dtype), thread, logging_info=info)
        return token
    monkeypatch.setattr(callbacks, "wgmma", wgmma)



FP8_INTERPRETED = {  # M, group sizes, tile_m, swiglu, output dtype (bf16 out of plain 128-row tiles: on the GPU)
    "tiny groups, 64-row tiles, float32 out": (200, [60, 0, 2, 1, 100], 64, False, jnp.float32),
    "SwiGLU in the epilogue": (400, [130, 0, 200, 50], 128, True, jnp.bfloat16),
}


@pytest.mark.parametrize("fp8_lhs", [False, True])
@pytest.mark.parametrize("case", FP8_INTERPRETED)
def test_kernel_reads_fp8_tiles(case, fp8_lhs, transposed_wgmma_operands):
    """FP8 weights as stored (float8_e4m3fn [G, N, K]) at a group offset in a longer stack: the
    kernel converts its K-major tiles to bf16 in SMEM (or with FP8 lhs and its row scales
    multiplies both on FP8 tensor cores), multiplies them transposed and applies the scales in its
    epilogue (interpreted): the reference's numbers (float32 out: within summation order; bf16: its
    bits but for rare one-ulp roundings), zeros past the sum. Through the entry point, interpret
    mode refuses FP8 with the reason."""
    M, sizes, tile_m, swiglu, out_dtype = FP8_INTERPRETED[case]
    G = offset = len(sizes)
    lhs, values, scale = fp8_operands(9, M, 256 if fp8_lhs else 128, 512, G, offset)   # 2 or 2 K steps
    rows = dict(zip(("lhs", "lhs_scale"), quantize_rows(lhs))) if fp8_lhs else dict(lhs=lhs)
    sizes, total = jnp.asarray(sizes, jnp.int32), sum(sizes)
    got = gmm_gpu.gmm(rows["lhs"], values, sizes, group_offset=offset, scale=scale, lhs_scale=rows.get("lhs_scale"),
                      preferred_element_type=out_dtype, swiglu=swiglu, tile_m=tile_m, interpret=True)
    layer = dict(rhs=values[offset:], group_sizes=sizes, scale=scale[offset:], **rows)
    if swiglu:
        assert_bits_but_rare_ulps(got[:total], reference.gmm_swiglu(**layer)[:total])
    elif out_dtype == jnp.float32:
        assert rel_err(got[:total], reference.gmm(**layer, preferred_element_type=out_dtype)[:total]) <= 1e-6
    else:
        assert_bits_but_rare_ulps(got[:total], reference.gmm(**layer)[:total])
    assert not np.asarray(got[total:], np.float32).any()
    with pytest.raises(ValueError, match="transposed wgmma operands"):
        api.gmm(lhs, values, sizes, scale=scale, backend="gpu", interpret=True)


def test_kernel_reads_k_major_bf16_weights(transposed_wgmma_operands):
    """bf16 weights given K-major ([G, N, K], the rows' gradient's product with the forward's
    weights), interpreted: the reference's product with the transposes, within summation order."""
    lhs, rhs, sizes = operands(10, 200, 128, 512, [60, 0, 2, 1, 100])
    got = gmm_gpu.gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, k_major=True, preferred_element_type=jnp.float32,
                      tile_m=64, interpret=True)
    want = reference.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32)
    assert rel_err(got[:163], want[:163]) <= 1e-6 and not np.asarray(got[163:]).any()


def assert_bits_but_rare_ulps(got, want):
    """got equals want (bf16) but for rare one-ulp differences: the same products summed in another
    order can round the other way (for values a thousand times below the largest, which a sum's
    cancellation leaves, one ulp of that thousandth)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    differ = got != want
    assert differ.mean() <= 1e-3
    floor = 1e-3 * np.abs(want).max()
    assert (np.abs(got - want)[differ] <= np.maximum(np.abs(want)[differ], floor) * 2.0 ** -7).all()


def operands(seed, M, K, N, sizes):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    lhs = jax.random.normal(k1, (M, K), jnp.float32).astype(jnp.bfloat16)
    rhs = (jax.random.normal(k2, (len(sizes), K, N), jnp.float32) / K ** 0.5).astype(jnp.bfloat16)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


CASES = {  # M, K, N, group sizes
    "zeros inside": (1000, 512, 512, [0, 130, 5, 0, 300, 1, 0, 400]),
    "empty ends, rows past sum": (203, 256, 512, [0, 3, 50, 0]),
    "one group": (300, 256, 256, [300]),
    "tiny groups": (96, 128, 256, [1, 2, 3, 0] * 8 + [0] * 32),
    "decode 8 x top-8": (64, 2048, 1024, [1] * 64 + [0] * 192),
    "skewed 256": (4096, 512, 2048, None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("tile_m", [64, 128])
@pytest.mark.parametrize("case", CASES)
def test_gpu_gmm_matches_float64(case, tile_m):
    M, K, N, sizes = CASES[case]
    if sizes is None:
        sizes = random_sizes(np.random.default_rng(0), M, 256)
    lhs, rhs, group_sizes = operands(len(case), M, K, N, sizes)
    total = int(np.sum(sizes))
    for out_dtype in (jnp.bfloat16, jnp.float32):
        out = jax.jit(lambda a, b, s: gmm_gpu.gmm(a, b, s, preferred_element_type=out_dtype, tile_m=tile_m))(
            lhs, rhs, group_sizes)
        assert out.dtype == out_dtype and out.shape == (M, N)
        want = gmm64(lhs, rhs, group_sizes)
        tol = 1e-5 if out_dtype == jnp.float32 else 5e-3
        assert rel_err(out[:total], want[:total]) <= tol
        assert not np.asarray(out[total:]).any()
        ref = reference.gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
        assert rel_err(out, ref) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("fp8_lhs", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_gpu_gmm_fp8_matches_reference(case, fp8_lhs):
    """FP8 weights read by the kernel (K-major tiles converted in SMEM, or with FP8 lhs and its row
    scales multiplied on FP8 tensor cores; scales in the epilogue) at a group offset: the
    reference's bits but for rare one-ulp roundings, both tile heights, bf16 and float32 outputs,
    and with SwiGLU in the epilogue; zeros past the sum. Hopper's FP8 MMA accumulates with fewer
    bits than float32 (as DeepSeek-V3's report describes), so with FP8 rows the float32 sums are
    within 5e-3 of the reference's exact float32 sums (relative to the largest output) and the
    bf16 outputs within 1e-2."""
    M, K, N, sizes = CASES[case]
    if sizes is None:
        sizes = random_sizes(np.random.default_rng(0), M, 256)
    G, total, offset = len(sizes), int(np.sum(sizes)), 3
    lhs, values, scale = fp8_operands(len(case), M, K, N, G, offset)
    rows = dict(zip(("lhs", "lhs_scale"), quantize_rows(lhs))) if fp8_lhs else dict(lhs=lhs)
    layer = dict(rhs=values[offset:], group_sizes=jnp.asarray(sizes, jnp.int32), scale=scale[offset:], **rows)
    run = functools.partial(gmm_gpu.gmm, rows["lhs"], values, layer["group_sizes"], group_offset=offset, scale=scale,
                            lhs_scale=rows.get("lhs_scale"))

    def bf16_close(got, want):
        if fp8_lhs:
            assert rel_err(got, want) <= 1e-2
        else:
            assert_bits_but_rare_ulps(got, want)

    for tile_m in (64, 128):
        for out_dtype in (jnp.bfloat16, jnp.float32):
            got = run(preferred_element_type=out_dtype, tile_m=tile_m)
            want = reference.gmm(**layer, preferred_element_type=out_dtype)
            assert not np.asarray(got[total:]).any()
            if out_dtype == jnp.float32:
                assert rel_err(got, want) <= (5e-3 if fp8_lhs else 1e-5)
            else:
                bf16_close(got, want)
    bf16_close(run(swiglu=True), reference.gmm_swiglu(**layer))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_gmm_swiglu_epilogue_matches_unfused(case):
    """Same roundings as gmm then SwiGLU: bit-equal but for rare one-ulp differences (the kernel's
    exp is not XLA's)."""
    M, K, N, sizes = CASES[case]
    if sizes is None:
        sizes = random_sizes(np.random.default_rng(0), M, 256)
    lhs, rhs, group_sizes = operands(len(case) + 1, M, K, N, sizes)
    total = int(np.sum(sizes))
    fused = np.asarray(jax.jit(lambda a, b, s: gmm_gpu.gmm(a, b, s, swiglu=True))(lhs, rhs, group_sizes), np.float32)
    unfused = np.asarray(jax.jit(lambda a, b, s: reference.swiglu(gmm_gpu.gmm(a, b, s)))(lhs, rhs, group_sizes),
                         np.float32)
    assert fused.shape == (M, N // 2)
    assert not fused[total:].any()
    assert_bits_but_rare_ulps(fused[:total], unfused[:total])
    assert rel_err(fused[:total], swiglu64(gmm64(lhs, rhs, group_sizes))[:total]) <= 1e-2


def moe_layer_against_reference_path(monkeypatch, fp8, token_counts):
    """A whole MoE layer (router -> sorted dispatch -> kernel gmm -> SwiGLU -> gmm -> combine)
    against the same layer with the jnp reference gmm and SwiGLU, at each of token_counts; bf16 or
    FP8 experts (fp8 True), or FP8 experts on FP8 rows (fp8 "rows", `fp8_activations="grouped"`:
    the SwiGLU output's one-ulp differences become e4m3 steps where they flip its quantization)."""
    from flax import nnx

    from ring_jax.config import RingConfig
    from ring_jax import backends
    from ring_jax.layers import moe

    config = RingConfig.from_hf(load_config_dict("tiny.json"), hidden_size=256, moe_intermediate_size=128,
                                fp8_activations="grouped" if fp8 == "rows" else "none")
    layer = moe.MoE(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    if fp8:
        layer.experts.quantize()
    monkeypatch.setattr(backends, "GATHER_MAX_PAIRS", 0)      # decode sizes through the gmm too, not matvec
    for tokens in token_counts:
        x = jax.random.normal(jax.random.PRNGKey(tokens), (1, tokens, 256)).astype(jnp.bfloat16)
        fast = layer(x)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(moe.pallas_kernels, "gmm_backend", lambda *a, **k: "reference")
            mp.setattr(moe.pallas_kernels, "gmm", functools.partial(api.gmm, backend="reference"))
            mp.setattr(moe.pallas_kernels, "gmm_swiglu", functools.partial(api.gmm_swiglu, backend="reference"))
            slow = layer(x)
        assert rel_err(fast, slow) <= (3e-2 if fp8 == "rows" else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True, "rows"])
def test_moe_layer_through_gpu_kernel_matches_reference_path(monkeypatch, fp8):
    """`moe_layer_against_reference_path` on the GPU at prefill and decode sizes (from 300 x top-4
    rows on: 128-row tiles, SwiGLU in the kernel)."""
    moe_layer_against_reference_path(monkeypatch, fp8, (1, 8, 300, 1000))


def test_moe_layer_with_fp8_rows_in_the_interpreter(monkeypatch, transposed_wgmma_operands):
    """The same with FP8 rows on the CPU: the grouped matmul in JAX's Mosaic GPU interpreter (its
    2 simulated SMs each run a sequence of units) and the Triton kernels in interpret mode, the
    rows quantized by the kernel: the tokens [300, 256] and the SwiGLU output [300 x top-k, 128]."""
    supports, kernel = gmm_gpu.supports, gmm_gpu.gmm
    quantized = as_if_on_hopper(monkeypatch, record={"quantize_rows": lambda x, **_: x.shape})
    monkeypatch.setattr(gmm_gpu, "supports", supports)
    monkeypatch.setattr(gmm_gpu, "gmm", lambda *a, **k: kernel(*a, **{**k, "interpret": True}))
    moe_layer_against_reference_path(monkeypatch, "rows", (300,))
    top_k = load_config_dict("tiny.json")["num_experts_per_tok"]
    assert set(quantized) == {(300, 256), (300 * top_k, 128)}


@pytest.mark.gpu
@pytest.mark.parametrize("swiglu", [False, True])
def test_gpu_gmm_reads_a_layer_of_a_stack_in_place(swiglu):
    """group_offset: one layer's experts in a stack of every layer's (the scanned decoder) give the
    bits of the same experts passed alone."""
    L, G, M, K, N = 3, 8, 1024, 256, 512
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    lhs = jax.random.normal(ks[0], (M, K)).astype(jnp.bfloat16)
    stack = jax.random.normal(ks[1], (L * G, K, N)).astype(jnp.bfloat16)
    sizes = jnp.asarray(np.random.default_rng(2).multinomial(M - 40, np.ones(G) / G), jnp.int32)
    op = api.gmm_swiglu if swiglu else api.gmm
    for layer in range(L):
        alone = op(lhs, stack[layer * G:(layer + 1) * G], sizes, backend="gpu")
        got = jax.jit(lambda s, i: op(lhs, s, sizes, group_offset=i * G, backend="gpu"))(stack, jnp.int32(layer))
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(alone, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, FP8])
def test_gpu_take_rows_copies_the_indexed_rows(dtype):
    """The row-gather kernel on the GPU, at a prefill chunk's dispatch shape (4096 tokens x top-8,
    hidden 2048) and a small one: x[idx] bit for bit (FP8 rows as uint16 pairs), and "auto" takes
    the kernel."""
    import pallas_kernels
    from pallas_kernels.moe import gather_gpu
    from pallas_kernels.backend import platform

    assert platform() == "hopper", "the kernel runs on Hopper GPUs only"
    rng = np.random.default_rng(0)
    for R, H, k in ((4096, 2048, 8), (33, 192 if dtype == FP8 else 96, 1)):
        x = jnp.asarray(rng.standard_normal((R, H)), dtype)
        idx = jnp.asarray(rng.permutation(R * k) // k if k > 1 else rng.integers(0, R, 40), jnp.int32)
        assert gather_gpu.fits(x, idx)
        got = pallas_kernels.take_rows(x, idx)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(x)[np.asarray(idx)])


@pytest.mark.gpu
def test_gradient_through_the_kernel_is_the_references():
    """jax.grad through the Mosaic GPU grouped matmul (plain and SwiGLU, a layer's experts read in
    a longer stack): the rows' gradient through the kernel with the weights K-major (and SwiGLU's
    at the product the kernel recomputes), the weights' the reference's: the gradients through the
    reference, within summation order."""
    from test_kernel_gradients import grads

    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.standard_normal((512, 256)), jnp.bfloat16)
    stack = jnp.asarray(0.1 * rng.standard_normal((8, 256, 512)), jnp.bfloat16)
    sizes = jnp.asarray([100, 0, 300, 112], jnp.int32)
    for entry in (api.gmm, api.gmm_swiglu):
        got = grads(lambda l, r: entry(l, r, sizes, group_offset=4, backend="gpu"), (lhs, stack), (0, 1))
        want = grads(lambda l, r: entry(l, r, sizes, group_offset=4, backend="reference"), (lhs, stack), (0, 1))
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-2
