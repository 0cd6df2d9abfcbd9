"""The command line (generate, chat, --help) and the quickstart notebook, run end to end on the
tiny random model."""

import json
import os
import subprocess
import sys

import pytest

from conftest import CONFIGS, ROOT
from convert.hf2jax import convert_hf_to_jax
from convert.random_hf import write_random_hf_checkpoint, write_small_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    with open(os.path.join(CONFIGS, "tiny.json")) as f:
        config = json.load(f)
    write_random_hf_checkpoint(str(work / "hf"), config, dtype="float32")
    write_small_tokenizer(str(work / "hf"), config["vocab_size"])
    convert_hf_to_jax(str(work / "hf"), str(work / "jax"), progress=False)
    return str(work / "jax")


def ring_jax_cli(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "ring_jax", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300, check=True).stdout


def test_help():
    for command in ([], ["generate"], ["chat"], ["demo"]):
        assert "usage" in ring_jax_cli(*command, "--help")


def test_generate_and_chat(model_dir):
    ids = ring_jax_cli("generate", "--model", model_dir, "--prompt-ids", "5 6 7", "--prompt-ids", "8 9",
                       "--max-new-tokens", "4")
    rows = [json.loads(line) for line in ids.strip().splitlines()]
    assert [len(r) for r in rows] == [4, 4]
    text = ring_jax_cli("generate", "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "6")
    assert text.endswith("\n")
    out = ring_jax_cli("chat", "--model", model_dir, "--max-new-tokens", "5", "--temperature", "0.7",
                       stdin="Hello\n/reset\nHow are you?\n/exit\n")
    assert out.count("> ") == 4


@pytest.mark.slow
def test_quickstart_notebook_runs():
    import nbclient
    import nbformat

    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    assert not any(o.get("output_type") == "error" for cell in nb.cells for o in cell.get("outputs", []))
