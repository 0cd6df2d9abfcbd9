"""Gradients through the model (the jnp paths, as on a CPU) against torch.autograd on the float64
PyTorch reference: a next-token loss of the tiny model (dense and MoE layers, linear and softmax
attention), parameter by parameter under their HF names, and each module's input gradient; and the
bf16 model's gradients against torch's bf16 and float64 ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ring_jax
from conftest import rel_err
from reference.checkpoint import make_hf_checkpoint
from reference.model import rope_cos_sin
from ring_jax.checkpoint import get_param
from ring_jax.io.mapping import tensor_table
from ring_jax.layers.rope import rope_tables
from ring_jax.schedule import cache_slot

GRAD_TOL = 1e-4
BF16_GRAD_TOL = 3e-2


def model_loss(logits, targets):
    """Mean cross-entropy of logits [B, T, V] against targets [B, T] (jnp or torch)."""
    if isinstance(logits, torch.Tensor):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


@pytest.mark.parametrize("changes", [{}, {"num_hidden_layers": 3, "first_k_dense_replace": 3}],
                         ids=["moe", "dense"])
def test_model_gradients_match_torch_autograd(tmp_path, tiny_dict, changes):
    config = dict(tiny_dict, **changes)
    ref = make_hf_checkpoint(str(tmp_path), config, dtype=torch.float32, seed=1).with_dtype(torch.float64)
    model = ring_jax.load_model(str(tmp_path))
    rng = np.random.default_rng(0)
    ids, targets = (rng.integers(0, config["vocab_size"], (2, 24)) for _ in range(2))

    for p in ref.parameters():                # the reference is built for inference only
        p.requires_grad_(True)
    loss = model_loss(ref(torch.as_tensor(ids)), torch.as_tensor(targets))
    loss.backward()
    want = {name: p.grad.numpy() for name, p in ref.named_parameters()}

    # Jitted: one compiled program (op by op, each op of the forward and the backward compiles apart).
    loss_of = nnx.value_and_grad(lambda m: model_loss(m.forward(jnp.asarray(ids)), jnp.asarray(targets)))
    value, grads = nnx.jit(loss_of)(model)
    assert abs(float(value) - loss.item()) <= 1e-5 * loss.item()
    as_grads = nnx.clone(model)
    nnx.update(as_grads, grads)
    got = {}
    for spec in tensor_table(model.config):
        got.update(spec.to_hf(*(np.asarray(a) for a in get_param(as_grads, spec))))
    assert set(want) <= set(got)
    for name, grad in got.items():
        if name not in want:                  # the expert biases: selection only, no gradient
            assert name.endswith("expert_bias") and not grad.any(), name
            continue
        if np.abs(want[name]).max() == 0:     # an expert no token chose
            assert not grad.any(), name
            continue
        assert rel_err(grad, want[name]) <= GRAD_TOL, (name, rel_err(grad, want[name]))


def test_module_input_gradients_match_torch_autograd(tmp_path, tiny_dict):
    """Per module (layer 0: linear attention and the dense MLP; layer 1: the MoE; layer 2: softmax
    attention; and each whole layer): the gradient with respect to the module's input."""
    ref = make_hf_checkpoint(str(tmp_path), tiny_dict, dtype=torch.float32, seed=1).with_dtype(torch.float64)
    model = ring_jax.load_model(str(tmp_path))
    T, hidden = 17, tiny_dict["hidden_size"]
    rng = np.random.default_rng(3)
    x, r = (rng.standard_normal((2, T, hidden)).astype(np.float32) for _ in range(2))
    cos, sin = rope_tables(model.config, jnp.arange(T), jnp.float32)
    rc, rs = rope_cos_sin(dict(tiny_dict), torch.arange(T), torch.float64)
    assert [model.config.is_softmax_layer(i) for i in range(3)] == [False, False, True]
    ours, theirs = {}, {}
    for i in range(3):
        layer, slot, ref_layer = model.layer(i), cache_slot(model.config, i), ref.model.layers[i]
        ours.update({(i, "attention"): lambda x, layer=layer, slot=slot: layer.attention(x, cos, sin, slot=slot)[0],
                     (i, "mlp"): layer.mlp,
                     (i, "layer"): lambda x, layer=layer, slot=slot: layer(x, cos, sin, slot=slot)[0]})
        theirs.update({(i, "attention"): lambda x, ref_layer=ref_layer: ref_layer.attention(x, rc, rs),
                       (i, "mlp"): ref_layer.mlp,
                       (i, "layer"): lambda x, ref_layer=ref_layer: ref_layer(x, rc, rs)})
    # Every module's gradient in one jitted program: one compilation, rather than one per module or
    # one per op (op by op).
    got = jax.jit(lambda x: {key: jax.grad(lambda x: jnp.sum(module(x) * r))(x)
                             for key, module in ours.items()})(jnp.asarray(x))
    for key, reference_module in theirs.items():
        x64 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        (reference_module(x64) * torch.as_tensor(r, dtype=torch.float64)).sum().backward()
        assert rel_err(got[key], x64.grad.numpy()) <= GRAD_TOL, (key, rel_err(got[key], x64.grad.numpy()))


