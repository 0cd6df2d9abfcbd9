"""FP8 weights (`ring_jax.quantization`): the quantization, the FP8 model's next-token distribution
against float32, conversion both ways (ring_jax's per-channel layout, block-scaled HF checkpoints),
batch-1 decode through the kernels, expert parallelism, and the errors a user can cause."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import ring_jax
from conftest import load_config_dict, rel_err
from convert.__main__ import main as convert_main
from ring_jax.checkpoint import get_param
from ring_jax.config import ConfigError, RingConfig
from ring_jax.errors import CheckpointError
from ring_jax.io.conversion import convert_hf_to_jax, convert_jax_to_hf
from ring_jax.io.mapping import tensor_table
from ring_jax.io.random_checkpoint import write_random_hf_checkpoint, write_small_tokenizer
from ring_jax.io.safetensors_io import SafetensorsFolder, write_hf_weights
from pallas_kernels.backend import FP8, FP8_MAX, quantize_rows
from ring_jax.quantization import Fp8, dequantize
from test_matvec import decode_logits, on_hopper

IDS = np.random.default_rng(11).integers(0, 256, (4, 64))          # 256 positions of the tiny vocabulary


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random float32 HF checkpoint of the tiny config, with an MTP layer (its experts are one
    layer's stack, not every layer's), and a tokenizer."""
    folder = tmp_path_factory.mktemp("fp8") / "hf"
    write_random_hf_checkpoint(folder, dict(load_config_dict("tiny.json"), num_nextn_predict_layers=1), dtype="float32")
    write_small_tokenizer(str(folder), 256)
    return str(folder)


@pytest.fixture(scope="module")
def folders(hf, tmp_path_factory):
    """hf converted three ways: "fp8" (`convert hf2jax --quantize fp8`), "plain" (unquantized) and
    "back" (`convert jax2hf` of "fp8": FBGEMM's FP8 layout)."""
    work = tmp_path_factory.mktemp("converted")
    out = {name: str(work / name) for name in ("fp8", "plain", "back")}
    assert convert_main(["hf2jax", "--hf-dir", hf, "--out", out["fp8"], "--quantize", "fp8", "--quiet"]) == 0
    convert_hf_to_jax(hf, out["plain"], progress=False)
    convert_jax_to_hf(out["fp8"], out["back"], progress=False)
    return out


def params_of(model):
    """{array key: numpy array} of every parameter of the model's table."""
    out = {}
    for spec in tensor_table(model.config, model.quantization):
        for (key, *_), array in zip(spec.arrays, get_param(model, spec)):
            out[key] = np.asarray(array)
    return out


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert pa[key].dtype == pb[key].dtype and pa[key].tobytes() == pb[key].tobytes(), key


def kl(want_logits, got_logits):
    """KL(want || got) of each position's next-token distribution -> (max, mean)."""
    p, q = (jax.nn.log_softmax(jnp.asarray(x, jnp.float32), -1) for x in (want_logits, got_logits))
    k = jnp.sum(jnp.exp(p) * (p - q), axis=-1)
    return float(k.max()), float(k.mean())


def test_quantize_rows_numpy_and_xla_agree():
    """Per-channel quantization: the same bits from numpy (conversion) and XLA (`RingModel.quantize`,
    load-time quantization); each row's largest magnitude maps to 448, a row of zeros to zeros,
    and every weight is within half an e4m3 step (2^-4 relative) of its dequantized value. Rows of
    magnitudes under 2^-64 (one of float32 subnormals, which XLA flushes to zero and numpy keeps)
    quantize to zeros with scale 1 both ways, not to NaN; a row just above it keeps its values."""
    check_quantize_rows()


@pytest.mark.gpu
def test_quantize_rows_on_the_gpu_agrees_with_numpy():
    check_quantize_rows()


