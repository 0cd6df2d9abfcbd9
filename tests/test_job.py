"""python -m ring_jax.job on the tiny random model: mixed and bad input lines, outputs equal to
generate(), resume after a crash, clean errors, and a two-process run on localhost."""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import ring_jax
from conftest import ROOT, tiny_model_folder
from ring_jax import job
from ring_jax.job import records

MAX_NEW = 6
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
LINES = [                                            # input line i + 1; run with --chat
    {"id": "a", "prompt": "Hello! How are you today?"},
    {"id": 7, "messages": CHAT},
    {"input_ids": list(range(5, 45))},
    None,                                            # a blank line
    "{not json",
    {"id": "oov", "input_ids": [3, 999]},            # outside the 256-token vocabulary
    {"prompt": "The quick brown fox", "id": None},
    {"input_ids": [2] * 510},                        # 510 + MAX_NEW > max_position_embeddings (512)
    {"id": "neither"},
    {"input_ids": list(range(40, 90))},
    {"prompt": "Linear attention keeps a constant-size recurrent state."},
    {"messages": [{"role": "robot", "content": "beep"}]},
    {"id": [1, 2], "messages": [{"role": "user", "content": "Hi"}]},
    {"input_ids": [100] * 35},
]
GOOD = (1, 2, 3, 7, 10, 11, 13, 14)   # 35 to 56 tokens each: one length bucket (64)
BAD = {5: "invalid JSON", 6: "token id 999 is outside", 8: "has 510 tokens", 9: "needs exactly one of",
       12: "unknown chat role: robot"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the tiny converted model (jax/) and the input file (prompts.jsonl)."""
    work = tmp_path_factory.mktemp("job")
    tiny_model_folder(str(work))
    with open(work / "prompts.jsonl", "w") as f:
        for line in LINES:
            f.write("" if line is None else line if isinstance(line, str) else json.dumps(line))
            f.write("\n")
    return work


def job_args(work, output, *extra) -> list[str]:
    """Batches of 2 sorted in windows of 2 batches, so finished out of input order: lines 3 and 7,
    1 and 2, 14 and 13, 10 and 11. Every batch is [2, 64]: the steps compile once."""
    return ["--model", str(work / "jax"), "--input", str(work / "prompts.jsonl"), "--output", str(output),
            "--batch-size", "2", "--sort-window", "2", "--max-new-tokens", str(MAX_NEW), "--chat", *extra]


def run_job(argv) -> tuple[int, str]:
    """job.main(argv) in this process -> (exit status, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = job.main(argv)
        except SystemExit as e:                    # a bad argument (argparse)
            status = e.code
    return status, stderr.getvalue()


@pytest.fixture(scope="module")
def full_run(work) -> tuple[str, str]:
    """The uninterrupted single-process run, over this process's devices (the default mesh: the
    experts over all of them): (the output file's text, stderr)."""
    status, stderr = run_job(job_args(work, work / "full.jsonl"))
    assert status == 0, stderr
    return (work / "full.jsonl").read_text(), stderr


def test_help():
    with pytest.raises(SystemExit) as exit, contextlib.redirect_stdout(io.StringIO()) as stdout:
        job.main(["--help"])
    assert exit.value.code == 0 and "--coordinator" in stdout.getvalue()


def test_record_cuts_after_eos():
    tokenizer = type("Tokenizer", (), {"decode": lambda self, ids, skip_special_tokens: " ".join(map(str, ids))})()
    item = records.Item(3, {"id": "x"}, (1, 2))
    assert records.record(item, np.array([5, 6, 1, 0, 0]), [1, 9], tokenizer) == {
        "line": 3, "id": "x", "output": "5 6", "output_ids": [5, 6, 1], "num_tokens": 3, "finish_reason": "stop"}
    assert records.record(item, np.array([5, 6, 7]), [1], tokenizer) == {
        "line": 3, "id": "x", "output": "5 6 7", "output_ids": [5, 6, 7], "num_tokens": 3, "finish_reason": "length"}


def test_prompt_lines_with_and_without_chat(work):
    tokenizer = ring_jax.load_tokenizer(str(work / "jax"))
    user = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=True)
    assert records.prompt_ids({"prompt": "Hello!"}, tokenizer, chat=True) == user
    assert records.prompt_ids({"prompt": "Hello!"}, tokenizer, chat=False) == tokenizer.encode("Hello!")
    quiet = tokenizer.apply_chat_template(CHAT, tokenize=True, enable_thinking=False)
    assert records.prompt_ids({"messages": CHAT}, tokenizer, chat=False, thinking=False) == quiet


@pytest.mark.parametrize("flags", [[], ["--chat"], ["--chat", "--no-thinking"]])
def test_generate_and_the_job_render_a_text_prompt_alike(work, flags, monkeypatch):
    """One rule (`ring_jax.chat.text_prompt_ids`): `python -m ring_jax generate --prompt TEXT` and a
    job's {"prompt": TEXT} line give the model the same ids, with --chat and without."""
    from ring_jax.__main__ import main

    seen = []
    monkeypatch.setattr(ring_jax, "stream", lambda model, prompts, *a, **k: seen.append(list(prompts[0])) or iter(()))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["generate", "--model", str(work / "jax"), "--prompt", "Hello!", *flags]) == 0
    tokenizer = ring_jax.load_tokenizer(str(work / "jax"))
    thinking = False if "--no-thinking" in flags else None
    assert seen == [records.prompt_ids({"prompt": "Hello!"}, tokenizer, chat="--chat" in flags, thinking=thinking)]


