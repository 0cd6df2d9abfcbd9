"""Entry point of softmax attention for a decode step over a stacked KV cache; `backend` picks the
implementation.

Backends (`pallas_kernels.backend`): "gpu", the Pallas Triton kernels of `decode_gpu.py`, which
"auto" takes on Hopper GPUs when they take the operands (`decode_gpu.fits`); and the jnp reference.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.backend import Kernel, resolve, with_reference_gradient
from pallas_kernels.softmax_attention import reference


def _gpu(q, keys):
    def answer():
        from pallas_kernels.softmax_attention import decode_gpu

        return Kernel(None if decode_gpu.fits(q, keys) else
                      f"takes q and keys of one dtype, D a power of two >= 16, a cache length that is a multiple of "
                      f"{decode_gpu.BLOCK} and at most {decode_gpu.MAX_ROWS} query rows per kv head; got q {q.dtype} "
                      f"{q.shape}, keys {keys.dtype} {keys.shape}")
    return answer


def softmax_attention_decode_backend(q, keys, backend="auto") -> str:
    """The backend `softmax_attention_decode` runs for q [B, T, H, D] and the key stack
    [S, B, L, Hkv, D]: "gpu" or "reference"."""
    return resolve(backend, gpu=_gpu(q, keys))


def softmax_attention_decode(q, keys, values, start, cursor, *, slot=0, backend="auto", interpret=False):
    """Attention of a few queries per sequence over a softmax layer's cache, which already holds
    their keys: see `reference.decode_attention` for the math.

    q: [B, T, H, D], query t at slot cursor + t; keys, values: [S, B, L, Hkv, D], a stack of
    caches of which entry `slot` (an int or [] int32) is the layer's, read in place by the GPU
    kernels; start: [B] int32, each sequence's first real slot; cursor: [] int32.
    Returns [B, T, H, D] in q.dtype.

    backend, interpret: `pallas_kernels.backend`.
    """
    B, T, H, D = q.shape
    if keys.ndim != 5 or keys.shape != values.shape or keys.shape[1] != B or keys.shape[4] != D or H % keys.shape[3]:
        raise ValueError(f"softmax_attention_decode: keys {keys.shape} and values {values.shape} must be one stack "
                         f"[S, {B}, L, Hkv, {D}] with Hkv dividing the {H} query heads")
    if start.shape != (B,):
        raise ValueError(f"softmax_attention_decode: start {start.shape} must be [{B}]")
    def ref(q, keys, values, slot, start, cursor):
        layer = [jax.lax.dynamic_index_in_dim(c, slot, keepdims=False) for c in (keys, values)]
        return reference.decode_attention(q, *layer, start, cursor)

    args = (q, keys, values, jnp.asarray(slot, jnp.int32), start, cursor)
    if resolve(backend, interpret, gpu=_gpu(q, keys)) == "gpu":
        from pallas_kernels.softmax_attention import decode_gpu

        def kernel(q, keys, values, slot, start, cursor):
            return decode_gpu.decode_attention(q, keys, values, slot, start, cursor, interpret=interpret)
        return with_reference_gradient(kernel, ref)(*args)
    return ref(*args)
