"""Fine-tuning on the CPU (`ring_jax.train`, `ring_jax.lora`): adapters that start at the model and
merge into it, a memorisation run, the every-parameter mode, and the command line's resume after
SIGKILL (the same losses, bit for bit) and merge."""

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from conftest import CONFIGS, rel_err, scan_depth, tiny_model_folder
from ring_jax import RingConfig, RingModel, load_model, lora, make_mesh, shard_model, train
from ring_jax.layers.mlp import swiglu
from ring_jax.layers.moe import combine
from ring_jax.layers.norms import RMSNorm
from ring_jax.train_data import Batches, Example

pytestmark = pytest.mark.slow


def tiny_model():
    return RingModel(RingConfig.from_hf(os.path.join(CONFIGS, "tiny.json")), dtype=jnp.float32, rngs=nnx.Rngs(0))


def random_examples(n, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(0, vocab, length).astype(np.int32), np.r_[False, np.ones(length - 1, bool)])
            for _ in range(n)]


def test_adapters_start_at_the_model_and_merge_into_it():
    model = tiny_model()
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 9))
    base = np.asarray(model(ids))
    names = lora.attach(model, 4, 8.0)
    assert {"linear_moe.attention.g_proj", "softmax_moe.attention.dense", "linear_dense.mlp.gate_up_proj",
            "softmax_moe.mlp.shared_experts.down_proj"} <= set(names)
    assert np.array_equal(np.asarray(model(ids)), base)                   # B = 0: the model unchanged
    for i, (_, linear) in enumerate(lora.projections(model)):
        b = linear.lora.b.get_value()
        linear.lora.b.set_value(0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
    adapted = np.asarray(model(ids))
    assert rel_err(adapted, base) > 1e-3
    assert lora.merge(model) == len(names)
    assert all(linear.lora is None for _, linear in lora.projections(model))
    assert rel_err(model(ids), adapted) <= 1e-5
    with pytest.raises(ValueError, match="rank"):
        lora.attach(model, 0, 1.0)
    with pytest.raises(ValueError, match="choose from"):
        lora.attach(model, 4, 8.0, targets=("experts",))
    lora.attach(model, 2, 2.0, targets=("attention",))
    with pytest.raises(ValueError, match="has a LoRA adapter already"):
        lora.attach(model, 2, 2.0, targets=("attention",))


def test_lora_memorises_and_every_parameter_mode_keeps_expert_bias(tmp_path):
    """LoRA rank 16: the loss of 4 random 32-token rows falls below a tenth of its start; the frozen
    weights do not move. Every parameter (rank 0): the weights move, the routers' expert_bias not."""
    model = tiny_model()
    examples = random_examples(4, 33, model.config.vocab_size)
    config = train.TrainConfig(steps=60, batch_size=4, seq_len=32, learning_rate=3e-3, warmup=5,
                               end_learning_rate=1e-4, lora_rank=16, save_every=1000, remat=False)
    qkv = np.asarray(model.linear_moe.attention.query_key_value.kernel.get_value())
    train.prepare(model, config)
    records = train.fit(model, Batches(examples, 4, 32, 0), config, train.Run(tmp_path / "lora", config, "m", "d"),
                        say=lambda line: None)
    assert len(records) == 60 and records[-1]["loss"] < 0.1 * records[0]["loss"]
    assert np.array_equal(np.asarray(model.linear_moe.attention.query_key_value.kernel.get_value()), qkv)
    assert [json.loads(line)["step"] for line in open(tmp_path / "lora" / "log.jsonl")] == list(range(60))

    model = tiny_model()
    bias = np.asarray(model.linear_moe.mlp.gate.expert_bias.get_value())
    bias = bias + np.linspace(-1, 1, bias.size, dtype=np.float32).reshape(bias.shape)   # a decay would move it
    model.linear_moe.mlp.gate.expert_bias.set_value(jnp.asarray(bias))
    config = train.TrainConfig(steps=3, batch_size=4, seq_len=32, learning_rate=1e-3, warmup=1, lora_rank=0,
                               weight_decay=0.1, save_every=1000, remat=False)
    train.prepare(model, config)
    train.fit(model, Batches(examples, 4, 32, 0), config, train.Run(tmp_path / "full", config, "m", "d"),
              say=lambda line: None)
    assert np.array_equal(np.asarray(model.linear_moe.mlp.gate.expert_bias.get_value()), bias)
    assert not np.array_equal(np.asarray(model.linear_moe.attention.query_key_value.kernel.get_value()), qkv)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="warmup"):
        train.TrainConfig(steps=10, warmup=10)
    with pytest.raises(ValueError, match="batch_size"):
        train.TrainConfig(batch_size=0)


