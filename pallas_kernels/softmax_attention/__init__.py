from pallas_kernels.softmax_attention.api import softmax_attention_decode, softmax_attention_decode_backend

__all__ = ["softmax_attention_decode", "softmax_attention_decode_backend"]
