"""Every kernel entry point is differentiable. Most through `pallas_kernels.backend.
with_reference_gradient` (the gradient through a kernel is the jnp reference's at the same inputs);
the grouped matmul's rows and the linear-attention scan through kernels of their own (the matmul
with its weights K-major; the scan as three more scans, `pallas_kernels.linear_attention.backward`),
held to the reference's gradient within rounding. Triton and TPU kernels run in interpret mode
here; the Mosaic GPU kernels through a jnp stand-in on the CPU (the scan's has no interpret mode,
the grouped matmul's FP8 path neither), and for real in tests/test_gmm_gpu.py and
tests/test_linear_attention_gpu.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err

import pallas_kernels
from pallas_kernels.linear_attention import (api as linear_attention_api, backward as la_backward,
                                             reference as la_reference, scan_gpu)
from pallas_kernels.moe import gmm_gpu, reference as moe_reference


def grads(f, args, argnums):
    """The gradient of sum(f(*args) * r) (r random, fixed per output) with respect to args[argnums],
    jitted: one compiled program rather than an op-by-op evaluation (in which an interpret-mode
    kernel runs each of its grid steps' ops one by one)."""
    out = jax.eval_shape(f, *args)
    weights = [jnp.asarray(np.random.default_rng(i).standard_normal(o.shape), jnp.float32)
               for i, o in enumerate(jax.tree.leaves(out)) if jnp.issubdtype(o.dtype, jnp.floating)]

    def loss(*a):
        floats = [o for o in jax.tree.leaves(f(*a)) if jnp.issubdtype(o.dtype, jnp.floating)]
        return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(floats, weights))
    return jax.jit(jax.grad(loss, argnums))(*args)


