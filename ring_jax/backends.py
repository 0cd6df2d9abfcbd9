"""Which implementation each computation of the model takes for a shape: a Pallas kernel, cuDNN's
flash attention, or XLA on jnp code. The layers ask here; they keep only the thresholds of their
own jnp algorithms (the MoE's all-pairs sort, its combine's collective, the linear layers' closed-form
step).

Each answer joins the kernel package's choice for the operands (`pallas_kernels.backend`: whether a
kernel for this device takes them) with the model's reasons:
- Under a mesh XLA partitions jnp code and would not partition a kernel call: the projections, the
  router and the linear-attention decode step stay jnp there. The attention kernels run on each
  device's block, the experts on the devices that hold them (both `sharding.on_blocks`).
- A decode step (a few tokens) and a prefill chunk (many) take different kernels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import backend as kernel_backend
from ring_jax.layers.norms import norm_operands
from ring_jax.quantization import Fp8
from ring_jax.sharding import in_mesh

# Continuations of more than this many tokens (prefill chunks) take cuDNN's flash attention on
# Hopper GPUs; fewer (decode steps) take the decode kernels, which read the layer's keys and values
# in the cache's stack (`pallas_kernels.softmax_attention_decode`).
FLASH_MIN_TOKENS = 8

# Up to this many (token, expert) pairs (a decode step), each pair reads its chosen expert's
# weights directly (`pallas_kernels.matvec`): no sort and no dispatch, and only the chosen experts
# are read (the jnp reference of the grouped matmul reads every expert). On a TPU (for bf16 or
# float32 experts: FP8 ones have no TPU kernel), and under expert parallelism on a GPU, the
# grouped-matmul kernel, which skips empty groups itself, is kept.
GATHER_MAX_PAIRS = 64


def _matvec_takes(rows: int, x, w, scale=None) -> bool:
    """Whether `pallas_kernels.matvec` runs [1, rows, K] rows of x (an array or a `Normed`) against
    w (a [K, N] matrix, a stack [E, K, N], or a tuple of stacks; FP8 with `scale`: K-major, [N, K]
    and [E, N, K]) on its kernel."""
    K = kernel_backend.matrix_shape(w[0] if isinstance(w, tuple) else w)[0]
    if not isinstance(w, tuple) and len(w.shape) == 2:
        w = jax.ShapeDtypeStruct((1,) + tuple(w.shape), w.dtype)
        scale = None if scale is None else jax.ShapeDtypeStruct((1,) + tuple(scale.shape), scale.dtype)
    x, norm = norm_operands(x)
    return pallas_kernels.matvec_backend(jax.ShapeDtypeStruct((1, rows, K), x.dtype), w, norm.get("norm_weight"),
                                         scale=scale) == "gpu"


def projection_matvec(x, w, scale=None) -> bool:
    """Whether x [..., K] (an array or a `Normed`) @ w [K, N] (FP8 with `scale`: [N, K]) takes the
    matvec kernel: as many rows as the kernel takes (`pallas_kernels.matvec`'s "auto": a batch-1
    decode step) on one Hopper GPU, where it streams the weights faster than XLA's product of that
    shape, reads a stacked layer's weights in their stack and normalises a Normed's rows."""
    return not in_mesh() and _matvec_takes(math.prod(x.shape[:-1]), x, w, scale)


def router_backend() -> str:
    """The backend of the router's expert selection (`pallas_kernels.select_experts`)."""
    return "reference" if in_mesh() else "auto"


def experts_gather(tokens, ids, gate_up, down, expert_parallel: bool = False) -> bool:
    """Whether the pairs `ids` [N, k] of tokens [N, hidden] run gathered (each pair reads its
    expert's weights directly) rather than sorted through grouped matmuls: few pairs, and either no
    grouped-matmul kernel for these operands, or the matvec kernel for both products. Not the
    matvec kernel under expert parallelism: every device would run every pair there (pairs held
    elsewhere point at a local expert and are masked), where the grouped kernel skips them (FP8
    experts alike: the GPU kernel reads their FP8 tiles)."""
    if ids.size > GATHER_MAX_PAIRS:
        return False
    if pallas_kernels.gmm_backend(tokens, _values_scale(gate_up)[0]) == "reference":
        return True
    return not expert_parallel and all(_matvec_takes(1, rows, *_values_scale(w))
                                       for rows, w in _product_rows(tokens, gate_up, down))


def _product_rows(tokens, gate_up, down) -> tuple:
    """((rows, gate_up), (rows, down)) of the experts' two products: gate_up reads the tokens (a
    Normed: normalised in the kernel), down the SwiGLU of its output, plain rows of their dtype."""
    return (tokens, gate_up), (norm_operands(tokens)[0], down)


def _values_scale(w) -> tuple:
    """A stack of matrices, or an Fp8 of one -> (values, scale or None)."""
    return (w.values, w.scale) if isinstance(w, Fp8) else (w, None)