def prompt_ids(line: dict, tokenizer) -> list[int]:
    """The prompt the job should run for a good input line, with --chat."""
    if "input_ids" in line:
        return line["input_ids"]
    messages = line.get("messages") or [{"role": "user", "content": line["prompt"]}]
    return tokenizer.apply_chat_template(messages, tokenize=True)


def test_outputs_equal_generate_and_bad_lines_are_reported(work, full_run):
    text, stderr = full_run
    records = {r["line"]: r for r in map(json.loads, text.splitlines())}
    assert list(records) == sorted(GOOD + tuple(BAD)) == [i + 1 for i, line in enumerate(LINES) if line is not None]

    for line, message in BAD.items():
        assert message in records[line]["error"]
        assert any(f"input line {line}: " in log and message in log for log in stderr.splitlines())
    assert records[6]["id"] == "oov"

    # generate() on the same prompts, batched differently (pairs in input order), greedily; the
    # model on the job's mesh, so that the batches' compiled steps serve these pairs too
    tokenizer = ring_jax.load_tokenizer(str(work / "jax"))
    model = ring_jax.load_model(str(work / "jax"), mesh=ring_jax.make_mesh())
    eos = list(tokenizer.eos_token_ids)
    for pair in zip(GOOD[::2], GOOD[1::2]):
        prompts = [prompt_ids(LINES[line - 1], tokenizer) for line in pair]
        for line, row in zip(pair, ring_jax.generate(model, prompts, max_new_tokens=MAX_NEW, eos_token_id=eos)):
            want = [int(t) for t in row]
            end = next((i + 1 for i, t in enumerate(want) if t in eos), None)
            got = records[line]
            assert got["output_ids"] == want[:end] and got["num_tokens"] == len(want[:end])
            assert got["finish_reason"] == ("length" if end is None else "stop")
            assert got["output"] == tokenizer.decode([t for t in want[:end] if t not in eos], skip_special_tokens=True)
            assert got.get("id", "absent") == LINES[line - 1].get("id", "absent")
    assert f"{len(records)}/{len(records)} prompts" in stderr


def test_resume_after_crash_equals_full_run(work, full_run):
    text, _ = full_run
    lines = text.splitlines(keepends=True)
    out = work / "resumed.jsonl"
    out.write_text("".join(lines[:3]) + lines[3][:15])  # lines 1-3 and a cut write; 3's batch reruns
    (work / "resumed.jsonl.job.json").write_text((work / "full.jsonl.job.json").read_text())
    status, stderr = run_job(job_args(work, out))
    assert status == 0, stderr
    assert "3 already in" in stderr and "3 batches to run" in stderr
    assert out.read_text() == text
    status, stderr = run_job(job_args(work, out))       # nothing left to do
    assert status == 0 and "0 batches to run" in stderr and out.read_text() == text
    status, stderr = run_job(job_args(work, out, "--max-new-tokens", "5"))   # other settings
    assert status == 2 and "other prompts or settings" in stderr and out.read_text() == text


