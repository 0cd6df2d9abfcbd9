"""One meaning of `backend` and `interpret` for every kernel entry point (`pallas_kernels.backend`),
and the model's path choices in one place (`ring_jax.backends`)."""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels import backend
from pallas_kernels.backend import Kernel, resolve
from ring_jax import backends


def takes():
    return Kernel()


def refuses():
    return Kernel("takes only bf16 (got float32)")


def slower():
    return Kernel(auto=False)


def no_interpret():
    return Kernel(interprets=False)


@pytest.mark.parametrize("device, kernels, want", [
    ("hopper", dict(gpu=takes, tpu=takes), "gpu"),
    ("tpu", dict(gpu=takes, tpu=takes), "tpu"),
    ("other", dict(gpu=takes, tpu=takes), "reference"),
    ("hopper", dict(tpu=takes), "reference"),             # no GPU kernel
    ("hopper", dict(gpu=refuses), "reference"),           # operands it does not take
    ("hopper", dict(gpu=slower), "reference"),            # "auto" prefers the reference here
])
def test_auto_picks_the_devices_kernel_where_it_takes_the_operands(monkeypatch, device, kernels, want):
    monkeypatch.setattr(backend, "platform", lambda: device)
    assert resolve("auto", **kernels) == want


def test_forced_backends_and_interpret():
    assert resolve("reference", gpu=refuses) == "reference"
    assert resolve("gpu", gpu=slower) == "gpu"                              # forced: taken even where slower
    assert resolve("gpu", True, gpu=takes) == "gpu"
    with pytest.raises(NotImplementedError, match=r"the gpu kernel takes only bf16 \(got float32\); use backend="):
        resolve("gpu", gpu=refuses)
    with pytest.raises(ValueError, match=r"choose 'auto' or one of \('reference', 'gpu'\)"):
        resolve("tpu", gpu=takes)
    for name in ("auto", "reference"):                                      # interpret names a kernel
        with pytest.raises(ValueError, match="interpret runs a Pallas kernel"):
            resolve(name, True, gpu=takes)
    with pytest.raises(ValueError, match="the gpu kernel has no interpret mode"):
        resolve("gpu", True, gpu=no_interpret)


def test_every_entry_point_takes_the_one_meaning():
    """The entry points' own checks: an unknown backend, and interpret without a named kernel."""
    x, w = jnp.ones((1, 1, 128)), jnp.ones((1, 128, 128))
    calls = [lambda **k: pallas_kernels.matvec(x, w, **k),
             lambda **k: pallas_kernels.gmm(jnp.ones((4, 64)), jnp.ones((2, 64, 256)), jnp.asarray([2, 2]), **k),
             lambda **k: pallas_kernels.take_rows(jnp.ones((4, 64)), jnp.zeros((8,), jnp.int32), **k),
             lambda **k: pallas_kernels.quantize_rows(jnp.ones((4, 64)), **k),
             lambda **k: pallas_kernels.select_experts(jnp.ones((2, 16)), jnp.zeros(16), top_k=2, n_group=4,
                                                       topk_group=2, **k)]
    for call in calls:
        with pytest.raises(ValueError, match="backend="):
            call(backend="cuda")
        with pytest.raises(ValueError, match="interpret runs a Pallas kernel"):
            call(interpret=True)


def test_model_paths_on_a_cpu_and_as_on_hopper(monkeypatch):
    """On the CPU every path is XLA's; on a Hopper GPU a decode step's products take the matvec
    kernel, a prefill chunk cuDNN's flash attention (bf16), a decode step the attention kernels."""
    x1, w = jax.ShapeDtypeStruct((1, 1, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    q, keys = jnp.zeros((1, 1, 4, 64), jnp.bfloat16), jnp.zeros((2, 1, 256, 2, 64), jnp.bfloat16)
    chunk = jnp.zeros((1, 64, 4, 64), jnp.bfloat16)
    assert not backends.projection_matvec(x1, w) and not backends.attention_decode_kernel(q, keys)
    assert not backends.flash_attention(chunk, chunk)
    monkeypatch.setattr(backend, "platform", lambda: "hopper")
    assert backends.projection_matvec(x1, w) and backends.attention_decode_kernel(q, keys)
    assert not backends.attention_decode_kernel(chunk, keys)                 # more than FLASH_MIN_TOKENS
    assert backends.flash_attention(chunk, chunk) == (backends.cudnn_attention() is not None)
    assert not backends.flash_attention(chunk.astype(jnp.float32), chunk.astype(jnp.float32))
    with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
        assert not backends.projection_matvec(x1, w)                        # under a mesh: XLA partitions
        assert backends.router_backend() == "reference"
    assert backends.router_backend() == "auto"
