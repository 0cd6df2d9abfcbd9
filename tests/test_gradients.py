"""Gradients through the model (the jnp paths, as on a CPU) against torch.autograd on the float64
PyTorch reference: a next-token loss of the tiny model (dense and MoE layers, linear and softmax
attention), parameter by parameter under their HF names, and each module's input gradient."""

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
        got.update(spec.to_hf(np.asarray(get_param(as_grads, spec))))
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
