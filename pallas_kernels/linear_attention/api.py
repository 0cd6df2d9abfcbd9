"""Entry points of the linear-attention kernels; `backend` picks the implementation.

Only the jnp reference exists so far: "auto" resolves to it on every platform until the GPU and TPU
kernels land behind these same signatures.
"""

from pallas_kernels.linear_attention import reference

BACKENDS = ("reference",)


def _resolve(backend: str) -> str:
    if backend == "auto":
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    return backend


def linear_attention(q, k, v, log_decay, *, scale=None, initial_state=None, mask=None, chunk_size=64,
                     backend="auto"):
    """Causal Lightning attention: see `reference.linear_attention` for shapes and math."""
    _resolve(backend)
    return reference.linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                      mask=mask, chunk_size=chunk_size)


def linear_attention_step(q, k, v, log_decay, state, *, scale=None, backend="auto"):
    """A few tokens continuing from `state`: see `reference.linear_attention_step`."""
    _resolve(backend)
    return reference.linear_attention_step(q, k, v, log_decay, state, scale=scale)