def _stack_of_one(w):
    """A matrix (or an Fp8 of one) -> its shape as a stack of one, (values, scale or None)."""
    return tuple(None if a is None else jax.ShapeDtypeStruct((1,) + tuple(a.shape), a.dtype) for a in _values_scale(w))


def shared_expert_joins(tokens, ids, gate_up, down, shared: tuple | None) -> bool:
    """Whether the shared expert (its gate_up and down matrices; None: none, or one with LoRA
    adapters, which runs as its own MLP) runs as one more pair per token in the routed experts'
    matvec calls: the pairs take the matvec kernel (`experts_gather`, one device), with the shared
    weights as one more stack (the kernel takes them when they have a routed expert's shapes and
    dtype). One launch per product instead of two, with the same per-tile products and sums."""
    if shared is None or in_mesh() or not experts_gather(tokens, ids, gate_up, down):
        return False

    def takes(rows, routed, shared):
        (values, scale), (shared_values, shared_scale) = _values_scale(routed), _stack_of_one(shared)
        return _matvec_takes(1, rows, (values, shared_values), None if scale is None else (scale, shared_scale))
    return all(takes(rows, e, w) for w, (rows, e) in zip(shared, _product_rows(tokens, gate_up, down)))


# Up to this batch a decode step on a Hopper GPU runs its layers unrolled. A few sequences' step is
# bound by its many small launches, and a scanned layer's bookkeeping (its counters, the loop's
# carries, values not hoisted out of the body) adds a handful per layer, which unrolling saves for
# a few seconds more of compile time, once. Larger batches gain less and compile for much longer
# (XLA autotunes each layer's GEMM fusions apart), so they keep the scans (docs/PERFORMANCE.md,
# "The decode loop's layers unrolled").
UNROLL_MAX_BATCH = 8


def decode_unrolled(batch: int) -> bool:
    """Whether the decode loop's step of `batch` sequences runs its layers unrolled rather than
    scanned: a few sequences on a Hopper GPU, where it was measured. Elsewhere the scans, which
    compile faster (the CPU's tests decode many tiny models)."""
    return batch <= UNROLL_MAX_BATCH and kernel_backend.platform() == "hopper"


def linear_decode_kernel(qkv, states, rotary_dim: int) -> bool:
    """Whether a linear layer's decode token (qkv [B, 1, 3 H D] after a state, one device) takes
    the kernel that runs the norms, the rotation and the recurrence in one launch and updates the
    state in its stack (`pallas_kernels.linear_attention_decode`)."""
    return (qkv.shape[1] == 1 and not in_mesh()
            and pallas_kernels.linear_attention_decode_backend(qkv[:, 0], states, rotary_dim) == "gpu")


def attention_decode_kernel(q, keys) -> bool:
    """Whether q [B, T, H, D] over the key stack [S, B, L, Hkv, D] takes the decode-attention
    kernels: a decode step (at most FLASH_MIN_TOKENS queries) they take."""
    return q.shape[1] <= FLASH_MIN_TOKENS and pallas_kernels.softmax_attention_decode_backend(q, keys) == "gpu"


@functools.cache
def cudnn_attention():
    """JAX's internal cuDNN attention entry point (it returns the float32 log-sum-exps, which the
    public `jax.nn.dot_product_attention` rounds to the inputs' dtype): (function, MaskType), or
    None where this JAX does not have it (then the jnp path runs)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    except ImportError:
        return None
    return dot_product_attention, MaskType


def flash_attention(q, k) -> bool:
    """Whether attention of q [B, T, H, D] over keys k [B, S, Hkv, D] takes cuDNN's flash
    attention: more than FLASH_MIN_TOKENS queries (a prefill chunk, a full forward), q and k both
    bf16 or both f16, a head size cuDNN takes (a multiple of 8 up to 256), on a Hopper GPU."""
    return (q.shape[1] > FLASH_MIN_TOKENS and q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
            and q.shape[3] % 8 == 0 and q.shape[3] <= 256 and kernel_backend.platform() == "hopper"
            and cudnn_attention() is not None)


def prefill_chunk(config, dtype) -> int:
    """Prompt tokens per prefill step (summed over the batch) when the caller gives none: 32768
    where the prefill attention is cuDNN's flash attention (`flash_attention`), 4096 elsewhere,
    where the jnp attention holds [B, H, chunk, block] float32 scores. On the GPU every MoE layer's
    grouped matmuls read all expert weights once per step, which bounds shorter steps by bandwidth
    (docs/PERFORMANCE.md)."""
    q = jax.ShapeDtypeStruct((1, 2 * FLASH_MIN_TOKENS, config.num_attention_heads, config.head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, 2 * FLASH_MIN_TOKENS, config.num_key_value_heads, config.head_dim), dtype)
    return 32768 if flash_attention(q, k) else 4096