def test_bfloat16_model_gradients_as_exact_as_torch_bfloat16(tmp_path, tiny_dict):
    """jax.grad through the bf16 model against torch.autograd on the bf16 reference (the same
    roundings) and on the float64 one, all on the same bf16 weights. A bf16 forward's gradients
    are far from float64's (about 15% on this random model, as torch's own are), so the bounds
    are: within BF16_GRAD_TOL of torch's bf16 gradients, and not further from float64's than
    torch's bf16 gradients are, by more than 10%. Norms over the whole gradient (every parameter
    as one vector): per tensor, a bf16 forward may send a token to another expert."""
    hf = make_hf_checkpoint(str(tmp_path), tiny_dict, dtype=torch.bfloat16, seed=1)
    model = ring_jax.load_model(str(tmp_path))
    assert model.dtype == jnp.bfloat16
    rng = np.random.default_rng(0)
    ids, targets = (rng.integers(0, tiny_dict["vocab_size"], (2, 24)) for _ in range(2))

    def torch_grads(ref):
        for p in ref.parameters():
            p.requires_grad_(True)
        model_loss(ref(torch.as_tensor(ids)), torch.as_tensor(targets)).backward()
        return {name: p.grad.double().numpy() for name, p in ref.named_parameters()}

    want64, want16 = torch_grads(hf.with_dtype(torch.float64)), torch_grads(hf.with_dtype(torch.bfloat16))
    loss_of = nnx.value_and_grad(lambda m: model_loss(m.forward(jnp.asarray(ids)), jnp.asarray(targets)))
    _, grads = nnx.jit(loss_of)(model)
    as_grads = nnx.clone(model)
    nnx.update(as_grads, grads)
    got = {}
    for spec in tensor_table(model.config):
        got.update(spec.to_hf(*(np.asarray(a, np.float64) for a in get_param(as_grads, spec))))
    names = sorted(want64)

    def flat(grads):
        return np.concatenate([grads[n].ravel() for n in names])

    def distance(a, b):
        return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))

    ours, theirs = distance(got, want64), distance(want16, want64)
    print(f"bf16 gradients from float64's: ours {ours:.3f}, torch's {theirs:.3f}; "
          f"ours from torch's bf16: {distance(got, want16):.3f}")
    assert distance(got, want16) <= BF16_GRAD_TOL
    assert ours <= 1.1 * theirs


@pytest.mark.parametrize("spec,x_shape,w_shape", [("...k,kn->...n", (2, 5, 64), (64, 48)),
                                                  ("...k,kn->...n", (64,), (64, 48)),
                                                  ("btkgd,bskd->bkgts", (2, 7, 2, 3, 16), (2, 9, 2, 16)),
                                                  ("bkgts,bskd->btkgd", (2, 2, 3, 7, 9), (2, 9, 2, 16))])
def test_bf16_product_gradients_equal_autodiff(spec, x_shape, w_shape):
    """The bf16 products' gradients (`ring_jax.layers.linear.einsum`: bf16 products of the bf16
    cotangent) equal, bit for bit, autodiff of the float32-accumulating product rounded to bf16
    (whose cotangent is the same bf16 values upcast), for every spec the model uses; with respect
    to either operand alone, the other gets none."""
    from ring_jax.layers.linear import einsum

    rng = np.random.default_rng(11)
    x, w = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in (x_shape, w_shape))
    probe = jnp.asarray(rng.standard_normal(jnp.einsum(spec, x, w).shape), jnp.bfloat16)

    def plain(x, w):
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    for argnums in ((0, 1), 0, 1):
        got = jax.grad(lambda x, w: jnp.sum(einsum(spec, x, w) * probe, dtype=jnp.float32), argnums)(x, w)
        want = jax.grad(lambda x, w: jnp.sum(plain(x, w) * probe, dtype=jnp.float32), argnums)(x, w)
        for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.dtype == v.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(v, np.float32))
