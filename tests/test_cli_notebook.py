"""The command line (generate, chat, --help) and the notebooks (quickstart, finetune), run end to
end on the tiny random model."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT, tiny_model_folder
from ring_jax.compilation_cache import ENV


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(str(tmp_path_factory.mktemp("cli")))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The CLI's compilation cache, in a folder of this module's (not ~/.cache)."""
    path, before = str(tmp_path_factory.mktemp("xla_cache")), os.environ.get(ENV)
    os.environ[ENV] = path
    yield path
    os.environ[ENV] = before if before is not None else "off"


def ring_jax_cli(*args, stdin=None, log_compiles=False):
    """stdout of `python -m ring_jax args`; with log_compiles, (stdout, stderr) with JAX's logs of
    compilations and persistent-cache hits. Every compilation goes to the cache, however short."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               **({"JAX_LOG_COMPILES": "1"} if log_compiles else {}))
    run = subprocess.run([sys.executable, "-m", "ring_jax", *args], input=stdin, capture_output=True,
                         text=True, env=env, timeout=300, check=True)
    return (run.stdout, run.stderr) if log_compiles else run.stdout


def test_help(capsys):
    """`python -m ring_jax --help` in its own process; the subcommands' in this one."""
    from ring_jax.__main__ import main

    assert "usage" in ring_jax_cli("--help")
    for command in ("generate", "chat", "demo"):
        with pytest.raises(SystemExit, match="0"):
            main([command, "--help"])
        assert "usage" in capsys.readouterr().out


def test_compilation_cache_off_and_unwritable(tmp_path):
    """"off" in any case leaves the cache off; a folder that cannot be made is a warning, not a
    crash; neither touches JAX's setting."""
    from ring_jax import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache("OFF") is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="compilation cache off"):
        assert enable_compilation_cache(str(blocker / "cache")) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_import_turns_the_cache_on_unless_told_off(tmp_path):
    """`import ring_jax` keeps compilations in $XDG_CACHE_HOME/ring_jax/xla by default;
    $RING_JAX_COMPILATION_CACHE=off leaves JAX's cache off."""
    code = "import ring_jax, jax; print(jax.config.jax_compilation_cache_dir)"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    for extra, want in (({"XDG_CACHE_HOME": str(tmp_path)}, str(tmp_path / "ring_jax" / "xla")), ({ENV: "off"}, "None")):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(env, PYTHONPATH=ROOT, **extra))
        assert run.stdout.strip() == want


def test_generate(model_dir, compilation_cache):
    """Token ids and text; the second run of a command loads its steps from the compilation cache
    (chat's command line: tests/test_user_errors.py)."""
    ids = ring_jax_cli("generate", "--model", model_dir, "--prompt-ids", "5 6 7", "--prompt-ids", "8 9",
                       "--max-new-tokens", "4")
    rows = [json.loads(line) for line in ids.strip().splitlines()]
    assert [len(r) for r in rows] == [4, 4]
    # The steps' compilations went to the cache; the same command again loads them.
    assert os.listdir(compilation_cache)
    again, log = ring_jax_cli("generate", "--model", model_dir, "--prompt-ids", "5 6 7", "--prompt-ids", "8 9",
                              "--max-new-tokens", "4", log_compiles=True)
    assert again == ids
    for step in ("prefill_step", "decode_loop"):
        assert f"Persistent compilation cache hit for 'jit_{step}'" in log, log[-2000:]
    text = ring_jax_cli("generate", "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "6")
    assert text.endswith("\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "finetune"])
def test_notebook_runs(name):
    """Every cell runs without an error (the notebooks assert what they show: finetune, that the
    loss falls and the merged model scores as the adapted one)."""
    import nbclient
    import nbformat

    nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    assert not any(o.get("output_type") == "error" for cell in nb.cells for o in cell.get("outputs", []))
