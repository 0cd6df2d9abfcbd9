"""Entry point of the grouped-matmul kernels; `backend` picks the implementation.

Only the jnp reference exists so far: "auto" resolves to it on every platform until the GPU and TPU
kernels land behind this same signature.
"""

from pallas_kernels.moe import reference

BACKENDS = ("reference",)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, backend="auto"):
    """Grouped matmul, `jax.lax.ragged_dot` semantics: see `reference.gmm`."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' or one of {BACKENDS}")
    return reference.gmm(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
