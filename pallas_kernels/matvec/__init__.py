from pallas_kernels.matvec.api import matvec, matvec_backend

__all__ = ["matvec", "matvec_backend"]