def test_resume_refuses_a_foreign_output(work):
    out = work / "foreign.jsonl"
    out.write_text('{"line": 2, "output": "?"}\n')
    status, stderr = run_job(job_args(work, out))
    assert status == 2 and "not an output of this input" in stderr
    assert out.read_text() == '{"line": 2, "output": "?"}\n'


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent/model"], "argument --model: no folder at /nonexistent/model"),   # the last wins
    (["--mesh", "data=2,bogus=1"], "argument --mesh:"),
    (["--mesh", "data=64"], "--mesh data=64,tensor=1 does not fit this run's devices"),
    (["--num-processes", "2"], "go with --coordinator"),
    (["--top-p", "1.5"], "argument --top-p: 1.5 is outside (0, 1]"),
    (["--seed", "-1"], "argument --seed: -1 must be >= 0"),
    (["--output", "/"], "Is a directory"),
    (["--output", "/nonexistent/out.jsonl"], "--output '/nonexistent/out.jsonl': no folder /nonexistent"),
])
def test_clean_errors(work, extra, message):
    status, stderr = run_job(job_args(work, work / "never.jsonl", *extra))
    assert status == 2 and message in stderr and stderr.startswith("python -m ring_jax.job: error: ")
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (work / "never.jsonl").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


JOB = [sys.executable, "-m", "ring_jax.job"]
# python -m ring_jax.job with the files it writes capped at a size (the first argument, bytes): a
# write past it fails with EFBIG (Python ignores SIGXFSZ), as on a full disk
JOB_WITH_FILES_CAPPED = [sys.executable, "-c", """import resource, runpy, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
runpy.run_module("ring_jax.job", run_name="__main__", alter_sys=True)
"""]
MESH = ("--mesh", "data=2,expert=2,tensor=1")   # two processes of two CPU devices


def run_two_processes(commands: list[list[str]], timeout: float) -> tuple[list[int], list[str]]:
    """Runs commands[i] + the flags of process i of a two-process run on localhost, each process on
    two CPU devices -> (their exit statuses, their stdout and stderr). Fails when one hangs."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    coordinator = f"localhost:{free_port()}"
    procs = [subprocess.Popen(
        [*command, "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i, command in enumerate(commands)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], logs


def test_two_processes_equal_one(work, full_run, tmp_path):
    """Two processes of two CPU devices each, the batch over data=2 and the experts over expert=2."""
    if jax.default_backend() != "cpu":
        pytest.skip("compares CPU processes with the in-process run, which is on this host's accelerator")
    out = tmp_path / "two.jsonl"
    statuses, logs = run_two_processes([JOB + job_args(work, out, *MESH)] * 2, timeout=300)
    assert statuses == [0, 0], "\n\n".join(logs)
    assert "4 devices in 2 processes" in logs[0] and "[job]" not in logs[1]
    assert out.read_text() == full_run[0]


def test_two_processes_given_different_prompts_stop(work, tmp_path):
    """check_same_everywhere: processes that read different inputs all stop before the output is
    opened or the model loaded."""
    other = tmp_path / "other.jsonl"
    other.write_text((work / "prompts.jsonl").read_text() + '{"prompt": "one more"}\n')
    out = tmp_path / "out.jsonl"
    statuses, logs = run_two_processes(
        [JOB + job_args(work, out, *MESH), JOB + job_args(work, out, *MESH, "--input", str(other))], timeout=60)
    assert statuses == [2, 2], "\n\n".join(logs)
    assert all("error: the processes read different prompts or settings" in log for log in logs), logs
    assert not out.exists() and not (tmp_path / "out.jsonl.job.json").exists()


@pytest.mark.parametrize("limit, message", [
    (0, "error: --output '{out}': [Errno 27] File too large"),    # the sidecar cannot be written
    (100, "error: writing {out}: [Errno 27] File too large"),     # the sidecar can, line 1's record cannot
], ids=["open", "first-write"])
def test_output_failure_on_process_0_stops_every_process(work, tmp_path, limit, message):
    """stop_all: when process 0 cannot write the output (its files capped at `limit` bytes), every
    process stops with a clean error instead of the others waiting for it in a collective. Line 1
    is bad, so its error record is written before the first batch (and the model is not loaded)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("{not json\n" + (work / "prompts.jsonl").read_text())
    out = tmp_path / "out.jsonl"
    argv = job_args(work, out, *MESH, "--input", str(prompts))
    statuses, logs = run_two_processes([JOB_WITH_FILES_CAPPED + [str(limit)] + argv, JOB + argv], timeout=60)
    assert statuses == [2, 2], "\n\n".join(logs)
    assert message.format(out=out) in logs[0] and "Traceback" not in logs[0], logs[0]
    assert "error: process 0 failed to open or write the output" in logs[1], logs[1]
    assert "loaded" not in logs[0]                                 # it stopped before the model
    assert "\n" not in (out.read_text() if out.exists() else "")  # no complete record
