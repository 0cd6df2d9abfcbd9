"""hf2jax / jax2hf: round trip, the error paths, atomic output, and the CLI."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import ring_jax
from conftest import ROOT
from convert.__main__ import main as convert_main
from ring_jax.io.conversion import convert_hf_to_jax
from ring_jax.io.conversion import convert_jax_to_hf
from ring_jax.io.random_checkpoint import write_random_hf_checkpoint
from ring_jax.errors import CheckpointError
from ring_jax.io.safetensors_io import SafetensorsFolder, write_hf_weights


def tensors_of(folder):
    src = SafetensorsFolder(folder)
    return {n: src.read(n) for n in src.names}


def assert_bit_identical(a_dir, b_dir):
    a, b = tensors_of(a_dir), tensors_of(b_dir)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("dtype, shard_bytes", [("bfloat16", 150_000), ("float32", 5 * 2**30)])
def test_round_trip_is_bit_identical(tmp_path, tiny_dict, dtype, shard_bytes):
    hf, jx, back = tmp_path / "hf", tmp_path / "jax", tmp_path / "back"
    write_random_hf_checkpoint(hf, dict(tiny_dict, num_nextn_predict_layers=1), dtype=dtype,
                               max_shard_bytes=shard_bytes)
    (hf / "tokenizer.json").write_text("{}")
    convert_hf_to_jax(str(hf), str(jx), progress=False)
    assert sorted(os.listdir(jx)) == ["config.json", "params", "ring_jax.json", "tokenizer.json"]
    convert_jax_to_hf(str(jx), str(back), max_shard_bytes=shard_bytes, progress=False)
    assert_bit_identical(hf, back)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert SafetensorsFolder(str(back)).dtype("model.layers.1.mlp.gate.expert_bias") == np.float32


def test_load_model_from_hf_folder_equals_converted(tmp_path, tiny_dict):
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")
    convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "jax"), progress=False)
    a, b = ring_jax.load_model(str(tmp_path / "jax")), ring_jax.load_model(str(tmp_path / "hf"))
    ids = np.arange(10)[None]
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
    c = ring_jax.load_model(str(tmp_path / "jax"), dtype="bfloat16")
    assert c.dtype == np.dtype("bfloat16") and c.layer(1).mlp.gate.expert_bias[...].dtype == np.float32
    # without a mesh, every parameter on the default device, from either kind of folder
    for folder in ("jax", "hf"):
        with jax.default_device(jax.devices()[1]):
            d = ring_jax.load_model(str(tmp_path / folder))
        assert {x.device for x in jax.tree.leaves(nnx.state(d))} == {jax.devices()[1]}


def test_save_model_then_load(tmp_path, tiny_dict):
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")
    model = ring_jax.load_model(str(tmp_path / "hf"))
    ring_jax.save_model(model, str(tmp_path / "saved"))
    again = ring_jax.load_model(str(tmp_path / "saved"))
    ids = np.arange(9)[None]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))


def rewrite(hf_dir, out_dir, edit):
    """Copies an HF folder with its tensors edited: edit(dict name -> array) in place."""
    tensors = tensors_of(hf_dir)
    edit(tensors)
    os.makedirs(out_dir)
    write_hf_weights(str(out_dir), {n: (t.dtype, t.shape) for n, t in tensors.items()}, tensors.__getitem__)
    with open(os.path.join(hf_dir, "config.json")) as f, open(os.path.join(out_dir, "config.json"), "w") as g:
        g.write(f.read())


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.3.attention.g_norm.weight"), "missing tensor model.layers.3.attention.g_norm.weight"),
    (lambda t: t.pop("model.layers.2.mlp.experts.7.up_proj.weight"), "missing tensor model.layers.2.mlp.experts.7.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.attention.rotary_emb.inv_freq": np.ones(4, np.float32)}),
     "unexpected tensor model.layers.0.attention.rotary_emb.inv_freq"),
    (lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}), r"model.norm.weight has shape \[65\]"),
    (lambda t: t.update({"model.norm.weight": np.ones(64, np.int64)}), "model.norm.weight is int64"),
])
def test_bad_checkpoints_are_named_and_leave_nothing(tmp_path, tiny_dict, edit, message):
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")
    rewrite(tmp_path / "hf", tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        convert_hf_to_jax(str(tmp_path / "bad"), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad", "hf"]  # no output, no temporary folder
    with pytest.raises(CheckpointError, match=message):
        ring_jax.load_model(str(tmp_path / "bad"))


def test_failure_midway_leaves_nothing(tmp_path, tiny_dict, monkeypatch):
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")
    calls = {"n": 0}
    real_read = SafetensorsFolder.read

    def failing_read(self, name):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk went away")
        return real_read(self, name)

    monkeypatch.setattr(SafetensorsFolder, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_output_and_missing_input(tmp_path, tiny_dict):
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    with pytest.raises(CheckpointError, match="is not a converted ring_jax folder .it has no ring_jax.json; "):
        convert_jax_to_hf(str(tmp_path / "hf"), str(tmp_path / "out2"), progress=False)  # an HF folder to jax2hf
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "out2"), progress=False)


def test_index_pointing_to_missing_shard(tmp_path, tiny_dict):
    with pytest.raises(ValueError, match="max_shard_bytes=0 must be > 0"):        # not a file per tensor
        write_random_hf_checkpoint(tmp_path / "none", tiny_dict, dtype="float32", max_shard_bytes=0)
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32", max_shard_bytes=100_000)
    shards = sorted(p for p in os.listdir(tmp_path / "hf") if p.startswith("model-"))
    (tmp_path / "hf" / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"lists {shards[1]}, which is missing"):
        convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)


def test_tied_head(tmp_path, tiny_dict):
    tied = dict(tiny_dict, tie_word_embeddings=True)
    write_random_hf_checkpoint(tmp_path / "hf", tied, dtype="float32")
    model = ring_jax.load_model(str(tmp_path / "hf"))
    assert model.lm_head is None
    # a copy of the embeddings under lm_head.weight is accepted, a different head is not
    rewrite(tmp_path / "hf", tmp_path / "copy",
            lambda t: t.update({"lm_head.weight": t["model.word_embeddings.weight"].copy()}))
    ring_jax.load_model(str(tmp_path / "copy"))
    rewrite(tmp_path / "hf", tmp_path / "differs",
            lambda t: t.update({"lm_head.weight": t["model.word_embeddings.weight"] + 1}))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        ring_jax.load_model(str(tmp_path / "differs"))


def test_manifest_mismatch_is_named(tmp_path, tiny_dict):
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")
    convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "jax"), progress=False)
    with pytest.raises(CheckpointError, match="parameter layers.6.input_layernorm.weight is missing"):
        ring_jax.load_model(str(tmp_path / "jax"), num_hidden_layers=7)


def test_cli_help_progress_and_errors(tmp_path, tiny_dict, capsys):
    for command in ([], ["hf2jax"], ["jax2hf"]):
        with pytest.raises(SystemExit) as e:
            convert_main(command + ["--help"])
        assert e.value.code == 0
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="bfloat16")
    assert convert_main(["hf2jax", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "jax")]) == 0
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.experts.{e}.gate_proj.weight + model.layers.1.mlp.experts.{e}.up_proj.weight -> layers.1.mlp.experts.gate_up_proj [16, 64, 64]" in err
    assert convert_main(["hf2jax", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "jax")]) == 2
    assert "exists" in capsys.readouterr().err
    for command, message in ((["hf2jax", "--hf-dir", str(tmp_path / "hf"), "--out", ""], "--out is empty"),
                             (["jax2hf", "--model-dir", str(tmp_path / "jax"), "--out", str(tmp_path / "x"),
                               "--max-shard-gb", "0"], "argument --max-shard-gb: 0 is outside (0, inf)")):
        with pytest.raises(SystemExit) as e:
            convert_main(command)
        assert e.value.code == 2 and f"python -m convert {command[0]}: error: {message}" in capsys.readouterr().err
    assert convert_main(["jax2hf", "--model-dir", str(tmp_path / "jax"), "--out", str(tmp_path / "back")]) == 0
    err = capsys.readouterr().err                          # read and verified, then each parameter
    assert "read and verified" in err and "lm_head.kernel -> lm_head.weight" in err
    assert_bit_identical(tmp_path / "hf", tmp_path / "back")


def test_module_entry_points_run(tmp_path):
    for module in ("convert", "ring_jax"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout


def test_table_covers_every_parameter_once(tiny_dict):
    from flax import nnx

    from ring_jax.io.mapping import tensor_table
    from ring_jax import RingConfig, RingModel
    from ring_jax.checkpoint import locate

    for change in ({}, {"num_nextn_predict_layers": 1}, {"tie_word_embeddings": True}, {"num_hidden_layers": 14}):
        config = RingConfig.from_hf(dict(tiny_dict, **change))
        model = nnx.eval_shape(lambda: RingModel(config, dtype=np.float32))
        entries = set()                       # (parameter, index in its stack) of every model parameter
        for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            stacked = (v.get_metadata().get("out_sharding") or (None,))[0] == "layers"
            entries |= {(id(v), i) for i in (range(v.shape[0]) if stacked else [None])}
        table = tensor_table(config)
        covered = []
        for spec in table:
            [(variable, index)] = locate(model, spec)
            assert (variable.shape[1:] if index is not None else variable.shape) == spec.shape, spec.key
            covered.append((id(variable), index))
        assert sorted(covered, key=str) == sorted(entries, key=str) and len(set(covered)) == len(covered)


def test_malformed_files_are_named(tmp_path, tiny_dict):
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")
    path = tmp_path / "hf" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"!!!!"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: malformed safetensors header"):
        convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    (tmp_path / "hf" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weight_map"):
        convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("header, data, message", [
    ([], b"", "malformed safetensors header (not a JSON object)"),
    ({"w": {"dtype": "F32", "shape": None, "data_offsets": [0, 4]}}, b"0000", "malformed header entry for tensor w"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"0" * 8, "malformed header entry for tensor w"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"0000", "past the end of the file"),
])
def test_malformed_headers_are_named_when_the_folder_opens(tmp_path, header, data, message):
    """Every header entry is checked before any tensor is read (a truncated file included)."""
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    with pytest.raises(CheckpointError, match=f"model.safetensors: .*{re.escape(message)}"):
        SafetensorsFolder(str(tmp_path))


def test_malformed_index_is_named(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    for text, message in (("{", "is not valid JSON"), ("[]", "no weight_map"),
                          ('{"weight_map": {"w": 5}}', "no weight_map of tensor names to file names")):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=f"model.safetensors.index.json.*{message}"):
            SafetensorsFolder(str(tmp_path))


def test_written_config_states_the_stored_dtype(tmp_path, tiny_dict):
    write_random_hf_checkpoint(tmp_path / "hf", dict(tiny_dict, dtype="float32"), dtype="float32")
    convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "jax"), dtype="bfloat16", progress=False)
    written = json.loads((tmp_path / "jax" / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16" and written["auto_map"] == tiny_dict["auto_map"]
    with pytest.raises(ValueError, match="both >= 1"):
        ring_jax.load_model(str(tmp_path / "jax"))(np.zeros((0, 3), np.int32))


def test_param_writer_groups_small_parameters(tmp_path, monkeypatch):
    """Small parameters share an Orbax partial save up to FLUSH_BYTES (one save each made writing
    quadratic in their number); one at or over it is saved at once; the checkpoint holds them all."""
    import orbax.checkpoint as ocp

    from ring_jax.checkpoint import PARAMS_DIR, ParamWriter

    writer = ParamWriter(str(tmp_path))
    saves, save = [], writer._partial.save
    monkeypatch.setattr(writer._partial, "save", lambda path, tree: saves.append(tree) or save(path, tree))
    monkeypatch.setattr(ParamWriter, "FLUSH_BYTES", 1000)
    rng = np.random.default_rng(0)
    arrays = {"a.x": rng.standard_normal(100, np.float32), "a.y": rng.standard_normal(100, np.float32),
              "b": rng.standard_normal(300, np.float32), "c": rng.standard_normal(10, np.float32)}
    for key, array in arrays.items():
        writer.add(key, array)
    assert len(saves) == 1                           # 400 + 400 + 1200 bytes: flushed after "b"
    writer.close(np.float32)
    assert len(saves) == 2 and list(saves[1]) == ["c"]
    restored = ocp.StandardCheckpointer().restore(str(tmp_path / PARAMS_DIR))
    for key, array in arrays.items():
        node = restored
        for part in key.split("."):
            node = node[part]
        np.testing.assert_array_equal(np.asarray(node), array)


def test_killed_conversion_is_cleaned_by_the_next(tmp_path, tiny_dict):
    """SIGKILL while hf2jax writes leaves only OUT.tmp-PID; the next run of the same --out removes
    it and converts."""
    import signal
    import time

    big = dict(tiny_dict, num_hidden_layers=12, num_experts=64, n_group=4)
    write_random_hf_checkpoint(tmp_path / "hf", big, dtype="float32")
    out = tmp_path / "jax"
    proc = subprocess.Popen([sys.executable, "-m", "convert", "hf2jax", "--hf-dir", str(tmp_path / "hf"),
                             "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:                       # the progress lines: a parameter is being written
        if line.startswith("[") and "/" in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = list(tmp_path.glob("jax.tmp-*"))
    assert stale and not out.exists()
    time.sleep(0.1)
    convert_hf_to_jax(str(tmp_path / "hf"), str(out), progress=False)
    assert out.is_dir() and not list(tmp_path.glob("jax.tmp-*"))


def test_failed_conversion_removes_the_parents_it_made(tmp_path, tiny_dict, monkeypatch):
    from ring_jax.checkpoint import ParamWriter

    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")

    def fail(self, key, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ParamWriter, "add", fail)
    with pytest.raises(OSError, match="No space left"):
        convert_hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "a" / "b" / "jax"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_unwritable_output_is_one_line(tmp_path, tiny_dict):
    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")
    (tmp_path / "file").write_text("")
    run = subprocess.run([sys.executable, "-m", "convert", "hf2jax", "--hf-dir", str(tmp_path / "hf"), "--out",
                          str(tmp_path / "file" / "jax")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    out = tmp_path / "file" / "jax"
    assert run.stderr == f"python -m convert hf2jax: error: {out}: {tmp_path / 'file'} is a file, not a folder\n"


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_dict):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: Orbax's writer fails, the command
    says so in one line, and neither the output nor its temporary folder nor its parents remain."""
    import resource
    import signal

    write_random_hf_checkpoint(tmp_path / "hf", tiny_dict, dtype="float32")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    run = subprocess.run([sys.executable, "-m", "convert", "hf2jax", "--hf-dir", str(tmp_path / "hf"), "--out",
                          str(tmp_path / "new" / "jax"), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=small_files)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr[-3000:]
    assert run.stderr.startswith("python -m convert hf2jax: error: ") and "File too large" in run.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf"]
