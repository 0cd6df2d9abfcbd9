"""Softmax attention of a few new queries per sequence (a decode step) over a stacked KV cache, on
CUDA GPUs: two Pallas kernels through the Triton lowering.

The keys and values are entry `slot` of a stack of every softmax layer's cache (the scanned
decoder's), addressed inside the kernels: a slice taken outside them is a copy of the layer's
whole cache, which XLA makes before its own products (three times the bytes of reading it once).

The reference rounds the normalised probabilities to the model dtype before their product with
the values, so the softmax's max and sum must be known before any value is read: one pass over the
keys cannot also take the values (as flash decoding does). Instead:

1. scores: grid (B, Hkv, chunks of the slots). Each program reads its chunk of one kv head's keys
   once, block by block, and computes the float32 scores of the head's R = T G query rows
   (G query heads per kv head, T tokens; -inf where a row does not read a slot), which it writes,
   and their running max and sum of exponentials over the chunk. Chunks that no row reads (past
   the last query, before every sequence's first slot) are skipped.
2. XLA merges the chunks' maxima and sums: [B, Hkv, chunks, R] values, a few KB.
3. values: grid (B, Hkv, splits of the slots). Each program reads its blocks' scores back,
   normalises and rounds them (`reference.probabilities`' numerics) and sums their products with
   the values in float32; XLA adds the splits' partial sums.
Traffic: the keys and values once, plus 8 R bytes of scores per slot and kv head (R = 4, D = 128:
6% more than the 4 D bytes of keys and values).

The products run on the matrix unit, which wants at least MMA_ROWS rows: the R query rows are
padded with zero rows, and the scores' padding rows are neither stored nor loaded (masked). Both
products accumulate in float32 (float32 operands at full precision, not TF32): the reference's
numerics up to the order of the float32 sums, and the exponentials' last bits (Triton's and XLA's
exp).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import power_of_two

BLOCK = 64               # slots per product
NUM_WARPS = 4
NUM_STAGES = 3           # loads in flight in each kernel's loop (Triton's software pipelining)
MAX_ROWS = 64            # query rows (T G) per kv head
MMA_ROWS = 16            # the matrix unit's fewest rows
TARGET_PROGRAMS = 512    # each kernel splits the slots until B Hkv splits reaches this


def fits(q, keys) -> bool:
    """Whether the kernels take q [B, T, H, D] and keys [S, B, L, Hkv, D]: q and keys of one dtype
    (bf16, f16 or f32), D a power of two of at least 16, L a multiple of BLOCK, and at most
    MAX_ROWS query rows per kv head."""
    _, T, H, D = q.shape
    L, Hkv = keys.shape[2], keys.shape[3]
    return (q.dtype == keys.dtype and jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                                             jnp.dtype(jnp.float32))
            and power_of_two(D) and D >= 16 and L % BLOCK == 0 and H % Hkv == 0 and T * (H // Hkv) <= MAX_ROWS)


def slot_splits(B: int, Hkv: int, n_blocks: int) -> tuple[int, int]:
    """(splits, blocks per split) of a kernel's grid over n_blocks blocks of slots."""
    splits = max(1, min(n_blocks, TARGET_PROGRAMS // (B * Hkv)))
    per_split = -(-n_blocks // splits)
    return -(-n_blocks // per_split), per_split


def _read_blocks(T: int, start, cursor, per_split: int):
    """The blocks [first, last) of this program's split that some query row reads: the slots from
    the first real one (or the first query's, if earlier) to the last query's."""
    lo, hi = jnp.minimum(start, cursor), cursor + T - 1
    j = pl.program_id(2)
    return jnp.maximum(j * per_split, lo // BLOCK), jnp.minimum((j + 1) * per_split, hi // BLOCK + 1)


def _dot(a, b, contract):
    """a @ b (contract: b's contracted axis) in float32, at full precision for float32 operands."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (contract,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _scores_kernel(q_ref, start_ref, cursor_ref, slot_ref, k_ref, s_ref, m_ref, sum_ref, *, T, G, R, per_split,
                   scale):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, cursor, slot = start_ref[b], cursor_ref[0], slot_ref[0]
    first, last = _read_blocks(T, start, cursor, per_split)
    q = q_ref[b, h, :, :]                                                        # [rows, D]
    row = jnp.arange(q.shape[0], dtype=jnp.int32)
    q_slot = cursor + row // G
    real = (row < R)[:, None]

    def score_block(i, carry):
        m, total = carry
        at = i * BLOCK
        s = _dot(q, k_ref[slot, b, pl.ds(at, BLOCK), h, :], 1) * scale          # [rows, BLOCK]
        slots = at + jnp.arange(BLOCK, dtype=jnp.int32)[None, :]
        seen = (slots >= start) & (slots <= q_slot[:, None]) | (slots == q_slot[:, None])
        s = jnp.where(seen, s, -jnp.inf)
        pltriton.store(s_ref.at[b, h, :, pl.ds(at, BLOCK)], s, mask=real)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)                         # rows with nothing seen yet
        return m_new, total * jnp.exp(m - shift) + jnp.sum(jnp.exp(s - shift[:, None]), axis=1)

    none = jnp.full(row.shape, -jnp.inf, jnp.float32)
    m, total = jax.lax.fori_loop(first, last, score_block, (none, jnp.zeros_like(none)))
    m_ref[b, h, j, :] = m
    sum_ref[b, h, j, :] = total


def _values_kernel(s_ref, m_ref, sum_ref, start_ref, cursor_ref, slot_ref, v_ref, o_ref, *, T, R, per_split):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, cursor, slot = start_ref[b], cursor_ref[0], slot_ref[0]
    first, last = _read_blocks(T, start, cursor, per_split)
    m, total = m_ref[b, h, :], sum_ref[b, h, :]                                   # [rows]
    real = (jnp.arange(m.shape[0]) < R)[:, None]

    def add_block(i, acc):
        block = pl.ds(i * BLOCK, BLOCK)
        s = pltriton.load(s_ref.at[b, h, :, block], mask=real, other=-jnp.inf)  # [rows, BLOCK]
        p = (jnp.exp(s - m[:, None]) / total[:, None]).astype(v_ref.dtype)
        return acc + _dot(p, v_ref[slot, b, block, h, :], 0)

    o_ref[b, h, j, :, :] = jax.lax.fori_loop(first, last, add_block, jnp.zeros(o_ref.shape[-2:], jnp.float32))


@functools.partial(jax.jit, static_argnames=("interpret",))
def decode_attention(q, keys, values, slot, start, cursor, *, interpret=False):
    """q: [B, T, H, D]; keys, values: [S, B, L, Hkv, D], of which entry slot ([] int32) is the
    layer's cache; start: [B] int32; cursor: [] int32 -> [B, T, H, D] in q.dtype
    (`reference.decode_attention` on entry slot)."""
    B, T, H, D = q.shape
    _, _, L, Hkv, _ = keys.shape
    G, R = H // Hkv, T * (H // Hkv)
    rows = max(MMA_ROWS, pl.next_power_of_2(R))                  # R query rows, then zero rows
    q_rows = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, D)   # row r: token r // G
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - R), (0, 0)))
    scalars = (start.astype(jnp.int32), jnp.reshape(cursor, (1,)).astype(jnp.int32),
               jnp.reshape(slot, (1,)).astype(jnp.int32))
    params = pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    n_blocks = L // BLOCK

    chunks, per_chunk = slot_splits(B, Hkv, n_blocks)
    stats = jax.ShapeDtypeStruct((B, Hkv, chunks, rows), jnp.float32)
    scores, m, total = pl.pallas_call(
        functools.partial(_scores_kernel, T=T, G=G, R=R, per_split=per_chunk, scale=D ** -0.5),
        grid=(B, Hkv, chunks),
        in_specs=[anywhere] * 5,
        out_specs=[anywhere] * 3,
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, rows, L), jnp.float32), stats, stats],
        compiler_params=params,
        interpret=interpret,
        name="attention_decode_scores",
    )(q_rows, *scalars, keys)
    m_all = jnp.max(m, axis=2)                                   # the chunks merged: [B, Hkv, rows]
    shift = jnp.where(m_all == -jnp.inf, 0.0, m_all)             # padding rows may read nothing
    total = jnp.sum(total * jnp.exp(m - shift[:, :, None]), axis=2)
    total = jnp.where(total == 0.0, 1.0, total)

    splits, per_split = slot_splits(B, Hkv, n_blocks)
    partial = pl.pallas_call(
        functools.partial(_values_kernel, T=T, R=R, per_split=per_split),
        grid=(B, Hkv, splits),
        in_specs=[anywhere] * 7,
        out_specs=anywhere,
        out_shape=jax.ShapeDtypeStruct((B, Hkv, splits, rows, D), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="attention_decode_values",
    )(scores, shift, total, *scalars, values)
    out = jnp.sum(partial[:, :, :, :R], axis=2).astype(q.dtype)                           # [B, Hkv, R, D]
    return out.reshape(B, Hkv, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)
