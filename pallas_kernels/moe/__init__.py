from pallas_kernels.moe.api import gmm, gmm_backend, gmm_swiglu, take_rows

__all__ = ["gmm", "gmm_backend", "gmm_swiglu", "take_rows"]
