"""The Pallas Mosaic TPU grouped matmul: its work table, and the kernel in TPU interpret mode.

The kernel is held to a float64 numpy loop over groups (`gmm64`) and to the jnp reference, on
fresh random inputs: group sizes with zeros, an empty first and last group, one group holding
every row, groups of 1-3 rows (many per tile), rows past the sum (must come back exactly 0), M, K,
N not multiples of the tile, G = 1, several tilings, bf16 and float32. Interpret mode fills
uninitialized VMEM and the parts of a partial block past the array's edge with NaN, so a row or a
K column that leaks into the result fails here, and it raises if an output block is revisited
after another one was written. The last tests lower the kernel for TPU (no TPU needed).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from conftest import rel_err
from pallas_kernels.moe import reference, gmm_tpu
from test_kernel_references import gmm64

INTERPRET = pltpu.InterpretParams()


def random_sizes(rng, G, total, p_zero=0.0):
    """G group sizes (int32) summing to `total`, about a fraction p_zero of them empty."""
    live = rng.random(G) >= p_zero
    live[rng.integers(G)] = True
    cuts = np.sort(rng.integers(0, total + 1, live.sum() - 1))
    sizes = np.zeros(G, np.int32)
    sizes[live] = np.diff(np.concatenate([[0], cuts, [total]]))
    return sizes


def random_operands(seed, M, K, N, G, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    lhs = jax.random.normal(k1, (M, K)).astype(dtype)
    rhs = jax.random.normal(k2, (G, K, N)).astype(dtype)
    return lhs, rhs


# ----------------------------------------------------------------------------------- work items

@pytest.mark.parametrize("tm", [8, 128])
@pytest.mark.parametrize("seed", range(8))
def test_work_items_partition_the_rows(tm, seed):
    """Live items cover every row < M exactly once (group g's rows by g, the tail by ZERO items),
    each within its tile; tiles never decrease (a tile's items are consecutive); the count fits
    the static bound; surplus items are SKIP on the last tile; dead items read live blocks."""
    rng = np.random.default_rng(seed)
    M, G = int(rng.integers(1, 700)), int(rng.integers(1, 30))
    sizes = random_sizes(rng, G, int(rng.integers(0, M + 1)), p_zero=0.3)
    items, count = gmm_tpu.work_items(jnp.asarray(sizes), M, tm)
    items, count = np.asarray(items), int(count)
    assert items.shape == (6, -(-M // tm) + G) and 1 <= count <= items.shape[1]
    kind, tile, group, src_tile, lo, hi = items
    owner = np.full(M, -1)
    for w in range(count):
        assert kind[w] in (gmm_tpu.COMPUTE, gmm_tpu.ZERO)
        first, end = max(lo[w], tile[w] * tm), min(hi[w], (tile[w] + 1) * tm)
        assert first < end and (owner[first:end] == -1).all()
        owner[first:end] = group[w] if kind[w] == gmm_tpu.COMPUTE else G
        if kind[w] == gmm_tpu.COMPUTE:
            assert src_tile[w] == tile[w]
    expected = np.concatenate([np.repeat(np.arange(G), sizes), np.full(M - sizes.sum(), G)])
    np.testing.assert_array_equal(owner, expected)
    assert (np.diff(tile) >= 0).all()
    assert (kind[count:] == gmm_tpu.SKIP).all() and (tile[count:] == tile[count - 1]).all()
    live = kind == gmm_tpu.COMPUTE
    if live.any():
        last = np.nonzero(live)[0][-1]
        assert (group[~live] == group[last]).all() and (src_tile[~live] == src_tile[last]).all()
    assert ((0 <= group) & (group < G)).all() and ((0 <= src_tile) & (src_tile * tm < M)).all()


# ------------------------------------------------------------------------------- kernel, float32

# name: (M, K, N, sizes (a list, or (G, total) for random sizes with zeros), tiling)
CASES = {
    "random_with_zeros": (256, 256, 256, (8, 256), (128, 128, 128)),
    "empty_first_and_last": (256, 128, 128, [0, 100, 56, 100, 0], (128, 128, 128)),
    "one_group_holds_all": (384, 128, 128, [0, 0, 384, 0], (128, 128, 128)),
    "tiny_groups_many_per_tile": (64, 128, 128, [1, 3, 2, 0, 1, 2, 3, 1, 1, 2, 0, 3] * 2 + [16],
                                  (16, 128, 128)),
    "sum_below_m": (256, 128, 256, [0, 37, 0, 60, 20], (128, 128, 128)),
    "all_groups_empty": (136, 128, 128, [0, 0, 0], (64, 128, 128)),
    "m_not_a_multiple_of_tm": (200, 128, 128, [70, 0, 61, 69], (128, 128, 128)),
    "single_group": (200, 256, 128, [150], (128, 128, 128)),
    "k_n_not_multiples": (160, 200, 300, [0, 40, 3, 77, 0, 30], (128, 128, 128)),
    "k_n_below_one_tile": (96, 72, 40, [10, 0, 50, 20], (128, 128, 128)),
    "wide_tiles": (512, 384, 384, (6, 500), (256, 256, 256)),
    "full_dim_tiles": (120, 384, 256, [30, 30, 0, 50], (512, 512, 512)),
    "thin_m_tiles": (120, 256, 128, (10, 117), (8, 256, 128)),
}


def case_sizes(spec, seed):
    if isinstance(spec, tuple):
        G, total = spec
        return random_sizes(np.random.default_rng(seed), G, total, p_zero=0.3)
    return np.asarray(spec, np.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_float64_and_reference(name):
    M, K, N, spec, tiling = CASES[name]
    seed = sorted(CASES).index(name)
    sizes = case_sizes(spec, seed)
    lhs, rhs = random_operands(100 + seed, M, K, N, len(sizes))
    out = gmm_tpu.gmm(lhs, rhs, jnp.asarray(sizes), tiling=tiling, interpret=INTERPRET)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    out = np.asarray(out)
    assert not np.any(out[sizes.sum():])  # rows past the groups: exactly 0
    if sizes.sum():
        assert rel_err(out, gmm64(lhs, rhs, sizes)) <= 1e-5
        assert rel_err(out, reference.gmm(lhs, rhs, jnp.asarray(sizes))) <= 1e-5


# ---------------------------------------------------------------------------------- kernel, bf16

@pytest.mark.parametrize("M, K, N, spec, tiling, out_dtype", [
    (256, 256, 256, (8, 230), (128, 128, 128), None),
    (200, 200, 300, [0, 1, 2, 3, 90, 0, 60, 1, 0], (16, 128, 128), None),
    (128, 384, 128, [0, 128, 0], (64, 256, 128), jnp.float32),
])
def test_bf16_matches_float64_and_reference(M, K, N, spec, tiling, out_dtype):
    sizes = case_sizes(spec, M + K)
    lhs, rhs = random_operands(M * 3 + N, M, K, N, len(sizes), jnp.bfloat16)
    out = gmm_tpu.gmm(lhs, rhs, jnp.asarray(sizes), preferred_element_type=out_dtype, tiling=tiling,
                  interpret=INTERPRET)
    assert out.dtype == (out_dtype or jnp.bfloat16)
    out = np.asarray(out.astype(jnp.float32))
    assert not np.any(out[sizes.sum():])
    assert rel_err(out, gmm64(lhs, rhs, sizes)) <= 1e-2  # from the same bf16 operands
    ref = reference.gmm(lhs, rhs, jnp.asarray(sizes), preferred_element_type=out_dtype)
    assert rel_err(out, ref) <= 1e-2


def test_bf16_float32_output_is_float32_accurate():
    """bf16 operands with a float32 output: only the final rounding is skipped, so the result is
    the float64 product of the bf16 values to float32 accuracy."""
    sizes = np.array([50, 0, 70, 8], np.int32)
    lhs, rhs = random_operands(7, 128, 256, 128, 4, jnp.bfloat16)
    out = gmm_tpu.gmm(lhs, rhs, jnp.asarray(sizes), preferred_element_type=jnp.float32,
                  interpret=INTERPRET)
    assert rel_err(out, gmm64(lhs, rhs, sizes)) <= 1e-5


# ------------------------------------------------------------------------------ schedule details

def test_n_tiles_on_two_cores():
    """The n tiles are "parallel": on two TensorCores (each with its own accumulator) they may run
    in any order; the items and k steps of one n tile stay in order on one core."""
    visits = []

    def record(token, grid_point, core):
        visits.append((tuple(int(x) for x in grid_point), int(core)))
        return token

    params = pltpu.InterpretParams(random_seed=5, num_cores_or_threads=2,
                                   grid_point_recorder=record)
    sizes = np.array([20, 0, 90, 3, 0, 60], np.int32)
    lhs, rhs = random_operands(11, 200, 256, 512, 6)
    out = gmm_tpu.gmm(lhs, rhs, jnp.asarray(sizes), interpret=params)
    assert rel_err(out, gmm64(lhs, rhs, sizes)) <= 1e-5 and not np.any(np.asarray(out)[173:])
    assert {core for _, core in visits} == {0, 1}
    for n in range(4):
        steps = [(w, k, core) for (nn, w, k), core in visits if nn == n]
        assert [(w, k) for w, k, _ in steps] == sorted((w, k) for w, k, _ in steps)
        assert len({core for *_, core in steps}) == 1


def test_tiling_errors_name_the_tile():
    lhs, rhs = random_operands(0, 256, 256, 256, 2)
    sizes = jnp.asarray([100, 100], jnp.int32)
    with pytest.raises(ValueError, match="tk=100"):
        gmm_tpu.gmm(lhs, rhs, sizes, tiling=(128, 100, 128), interpret=INTERPRET)
    with pytest.raises(ValueError, match="tm=8 must be a positive multiple of 16"):
        gmm_tpu.gmm(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), sizes, tiling=(8, 128, 128),
                interpret=INTERPRET)
    with pytest.raises(ValueError, match="dtypes"):
        gmm_tpu.gmm(lhs, rhs.astype(jnp.bfloat16), sizes, interpret=INTERPRET)


# ------------------------------------------------------------------------------------- lowering

def _lower_for_tpu(fn, *specs):
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("dtype, M, K, N, G, tiling", [
    (jnp.bfloat16, 1024, 2048, 1024, 256, (128, 128, 128)),   # Ring-like decode/prefill step
    (jnp.bfloat16, 4096, 2048, 1024, 16, (512, 1024, 1024)),
    (jnp.float32, 200, 200, 300, 7, (128, 128, 128)),         # ragged M, K and N
])
def test_kernel_lowers_to_mosaic_tpu(dtype, M, K, N, G, tiling):
    """The Pallas -> Mosaic TPU lowering accepts the kernel (block shapes, scalar prefetch, ops)."""
    specs = (jax.ShapeDtypeStruct((M, K), dtype), jax.ShapeDtypeStruct((G, K, N), dtype),
             jax.ShapeDtypeStruct((G,), jnp.int32))
    text = _lower_for_tpu(lambda l, r, s: gmm_tpu.gmm(l, r, s, tiling=tiling), *specs)
    assert "tpu_custom_call" in text
