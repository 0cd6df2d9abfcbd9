"""One decode token of the Lightning layer on CUDA GPUs: a Pallas kernel through the Triton lowering.

From the layer's fused projection to the attention output and the new state in one launch, where
XLA runs four fusions (`benchmarks/decode_kernels.py` times both):
per head h, q and k are RMS-normalised over D, weighted and rotated (partial NeoX RoPE), then

    o = scale (exp(g_h) q S + (q . k) v) = scale q S',      S' = exp(g_h) S + k^T v.

Block sizes of 16-64 columns and 2-8 warps time the same: the kernel is bound by its chain of
dependent loads and reductions, not by its state bytes.

Grid (B, H, Dv / BLOCK_V). Every program recomputes its head's q and k (D values each, from L2)
and owns a [D, BLOCK_V] column block of the state, which it reads once and writes once, in place.
The state is entry `slot` of a stack of every linear layer's states (the scanned decoder's cache),
addressed inside the kernel: a slice taken outside it would be a copy of the state. So are the
layer's decay (in the table of every linear layer's) and its q/k norm weights (in their stacks).
The head's D channels are handled as the spans [0, r/2), [r/2, r), [r, D) for rotary_dim r, each a
power-of-two Triton vector, so that the rotation pairs channel i with i + r/2 without a shuffle.

Numerics are the layer's (`reference.decode_step`): every bf16 operation of the norm and the
rotation rounds to bf16, the statistics and the recurrence are float32, and exp(g) comes in
computed by XLA. Only the order of the float32 sums differs.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import power_of_two

BLOCK_V = 32
NUM_WARPS = 4


def _spans(D: int, rotary_dim: int) -> tuple[tuple[int, int], ...]:
    half = rotary_dim // 2
    return tuple((a, n) for a, n in ((0, half), (half, half), (rotary_dim, D - rotary_dim)) if n)


def fits(qkv, state, rotary_dim: int) -> bool:
    """Whether the kernel takes these operands (Triton blocks have power-of-two sizes): bf16 or
    float32 qkv, a float32 state [..., D, D] with D a power of two of at least BLOCK_V, and
    rotary_dim / 2 and D - rotary_dim (unless 0) powers of two."""
    D, Dv = state.shape[-2:]
    spans_ok = rotary_dim % 2 == 0 and 0 < rotary_dim <= D and all(power_of_two(n) for _, n in _spans(D, rotary_dim))
    return (jnp.dtype(qkv.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
            and jnp.dtype(state.dtype) == jnp.dtype(jnp.float32) and D == Dv and power_of_two(D) and D >= BLOCK_V
            and spans_ok)


def _kernel(q_ref, k_ref, v_ref, qw_ref, kw_ref, cos_ref, sin_ref, decay_ref, valid_ref, slot_ref, weight_ref,
            s_ref, o_ref, s_out_ref, *, spans, eps, scale):
    f32, dtype = jnp.float32, q_ref.dtype
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot, cols = slot_ref[0], pl.ds(j * BLOCK_V, BLOCK_V)
    half = spans[0][1]
    D = sum(n for _, n in spans)

    def rnd(x):                                          # one rounding to the activation dtype
        return x.astype(dtype).astype(f32)

    def head(x_ref, w_ref):
        """The head's q or k: RMS-normalised, weighted, rotated -> its spans, float32 [n] each."""
        parts = [x_ref[pl.ds(a, n)].astype(f32) for a, n in spans]
        mean_square = sum(jnp.sum(p * p) for p in parts) / D
        inv = jax.lax.rsqrt(mean_square + eps)
        parts = [rnd(rnd(p * inv) * w_ref[weight, pl.ds(a, n)].astype(f32)) for p, (a, n) in zip(parts, spans)]
        x1, x2 = parts[:2]
        cos1, cos2 = cos_ref[pl.ds(0, half)].astype(f32), cos_ref[pl.ds(half, half)].astype(f32)
        sin1, sin2 = sin_ref[pl.ds(0, half)].astype(f32), sin_ref[pl.ds(half, half)].astype(f32)
        return [rnd(rnd(x1 * cos1) + rnd(-x2 * sin1)), rnd(rnd(x2 * cos2) + rnd(x1 * sin2))] + parts[2:]

    blocks = [s_ref[slot, b, h, pl.ds(a, n), cols] for a, n in spans]   # [n, BLOCK_V] each, loads first
    weight = weight_ref[0]
    valid = valid_ref[0] != 0
    q = head(q_ref, qw_ref)
    k = [jnp.where(valid, p, 0.0) for p in head(k_ref, kw_ref)]
    v = jnp.where(valid, v_ref[...].astype(f32), 0.0)                      # [BLOCK_V]
    decay = decay_ref[slot, h]                                              # exp(g_h)
    qk = sum(jnp.sum(a * b) for a, b in zip(q, k))
    q_state = jnp.zeros_like(v)
    for (a, n), rows, q_part, k_part in zip(spans, blocks, q, k):
        q_state += jnp.sum(q_part[:, None] * rows, axis=0)
        s_out_ref[slot, b, h, pl.ds(a, n), cols] = decay * rows + k_part[:, None] * v[None, :]
    o_ref[...] = (scale * (qk * v + decay * q_state)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "scale", "interpret"))