def check_quantize_rows():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 48, 96)).astype(np.float32) * np.exp(rng.uniform(-8, 8, (3, 48, 1))).astype(np.float32)
    w[1, 5] = 0
    w[0, 3] = w[0, 3] / np.abs(w[0, 3]).max() * 2.0 ** -70                   # under ZERO_ROW: zeros
    w[2, 7] = np.linspace(-1e-39, 1e-39, 96)                                 # subnormals: zeros
    w[2, 8] = w[2, 8] / np.abs(w[2, 8]).max() * 2.0 ** -60                   # above it: quantized
    tiny = [(0, 3), (2, 7)]
    for source in (w, w.astype(ml_dtypes.bfloat16)):
        host = Fp8(*quantize_rows(source))
        device = Fp8(*quantize_rows(jnp.asarray(source)))
        assert host.values.dtype == FP8 and host.scale.dtype == np.float32 and host.scale.shape == (3, 48)
        assert np.asarray(device.values).tobytes() == host.values.tobytes()
        assert np.asarray(device.scale).tobytes() == host.scale.tobytes()
        assert np.all(np.isfinite(host.values.astype(np.float32)))
        largest = np.abs(host.values.astype(np.float32)).max(-1)
        zeros = [(1, 5)] + tiny
        assert all(largest[r] == 0 and host.scale[r] == 1 for r in zeros)
        assert np.sum(largest == FP8_MAX) == largest.size - len(zeros)
        err = np.abs(dequantize(host) - source.astype(np.float32))
        assert np.all(err <= np.abs(source.astype(np.float32)) * 2.0 ** -4 + host.scale[..., None] * 2.0 ** -10)


def test_fp8_logits_against_float32(hf):
    """The quality figure: KL of the FP8 model's next-token distribution from the float32 model's
    over 256 positions, beside bf16's. Random tiny weights make the model chaotic (routing flips
    from one rounding), so bf16 itself is far from float32 here; FP8 stays within a small
    multiple of it."""
    want = ring_jax.load_model(hf)(IDS)
    bf16 = kl(want, ring_jax.load_model(hf, dtype="bfloat16")(IDS))
    fp8 = kl(want, ring_jax.load_model(hf, dtype="bfloat16", quantize="fp8")(IDS))
    rows = kl(want, ring_jax.load_model(hf, dtype="bfloat16", quantize="fp8", fp8_activations="grouped")(IDS))
    print(f"KL from float32 (max, mean): bf16 {bf16}, fp8 {fp8}, fp8 with FP8 expert rows {rows}")
    assert fp8[1] <= 0.1 and fp8[0] <= 1.0
    assert fp8[1] <= 5 * bf16[1]
    assert rows[1] <= 0.1 and rows[0] <= 1.0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp8_rows_keep_the_model_dtype(hf, dtype):
    """FP8 rows in a float32 or float16 model: the experts' outputs come back in the model's dtype
    (the grouped kernel writes bf16 or float32), so the layers' scan carries one dtype, the logits
    are near the weight-only FP8 model's, and a gradient flows through them."""
    weight_only = ring_jax.load_model(hf, dtype=dtype, quantize="fp8")
    model = ring_jax.load_model(hf, dtype=dtype, quantize="fp8", fp8_activations="grouped")
    got, want = model(IDS[:1]), weight_only(IDS[:1])
    assert got.dtype == want.dtype and np.all(np.isfinite(np.asarray(got, np.float32)))
    assert kl(want, got)[1] <= 0.1
    if dtype == "float32":
        def loss(model):
            return jnp.mean(model(IDS[:1, :16]) ** 2)
        grads = nnx.grad(loss)(model)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_fp8_rows_grouped_outputs_in_float32():
    """The experts' grouped products with FP8 rows give tokens' dtype (float32 here, the weight-only
    path's too), and their gradient (the weight-only reference's, through the rows' rounding)
    flows to the tokens."""
    from ring_jax.layers import moe
    from ring_jax.quantization import quantize_kernel

    E, H, I, N, k = 4, 128, 128, 8, 2
    keys = jax.random.split(jax.random.key(5), 4)
    gate_up = quantize_kernel(jax.random.normal(keys[0], (E, H, 2 * I), jnp.float32) / 10)
    down = quantize_kernel(jax.random.normal(keys[1], (E, I, H), jnp.float32) / 10)
    tokens = jax.random.normal(keys[2], (N, H), jnp.float32)
    ids = jax.random.randint(keys[3], (N, k), 0, E).astype(jnp.int32)
    got = moe.grouped_outputs(tokens, ids, gate_up, down, fp8_rows=True)
    want = moe.grouped_outputs(tokens, ids, gate_up, down)
    assert got.dtype == want.dtype == jnp.float32
    assert rel_err(got, want) < 0.1
    grad = jax.grad(lambda t: jnp.sum(moe.grouped_outputs(t, ids, gate_up, down, fp8_rows=True) ** 2))(tokens)
    assert grad.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(grad)))


