"""Linear projection without bias: kernel [in, out] (the transpose of torch's weight)."""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero

import pallas_kernels
from pallas_kernels.backend import matrix_shape
from ring_jax import backends
from ring_jax.layers.norms import norm_operands
from ring_jax.layers.stack import StackSlice, read
from ring_jax.quantization import Fp8, fp8_axes, quantize_kernel
from ring_jax.sharding import param


def einsum(spec: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """jnp.einsum with float32 accumulation, rounded to `out_dtype` (default x.dtype).

    float32 inputs use full-precision passes (a GPU would otherwise use TF32); bf16 inputs use the
    native bf16 MMA with a float32 accumulator, as torch does, and so do their gradients when the
    product comes back in their dtype (`_rounded_einsum`).
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if x.dtype == jnp.float32:
        y = jnp.einsum(spec, x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    if x.dtype == w.dtype == out_dtype and _transposable(spec):
        return _rounded_einsum(spec, x, w)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _transposable(spec: str) -> bool:
    """Whether `_rounded_einsum`'s gradients, einsums of the output's and the other operand's
    indices, cover spec "x,w->out": every index of each operand is in the other one or the output."""
    if spec.count("->") != 1 or spec.count(",") != 1:
        return False
    inputs, out = spec.replace("...", ".").split("->")
    x_spec, w_spec = inputs.split(",")
    return set(x_spec) <= set(w_spec + out) and set(w_spec) <= set(x_spec + out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rounded_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w) of one narrow dtype (bf16), accumulated in float32 and rounded to it.

    Its gradients are products of the same kind: the output's cotangent is of that dtype, so the
    input's gradient is (cotangent @ w.T, accumulated in float32, rounded) and the weights' (x.T @
    cotangent, likewise), as torch's backward of a bf16 Linear. Autodiff of the float32-accumulating
    product would instead multiply the float32 cotangent with the weights upcast to float32: on a
    GPU, TF32 products over float32 copies of the weights, at the same values and twice the cost.
    (A custom VJP: forward-mode autodiff, jax.jvp, does not go through it.)
    """
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _rounded_forward(spec, x, w):
    residuals = (x.value if w.perturbed else None,               # x serves the weights' gradient,
                 w.value if x.perturbed else None)               # w the input's
    return _rounded_einsum(spec, x.value, w.value), residuals


def _rounded_backward(spec, residuals, cotangent):
    x, w = residuals
    if isinstance(cotangent, SymbolicZero):
        return None, None
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    dx = None if w is None else _rounded_einsum(f"{out},{w_spec}->{x_spec}", cotangent, w)
    dw = None if x is None else _rounded_einsum(f"{x_spec},{out}->{w_spec}", x, cotangent)
    return dx, dw


_rounded_einsum.defvjp(_rounded_forward, _rounded_backward, symbolic_zeros=True)


def matmul(x, w, scale=None) -> jax.Array:
    """x [..., K] (an array or a `Normed`) @ w [K, N] (an array or a `StackSlice`) -> [..., N] of x's
    dtype, as `einsum`; with `scale` [N] (float32; a StackSlice where w is one), w is FP8 in its
    K-major layout [N, K] and the product is x times its values, accumulated in float32, times the
    scale (`ring_jax.quantization`). A decode step's single row may take the matvec kernel
    (`backends.projection_matvec`), which reads a stacked layer's weights in their stack and
    normalises a Normed's rows itself."""
    K, N = matrix_shape(w)
    rows = math.prod(x.shape[:-1])
    if backends.projection_matvec(x, w, scale):
        rows_in, norm = norm_operands(x)
        if isinstance(w, StackSlice):
            scales = {} if scale is None else dict(scale=scale.stack)
            y = pallas_kernels.matvec(rows_in.reshape(1, rows, K), w.stack, w.indices(), **scales, **norm)
        else:
            scales = {} if scale is None else dict(scale=scale[None])
            y = pallas_kernels.matvec(rows_in.reshape(1, rows, K), w[None], **scales, **norm)
        return y.reshape(*x.shape[:-1], N).astype(x.dtype)
    if scale is None:
        return einsum("...k,kn->...n", read(x), read(w))
    x = read(x)
    return (einsum("...k,nk->...n", x, read(w).astype(x.dtype), jnp.float32) * read(scale)).astype(x.dtype)


def float32_matmul(x, w) -> jax.Array:
    """x [..., K] (an array or a `Normed`) @ w [K, N] (an array or a `StackSlice`) -> [..., N]
    float32, as torch's `F.linear(x.float(), w.float())` (the router, docs/SPEC.md §10.4). Where both
    are bf16 and the product is not a decode step's matvec, it runs on the bf16 tensor cores with
    float32 output (`_widened_product`): the product of two bf16 values is exact in float32, so this
    is the float32 product up to the order and rounding of its float32 sums, at a fraction of a
    float32 product's cost. (Not float16: a TPU has no float16 products to run it on.)"""
    narrow = jnp.dtype(x.dtype) == jnp.dtype(w.dtype) == jnp.dtype(jnp.bfloat16)
    if not narrow or backends.projection_matvec(x.astype(jnp.float32), w):
        return matmul(x.astype(jnp.float32), w)
    return _widened_product(read(x), read(w))


def bf16_parts(v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 v -> three bf16 arrays of its shape, its leading, next and last 8 significand bits,
    whose float32 sum is v (exactly, but for parts below float32's normal range: an error under
    2^-120). A product of v with a bf16 operand then runs on the bf16 tensor cores at float32
    precision: each part's products are exact in float32, and summed in float32."""
    high = _leading_bits(v)
    middle = _leading_bits(v - high)
    return tuple(part.astype(jnp.bfloat16) for part in (high, middle, v - high - middle))


def _leading_bits(v) -> jax.Array:
    """float32 v with all but its leading 8 significand bits cleared: a bf16 value, exactly. Cleared
    by a mask, not by a round trip through bf16, which XLA may fold away where it allows excess
    precision."""
    bits = jax.lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@jax.custom_vjp
def _widened_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N], both bf16 -> [..., N] float32, accumulated in float32.

    Its gradients are those of the float32 product of the float32 copies, which torch's backward
    computes: float32 products of the float32 cotangent, rounded to bf16 at the end, here on the
    bf16 tensor cores (`_widened_backward`). (A custom VJP: autodiff of this product would run the
    cotangent's products at the default precision, TF32 on a GPU. Forward-mode autodiff, jax.jvp,
    does not go through it.)
    """
    return jnp.einsum("...k,kn->...n", x, w, preferred_element_type=jnp.float32)


def _widened_forward(x, w):
    residuals = (x.value if w.perturbed else None,               # x serves the weights' gradient,
                 w.value if x.perturbed else None)               # w the input's
    return _widened_product(x.value, w.value), residuals


def _widened_backward(residuals, cotangent):
    """The float32 products of the float32 cotangent [..., N] with the bf16 residuals, on the bf16
    tensor cores: the cotangent as its three bf16 parts (`bf16_parts`), side by side on N."""
    x, w = residuals                                             # bf16
    if isinstance(cotangent, SymbolicZero):
        return None, None
    parts = jnp.concatenate(bf16_parts(cotangent), axis=-1)                                  # [..., 3 N]
    dx = None if w is None else jnp.einsum("...n,kn->...k", parts, jnp.concatenate([w] * 3, axis=-1),
                                           preferred_element_type=jnp.float32).astype(w.dtype)
    if x is None:
        return dx, None
    dw = jnp.einsum("...k,...n->kn", x, parts, preferred_element_type=jnp.float32)            # [K, 3 N]
    return dx, jnp.sum(dw.reshape(dw.shape[0], 3, -1), axis=1).astype(x.dtype)


_widened_product.defvjp(_widened_forward, _widened_backward, symbolic_zeros=True)


def quantized_params(weight: nnx.Variable, axes: tuple) -> tuple[nnx.Param, nnx.Param]:
    """A weight [..., in, out] with logical axes `axes` -> its FP8 parameters: values [..., out, in]
    and scale [..., out] (`ring_jax.quantization.quantize_kernel`), each with its axes."""
    values_axes, scale_axes = fp8_axes(axes)
    q = quantize_kernel(weight.get_value())
    return param(q.values, values_axes), param(q.scale, scale_axes)


class Linear(nnx.Module):
    """y = x @ kernel; kernel: [in_features, out_features] with logical axes `axes`, or after
    `quantize` FP8 values [out_features, in_features] with kernel_scale [out_features]
    (`ring_jax.quantization`). lora: None, or a `ring_jax.lora.LoRA` adapter whose update is added
    (fine-tuning)."""

    def __init__(self, in_features: int, out_features: int, *, axes=(None, None), dtype, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32)
        self.kernel = param((init / in_features ** 0.5).astype(dtype), axes)
        self.kernel_scale = nnx.data(None)
        self.lora = nnx.data(None)

    @property
    def quantized(self) -> bool:
        return self.kernel_scale is not None

    def layout(self) -> tuple[tuple[int, ...], tuple]:
        """(shape, logical axes) of the weight as [..., in, out] (a stack's axes first), quantized
        or not."""
        shape, axes = self.kernel.shape, self.kernel.get_metadata().get("out_sharding") or (None,) * self.kernel.ndim
        if self.quantized:                    # values [..., out, in]: swap back (fp8_axes is its own inverse)
            shape, axes = fp8_axes(tuple(shape))[0], fp8_axes(tuple(axes))[0]
        return tuple(shape), tuple(axes)

    def quantize(self) -> None:
        """Makes the weight FP8 (`quantized_params`), in place."""
        self.kernel, self.kernel_scale = quantized_params(self.kernel, self.layout()[1])

    def weight(self):
        """The kernel's value (an array or a StackSlice), or after `quantize` an Fp8 of the values
        and the scale."""
        if self.kernel_scale is None:
            return self.kernel.get_value()
        return Fp8(self.kernel.get_value(), self.kernel_scale.get_value())

    def __call__(self, x) -> jax.Array:
        """x: [..., in] (an array or a `Normed`) -> [..., out] in x's dtype."""
        w = self.weight()
        y = matmul(x, *w) if self.quantized else matmul(x, w)
        return y if self.lora is None else self.lora(y, x)
