"""Entry points of the linear-attention kernels; `backend` picks the implementation.

`linear_attention` (a sequence) and `linear_attention_step` (a few tokens after a state) take q,
k and v; `linear_attention_decode` takes one token per sequence from the layer's fused projection
(its backends: "reference" and "gpu", the Pallas Triton kernel in `decode_gpu.py`).

Backends (`pallas_kernels.backend`): "tpu", the Mosaic TPU kernels (any T, masks, bf16 or f32);
"gpu", the Mosaic GPU prefill kernel (bf16, D % 64 == 0, Dv % 128 == 0, no mask, JAX 0.11 or newer)
and the Pallas Triton decode kernel; and the jnp reference.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.backend import Kernel, resolve, with_reference_gradient
from pallas_kernels.linear_attention import backward, reference

# JAX 0.10's Mosaic GPU layout inference finds no layout for the prefill kernel (lowering it for
# CUDA on a CPU with JAX 0.10.2 fails); it is built and measured on JAX 0.11.
GPU_MIN_JAX = (0, 11)


def jax_version() -> tuple[int, int]:
    return tuple(int(part) for part in jax.__version__.split(".")[:2])


def _scan_gpu(q, v, mask):
    def answer():
        takes = (mask is None and q.dtype == "bfloat16" and v.dtype == "bfloat16" and q.shape[-1] % 64 == 0
                 and v.shape[-1] % 128 == 0 and jax_version() >= GPU_MIN_JAX)
        return Kernel(None if takes else "takes bf16 q/k/v with D % 64 == 0, Dv % 128 == 0 and no mask, on JAX >= 0.11",
                      interprets=False)
    return answer


def _tpu():
    return Kernel()


def _decode_gpu(qkv, state, rotary_dim: int):
    def answer():
        from pallas_kernels.linear_attention import decode_gpu

        return Kernel(None if decode_gpu.fits(qkv, state, rotary_dim) else
                      f"takes bf16 or float32 qkv, a float32 state, D a power of two >= {decode_gpu.BLOCK_V}, and "
                      f"rotary_dim / 2 and D - rotary_dim powers of two (or D - rotary_dim = 0); got {qkv.dtype}, "
                      f"state {state.dtype}, D={state.shape[-1]}, rotary_dim={rotary_dim}")
    return answer


def linear_attention_backend(q, v, mask=None, backend="auto") -> str:
    """The backend `linear_attention` runs for these operands: "gpu", "tpu" or "reference"."""
    return resolve(backend, gpu=_scan_gpu(q, v, mask), tpu=_tpu)


def linear_attention(q, k, v, log_decay, *, scale=None, initial_state=None, mask=None, chunk_size=64,
                     backend="auto", interpret=False):
    """Causal Lightning attention: see `reference.linear_attention` for shapes and math.

    backend, interpret: `pallas_kernels.backend`. The GPU kernel always uses chunks of 64 tokens.
    Differentiable in q, k, v, log_decay and initial_state: through a kernel, the gradient is three
    more runs of it (`backward.py`), the decay's the reference's; through the reference, its
    autodiff.
    """
    kind = resolve(backend, interpret, gpu=_scan_gpu(q, v, mask), tpu=_tpu)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def ref(q, k, v, log_decay, initial_state, mask):
        return reference.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state, mask=mask,
                                          chunk_size=chunk_size)
    if kind == "reference":
        return ref(q, k, v, log_decay, initial_state, mask)

    def kernel(q, k, v, log_decay, initial_state, mask):
        """The kernel of `kind`; the reference for the backward pass's operands the GPU kernel
        does not take."""
        if kind == "tpu":
            from pallas_kernels.linear_attention import scan_tpu

            return scan_tpu.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                             mask=mask, chunk_size=chunk_size, interpret=interpret)
        if _scan_gpu(q, v, mask)().refusal is None:
            from pallas_kernels.linear_attention import scan_gpu

            return scan_gpu.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state)
        return ref(q, k, v, log_decay, initial_state, mask)
    return backward.differentiable(kernel, ref, scale)(q, k, v, log_decay, initial_state, mask)


def linear_attention_step(q, k, v, log_decay, state, *, scale=None, backend="auto", interpret=False):
    """A few tokens continuing from `state`: see `reference.linear_attention_step`.

    Backends "tpu" and "reference" (`pallas_kernels.backend`): on a GPU the jnp recurrence runs
    (XLA fuses it inside a jitted decode loop); a decode token from the fused projection has
    `linear_attention_decode`.
    """
    def ref(q, k, v, log_decay, state):
        return reference.linear_attention_step(q, k, v, log_decay, state, scale=scale)

    if resolve(backend, interpret, tpu=_tpu) == "tpu":
        from pallas_kernels.linear_attention import scan_tpu

        def kernel(q, k, v, log_decay, state):
            return scan_tpu.linear_attention_step(q, k, v, log_decay, state, scale=scale, interpret=interpret)
        return with_reference_gradient(kernel, ref)(q, k, v, log_decay, state)
    return ref(q, k, v, log_decay, state)


def linear_attention_decode_backend(qkv, state, rotary_dim: int, backend="auto") -> str:
    """The backend `linear_attention_decode` runs for these operands: "gpu" (the Pallas Triton
    kernel of `decode_gpu.py`) or "reference"."""
    return resolve(backend, gpu=_decode_gpu(qkv, state, rotary_dim))


def linear_attention_decode(qkv, q_weight, k_weight, cos, sin, log_decay, state, valid=None, *, slot=None,
                            weight_index=None, eps, scale=None, backend="auto", interpret=False):
    """One token per sequence of the Lightning layer, from its fused projection to the attention
    output and the new state: see `reference.decode_step` for shapes and math (valid None: all).
    The GPU kernel does in one launch what XLA runs as four fusions. "auto" takes it on Hopper GPUs
    when it takes the operands (`decode_gpu.fits`), the jnp reference elsewhere (on a TPU too: the
    layer calls this only where the kernel runs, and takes `linear_attention_step` otherwise).

    slot: None, state [B, H, D, D] and log_decay [H] -> (o, new state); or an int / [] int32, state
    a stack [S, B, H, D, D] of which entry slot is the state, and log_decay [H] or the table
    [S, H] of which entry slot is the layer's -> (o, the stack with that entry advanced: the kernel
    updates it in place when the stack is donated or a loop's carry).
    weight_index: None, q_weight and k_weight [D]; or an int / [] int32, q_weight and k_weight
    stacks [N, D] of which that entry is the layer's. The kernel reads the entries in their stacks.

    backend, interpret: `pallas_kernels.backend`.
    """
    states = state[None] if slot is None else state
    _, B, H, D, Dv = states.shape
    at = 0 if slot is None else slot
    decays = log_decay[None] if log_decay.ndim == 1 else log_decay
    q_weights, k_weights = (w[None] if weight_index is None else w for w in (q_weight, k_weight))
    weight = 0 if weight_index is None else weight_index
    if qkv.shape != (B, 3 * H * D) or D != Dv:
        raise ValueError(f"linear_attention_decode: qkv {qkv.shape} does not hold q, k and v for the "
                         f"state {states.shape[1:]} ([B, 3 H D] with Dv == D)")
    if decays.ndim != 2 or decays.shape[1] != H or (log_decay.ndim == 2 and decays.shape[0] != states.shape[0]):
        raise ValueError(f"linear_attention_decode: log_decay {log_decay.shape} must be [{H}] or one row per state "
                         f"[{states.shape[0]}, {H}]")
    if q_weights.ndim != 2 or q_weights.shape[1] != D or k_weights.shape != q_weights.shape:
        raise ValueError(f"linear_attention_decode: q_weight {q_weight.shape} and k_weight {k_weight.shape} must be "
                         f"[{D}], or stacks [N, {D}] with weight_index")
    if cos.shape != sin.shape or cos.shape[0] != B or cos.shape[-1] > D:
        raise ValueError(f"linear_attention_decode: cos {cos.shape} and sin {sin.shape} must be [{B}, rotary_dim <= {D}]")
    if any(t.dtype != qkv.dtype for t in (q_weight, k_weight, cos, sin)):
        raise ValueError(f"linear_attention_decode: the norm weights, cos and sin must have qkv's dtype {qkv.dtype}, got "
                         f"{[str(t.dtype) for t in (q_weight, k_weight, cos, sin)]}")
    valid = jnp.ones((B,), bool) if valid is None else valid
    scale = D ** -0.5 if scale is None else scale
    if log_decay.ndim == 1:
        decays = jnp.broadcast_to(decays, (states.shape[0], H))
    args = (qkv, q_weights, k_weights, jnp.asarray(weight, jnp.int32), cos, sin, decays, states,
            jnp.asarray(at, jnp.int32), valid)

    def ref(qkv, q_weights, k_weights, weight, cos, sin, decays, states, at, valid):
        def entry(x, i):
            return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)

        o, one = reference.decode_step(qkv, entry(q_weights, weight), entry(k_weights, weight), cos, sin,
                                       entry(decays, at), entry(states, at), valid, eps=eps, scale=scale)
        return o, jax.lax.dynamic_update_index_in_dim(states, one, at, 0)

    if resolve(backend, interpret, gpu=_decode_gpu(qkv, states, cos.shape[-1])) == "gpu":
        from pallas_kernels.linear_attention import decode_gpu

        def kernel(*args):
            return decode_gpu.decode_step(*args, eps=eps, scale=scale, interpret=interpret)
        o, states = with_reference_gradient(kernel, ref)(*args)
    else:
        o, states = ref(*args)
    return (o, states[0]) if slot is None else (o, states)
