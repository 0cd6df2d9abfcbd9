"""Damaged converted folders read as one line that names the damage, from the Python API and the
command lines, and a checksum catches what loads without an error."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ring_jax
from conftest import ROOT, tiny_model_folder
from ring_jax.errors import CheckpointError
from ring_jax.checkpoint import MANIFEST, checksum


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_model_folder(str(tmp_path_factory.mktemp("damaged")))


def largest_data_file(folder):
    return max(glob.glob(os.path.join(folder, "params", "**", "d", "*"), recursive=True), key=os.path.getsize)


def overwrite(path, at=1000, size=4096):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.random.default_rng(0).bytes(size))


def edit_manifest(folder, change):
    path = os.path.join(folder, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


DAMAGE = {
    "data file deleted": lambda d: os.remove(largest_data_file(d)),
    "data file truncated": lambda d: os.truncate(largest_data_file(d), os.path.getsize(largest_data_file(d)) // 2),
    "data file emptied": lambda d: open(largest_data_file(d), "w").close(),
    "4 KiB overwritten": lambda d: overwrite(largest_data_file(d)),
    "Orbax metadata removed": lambda d: os.remove(os.path.join(d, "params", "_METADATA")),
    "params removed": lambda d: shutil.rmtree(os.path.join(d, "params")),
    "manifest cut": lambda d: os.truncate(os.path.join(d, MANIFEST), 100),
    "manifest's dtype removed": lambda d: edit_manifest(d, lambda m: m.pop("dtype")),
    "a manifest entry a number": lambda d: edit_manifest(d, lambda m: m["params"].update(
        {next(iter(m["params"])): 5})),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_damaged_folder_is_one_line(good, tmp_path, name):
    folder = str(tmp_path / "model")
    shutil.copytree(good, folder)
    DAMAGE[name](folder)
    with pytest.raises(CheckpointError) as caught:
        ring_jax.load_model(folder, verify=True)
    message = str(caught.value)
    assert message.startswith(f"damaged or incomplete checkpoint {folder}: ") and message.endswith("; convert it again")
    assert "\n" not in message and len(message) < 400, message


def test_a_changed_value_is_named_by_its_checksum(good, tmp_path):
    """A parameter whose stored values changed but still load (here: the manifest's checksum of one
    parameter off by one, as if its data had changed) is named."""
    import json

    folder = str(tmp_path / "model")
    shutil.copytree(good, folder)
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    manifest["params"]["layers.2.attention.dense.kernel"][2] += 1
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)
    ring_jax.load_model(folder)                                  # not verified: loads
    with pytest.raises(CheckpointError, match="parameter layers.2.attention.dense.kernel does not match its checksum"):
        ring_jax.load_model(folder, verify=True)


def test_missing_manifest_is_named(good, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(good, folder)
    os.remove(os.path.join(folder, MANIFEST))
    with pytest.raises(CheckpointError, match="params/ but no ring_jax.json"):
        ring_jax.load_model(folder)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_host_and_device_checksums_agree(dtype):
    """The checksum written with numpy at conversion is the one computed on the device at load,
    whatever the sharding; one changed element changes it."""
    from ring_jax.checkpoint import device_checksum

    x = np.asarray(np.random.default_rng(1).standard_normal((3, 1000, 24)), dtype)
    want = checksum(x)
    assert int(device_checksum(jnp.asarray(x))) == want
    mesh = jax.make_mesh((8,), ("d",), devices=jax.devices()[:8])
    spread = jax.device_put(jnp.asarray(x), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "d")))
    assert int(device_checksum(spread)) == want
    y = x.copy()
    y[2, 999, 23] = -y[2, 999, 23]
    assert checksum(y) != want


@pytest.mark.parametrize("shape", [(17, 1 << 20), (18, 1 << 20)])       # blocks of 1 row, of 9 rows
def test_device_checksum_of_a_large_array_agrees(shape):
    """An array past 2^24 elements on one CPU device is summed in blocks of its leading axis: the
    host's checksum, with 1-byte elements (FP8)."""
    from ring_jax.checkpoint import device_checksum

    x = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8).view(jnp.float8_e4m3fn)
    assert int(device_checksum(jnp.asarray(x))) == checksum(x)


def test_device_checksum_holds_no_copy_of_its_products():
    """XLA:CPU writes a reduction's operand out before it sums it: the checksum of a 256 MiB FP8
    array must not add the 1 GiB of its uint32 products to the peak memory (a fresh process; the
    peak is reset after a first call, which compiles). The blocks add the array's bits (256 MiB)
    and one block's products (64 MiB)."""
    code = """
import jax.numpy as jnp, numpy as np
from ring_jax.checkpoint import device_checksum
def hwm():
    return [int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]
x = jnp.asarray(np.ones((256, 1 << 20), np.uint8)).view(jnp.float8_e4m3fn)
device_checksum(x).block_until_ready()
open('/proc/self/clear_refs', 'w').write('5')     # the peak RSS starts again from the RSS
before = hwm()
device_checksum(x).block_until_ready()
print(hwm() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 2**29, "the checksum added 512 MiB or more to the peak RSS"


def test_command_lines_say_it_in_one_line(good, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(good, folder)
    os.truncate(largest_data_file(folder), 10)
    env = dict(os.environ, PYTHONPATH=ROOT, RING_JAX_COMPILATION_CACHE="off")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    for command in (["ring_jax", "generate", "--model", folder, "--prompt-ids", "1 2"],
                    ["convert", "jax2hf", "--model-dir", folder, "--out", str(tmp_path / "hf")],
                    ["ring_jax.job", "--model", folder, "--input", str(tmp_path / "prompts.jsonl"),
                     "--output", str(tmp_path / "out.jsonl")]):
        run = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and "damaged or incomplete checkpoint" in run.stderr.splitlines()[-1]
    assert not os.path.exists(tmp_path / "hf")
    assert (tmp_path / "out.jsonl").read_text() == ""          # the job's output, opened to resume: no record
