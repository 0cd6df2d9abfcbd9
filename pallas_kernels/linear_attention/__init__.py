from pallas_kernels.linear_attention.api import (linear_attention, linear_attention_decode,
                                                 linear_attention_decode_backend, linear_attention_step)

__all__ = ["linear_attention", "linear_attention_decode", "linear_attention_decode_backend", "linear_attention_step"]
