"""One decode token's MoE block in one kernel (`pallas_kernels.moe_decode`): the persistent Pallas
Triton kernel in interpret mode (its phases in one program, and as three kernels over several
programs, and with other tiles) against its jnp reference, the reference against float64 of the
block, and the errors; on a GPU, with its grid barriers, at Ring-mini's sizes over stacks of
several layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.backend import FP8, quantize_rows
from pallas_kernels.moe_decode import gpu

SELECTION = dict(eps=1e-6, top_k=4, n_group=4, topk_group=2, scaling=2.5)


def operands(K=256, I=64, E=32, L=3, S=2, seed=0):
    """Random operands of `moe_decode` (bf16 activations, every layer's FP8 stacks) but index."""
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.standard_normal((1, K)) * 3, jnp.bfloat16)
    norm = jnp.asarray(1 + 0.1 * r.standard_normal((L, K)), jnp.bfloat16)
    router = jnp.asarray(r.standard_normal((L, K, E)) / np.sqrt(K), jnp.bfloat16)
    bias = jnp.asarray(0.1 * r.standard_normal((L, E)), jnp.float32)

    def fp8(shape):
        values, scale = quantize_rows(r.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-1]))
        return jnp.asarray(values), jnp.asarray(scale)
    (gate_up, gate_up_scale), (shared_gate_up, shared_gate_up_scale) = fp8((L * E, 2 * I, K)), fp8((S, 2 * I, K))
    (down, down_scale), (shared_down, shared_down_scale) = fp8((L * E, K, I)), fp8((S, K, I))
    return (x, norm, router, bias, (gate_up, shared_gate_up), (gate_up_scale, shared_gate_up_scale),
            (down, shared_down), (down_scale, shared_down_scale))


def float64_block(x, norm, router, bias, gate_up, gate_up_scale, down, down_scale, index, ids, weights):
    """The block in float64 for the selection given (ids, weights), no rounding between steps."""
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)    # noqa: E731
    n, r, b, first, mine = (int(i) for i in index)
    xs = f64(x)[0]
    normed = xs / np.sqrt(np.mean(xs ** 2) + SELECTION["eps"]) * f64(norm[n])
    total = np.zeros_like(xs)
    for j, e in enumerate(list(np.asarray(ids) + first) + [None]):
        stack, m = (0, e) if e is not None else (1, mine)
        y = f64(gate_up[stack][m]) * f64(gate_up_scale[stack][m])[:, None] @ normed
        gate, up = np.split(y, 2)
        act = gate / (1 + np.exp(-gate)) * up
        out = f64(down[stack][m]) * f64(down_scale[stack][m])[:, None] @ act
        total += out * (float(weights[j]) if e is not None else 1.0)
    return total


@pytest.fixture(params=["values", "pairs", "small router tiles"])
def reads(request, monkeypatch):
    """How the kernel reads: the FP8 stacks as values; the routed stacks as uint16 pairs (as it reads
    a stack of 2-4 GiB, here small ones; the shared ones as values); or the router in tiles of 8
    experts by 32 rows (8 partial sums of the logits, 4 expert blocks). The jit caches are cleared
    around it, so that no kernel traced one way serves another."""
    if request.param == "pairs":
        monkeypatch.setattr(gpu, "triton_offsets_overflow", lambda a: a.shape[0] > 2)   # not the 2 shared
    if request.param == "small router tiles":
        monkeypatch.setattr(gpu, "BLOCK_E", 8)
        monkeypatch.setattr(gpu, "ROUTER_TILE_BYTES", 8 * 32 * 2)
    jax.clear_caches()
    yield request.param
    jax.clear_caches()


def test_kernel_in_interpret_mode_equals_the_reference(reads):
    """Both interpret forms (one program running the three phases; three kernels of 3 programs,
    each striding over the items) give the reference's selection, and its output to a bf16 step;
    the reference is within bf16's rounding of the float64 block. The entries: layer 0's, and mixed
    ones (each stack's own layer; the compiled kernels take them as arguments)."""
    ops = operands()
    for entries in [(0, 0, 0, 0, 0), (2, 1, 2, 64, 1)]:
        index = jnp.asarray(entries, jnp.int32)
        want = pallas_kernels.moe_decode(*ops, index, **SELECTION, backend="reference")
        for settings in (dict(), dict(split=True, programs=3)):
            out, ids, weights = gpu.moe_decode(*ops, index, **SELECTION, interpret=True, **settings)
            assert np.array_equal(ids, want[1]), (entries, settings)
            np.testing.assert_allclose(weights, want[2], rtol=1e-6)
            err = np.abs(np.asarray(out, np.float32) - np.asarray(want[0], np.float32))
            assert np.all(err <= 2.0 ** -7 * np.abs(np.asarray(want[0], np.float32)) + 1e-6), (entries, settings)
        exact = float64_block(*ops, index, want[1], want[2])
        got = np.asarray(want[0], np.float64)[0]
        assert np.max(np.abs(got - exact)) / np.max(np.abs(exact)) < 3e-2, entries