def test_equal_settings_give_one_optimizer():
    """`train_step` takes the optimizer as a static argument: equal settings give the same object
    (so the step compiles once), others another."""
    settings = train.TrainConfig(steps=10, warmup=2)
    assert train.optimizer(settings) is train.optimizer(dataclasses.replace(settings))
    assert train.optimizer(settings) is not train.optimizer(dataclasses.replace(settings, learning_rate=1e-3))


def test_command_line_resumes_after_sigkill_bit_for_bit_and_merges(tmp_path):
    """A run killed after a checkpoint and started again logs the losses of an uninterrupted run;
    merge writes a model folder whose logits are the adapted model's."""
    model_dir = tiny_model_folder(str(tmp_path))
    words = "the cat sat on a mat and ran to the red door while birds sang".split()
    rng = np.random.default_rng(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n" for _ in range(6)))
    config = tmp_path / "train.yaml"
    config.write_text("steps: 16\nbatch-size: 2\nseq_len: 24\nsave_every: 8\nwarmup: 2\nlearning_rate: 0.003\n"
                      "lora_rank: 4\n")
    command = [sys.executable, "-m", "ring_jax.train", "--model", model_dir, "--data", str(data), "--config",
               str(config), "--no-remat", "--compilation-cache", str(tmp_path / "xla")]

    def log(run):
        with open(tmp_path / run / "log.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]

    done = subprocess.run(command + ["--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "step 16/16" in done.stderr

    killed = subprocess.Popen(command + ["--out", str(tmp_path / "b")], stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        path = tmp_path / "b" / "log.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 10:
            os.kill(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(log("b")) < 16
    resumed = subprocess.run(command + ["--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert log("b") == log("a")

    settings = train.TrainConfig(**json.loads((tmp_path / "a" / "train.json").read_text())["config"])
    with pytest.raises(ValueError, match=r"other settings \(learning_rate\)"):
        train.Run(str(tmp_path / "a"), dataclasses.replace(settings, learning_rate=0.01), model_dir, str(data))

    # merge's command line in this process (the run's own process is what the kill tests above)
    assert train.main(["merge", "--run", str(tmp_path / "a"), "--out", str(tmp_path / "merged")]) == 0
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")
    adapted = load_model(model_dir)
    train.prepare(adapted, settings)
    tx = train.optimizer(settings)
    _, params, _ = nnx.split(adapted, train.trainable(settings), ...)
    run = train.Run(str(tmp_path / "a"), settings, model_dir, str(data))
    nnx.update(adapted, run.restore(16, params, tx.init(params))[0])
    ids = rng.integers(0, adapted.config.vocab_size, (1, 12))
    assert rel_err(load_model(str(tmp_path / "merged"))(ids), adapted(ids)) <= 1e-5


@pytest.mark.parametrize("dtype,tied", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_loss_in_pieces_equals_autodiff_of_the_whole(dtype, tied):
    """The loss's logits are computed a piece of positions at a time (bounded memory), its gradients
    in the forward pass: the loss and every parameter's gradient (the head's and, tied, the
    embeddings' included) equal autodiff of the plain formula over all the logits at once, also
    where the pieces do not divide the row (padding with weight 0), and under a cotangent other
    than 1. In bf16, which rounds the gradients at other points, both are as far from the float32
    model's gradients (the whole gradient as one vector). The positions' weights take no gradient:
    asking for one is an error."""
    # One group of layers (a dense, a linear and a softmax layer): the loss's pieces are at the head.
    config = dataclasses.replace(RingConfig.from_hf(os.path.join(CONFIGS, "tiny.json")), tie_word_embeddings=tied,
                                 num_hidden_layers=3)
    rng = np.random.default_rng(3)
    tokens, targets = (jnp.asarray(rng.integers(0, config.vocab_size, (2, 30)), jnp.int32) for _ in range(2))
    weights = jnp.asarray(rng.random((2, 30)) < 0.8, jnp.float32)

    def plain(model):
        logits = model.forward(tokens)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weights) / jnp.sum(weights)

    def value_and_grad(f, dtype):
        graphdef, params = nnx.split(RingModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
        value, grads = jax.jit(jax.value_and_grad(lambda p: f(nnx.merge(graphdef, p)) / 3))(params)
        return value, jax.tree.leaves(grads)
    want, want_grads = value_and_grad(plain, dtype)
    value, grads = value_and_grad(lambda m: train.loss(m, tokens, targets, weights, chunk=8), dtype)  # 4 pieces
    assert abs(float(value) - float(want)) <= 1e-6 * float(want)
    assert [g.dtype for g in grads] == [g.dtype for g in want_grads]
    for got, want in zip(grads, want_grads):
        if not np.any(want):                          # the expert biases: selection only
            assert not np.any(got)
        else:
            assert rel_err(got, want) <= (1e-5 if dtype == jnp.float32 else 0.1)
    if dtype == jnp.bfloat16:
        exact = value_and_grad(plain, jnp.float32)[1]
        whole = lambda leaves: np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
        assert rel_err(whole(grads), whole(want_grads)) <= 0.05
        assert rel_err(whole(grads), whole(exact)) <= 1.1 * rel_err(whole(want_grads), whole(exact))
    model = RingModel(config, dtype=dtype, rngs=nnx.Rngs(0))
    fn, head = model.head()                       # the loss casts the head's product itself
    hidden = model.hidden_states(tokens)
    assert fn(head, hidden).dtype == dtype and model.logits(hidden).dtype == jnp.float32
    with pytest.raises(ValueError, match="no gradient with respect to its weights"):
        jax.grad(lambda w: train.loss(model, tokens, targets, w, chunk=8))(weights)


def saved_residuals(f, *args) -> list[str]:
    """The arrays autodiff keeps for f's backward pass, one line each ("f32[8,64] output of ...")."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_gradients_equal_autodiff_of_its_formula(dtype):
    """The adapted output, round(y + scale (x a) b) with the update in float32, has its gradients
    written out (a custom VJP) and its products over the wide axes run on the bf16 tensor cores
    where an operand is bf16: the value and the gradients with respect to y, x (in their dtypes,
    over leading batch axes), a and b are autodiff's of the float32 formula, to float32 precision
    against float64 in the factors' gradients; the lowered wide products are bf16 for bf16 x."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), dtype)
    y = jnp.asarray(rng.standard_normal((3, 5, 48)), dtype)
    a, b = (jnp.asarray(rng.standard_normal(shape) / 8, jnp.float32) for shape in ((64, 4), (4, 48)))
    cotangent = jnp.asarray(rng.standard_normal((3, 5, 48)), dtype)
    hp = jax.lax.Precision.HIGHEST
    formula = lambda y, x, a, b: (y.astype(jnp.float32) + 2.0 * jnp.matmul(
        jnp.matmul(x.astype(jnp.float32), a, precision=hp), b, precision=hp)).astype(y.dtype)
    adapter = lambda y, x, a, b: lora.LoRA(a, b, 8.0, (None, None))(y, x)           # alpha 8, rank 4
    args = (y, x, a, b)
    assert np.array_equal(np.asarray(jax.jit(adapter)(*args), np.float32), np.asarray(jax.jit(formula)(*args), np.float32))
    got, want = (jax.jit(lambda *args, f=f: jax.vjp(f, *args)[1](cotangent))(*args) for f in (adapter, formula))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, w) <= (1e-6 if g.dtype == jnp.float32 else 4e-3)
    x64, g64 = np.asarray(x, np.float64), 2.0 * np.asarray(cotangent, np.float64)  # the factors' gradients
    exact_a = x64.reshape(-1, 64).T @ (g64 @ np.asarray(b, np.float64).T).reshape(-1, 4)
    exact_b = (x64 @ np.asarray(a, np.float64)).reshape(-1, 4).T @ g64.reshape(-1, 48)
    assert rel_err(got[2], exact_a) <= 1e-6 and rel_err(got[3], exact_b) <= 1e-6
    products = re.findall(r"dot_general.*", jax.jit(lambda *args: jax.vjp(adapter, *args)[1](cotangent))
                          .lower(*args).as_text())
    wide = [p for p in products if "x4xf32>, tensor<4x" not in p]     # not d_u a^T, a product over the rank
    assert len(wide) == 4 and all(("bf16" in p) == (dtype == jnp.bfloat16) for p in wide), wide   # x a, 3 gradients


def test_backward_keeps_no_float32_copies_of_bf16_activations():
    """The norms, the LoRA adapters, the MoE's combine and SwiGLU compute in float32 from bf16 activations;
    their backward passes recompute those float32 values rather than keep them (without remat a
    step keeps every layer's): what autodiff saves of them is bf16 or per-row statistics."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((6, 8, 64)), jnp.bfloat16)
    full = lambda lines: [l for l in lines if l.startswith(("f32[6,8,64] output", "f32[24,2,64] output"))]
    probe = jnp.asarray(rng.standard_normal((6, 8, 64)), jnp.float32)        # a loss linear in the output
    norm = RMSNorm(64, 1e-6, dtype=jnp.bfloat16)
    a, b = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((64, 4), (4, 64)))
    out, weights = x.reshape(24, 2, 64), jnp.asarray(rng.random((24, 2)), jnp.float32)
    cases = {"norm": (lambda x: jnp.sum(norm(x) * probe), x),
             "lora": (lambda a: jnp.sum(lora.LoRA(a, b, 8.0, (None, None))(x, x) * probe), a),
             "combine": (lambda out, weights: jnp.sum(combine(out, weights) * probe[:3].reshape(24, 64)), out, weights),
             "swiglu": (lambda x: jnp.sum(swiglu(jnp.concatenate([x, x], -1)) * probe), x)}
    for name, (f, *args) in cases.items():
        lines = saved_residuals(f, *args)
        assert lines, name
        assert not full(lines), (name, full(lines))


def test_training_without_remat_unrolls_the_layers_with_the_same_gradients():
    """Without remat the backward pass keeps every layer's activations, and every layer runs
    unrolled (`RingModel.unroll`, in the graph `train.split` gives `train_step`; the model itself
    stays scanned for inference): no scan over layers, which would write the kept activations into
    its stacks and copy them back out. The loss and the adapters' gradients are the scanned layers'."""
    config = RingConfig.from_hf(os.path.join(CONFIGS, "tiny.json"), num_hidden_layers=10, layer_group_size=3)
    model = RingModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert model.schedule.repeats == 2 and max(r.length for r in model.schedule.group) == 2
    settings = train.TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=0, lora_rank=4, remat=False)
    train.prepare(model, settings)
    for i, (_, linear) in enumerate(lora.projections(model)):
        b = linear.lora.b.get_value()
        linear.lora.b.set_value(0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
    graphdef, params, frozen = train.split(model, settings)
    assert nnx.merge(graphdef, params, frozen).unroll and not model.unroll          # inference: scanned
    rng = np.random.default_rng(7)
    tokens, targets = (jnp.asarray(rng.integers(0, config.vocab_size, (2, 16)), jnp.int32) for _ in range(2))
    weights = jnp.ones((2, 16), jnp.float32)

    def f(params, unroll: bool):
        model = nnx.merge(graphdef, params, frozen)
        model.unroll = unroll
        return train.loss(model, tokens, targets, weights, chunk=8)       # the loss's pieces: one scan

    depth = {unroll: scan_depth(jax.make_jaxpr(jax.grad(f), static_argnums=1)(params, unroll).jaxpr)
             for unroll in (True, False)}
    assert depth[False] == depth[True] + 2        # the groups' scan and its runs' (the layers' own
    #                                               scans remain on the CPU: the chunked references)
    (value, grads), (want, want_grads) = (jax.jit(jax.value_and_grad(f), static_argnums=1)(params, unroll)
                                          for unroll in (True, False))
    assert abs(float(value) - float(want)) <= 1e-6 * float(want)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert np.any(expected) and rel_err(got, expected) <= 1e-5          # float32, fused otherwise


def test_micro_batches_average_their_losses_and_gradients():
    """A step of two micro-batches (a scan over them) takes the mean of their losses and gradients:
    its loss and gradient norm are those of the mean of each one's, computed on its own."""
    config = RingConfig.from_hf(os.path.join(CONFIGS, "tiny.json"), num_hidden_layers=2)  # softmax: dense, MoE
    model = RingModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    settings = train.TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=0, lora_rank=0, accumulate=2)
    train.prepare(model, settings)
    graphdef, params, frozen = train.split(model, settings)
    batches = Batches(random_examples(4, 17, config.vocab_size, seed=8), 2, 16, 0)
    micro = [batches.batch(0), batches.batch(1)]
    one = jax.jit(jax.value_and_grad(lambda p, m: train.loss(nnx.merge(graphdef, p, frozen), *m)))
    each = [one(params, m) for m in micro]
    value = (each[0][0] + each[1][0]) / 2
    norm = optax.global_norm(jax.tree.map(lambda a, b: (a + b) / 2, each[0][1], each[1][1]))
    tx = train.optimizer(settings)
    batch = tuple(jnp.asarray(np.stack(parts)) for parts in zip(*micro))              # [2, B, L] each
    copy = lambda tree: jax.tree.map(jnp.array, tree)                                  # the step donates
    _, _, got_value, got_norm = train.train_step(graphdef, tx, copy(params), tx.init(copy(params)), frozen, batch)
    assert abs(float(got_value) - float(value)) <= 1e-6 * float(value)
    assert abs(float(got_norm) - float(norm)) <= 1e-5 * float(norm)


def test_training_on_the_inference_mesh_follows_one_device(tmp_path):
    """Training on the inference mesh, data=2 x expert=4 of the tests' eight CPU devices (the batch
    split over `data`, the experts over `expert`, the adapters laid out by their projections), logs
    the losses of the same run on one device, each step's update included."""
    config = RingConfig.from_hf(os.path.join(CONFIGS, "tiny.json"), num_hidden_layers=3)  # every kind of layer
    examples = random_examples(4, 17, config.vocab_size, seed=9)
    settings = train.TrainConfig(steps=3, batch_size=4, seq_len=16, learning_rate=3e-3, warmup=1, lora_rank=8,
                                 save_every=1000)
    losses = {}
    for name, mesh in (("one", None), ("mesh", make_mesh(data=2, expert=4, devices=jax.devices()[:8]))):
        model = RingModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
        if mesh is not None:
            shard_model(model, mesh)
        train.prepare(model, settings)
        records = train.fit(model, Batches(examples, 4, 16, 0), settings, train.Run(tmp_path / name, settings, "m", "d"),
                            say=lambda line: None)
        losses[name] = [r["loss"] for r in records]
    experts = model.linear_moe.mlp.experts.gate_up_proj.get_value()
    adapter = model.linear_moe.attention.query_key_value.lora.a.get_value()
    assert experts.sharding.spec[1] == "expert" and adapter.sharding.mesh == mesh
    assert len(set(losses["one"])) == 3
    np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-5)


def test_mistakes_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Settings, their file, the data's fit to the model and the run folder are checked before the
    model loads, each mistake in one line, and none leaves a run folder behind that would block
    the corrected command. A loss that is not finite stops the run before it saves."""
    model_dir = tiny_model_folder(str(tmp_path))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i} of the text"}) for i in range(4)) + "\n")
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded the model"))

    def error(*args, config=None, out="run"):
        argv = ["--model", model_dir, "--data", str(data), "--out", str(tmp_path / out), "--steps", "2",
                "--warmup", "0", "--seq-len", "16", *args]
        if config is not None:
            (tmp_path / "train.yaml").write_text(config)
            argv += ["--config", str(tmp_path / "train.yaml")]
        try:
            assert train.main(argv) == 2
        except SystemExit as e:                                      # argparse's error: the settings
            assert e.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m ring_jax.train: error: "), err
        return err.strip().removeprefix("python -m ring_jax.train: error: ")

    assert error("--config", str(tmp_path / "none.yaml")).startswith(f"--config {tmp_path / 'none.yaml'}: [Errno 2]")
    assert error(config="steps: [1\n").startswith(f"--config {tmp_path / 'train.yaml'}: while parsing")
    assert error(config="accumulate: two\n") == "accumulate must be an integer, got 'two'"
    assert error(config="remat: 'no'\n") == "remat must be true or false, got 'no'"
    assert error(config="lora_targets: atention\n").startswith("lora_targets ['atention']: choose from")
    assert error("--quantize", "fp8", "--lora-rank", "0").startswith("an fp8 model trains LoRA adapters only")
    assert error("--seq-len", "4096") == "seq_len=4096 is longer than the model's max_position_embeddings=512"
    (tmp_path / "afile").write_text("")
    assert error(out="afile") == f"{tmp_path / 'afile'} is a file; --out is the run's folder"
    assert error(out=os.path.relpath(model_dir, tmp_path)).endswith("holds files but no run (no train.json); give a "
                                                                    "new or empty folder")
    os.makedirs(tmp_path / "damaged")
    (tmp_path / "damaged" / "train.json").write_text("{}")
    assert error(out="damaged").endswith("train.json: not a run's settings (needs ['config', 'data', 'model'])")
    assert not os.path.exists(tmp_path / "run")
    assert train.TrainConfig(learning_rate="1e-4").learning_rate == 1e-4         # YAML's reading of 1e-4

    model = load_model(model_dir)
    model.norm.weight[...] = jnp.full_like(model.norm.weight[...], jnp.nan)
    config = train.TrainConfig(steps=2, warmup=0, batch_size=2, seq_len=8, lora_rank=4)
    train.prepare(model, config)
    run = train.Run(tmp_path / "nan", config, "m", "d")
    with pytest.raises(ValueError, match="step 1: the loss is nan; the run stops before saving it"):
        train.fit(model, Batches(random_examples(2, 9, 256), 2, 8, 0), config, run, say=lambda _: None)
    assert run.latest() is None


def test_a_checkpoint_of_other_shapes_is_named_as_such(tmp_path):
    """Restoring a run's checkpoint into parameters of other shapes (another model at the run's
    path, another rank) says so in one line, not in Orbax's words."""
    config = train.TrainConfig(steps=2, warmup=0)
    run = train.Run(tmp_path / "run", config, "m", "d")
    run.begin()
    run.save(1, {"a": jnp.zeros((2, 3))}, {"m": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"checkpoint 1 does not fit this model and settings \(was the run made with "
                                         r"another model\?\)") as e:
        run.restore(1, {"a": jnp.zeros((2, 4))}, {"m": jnp.zeros(3)})
    assert "\n" not in str(e.value)
