"""Perplexity (`ring_jax.eval`): each token's loss equals the full forward's, through windows and
chunks of the cache; the command line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ring_jax
from conftest import load_config_dict, tiny_model_folder
from ring_jax.eval import main, perplexity, windows


@pytest.fixture(scope="module")
def model():
    return ring_jax.RingModel(ring_jax.RingConfig.from_hf(load_config_dict("tiny.json")), dtype=jnp.float32,
                              rngs=nnx.Rngs(2))


def forward_losses(model, tokens) -> np.ndarray:
    """[n - 1]: the loss of tokens[1:] from one full forward of tokens (float64 log-softmax)."""
    logits = np.asarray(model(np.asarray(tokens)[None])[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


def test_windows_score_every_token_once():
    for n, context, stride in [(40, 16, 8), (40, 16, 16), (17, 16, 5), (5, 16, 8), (100, 32, 1)]:
        spans = windows(n, context, stride)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert sorted(scored) == scored and len(set(scored)) == len(scored)
        # every token but the first, except where windows do not overlap: a window's first token has
        # nothing before it in the window
        unscored = {start for (start, _, _), (_, end, _) in zip(spans[1:], spans) if start == end}
        assert set(scored) == set(range(1, n)) - unscored and (stride < context or len(unscored) == len(spans) - 1)
        assert all(first > start and end - start <= context for start, end, first in spans)
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def test_one_window_equals_the_forward(model):
    """A text within the context, in chunks of 16 through the cache: each token's loss is the full
    forward's (float32, the chunks' left padding included)."""
    tokens = np.random.default_rng(0).integers(0, 256, 45)
    got = perplexity(model, tokens, chunk=16)
    want = forward_losses(model, tokens)
    assert got.tokens == 44 and got.windows == 1 and got.positions.tolist() == list(range(1, 45))
    np.testing.assert_allclose(got.losses, want, rtol=2e-5, atol=2e-5)
    assert got.perplexity == pytest.approx(np.exp(want.mean()), rel=1e-5)


def test_sliding_windows_equal_each_windows_forward(model):
    tokens = np.random.default_rng(1).integers(0, 256, 50)
    got = perplexity(model, tokens, context=20, stride=8, chunk=16)
    want = np.concatenate([forward_losses(model, tokens[start:end])[first - 1 - start:]
                           for start, end, first in windows(50, 20, 8)])
    assert got.windows == len(windows(50, 20, 8)) and got.positions.tolist() == list(range(1, 50))
    skipping = perplexity(model, tokens, context=20, stride=20, chunk=16)     # no overlap: 20 and 40 unscored
    assert skipping.positions.tolist() == [t for t in range(1, 50) if t not in (20, 40)]
    np.testing.assert_allclose(got.losses, want, rtol=2e-5, atol=2e-5)


def test_bad_input_is_named(model):
    with pytest.raises(ValueError, match="n >= 2"):
        perplexity(model, [3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        perplexity(model, [3, 999])
    with pytest.raises(ValueError, match="context=600"):
        perplexity(model, [3, 4, 5], context=600)
    with pytest.raises(ValueError, match="chunk=24"):
        perplexity(model, [3, 4, 5], chunk=24)


def test_command_line(tmp_path, capsys):
    """python -m ring_jax.eval on a converted folder: texts from JSONL, another slope law (another
    loss than the config's), the per-token file; a bad line is one line, before the model loads."""
    folder = tiny_model_folder(str(tmp_path))
    tokenizer = ring_jax.load_tokenizer(folder)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    jsonl, out = tmp_path / "texts.jsonl", tmp_path / "losses.jsonl"
    jsonl.write_text(json.dumps({"input_ids": ids}) + "\n\n" + json.dumps({"text": "Hello there!"}) + "\n")
    assert main(["--model", folder, "--jsonl", str(jsonl), "--slope-law", "engine", "--context", "64",
                 "--chunk", "16", "--losses", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    engine = ring_jax.load_model(folder, slope_law="engine")
    texts = [ids, tokenizer.encode("Hello there!")]
    want = [perplexity(engine, t, context=64, chunk=16) for t in texts]
    total = sum(w.tokens for w in want)
    loss = float(np.concatenate([w.losses for w in want]).mean())
    assert line.startswith(f"{total} tokens in 2 text(s)") and f"loss {loss:.4f}" in line, line
    records = [json.loads(r) for r in out.read_text().splitlines()]
    assert [r["losses"] for r in records] == [pytest.approx(w.losses.tolist(), abs=1e-6) for w in want]
    assert [r["ids"] for r in records] == [[t[p] for p in w.positions] for t, w in zip(texts, want)]
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    assert main(["--model", folder, "--text", str(text), "--context", "32", "--chunk", "16"]) == 0
    # On the command line's default mesh (the experts over the 8 devices), where its compiled step
    # serves this call too; the engine law's results above are the unsharded model's.
    hf = perplexity(ring_jax.load_model(folder, mesh=ring_jax.make_mesh()), tokenizer.encode(text.read_text()),
                    context=32, chunk=16)
    assert hf.windows > 1
    assert capsys.readouterr().out.startswith(f"{hf.tokens} tokens in 1 text(s), {hf.windows} window(s): "
                                              f"loss {hf.loss:.4f}")
    assert abs(hf.loss - perplexity(engine, tokenizer.encode(text.read_text()), context=32, chunk=16).loss) > 1e-4
    jsonl.write_text('{"prompt": "x"}\n')
    assert main(["--model", folder, "--jsonl", str(jsonl)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith('line 1: needs exactly one of "text" and "input_ids"') and "loading" not in err
    jax.clear_caches()


def test_mistakes_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The texts, the window settings and the --losses file are checked before the model loads,
    each mistake in one line naming the file and line."""
    folder = tiny_model_folder(str(tmp_path))
    monkeypatch.setattr(ring_jax, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    jsonl = tmp_path / "texts.jsonl"

    def error(lines, *args):
        jsonl.write_text(lines)
        assert main(["--model", folder, "--jsonl", str(jsonl), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m ring_jax.eval: error: "), err
        return err.strip().removeprefix("python -m ring_jax.eval: error: ")

    ok = json.dumps({"text": "Hello there, how are you?"}) + "\n"
    assert error("\n\n") == f"{jsonl}: no texts (every line is blank)"
    assert error(ok + '{"text": 5}\n') == f'{jsonl} line 2: "text" must be a string, got int'
    assert error('\n{"input_ids": ["1", "2"]}\n') == f'{jsonl} line 2: "input_ids" must be a list of integers'
    assert error('{"input_ids": [1, 300]}\n') == f"{jsonl} line 1: token id 300 is outside the vocabulary [0, 256)"
    assert error(ok, "--context", "16", "--stride", "32") == "stride=32 must be in [1, context=16]"
    assert error(ok, "--losses", str(tmp_path / "no" / "losses.jsonl")).endswith("cannot write a file there")