def test_every_path_to_an_fp8_model_gives_the_same_bits(hf, folders, tmp_path):
    """`convert --quantize fp8`, `load_model(hf, quantize=)`, `load_model(converted unquantized
    folder, quantize=)` and `RingModel.quantize` make one model; its folder saves and loads as it
    is, and loads in bf16 with the FP8 arrays as stored."""
    converted = ring_jax.load_model(folders["fp8"], verify=True)
    assert converted.quantization == "fp8" and converted.dtype == np.float32
    manifest = json.loads(open(f"{folders['fp8']}/ring_jax.json").read())
    assert manifest["quantize"] == "fp8"
    assert manifest["params"]["lm_head.kernel"][:2] == [[256, 64], "float8_e4m3fn"]
    assert manifest["params"]["layers.1.mlp.experts.down_proj_scale"][:2] == [[16, 64], "float32"]
    assert manifest["params"]["layers.1.mlp.gate.kernel"][1] == "float32"             # the router stays
    others = (ring_jax.load_model(hf, quantize="fp8"),
              ring_jax.load_model(folders["plain"], quantize="fp8"),
              ring_jax.load_model(folders["plain"]).quantize())
    for other in others:
        assert_same_params(converted, other)
    ring_jax.save_model(converted, str(tmp_path / "saved"))
    assert_same_params(converted, ring_jax.load_model(str(tmp_path / "saved")))
    narrow = ring_jax.load_model(folders["fp8"], dtype="bfloat16", verify=True)     # FP8 arrays stay
    assert narrow.dtype == np.dtype(ml_dtypes.bfloat16) and narrow.lm_head.kernel[...].dtype == FP8
    assert np.asarray(narrow.lm_head.kernel[...]).tobytes() == np.asarray(converted.lm_head.kernel[...]).tobytes()
    np.testing.assert_array_equal(np.asarray(converted(IDS[:1])), np.asarray(others[0](IDS[:1])))


def test_jax2hf_writes_fbgemm_fp8_and_reads_it_back(folders, tmp_path):
    """jax2hf of an FP8 folder: float8_e4m3fn weights with `weight_scale` [out, 1] and FBGEMM's
    quantization_config (the routers not converted); hf2jax and load_model read it back as stored,
    to the same bits."""
    back = SafetensorsFolder(folders["back"])
    assert back.dtype("model.layers.1.mlp.experts.3.up_proj.weight") == FP8
    assert back.shape("model.layers.1.mlp.experts.3.up_proj.weight_scale") == (32, 1)
    assert back.dtype("model.layers.1.mlp.gate.weight") == np.float32
    assert "model.layers.1.mlp.gate.weight_scale" not in back.names
    qc = json.loads(open(f"{folders['back']}/config.json").read())["quantization_config"]
    assert qc["quant_method"] == "fbgemm_fp8" and "model.layers.1.mlp.gate" in qc["modules_to_not_convert"]
    first = ring_jax.load_model(folders["fp8"])
    convert_hf_to_jax(folders["back"], str(tmp_path / "again"), progress=False)
    assert_same_params(first, ring_jax.load_model(str(tmp_path / "again")))
    assert_same_params(first, ring_jax.load_model(folders["back"]))