def decode_step(qkv, q_weights, k_weights, weight, cos, sin, log_decays, states, slot, valid, *, eps, scale,
                interpret=False):
    """qkv: [B, 3 H D]; q_weights, k_weights: [N, D], of which entry weight ([] int32) is the
    layer's; cos, sin: [B, rotary_dim]; log_decays: [S, H]; states: [S, B, H, D, D] float32, of
    which entry slot ([] int32) is the layer's (its decay and its state); valid: [B] bool
    -> (o [B, H, D] in qkv.dtype, states with entry slot advanced) (api.linear_attention_decode).
    The layer's entries are read inside the kernel: slices taken outside it would be copies (a
    launch each) inside a scanned decoder."""
    _, B, H, D, Dv = states.shape
    rotary_dim = cos.shape[-1]
    heads = qkv.reshape(B, 3 * H, D)
    decays = jnp.exp(log_decays.astype(jnp.float32))          # a constant table in the model: folded
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    # valid goes in as int8: a conversion of the bool that does not grow it, which XLA hoists out of
    # a scanned decoder (a widening one it would redo in every layer, one launch each).
    return pl.pallas_call(
        functools.partial(_kernel, spans=_spans(D, rotary_dim), eps=eps, scale=scale),
        grid=(B, H, Dv // BLOCK_V),
        in_specs=[
            pl.BlockSpec((None, None, D), lambda b, h, j: (b, h, 0)),                # q
            pl.BlockSpec((None, None, D), lambda b, h, j: (b, H + h, 0)),            # k
            pl.BlockSpec((None, None, BLOCK_V), lambda b, h, j: (b, 2 * H + h, j)),  # v columns
            anywhere,                                                              # q_weights: by weight
            anywhere,                                                              # k_weights
            pl.BlockSpec((None, rotary_dim), lambda b, h, j: (b, 0)),
            pl.BlockSpec((None, rotary_dim), lambda b, h, j: (b, 0)),
            anywhere,                                                              # decays: by slot
            pl.BlockSpec((1,), lambda b, h, j: (b,)),
            anywhere,                                                              # slot
            anywhere,                                                              # weight
            anywhere,                                                              # states: whole, by slot
        ],
        out_specs=[pl.BlockSpec((None, None, BLOCK_V), lambda b, h, j: (b, h, j)), anywhere],
        out_shape=[jax.ShapeDtypeStruct((B, H, Dv), qkv.dtype), jax.ShapeDtypeStruct(states.shape, jnp.float32)],
        input_output_aliases={11: 1},
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="linear_attention_decode",
    )(heads, heads, heads, q_weights, k_weights, cos, sin, decays, valid.astype(jnp.int8),
      jnp.reshape(jnp.asarray(slot, jnp.int32), (1,)), jnp.reshape(jnp.asarray(weight, jnp.int32), (1,)), states)