def test_other_tiles_change_the_work_not_the_result():
    """Items of 2 gate rows and 64 down columns (and of 32 rows and 8 columns) over 3 programs give
    the same bits as the kernel's own tiles: the tiles cut the same sums into other items."""
    ops, index = operands(), jnp.asarray([2, 1, 2, 64, 1], jnp.int32)
    want = gpu.moe_decode(*ops, index, **SELECTION, split=True, programs=3, interpret=True)
    for tiles in (gpu.Tiles(2, 64, 4), gpu.Tiles(32, 8, 2)):
        got = gpu.moe_decode(*ops, index, **SELECTION, split=True, programs=3, tiles=tiles, interpret=True)
        for g, w in zip(got, want):
            assert np.array_equal(np.asarray(g), np.asarray(w)), tiles
    # Sizes that only smaller tiles take (width 4, hidden 8): the kernel's own would leave no items.
    ops = operands(K=8, I=4)
    want = pallas_kernels.moe_decode(*ops, index, **SELECTION, backend="reference")
    out, ids, _ = gpu.moe_decode(*ops, index, **SELECTION, split=True, programs=3, tiles=gpu.Tiles(4, 8, 2),
                                 interpret=True)
    assert np.array_equal(ids, want[1])
    err = np.abs(np.asarray(out, np.float32) - np.asarray(want[0], np.float32))
    assert np.all(err <= 2.0 ** -7 * np.abs(np.asarray(want[0], np.float32)) + 1e-6)


def test_entry_point_takes_the_kernel_by_name_and_the_reference_by_default():
    ops, index = operands(), jnp.asarray([1, 1, 1, 32, 0], jnp.int32)
    want = pallas_kernels.moe_decode(*ops, index, **SELECTION)                      # "auto" on the CPU
    assert pallas_kernels.moe_decode_backend(ops[2], ops[4], 4, 4) == "reference"
    got = pallas_kernels.moe_decode(*ops, index, **SELECTION, backend="gpu", interpret=True)
    assert np.array_equal(got[1], want[1])
    assert pallas_kernels.moe_decode_backend(ops[2], ops[4], 4, 4, backend="gpu") == "gpu"


def test_errors():
    ops, index = operands(), jnp.zeros((5,), jnp.int32)
    with pytest.raises(ValueError, match=r"index must be \(5,\)"):
        pallas_kernels.moe_decode(*ops, index[:3], **SELECTION)
    with pytest.raises(ValueError, match=r"x must be \(1, 256\)"):
        pallas_kernels.moe_decode(jnp.concatenate([ops[0]] * 2), *ops[1:], index, **SELECTION)
    with pytest.raises(ValueError, match="must be FP8"):
        gate_up = tuple(w.astype(jnp.bfloat16) for w in ops[4])
        pallas_kernels.moe_decode(*ops[:4], gate_up, *ops[5:], index, **SELECTION)
    with pytest.raises(NotImplementedError, match="power-of-two sizes"):
        pallas_kernels.moe_decode(*operands(E=24), index, **{**SELECTION, "n_group": 3}, backend="gpu")
    with pytest.raises(ValueError, match="one program, or split"):
        gpu.moe_decode(*ops, index, **SELECTION, interpret=True, programs=2)
    with pytest.raises(ValueError, match=r"does not take hidden 256, expert width 64, .* Tiles\(block_n=128"):
        gpu.moe_decode(*ops, index, **SELECTION, interpret=True, tiles=gpu.Tiles(128, 16, 8))


@pytest.mark.gpu
def test_gpu_kernel_at_ring_mini_sizes():
    """Ring-mini's block (hidden 2048, 256 experts of width 512, top 8 of 4 groups of 8) over
    stacks of 4 layers' experts against the reference on the GPU, with the grid barriers, as
    three kernels, and with other tiles (16 warps). (Stacks of 2-4 GiB, read as pairs, are tested
    in interpret mode only: on the GPU such a call ran out of memory, docs/PERFORMANCE.md.)"""
    K, I, E, L = 2048, 512, 256, 4
    keys = jax.random.split(jax.random.key(0), 8)

    def fp8(key, shape):                                 # random bytes, NaNs cleared
        return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint8) & 0xBF, FP8)

    def scale(key, shape):
        return jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5) / np.sqrt(shape[-1] * 4)

    down = (fp8(keys[0], (L * E, K, I)), fp8(keys[1], (1, K, I)))
    ops = (jax.random.normal(keys[2], (1, K)).astype(jnp.bfloat16), jnp.ones((L, K), jnp.bfloat16),
           (jax.random.normal(keys[3], (L, K, E)) / np.sqrt(K)).astype(jnp.bfloat16), jnp.zeros((L, E), jnp.float32),
           (fp8(keys[4], (L * E, 2 * I, K)), fp8(keys[5], (1, 2 * I, K))),
           (scale(keys[6], (L * E, 2 * I)), scale(keys[6], (1, 2 * I))), down,
           (scale(keys[7], (L * E, K)), scale(keys[7], (1, K))))
    selection = dict(eps=1e-6, top_k=8, n_group=8, topk_group=4, scaling=2.5)
    for layer in (0, L - 1):
        index = jnp.asarray([layer, layer, layer, layer * E, 0], jnp.int32)
        want = pallas_kernels.moe_decode(*ops, index, **selection, backend="reference")
        for split, tiles in ((False, gpu.TILES), (True, gpu.TILES), (False, gpu.Tiles(16, 32, 16))):
            out, ids, weights = gpu.moe_decode(*ops, index, **selection, split=split, tiles=tiles)
            assert np.array_equal(ids, want[1]), (layer, split, tiles)
            np.testing.assert_allclose(weights, want[2], rtol=1e-5)
            want_out = np.asarray(want[0], np.float32)      # a term's flipped rounding: a bf16 step of the largest
            err = np.abs(np.asarray(out, np.float32) - want_out)
            assert np.all(err <= 2.0 ** -7 * (np.abs(want_out) + np.max(np.abs(want_out)))), (layer, split, tiles)