def block_quantize(w: np.ndarray, block) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] float32 -> (values float8_e4m3fn, weight_scale_inv [cdiv(out, bo), cdiv(in, bi)]):
    a DeepSeek-style checkpoint's layout (w ~ values * scale_inv of its block)."""
    bo, bi = block
    out, inp = w.shape
    padded = np.zeros((-(-out // bo) * bo, -(-inp // bi) * bi), np.float32)
    padded[:out, :inp] = w
    blocks = padded.reshape(padded.shape[0] // bo, bo, padded.shape[1] // bi, bi)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12).astype(np.float32) / np.float32(FP8_MAX)
    full = np.repeat(np.repeat(scale, bo, axis=0), bi, axis=1)[:out, :inp]
    return (w / full).astype(FP8), scale


def test_block_scaled_hf_checkpoint(hf, tmp_path):
    """A DeepSeek-style FP8 checkpoint (quant_method "fp8", weight_block_size [16, 32], the LM head
    left bf16): read dequantized into a float32 model exactly, and quantized per channel from
    those values with quantize="fp8"."""
    source = SafetensorsFolder(hf)
    config = RingConfig.from_hf(hf)
    matrices = {name for spec in tensor_table(config, "fp8") if spec.quantized and spec.key != "lm_head.kernel"
                for name in spec.hf_names}
    layout, tensors = {}, {}
    for name in source.names:
        w = source.read(name)
        if name in matrices:
            values, scale = block_quantize(w, (16, 32))
            tensors[name], tensors[name + "_scale_inv"] = values, scale
        else:
            tensors[name] = w
    for name, t in tensors.items():
        layout[name] = (t.dtype, t.shape)
    folder = tmp_path / "block"
    folder.mkdir()
    raw = json.load(open(f"{hf}/config.json"))
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [16, 32]}
    (folder / "config.json").write_text(json.dumps(raw))
    write_hf_weights(str(folder), layout, tensors.__getitem__)

    name = "model.layers.1.mlp.experts.2.down_proj.weight"          # [64, 32]: 4 x 1 blocks
    values, scale = tensors[name], tensors[name + "_scale_inv"]
    want = values.astype(np.float32) * np.repeat(np.repeat(scale, 16, 0), 32, 1)[:64, :32]
    plain = ring_jax.load_model(str(folder))
    assert plain.quantization is None and plain.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(plain.layer(1).mlp.experts.down_proj[...][2]), want.T)
    quantized = ring_jax.load_model(str(folder), quantize="fp8")
    q = Fp8(*quantize_rows(want))
    got = quantized.layer(1).mlp.experts
    assert np.asarray(got.down_proj[...][2]).tobytes() == q.values.tobytes()
    assert np.asarray(got.down_proj_scale[...][2]).tobytes() == q.scale.tobytes()
    print("block-scaled checkpoint, KL (max, mean) of the per-channel FP8 model from the dequantized one:",
          kl(plain(IDS), quantized(IDS)))


def decode_config() -> RingConfig:
    """The tiny config widened so that every FP8 product of a decode step is whole kernel tiles
    (K a multiple of 256)."""
    config = load_config_dict("tiny.json")
    config.update(hidden_size=256, head_dim=64, intermediate_size=256, moe_intermediate_size=256,
                  moe_shared_expert_intermediate_size=256, num_experts=64)
    return RingConfig.from_hf(config)


def test_batch_one_decode_through_the_fp8_kernels(monkeypatch):
    """As on a Hopper GPU (matvec kernel in interpret mode): the FP8 projections, the routed experts
    by id and the shared expert in their calls read K-major FP8 stacks with their scales, and the
    decode logits equal the FP8 model's full forward."""
    model = ring_jax.RingModel(decode_config(), dtype=jnp.float32, rngs=nnx.Rngs(1)).quantize()
    p = np.random.default_rng(3).integers(2, 256, 12)
    want = model(p[None])[0, -1:]
    calls = on_hopper(monkeypatch)
    got = decode_logits(model, p, 1)
    # the experts of the 3 linear MoE layers, [3 x 64, N, K], each with the shared expert
    assert ("normed", ((3 * 64, 512, 256), (3, 512, 256))) in calls and ((3 * 64, 256, 256), (3, 256, 256)) in calls
    assert ("normed", (3, 768, 256)) in calls                              # linear attention qkv, K-major
    assert rel_err(got, want) <= 1e-5


def test_expert_parallel_fp8_equals_one_device(folders):
    """An FP8 folder loaded onto a mesh with the experts over 8 devices gives one device's logits
    on each way the pairs run there: gathered (2 tokens) and grouped with the scattered combine
    (256); an unquantized folder quantized as it loads onto the mesh, or once loaded there
    (`RingModel.quantize`: the experts' stacks a layer at a time), is the same model."""
    mesh = ring_jax.make_mesh(data=1, expert=8, devices=jax.devices()[:8])
    one = ring_jax.load_model(folders["fp8"])
    sharded = ring_jax.load_model(folders["fp8"], mesh=mesh)
    assert sharded.linear_moe.mlp.experts.gate_up_proj_scale[...].sharding.spec[:2] == (None, "expert")
    for ids in (IDS[:2, :1], IDS):
        assert rel_err(sharded(ids), one(ids)) <= 1e-5
    assert_same_params(sharded, ring_jax.load_model(folders["plain"], mesh=mesh, quantize="fp8"))
    quantized = ring_jax.load_model(folders["plain"], mesh=mesh).quantize()
    assert quantized.linear_moe.mlp.experts.gate_up_proj[...].sharding.spec[:2] == (None, "expert")
    assert_same_params(sharded, quantized)


def test_lora_trains_over_fp8_weights(tmp_path):
    """LoRA adapters on an FP8 model (the gradient flows through the FP8 products to the adapters):
    the loss falls, the FP8 values stay."""
    from ring_jax import train
    from ring_jax.train_data import Batches, Example

    model = ring_jax.RingModel(RingConfig.from_hf(load_config_dict("tiny.json")), dtype=jnp.float32,
                               rngs=nnx.Rngs(0)).quantize()
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(0, 256, 17).astype(np.int32), np.r_[False, np.ones(16, bool)]) for _ in range(2)]
    config = train.TrainConfig(steps=8, batch_size=2, seq_len=16, learning_rate=5e-3, warmup=1, lora_rank=8,
                               save_every=1000, remat=False)
    qkv = np.asarray(model.linear_moe.attention.query_key_value.kernel.get_value())
    train.prepare(model, config)
    records = train.fit(model, Batches(examples, 2, 16, 0), config, train.Run(tmp_path / "run", config, "m", "d"),
                        say=lambda line: None)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert np.asarray(model.linear_moe.attention.query_key_value.kernel.get_value()).tobytes() == qkv.tobytes()


