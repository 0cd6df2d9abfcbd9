from pallas_kernels.moe.api import gmm

__all__ = ["gmm"]
