from pallas_kernels.moe.api import gmm, gmm_backend

__all__ = ["gmm", "gmm_backend"]