def test_command_lines_pass_quantize_to_load_model(hf, monkeypatch):
    """--quantize fp8 reaches `load_model` from generate and eval (the model it loads is tested
    above)."""
    from ring_jax import eval as evaluation
    from ring_jax.__main__ import main

    seen = []

    class Loaded(Exception):
        pass

    def load_model(path, **kwargs):
        seen.append(kwargs.get("quantize"))
        raise Loaded
    monkeypatch.setattr(ring_jax, "load_model", load_model)
    for run in (lambda: main(["generate", "--model", hf, "--prompt-ids", "5 6", "--quantize", "fp8", "--debug"]),
                lambda: evaluation.main(["--model", hf, "--text", __file__, "--quantize", "fp8", "--debug"])):
        with pytest.raises(Loaded):
            run()
    assert seen == ["fp8", "fp8"]


def test_tied_head_stored_in_fp8_is_named(folders, tmp_path):
    """An FP8 checkpoint whose config ties the head to the embeddings but which stores an FP8
    lm_head.weight (without its scale): one error naming the head, not a missing scale."""
    from test_convert import rewrite

    def edit(tensors):
        tensors.pop("lm_head.weight_scale")
    rewrite(folders["back"], tmp_path / "tied", edit)
    config = json.load(open(tmp_path / "tied" / "config.json"))
    json.dump(dict(config, tie_word_embeddings=True), open(tmp_path / "tied" / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor lm_head.weight \(float8_e4m3fn\)"):
        ring_jax.load_model(str(tmp_path / "tied"))


def test_converted_fp8_array_of_another_dtype_is_named(folders, tmp_path):
    """A converted FP8 folder whose manifest lists an FP8 array in another dtype is refused by name
    (Orbax would cast it on restore), and one that names a quantization ring_jax does not read."""
    import shutil

    folder = tmp_path / "fp8"
    shutil.copytree(folders["fp8"], folder)
    manifest = json.load(open(folder / "ring_jax.json"))
    manifest["params"]["layers.1.mlp.experts.down_proj"][1] = "bfloat16"
    json.dump(manifest, open(folder / "ring_jax.json", "w"))
    with pytest.raises(CheckpointError, match="layers.1.mlp.experts.down_proj is stored as bfloat16; the model "
                                              "holds it in float8_e4m3fn"):
        ring_jax.load_model(str(folder))
    manifest["quantize"] = "int4"
    json.dump(manifest, open(folder / "ring_jax.json", "w"))
    with pytest.raises(CheckpointError, match=r"quantize 'int4' is not one this ring_jax reads \(fp8\)"):
        ring_jax.load_model(str(folder))


def test_errors(hf, folders, tmp_path):
    """Each mistake is one clear error."""
    model = ring_jax.load_model(hf).quantize()
    with pytest.raises(ValueError, match="quantized .fp8. already"):
        model.quantize()
    with pytest.raises(ValueError, match="quantize method None"):
        ring_jax.load_model(hf).quantize(None)
    with pytest.raises(ValueError, match="quantize='int4'"):
        ring_jax.load_model(hf, quantize="int4")
    with pytest.raises(ValueError, match="LoRA adapters only"):
        from ring_jax import train
        train.prepare(model, train.TrainConfig(lora_rank=0))
    raw = json.load(open(f"{hf}/config.json"))
    with pytest.raises(ConfigError, match="quant_method 'awq'"):
        RingConfig.from_hf(dict(raw, quantization_config={"quant_method": "awq"}))
    with pytest.raises(ConfigError, match="weight_block_size"):
        RingConfig.from_hf(dict(raw, quantization_config={"quant_method": "fp8"}))
    block = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ConfigError, match="fmt 'e5m2'"):
        RingConfig.from_hf(dict(raw, quantization_config=dict(block, fmt="e5m2")))
    with pytest.raises(ConfigError, match="activation_scheme 'static'"):
        RingConfig.from_hf(dict(raw, quantization_config=dict(block, activation_scheme="static")))
    with pytest.raises(ConfigError, match="weight_block_size \\[True, True\\]"):
        RingConfig.from_hf(dict(raw, quantization_config=dict(block, weight_block_size=[True, True])))
    with pytest.raises(ConfigError, match="quant_method None"):
        RingConfig.from_hf(dict(raw, quantization_config={"load_in_8bit": True}))
    with pytest.raises(ValueError, match="fp8_activations='grouped' needs FP8 weights"):
        ring_jax.load_model(folders["plain"], fp8_activations="grouped")

    config = json.loads(open(f"{folders['back']}/config.json").read())
    back = SafetensorsFolder(folders["back"])
    tensors = {name: back.read(name) for name in back.names}
    scale = "model.layers.2.attention.dense.weight_scale"

    def damaged(name, change, quantized=True):
        folder = tmp_path / name
        folder.mkdir()
        edited = dict(tensors)
        change(edited)
        (folder / "config.json").write_text(json.dumps(config if quantized else
                                                       {k: v for k, v in config.items() if k != "quantization_config"}))
        write_hf_weights(str(folder), {n: (t.dtype, t.shape) for n, t in edited.items()}, edited.__getitem__)
        return str(folder)

    with pytest.raises(CheckpointError, match="is float8_e4m3fn.*needs? a quantization_config"):
        ring_jax.load_model(damaged("no-config", lambda t: None, quantized=False))
    with pytest.raises(CheckpointError, match=f"its scale {scale} is missing"):
        ring_jax.load_model(damaged("no-scale", lambda t: t.pop(scale)))
    with pytest.raises(CheckpointError, match=f"{scale} has shape \\[64\\], .* needs \\[64, 1\\]"):
        ring_jax.load_model(damaged("scale-shape", lambda t: t.update({scale: t[scale][:, 0]})))
    with pytest.raises(CheckpointError, match="only projection and expert matrices may be FP8"):
        ring_jax.load_model(damaged("fp8-norm", lambda t: t.update(
            {"model.norm.weight": t["model.norm.weight"].astype(FP8)})))
    with pytest.raises(CheckpointError, match=f"{scale} is int32; an FP8 weight's scale must be one of"):
        ring_jax.load_model(damaged("int-scale", lambda t: t.update({scale: t[scale].astype(np.int32)})))
    weight = scale.removesuffix("_scale")
    dequantized = lambda t, name: (t[name].astype(np.float32) * t[name + "_scale"]).astype(np.float32)  # noqa: E731
    with pytest.raises(CheckpointError, match=f"{weight} is float32 but has a scale, {scale}: a scaled weight must"):
        ring_jax.load_model(damaged("kept-scale", lambda t: t.update({weight: dequantized(t, weight)})))
    for bad in (np.nan, np.inf, 0.0, -1.0):
        poked = tensors[scale].copy()
        poked[7] = bad
        with pytest.raises(CheckpointError, match=f"{scale} holds scales that are not finite and positive"):
            ring_jax.load_model(damaged(f"scale-{bad}", lambda t: t.update({scale: poked})))
    # An FBGEMM checkpoint whose LM head stays unquantized (transformers' modules_to_not_convert):
    # read as stored it would be quantized, so it is refused unless quantize asks for it.
    head = damaged("bf16-head", lambda t: t.update({"lm_head.weight": dequantized(t, "lm_head.weight")})
                   or t.pop("lm_head.weight_scale"))
    with pytest.raises(CheckpointError, match="lm_head.weight is float32 in an FP8 checkpoint .*quantize='fp8'"):
        ring_jax.load_model(head)
    requantized = ring_jax.load_model(head, quantize="fp8")
    assert requantized.lm_head.kernel[...].dtype == FP8
    assert rel_err(requantized(IDS[:1]), ring_jax.load_model(folders["back"])(IDS[:1])) <= 1e-5
