"""Progress on long work: a bar where stderr is a terminal, plain lines elsewhere; what a first
call compiled."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import jax
import jax.numpy as jnp

from conftest import ROOT, load_config_dict
from ring_jax.progress import CompileReport, Progress


def test_plain_lines_without_a_terminal(capsys):
    progress = Progress(10, unit="B", in_bytes=True, bar=False)
    progress.update(4, "step one", note="one")
    progress.say("a message")
    progress.update(6, "step two")
    progress.close()
    assert capsys.readouterr().err == "step one\na message\nstep two\n"


def test_a_bar_on_a_terminal(capsys):
    progress = Progress(3, unit="prompt", done=1, bar=True)
    progress.update(2, "not shown", note="12 tokens")
    progress.close()
    err = capsys.readouterr().err
    assert "not shown" not in err and "3/3" in err and "prompt" in err and "12 tokens" in err


def test_compile_report_says_what_compiled():
    x = jnp.ones(7)
    report = CompileReport()
    f = jax.jit(lambda x: x * 3.25 + 1)
    f(x)
    first = report.take()
    f(x)
    assert first.startswith("compiled 1 program(s) in ") and report.take() == ""
    jax.jit(lambda x: x - 2)(x)
    stages = report.stages()
    assert set(stages) == {"trace", "lower", "compile"} and all(s > 0 for s in stages.values())
    assert report.stages() == dict.fromkeys(stages, 0.0)


def test_conversion_shows_a_bar_on_a_terminal(tmp_path):
    """`python -m convert hf2jax` with stderr on a pseudo-terminal draws a tqdm bar (bytes), and
    prints its per-tensor lines when stderr is a pipe."""
    from ring_jax.io.random_checkpoint import write_random_hf_checkpoint

    write_random_hf_checkpoint(str(tmp_path / "hf"), load_config_dict("tiny.json"), dtype="float32")
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "convert", "hf2jax", "--hf-dir", str(tmp_path / "hf"), "--out"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))     # a 120-column terminal
    run = subprocess.run(command + [str(tmp_path / "a")], stderr=follower, stdout=subprocess.DEVNULL, env=env,
                         timeout=300)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:                 # the terminal's other end is closed: everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    terminal = b"".join(chunks).decode(errors="replace")
    assert run.returncode == 0, terminal
    assert "100%" in terminal and "B/s" in terminal and "[    1/" not in terminal, terminal[-2000:]
    piped = subprocess.run(command + [str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=300)
    assert piped.returncode == 0 and "100%" not in piped.stderr and "] " in piped.stderr and " GiB " in piped.stderr
