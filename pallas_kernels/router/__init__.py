from pallas_kernels.router.api import select_experts

__all__ = ["select_experts"]
