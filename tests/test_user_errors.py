"""What a user can get wrong reads as one line: command-line arguments (before the model loads),
a missing model folder, a chat that outgrows the context (the session goes on)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_model_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(str(tmp_path_factory.mktemp("user_errors")))


def cli(*args, stdin=None):
    """(exit status, stdout, stderr) of `python -m ring_jax args`."""
    env = dict(os.environ, PYTHONPATH=ROOT, RING_JAX_COMPILATION_CACHE="off")
    run = subprocess.run([sys.executable, "-m", "ring_jax", *args], input=stdin, capture_output=True, text=True,
                         env=env, timeout=300)
    return run.returncode, run.stdout, run.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1 x"], "argument --prompt-ids: '1 x' is not a list of token ids (integers: '1 2 3')"),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be >= 1"),
    (["--prompt-ids", "1", "--max-new-tokens", "2.5"], "argument --max-new-tokens: '2.5' is not an integer"),
    (["--prompt-ids", "1", "--temperature", "-1"], "argument --temperature: -1 is outside [0, inf)"),
    (["--prompt-ids", "1", "--top-p", "2"], "argument --top-p: 2 is outside (0, 1]"),
    (["--prompt-ids", "1", "--top-k", "0"], "argument --top-k: 0 must be >= 1"),
    (["--prompt-ids", "1", "--temperature", "1e400"], "argument --temperature: 1e400 is outside [0, inf)"),
    (["--prompt-ids", "1", "--chat"], "--chat renders text prompts (--prompt) with the chat template, not --prompt-ids"),
])
def test_bad_arguments_are_one_line_before_loading(model_dir, args, message, capsys, monkeypatch):
    import ring_jax.checkpoint
    from ring_jax.__main__ import main

    monkeypatch.setattr(ring_jax.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", model_dir, *args])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and err == f"python -m ring_jax generate: error: {message}\n" and not out, err


def test_library_calls_name_the_argument_of_another_kind(model_dir):
    """A notebook's mistakes in the library's calls: a folder where a model or tokenizer goes, a
    mesh given as its command-line text, settings of the wrong type. Each is named before any
    work; none is an AttributeError from deep inside or a silent wrong answer (a pad id outside
    the vocabulary, or a NaN temperature, gave zeros)."""
    import ring_jax
    from ring_jax import train
    from ring_jax.eval import perplexity

    model = ring_jax.load_model(model_dir)
    with pytest.raises(TypeError, match=r"model must be a ring_jax.RingModel \(ring_jax.load_model\(folder\)\), got str"):
        ring_jax.generate(model_dir, [[1, 2]], max_new_tokens=2)
    with pytest.raises(TypeError, match="model must be a ring_jax.RingModel"):
        perplexity(model_dir, [1, 2, 3])
    with pytest.raises(TypeError, match="model must be a ring_jax.RingModel"):
        train.prepare(model_dir, train.TrainConfig())
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer with a chat template"):
        ring_jax.chat(model, model_dir, [{"role": "user", "content": "Hi"}], max_new_tokens=2)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        ring_jax.load_model(model_dir, mesh="expert=8")
    for settings, error, message in (
            (dict(eos_token_id="x"), TypeError, "eos_token_id must be a token id or a list of them, got 'x'"),
            (dict(stop="abc"), TypeError, "stop must be a list of token-id lists, got 'abc'"),
            (dict(stop=[[1, "a"]]), TypeError, "stop must be a list of token-id lists"),
            (dict(top_k=2.5), TypeError, "top_k must be an integer"),
            (dict(temperature=float("nan")), ValueError, "temperature=nan must be a finite number >= 0"),
            (dict(pad_token_id=999), ValueError, r"pad_token_id=999 is outside the vocabulary \[0, 256\)"),
            (dict(eos_token_id=999), ValueError, r"eos_token_id holds token id 999, outside the vocabulary"),
            (dict(stop=[[1, -1]]), ValueError, r"stop holds token id -1, outside the vocabulary"),
            (dict(temperature="0.5"), TypeError, "temperature must be a number, got '0.5'"),
            (dict(top_p=True), TypeError, "top_p must be a number, got True"),
            (dict(cache_len=5000), ValueError, "cache_len=5000: beyond 4096 it must be a multiple of 4096")):
        with pytest.raises(error, match=message):
            ring_jax.generate(model, [[1, 2]], max_new_tokens=2, **settings)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 1\) != input_ids shape \(1, 2\)"):
        ring_jax.generate(model, np.array([[1, 2]]), max_new_tokens=2, attention_mask=np.ones((2, 1)))
    with pytest.raises(TypeError, match="steps_per_call must be an integer, got 2.5"):
        next(ring_jax.stream(model, [[1, 2]], max_new_tokens=2, steps_per_call=2.5))
    with pytest.raises(ValueError, match="input_ids must be .* or a list of token-id lists"):
        ring_jax.generate(model, [1, [2, 3]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"rectangular \[batch, seq_len\]"):
        model([[1, 2], [3]])
    with pytest.raises(ValueError, match="warmup: batch_sizes must be a list of integers >= 1, got 2"):
        ring_jax.warmup(model, batch_sizes=2)
    with pytest.raises(ValueError, match="dtype must be bfloat16, float32 or float16, got 'int32'"):
        ring_jax.load_model(model_dir, dtype=np.int32)
    want = ring_jax.generate(model, [[1, 2]], max_new_tokens=2)
    # numpy integers and Python ints in an object array are the same settings and ids
    assert np.array_equal(ring_jax.generate(model, np.array([[1, 2]], object), max_new_tokens=np.int64(2)), want)
    assert ring_jax.generate(model, [[1, 2]], max_new_tokens=2, stop=[np.array([3, 4])], eos_token_id=[5]).shape == (1, 2)


def test_missing_model_and_bad_values_found_late_are_one_line(tmp_path, model_dir):
    code, _, err = cli("chat", "--model", str(tmp_path / "nowhere"))
    assert (code, err) == (2, f"python -m ring_jax chat: error: argument --model: no folder at {tmp_path / 'nowhere'}\n")
    code, _, err = cli("generate", "--model", str(tmp_path), "--prompt-ids", "1")     # a folder, but no model
    assert code == 2 and err.splitlines()[-1] == f"python -m ring_jax generate: error: no config.json at {tmp_path}/config.json"
    assert "Traceback" not in err
    code, _, err = cli("generate", "--model", model_dir, "--prompt-ids", "1 999")     # past the vocabulary
    assert code == 2 and err.splitlines()[-1].startswith("python -m ring_jax generate: error: prompt 0 holds token id 999")
    code, _, err = cli("generate", "--model", model_dir, "--prompt-ids", "1 999", "--debug")
    assert code == 1 and "Traceback" in err


def test_chat_keeps_the_session_when_the_context_fills(model_dir):
    """tiny: a context of 512 tokens. Long messages push the oldest out (said on stderr); one that
    cannot fit alone is refused; the session answers the next message, starts over at /reset, and
    ends normally (sampling at a temperature)."""
    long = "x" * 200
    code, out, err = cli("chat", "--model", model_dir, "--max-new-tokens", "8", "--temperature", "0.7",
                         stdin=f"{long}\n{long}\n{long}\n{'y' * 2000}\nshort\n/reset\nHow are you?\n/exit\n")
    assert code == 0 and "Traceback" not in err, err
    assert "[context full: dropped the" in err
    assert "[message not sent: it does not fit in the context of 512 tokens" in err
    assert "[compiled " in err                  # the first reply says what it compiled
    assert out.count("> ") == 8                 # every message was read; the session never ended early


def test_chat_caps_max_new_tokens_to_the_room_left(model_dir):
    import ring_jax
    from ring_jax.chat import prompt_ids, room_left

    model, tokenizer = ring_jax.load_model(model_dir), ring_jax.load_tokenizer(model_dir)
    messages = [{"role": "user", "content": "z" * 300}]
    room = room_left(model, prompt_ids(tokenizer, messages))
    assert 0 < room < 512
    ring_jax.chat(model, tokenizer, messages, max_new_tokens=512)              # capped, not an error
    with pytest.raises(ValueError, match="fills the context"):
        ring_jax.chat(model, tokenizer, [{"role": "user", "content": "z" * 2000}])


def test_convert_and_demo_arguments_are_one_line(tmp_path, capsys):
    from convert.__main__ import main as convert_main
    from ring_jax.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        convert_main(["hf2jax", "--hf-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "python -m convert hf2jax: error: the following arguments are required: --out\n"
    (tmp_path / "config.json").write_text("{}")
    for args, message in ((["hf2jax", "--hf-dir", str(tmp_path / "config.json")], f"argument --hf-dir: "
                           f"{tmp_path / 'config.json'} is not a folder"),
                          (["jax2hf", "--model-dir", str(tmp_path), "--max-shard-gb", "1e-10"],
                           "argument --max-shard-gb: 1e-10 GiB is under one byte")):
        with pytest.raises(SystemExit) as exit_:
            convert_main([*args, "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2
        assert capsys.readouterr().err == f"python -m convert {args[0]}: error: {message}\n"
    assert main(["demo", "--keep", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"python -m ring_jax demo: error: --keep {tmp_path} exists; choose a new folder\n"
    (tmp_path / "list.json").write_text("[1]")
    assert main(["demo", "--config", str(tmp_path / "list.json")]) == 2
    assert capsys.readouterr().err == f"python -m ring_jax demo: error: {tmp_path / 'list.json'} holds no JSON object\n"
    small = dict(json.loads(open(os.path.join(ROOT, "configs", "tiny.json")).read()), vocab_size=50)
    (tmp_path / "small.json").write_text(json.dumps(small))
    assert main(["demo", "--config", str(tmp_path / "small.json"), "--keep", str(tmp_path / "kept")]) == 2
    assert "too small for a character-level tokenizer" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["config.json", "list.json", "small.json"]    # nothing kept


def test_demo_keeps_the_tiny_model(tmp_path):
    code, out, _ = cli("demo", "--keep", str(tmp_path / "tiny"), "--tokens", "2")
    assert code == 0 and f"kept: {tmp_path / 'tiny' / 'hf'}" in out
    assert os.path.isfile(tmp_path / "tiny" / "jax" / "ring_jax.json")
    assert os.path.isfile(tmp_path / "tiny" / "hf" / "config.json")


def test_tensorstore_errors_keep_their_cause_in_one_line():
    """TensorStore puts the cause before its annotations (the array's spec, hundreds of characters,
    and source lines): the one-line message drops those, so that the cause survives the shortening."""
    from ring_jax.errors import one_line

    folder = "/tmp/run/jax.tmp-1/orbax_partial.partial_save.orbax-checkpoint-tmp/state/ocdbt.process_0"
    spec = '{"driver":"zarr3","kvstore":{"path":"' + "layers.1.mlp.experts.gate_up_proj/" * 20 + '"},' \
           '"metadata":{"fill_value":true,"shape":[16,64,64]}}'
    error = OSError(f'OUT_OF_RANGE: Error opening "zarr3" driver: Error writing "layers.1.mlp.experts.gate_up_proj/'
                    f'zarr.json" in OCDBT database at local file "{folder}/": Failed writing: "{folder}/d/5ca2": '
                    f"Failed to write 4096 bytes to file 12: File too large [os_error_code='27'] "
                    f"[source locations='tensorstore/kvstore/file/file_key_value_store.cc:210\n"
                    f"tensorstore/driver/zarr3/driver.cc:612'] [tensorstore_spec='{spec}']")
    line = one_line(error)
    assert "\n" not in line and len(line) <= 505
    assert line.endswith("File too large [os_error_code='27']") and "tensorstore_spec" not in line
    long = OSError(str(error).replace(folder, folder * 4))                  # shortened: the cause stays at its end
    line = one_line(long)
    assert " ... " in line and len(line) <= 505 and line.endswith("File too large [os_error_code='27']")


def test_device_out_of_memory_is_one_line_that_says_what_to_change(capsys):
    """XLA's RESOURCE_EXHAUSTED (here the CPU's, a 256 TiB array: more than a process's address
    space) reads as one line with the remedies; any other runtime error is a bug and keeps its
    traceback."""
    import jax
    import jax.numpy as jnp

    from ring_jax.errors import run_command

    def too_big(args):
        jax.jit(lambda: jnp.ones(2 ** 46, jnp.float32))().block_until_ready()

    assert run_command(too_big, None, "prog") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("prog: error: out of device memory (RESOURCE_EXHAUSTED: Out of memory") and "smaller batch" in err

    def bug(args):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        run_command(bug, None, "prog")
