"""Kernels of ring-jax, each behind one entry point with a plain-jnp reference beside it."""

from pallas_kernels.linear_attention import (linear_attention, linear_attention_decode, linear_attention_decode_backend,
                                             linear_attention_step)
from pallas_kernels.matvec import matvec, matvec_backend
from pallas_kernels.moe import gmm, gmm_backend, gmm_swiglu, quantize_rows, take_rows
from pallas_kernels.moe_decode import moe_decode, moe_decode_backend
from pallas_kernels.router import select_experts
from pallas_kernels.softmax_attention import softmax_attention_decode, softmax_attention_decode_backend

__all__ = ["gmm", "gmm_backend", "gmm_swiglu", "linear_attention", "linear_attention_decode",
           "linear_attention_decode_backend", "linear_attention_step", "matvec", "matvec_backend", "moe_decode",
           "moe_decode_backend", "quantize_rows",
           "select_experts", "softmax_attention_decode", "softmax_attention_decode_backend", "take_rows"]
