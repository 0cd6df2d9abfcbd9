from pallas_kernels.moe.api import gmm, gmm_backend, gmm_swiglu, quantize_rows, take_rows

__all__ = ["gmm", "gmm_backend", "gmm_swiglu", "quantize_rows", "take_rows"]
