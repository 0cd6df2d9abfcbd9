from pallas_kernels.moe.api import gmm, gmm_backend, gmm_swiglu

__all__ = ["gmm", "gmm_backend", "gmm_swiglu"]
