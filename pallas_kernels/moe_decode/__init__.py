from pallas_kernels.moe_decode.api import moe_decode, moe_decode_backend

__all__ = ["moe_decode", "moe_decode_backend"]
