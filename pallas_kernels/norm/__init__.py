from pallas_kernels.norm.api import add_rms_norm

__all__ = ["add_rms_norm"]