def same_gradients(kernel_call, reference_call, args, argnums):
    for got, want in zip(jax.tree.leaves(grads(kernel_call, args, argnums)),
                         jax.tree.leaves(grads(reference_call, args, argnums))):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def normal(shape, dtype=jnp.float32, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def test_matvec():
    """Plain, and with the rows normalised in the kernel (the gradient reaches the norm's weights)."""
    x, w = normal((2, 1, 128), seed=1), normal((3, 128, 128), seed=2, scale=0.1)
    norm = normal((2, 128), seed=9)
    ids = jnp.asarray([2, 0, 1, 2], jnp.int32)
    same_gradients(lambda x, w: pallas_kernels.matvec(x, w, ids, backend="gpu", interpret=True),
                   lambda x, w: pallas_kernels.matvec(x, w, ids, backend="reference"), (x, w), (0, 1))
    same_gradients(lambda x, w, n: pallas_kernels.matvec(x, w, ids, norm_weight=n, norm_index=jnp.int32(1),
                                                         norm_eps=1e-6, backend="gpu", interpret=True),
                   lambda x, w, n: pallas_kernels.matvec(x, w, ids, norm_weight=n, norm_index=jnp.int32(1),
                                                         norm_eps=1e-6, backend="reference"), (x, w, norm), (0, 1, 2))


def test_select_experts_weights():
    """No gradient through the selection; the weights' gradient reaches the scores they are made of."""
    scores = jax.nn.sigmoid(normal((3, 16), seed=3))
    args = dict(top_k=2, n_group=4, topk_group=2, scaling=2.0)
    same_gradients(lambda s: pallas_kernels.select_experts(s, jnp.zeros(16), backend="gpu", interpret=True, **args),
                   lambda s: pallas_kernels.select_experts(s, jnp.zeros(16), backend="reference", **args),
                   (scores,), 0)


def test_take_rows():
    x, idx = normal((5, 64), seed=4), jnp.asarray([4, 0, 0, 2, 1, 3, 3, 4], jnp.int32)
    same_gradients(lambda x: pallas_kernels.take_rows(x, idx, backend="gpu", interpret=True),
                   lambda x: pallas_kernels.take_rows(x, idx, backend="reference"), (x,), 0)


def test_quantize_rows():
    """The values' and the scales' gradients reach x (the reference's: rounding and row maxima)."""
    x = normal((24, 128), seed=8)
    same_gradients(lambda x: pallas_kernels.quantize_rows(x, backend="gpu", interpret=True),
                   lambda x: pallas_kernels.quantize_rows(x, backend="reference"), (x,), 0)
    assert np.any(np.asarray(grads(lambda x: pallas_kernels.quantize_rows(x, backend="reference"), (x,), 0)))


def test_decode_attention():
    q, keys, values = normal((1, 2, 4, 16), seed=5), normal((2, 1, 64, 2, 16), seed=6), normal((2, 1, 64, 2, 16), seed=7)
    start, cursor = jnp.zeros((1,), jnp.int32), jnp.int32(40)
    same_gradients(
        lambda q, k, v: pallas_kernels.softmax_attention_decode(q, k, v, start, cursor, slot=1, backend="gpu",
                                                               interpret=True),
        lambda q, k, v: pallas_kernels.softmax_attention_decode(q, k, v, start, cursor, slot=1, backend="reference"),
        (q, keys, values), (0, 1, 2))


def test_linear_attention_decode():
    B, H, D = 2, 2, 64
    qkv, state = normal((B, 3 * H * D), seed=8), normal((B, H, D, D), seed=9, scale=0.1)
    weights = (normal((D,), seed=10), normal((D,), seed=11))
    cos, sin = jnp.cos(normal((B, 32), seed=12)), jnp.sin(normal((B, 32), seed=12))
    decay = -jnp.abs(normal((H,), seed=13))

    def call(backend, interpret):
        return lambda qkv, s: pallas_kernels.linear_attention_decode(qkv, *weights, cos, sin, decay, s, eps=1e-6,
                                                                     backend=backend, interpret=interpret)
    same_gradients(call("gpu", True), call("reference", False), (qkv, state), (0, 1))


def close_gradients(kernel_call, reference_call, args, argnums, tolerance):
    for got, want in zip(jax.tree.leaves(grads(kernel_call, args, argnums)),
                         jax.tree.leaves(grads(reference_call, args, argnums))):
        assert np.asarray(want, np.float32).any()
        assert rel_err(got, want) <= tolerance, rel_err(got, want)


def linear_attention_operands(B, T, H, D, dtype=jnp.float32, seed=40):
    q, k, v = (normal((B, T, H, D), dtype, seed=seed + i, scale=0.3) for i in range(3))
    g = -jnp.abs(normal((H,), seed=seed + 3)) * 0.1
    return q, k, v, g, normal((B, H, D, D), seed=seed + 4, scale=0.1)


@pytest.mark.parametrize("case", ["plain", "padding", "scattered mask", "steep decay"])
def test_linear_attention_gradient_by_three_scans(case):
    """`backward.differentiable` over the jnp reference's forward, against autodiff of the
    reference: every input's gradient (the decay's is the reference's own), through the outputs and
    the final state, with an initial state, a padding (under jax.checkpoint) or scattered mask, and
    a decay steep enough that a factor exp(-g) would overflow float32."""
    q, k, v, g, s0 = linear_attention_operands(2, 100, 2, 32)
    mask = {"padding": jnp.arange(100)[None, :] < jnp.asarray([[70], [100]]),
            "scattered mask": jnp.asarray(np.random.default_rng(45).random((2, 100)) < 0.7)}.get(case)
    if case == "steep decay":
        g = jnp.asarray([-0.02, -120.0], jnp.float32)

    def scan(q, k, v, g, s0, mask):
        return la_reference.linear_attention(q, k, v, g, initial_state=s0, mask=mask, scale=32 ** -0.5)
    three_scans = la_backward.differentiable(scan, scan, 32 ** -0.5)
    if case == "padding":                     # inside a remat, as training runs each layer
        three_scans = jax.checkpoint(three_scans)
    close_gradients(lambda q, k, v, g, s0: three_scans(q, k, v, g, s0, mask),
                    lambda q, k, v, g, s0: scan(q, k, v, g, s0, mask),
                    (q, k, v, g, s0), (0, 1, 2, 3, 4), 2e-5)


def test_linear_attention_tpu_kernel():
    """The TPU kernel (interpret mode, float32, a padding mask) differentiates by three more runs
    of itself: the gradient is the reference's to float32 rounding."""
    q, k, v, g, s0 = linear_attention_operands(2, 96, 2, 128)
    mask = jnp.arange(96)[None, :] >= jnp.asarray([[0], [30]])

    def call(backend, interpret):
        return lambda q, k, v, g, s0: pallas_kernels.linear_attention(q, k, v, g, initial_state=s0, mask=mask,
                                                                      backend=backend, interpret=interpret)
    close_gradients(call("tpu", True), call("reference", False), (q, k, v, g, s0), (0, 1, 2, 3, 4), 2e-5)


def test_gmm_tpu_kernel():
    lhs, rhs = normal((64, 128), seed=19), normal((3, 128, 128), seed=20, scale=0.1)
    sizes = jnp.asarray([20, 0, 40], jnp.int32)
    same_gradients(lambda l, r: pallas_kernels.gmm(l, r, sizes, backend="tpu", interpret=True),
                   lambda l, r: pallas_kernels.gmm(l, r, sizes, backend="reference"), (lhs, rhs), (0, 1))


def gmm_stand_in(lhs, rhs, sizes, group_offset=0, scale=None, lhs_scale=None, swiglu=False, k_major=False,
                 preferred_element_type=None, **_):
    """`gmm_gpu.gmm`'s numbers in jnp: the reference on the groups (and scales) at group_offset."""
    def layer(stack):
        return None if stack is None else jax.lax.dynamic_slice_in_dim(stack, group_offset, sizes.shape[0])
    if swiglu:
        return moe_reference.gmm_swiglu(lhs, layer(rhs), sizes, scale=layer(scale), lhs_scale=lhs_scale)
    weights = jnp.swapaxes(layer(rhs), 1, 2) if k_major and scale is None else layer(rhs)
    return moe_reference.gmm(lhs, weights, sizes, scale=layer(scale), lhs_scale=lhs_scale,
                             preferred_element_type=preferred_element_type)


def test_mosaic_gpu_branches_differentiate(monkeypatch):
    """The grouped matmul's (plain and SwiGLU, reading a layer's experts in a longer stack; the rows'
    gradient through the kernel with the weights K-major) and the linear-attention scan's GPU
    branches, their kernels swapped for jnp stand-ins: the gradient is the reference's within bf16
    rounding, the stack's other layers get none; with the weights frozen,
    the SwiGLU product's backward pass runs one grouped matmul (the rows' gradient) and no second
    product."""
    calls = []
    monkeypatch.setattr(gmm_gpu, "gmm", lambda *a, **k: calls.append(k.get("k_major")) or gmm_stand_in(*a, **k))
    lhs, stack = normal((256, 256), jnp.bfloat16, seed=21), normal((6, 256, 512), jnp.bfloat16, seed=22, scale=0.1)
    sizes = jnp.asarray([120, 136], jnp.int32)                    # 128 rows per group: the SwiGLU epilogue
    for entry in (pallas_kernels.gmm, pallas_kernels.gmm_swiglu):
        got = grads(lambda l, r: entry(l, r, sizes, group_offset=2, backend="gpu"), (lhs, stack), (0, 1))
        want = grads(lambda l, r: entry(l, r, sizes, group_offset=2, backend="reference"), (lhs, stack), (0, 1))
        for g, w in zip(got, want):       # bf16 gradients: the K-major product sums in another order
            assert rel_err(g, w) <= 2 ** -8
        assert not np.asarray(got[1], np.float32)[[0, 1, 4, 5]].any()
    assert True in calls
    calls.clear()                    # frozen weights: SwiGLU's gradient reads the forward's product
    got = grads(lambda l: pallas_kernels.gmm_swiglu(l, stack, sizes, group_offset=2, backend="gpu"), (lhs,), (0,))
    want = grads(lambda l: pallas_kernels.gmm_swiglu(l, stack, sizes, group_offset=2, backend="reference"), (lhs,), (0,))
    assert rel_err(got[0], want[0]) <= 2 ** -8
    assert calls == [None, None, True]   # grads' shape trace, the forward's product, the rows' gradient

    monkeypatch.setattr(linear_attention_api, "GPU_MIN_JAX", (0, 0))
    monkeypatch.setattr(scan_gpu, "linear_attention", lambda q, k, v, g, scale=None, initial_state=None:
                        la_reference.linear_attention(q, k, v, g, scale=scale, initial_state=initial_state))
    q, k, v, g, s0 = linear_attention_operands(1, 128, 2, 128, jnp.bfloat16)
    close_gradients(lambda q, k, v, g, s0: pallas_kernels.linear_attention(q, k, v, g, initial_state=s0, backend="gpu"),
                    lambda q, k, v, g, s0: pallas_kernels.linear_attention(q, k, v, g, initial_state=s0,
                                                                           backend="reference"),
                    (q, k, v, g, s0), (0, 1, 2, 3, 4), 1e-2)


def test_frozen_grouped_matmuls_keep_only_the_swiglu_product(monkeypatch):
    """A MoE layer's two grouped matmuls in a scan over layers, the experts frozen (as LoRA trains):
    what the backward pass keeps of each layer is the SwiGLU product [M, 2 I] alone, not the rows of
    either matmul (only the weights' gradient reads those); the experts' stacks stay constants."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    monkeypatch.setattr(gmm_gpu, "gmm", gmm_stand_in)
    lhs = normal((256, 128), jnp.bfloat16, seed=33)
    gate_up, down = normal((3 * 2, 128, 512), jnp.bfloat16, seed=34), normal((3 * 2, 256, 256), jnp.bfloat16, seed=35)
    sizes = jnp.asarray([120, 136], jnp.int32)

    def loss(x):
        def layer(x, index):
            up = pallas_kernels.gmm_swiglu(x, gate_up, sizes, group_offset=2 * index, backend="gpu")
            return x + pallas_kernels.gmm(up, down, sizes, group_offset=2 * index, backend="gpu")[:, :128], None
        return jnp.sum(jax.lax.scan(layer, x, jnp.arange(3))[0].astype(jnp.float32))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, lhs)
    per_layer = [line.split(" output of ")[0] for line in out.getvalue().splitlines() if " output of scan" in line]
    assert sorted(per_layer) == ["bf16[3,256,512]", "i32[3]", "i32[3]"], out.getvalue()


def test_linear_attention_decay_gradient_runs_only_when_asked(monkeypatch):
    """The decay's gradient is the reference's, whose chunk loop XLA drops from a program that
    does not differentiate the decay (as the model's are constants): the GPU branch, its kernel a
    loop-free stand-in, compiles no loop for the gradient to q alone and one for q and the decay."""
    monkeypatch.setattr(linear_attention_api, "GPU_MIN_JAX", (0, 0))
    monkeypatch.setattr(scan_gpu, "linear_attention", lambda q, k, v, g, scale=None, initial_state=None:
                        la_reference.linear_attention_step(q, k, v, g, jnp.zeros(q.shape[:1] + (q.shape[2], q.shape[3],
                                                                                                 v.shape[3])),
                                                           scale=scale))
    q, k, v, g, _ = linear_attention_operands(1, 256, 2, 128, jnp.bfloat16)

    def loss(q, g):
        return jnp.sum(pallas_kernels.linear_attention(q, k, v, g, backend="gpu")[0].astype(jnp.float32))
    loops = [jax.jit(jax.grad(loss, argnums)).lower(q, g).compile().as_text().count(" while(")
             for argnums in ((0,), (0, 1))]
    assert loops[0] == 0 and loops[1] >= 1, loops


def test_fp8_grouped_matmul_gradient_in_a_scan_over_layers(monkeypatch):
    """FP8 experts on the GPU branch inside a scan over layers, as the decoder runs them (LoRA over
    an FP8 model trains through them): the layer index and the scales are tracers there, and the
    gradient to the rows is the reference's (the kernel swapped for its jnp stand-in)."""
    from pallas_kernels import backend as kernel_backend
    from pallas_kernels.backend import quantize_rows

    monkeypatch.setattr(gmm_gpu, "gmm", gmm_stand_in)
    monkeypatch.setattr(kernel_backend, "platform", lambda: "hopper")
    lhs = normal((256, 128), jnp.bfloat16, seed=27)
    values, scale = quantize_rows(normal((3 * 2, 512, 128), seed=28, scale=0.1))     # 3 layers of 2 experts
    sizes = jnp.asarray([120, 136], jnp.int32)

    def layers(backend):
        def run(lhs, values, scale):           # the weights are arguments of the jitted gradient: tracers
            def layer(x, index):
                up = pallas_kernels.gmm_swiglu(x, values, sizes, group_offset=2 * index, scale=scale, backend=backend)
                out = pallas_kernels.gmm(x, values, sizes, group_offset=2 * index, scale=scale, backend=backend)
                return x + out[:, :128] + up[:, :128], None
            return jax.lax.scan(layer, lhs, jnp.arange(3))[0]
        return run
    same_gradients(layers("gpu"), layers("reference"), (lhs, values, scale), (0,))


def test_fp8_rows_pass_their_rounding_straight_through(monkeypatch):
    """The experts with FP8 rows (`fp8_activations="grouped"`): forward, the FP8 product; gradient
    to the tokens, the weight-only product's, on the GPU branch (kernels swapped for stand-ins) as
    on the reference."""
    from pallas_kernels import backend as kernel_backend
    from pallas_kernels.backend import quantize_rows
    from ring_jax.layers.moe import grouped_outputs
    from ring_jax.quantization import Fp8

    from pallas_kernels.moe import gather_gpu, quantize_gpu

    monkeypatch.setattr(gmm_gpu, "gmm", gmm_stand_in)
    monkeypatch.setattr(gather_gpu, "take_rows", lambda x, idx, **_: moe_reference.take_rows(x, idx))
    kernel = quantize_gpu.quantize_rows
    monkeypatch.setattr(quantize_gpu, "quantize_rows", lambda x, **_: kernel(x, interpret=True))
    tokens = normal((40, 128), jnp.bfloat16, seed=29)
    ids = jax.random.randint(jax.random.PRNGKey(30), (40, 4), 0, 8)
    gate_up, down = (Fp8(*quantize_rows(normal(shape, seed=s, scale=0.1))) for s, shape in ((31, (8, 512, 128)),
                                                                                           (32, (8, 128, 256))))
    for platform in ("hopper", "cpu"):
        monkeypatch.setattr(kernel_backend, "platform", lambda: platform)
        rows, plain = (jax.jit(lambda t, r=r: grouped_outputs(t, ids, gate_up, down, r)) for r in (True, False))
        assert not np.array_equal(np.asarray(rows(tokens), np.float32), np.asarray(plain(tokens), np.float32))
        got, want = (grads(f, (tokens,), (0,))[0] for f in (rows, plain))
        assert np.asarray(got, np.float32).any()
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
