"""ring_jax.train_data on the small BPE tokenizer of test_tokenizer (Ring special tokens and template)."""

import json
import re

import numpy as np
import pytest
from test_tokenizer import CONFIG, make_folder

from ring_jax.tokenizer import load_tokenizer
from ring_jax.train_data import Batches, DataError, Example, examples_from_records, read_examples

CHAT = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello, world!"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_folder(tmp_path_factory.mktemp("tokenizer")))


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def runs(mask):
    """The [start, end) spans where mask is True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


# --- examples


def test_text_example(tok):
    [example] = examples_from_records([{"text": "The quick brown fox.", "id": 7}], tok)
    assert example.tokens.dtype == np.int32 and example.mask.dtype == np.bool_
    assert example.tokens.tolist() == tok.encode("The quick brown fox.")
    assert example.mask.tolist() == [False] + [True] * (len(example.tokens) - 1)


def test_chat_example_masks_exactly_the_assistant_turns(tok):
    [example] = examples_from_records([{"messages": CHAT}], tok)
    assert example.tokens.tolist() == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    spans = runs(example.mask)
    assert [tok.decode(example.tokens[a:b]) for a, b in spans] == ["Hello, world!<|role_end|>", "It is 4.<|role_end|>"]
    unmasked = tok.decode(example.tokens[~example.mask])
    assert unmasked == ("<role>SYSTEM</role>You are kind.\ndetailed thinking on<|role_end|><role>HUMAN</role>Hi"
                        "<|role_end|><role>ASSISTANT</role><role>HUMAN</role>What is 2 + 2?<|role_end|>"
                        "<role>ASSISTANT</role>")


def test_chat_thinking_switch_and_trailing_user_turn(tok):
    chat = CHAT[1:4]  # no system message; ends with a user turn, whose tokens are not targets
    [example] = examples_from_records([{"messages": chat}], tok, enable_thinking=False)
    assert "detailed thinking off" in tok.decode(example.tokens)
    [(a, b)] = runs(example.mask)
    assert tok.decode(example.tokens[a:b]) == "Hello, world!<|role_end|>"
    assert b < len(example.tokens)


def test_bos_not_doubled(tmp_path):
    tok = load_tokenizer(make_folder(tmp_path, config={**CONFIG, "add_bos_token": True}))
    text, chat = examples_from_records([{"text": "<|startoftext|>Hello"}, {"messages": CHAT}], tok)
    assert text.tokens.tolist() == tok.encode("Hello") and text.tokens[1] != tok.bos_token_id
    # The template writes the specials it wants (the Ring one none at the start): nothing is added.
    assert chat.tokens.tolist() == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    assert tok.bos_token_id not in chat.tokens.tolist()


def test_template_with_eos_after_the_turn(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<role>{{ m.role }}</role>{{ m.content }}"
                "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<role>assistant</role>{% endif %}")
    tok = load_tokenizer(make_folder(tmp_path, config={**CONFIG, "chat_template": template}))
    [example] = examples_from_records([{"messages": CHAT[1:3]}], tok)
    assert example.tokens[0] == tok.bos_token_id
    [(a, b)] = runs(example.mask)
    assert tok.decode(example.tokens[a:b]) == "Hello, world!<|role_end|>" and b == len(example.tokens)


def test_read_examples_file(tok, tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [{"text": "Hello again."}, "", "  ", {"messages": CHAT}])
    text, chat = read_examples(path, tok)
    assert text.tokens.tolist() == tok.encode("Hello again.")
    assert len(runs(chat.mask)) == 2


def test_example_checks_shapes():
    with pytest.raises(DataError, match="shapes"):
        Example(np.arange(3), np.ones(2, bool))


# --- errors name the file and line

NOT_PREFIX_STABLE = ("{% for m in messages %}<role>{{ m.role }}</role>"
                     "{% if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}<|role_end|>{% endfor %}"
                     "{% if add_generation_prompt %}<role>assistant</role>{% endif %}")


@pytest.mark.parametrize("line, match", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"id": 1}, 'exactly one of "text" or "messages", got neither'),
    ({"text": "a", "messages": CHAT}, "got 'text' and 'messages'"),
    ({"text": ""}, '"text" is empty'),
    ({"text": 3}, '"text" must be a string'),
    ({"text": "4"}, "1 token"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, "non-empty list"),
    ({"messages": CHAT[:2]}, "no assistant message"),
    ({"messages": [{"role": "tool", "content": "4"}, CHAT[2]]}, "chat template: unknown chat role: tool"),
])
def test_bad_line(tok, tmp_path, line, match):
    path = write_lines(tmp_path / "train.jsonl", [{"text": "Hello."}, "", line, {"text": "Hello."}])
    with pytest.raises(DataError, match=f"train.jsonl, line 3: .*{re.escape(match)}"):
        read_examples(path, tok)


def test_not_utf8(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        read_examples(path, tok)


def test_not_prefix_stable(tmp_path):
    tok = load_tokenizer(make_folder(tmp_path, config={**CONFIG, "chat_template": NOT_PREFIX_STABLE}))
    examples_from_records([{"messages": CHAT[1:3]}], tok)  # one assistant turn, the last: stable
    with pytest.raises(DataError, match="chat.jsonl, line 2: the chat template is not prefix-stable at "
                                        "assistant message 1"):
        examples_from_records([{"messages": CHAT[1:3]}, {"messages": CHAT[1:]}], tok, source="chat.jsonl")


def test_empty_file(tok, tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_examples(write_lines(tmp_path / "train.jsonl", [""]), tok)


# --- batches


def example(tokens, mask):
    return Example(np.array(tokens), np.array(mask, bool))


def test_shift_padding_and_truncation():
    short = example([5, 6, 7, 8], [False, False, True, True])
    long = example(range(10, 20), [False] + [True] * 9)
    batches = Batches([short, long], batch_size=2, seq_len=6, seed=0, pad_id=1)
    tokens, targets, weights = batches.batch(0)
    assert (tokens.dtype, targets.dtype, weights.dtype) == (np.int32, np.int32, np.float32)
    assert tokens.shape == targets.shape == weights.shape == (2, 6)
    rows = {int(t[0]): (t, y, w) for t, y, w in zip(tokens, targets, weights)}
    t, y, w = rows[5]
    assert t.tolist() == [5, 6, 7, 8, 1, 1]
    assert y.tolist() == [6, 7, 8, 1, 1, 1]
    assert w.tolist() == [0, 1, 1, 0, 0, 0]
    t, y, w = rows[10]  # cut to seq_len + 1 = 7 tokens: 6 inputs, 6 next tokens
    assert t.tolist() == [10, 11, 12, 13, 14, 15]
    assert y.tolist() == [11, 12, 13, 14, 15, 16]
    assert w.tolist() == [1] * 6
    assert (y[:-1] == t[1:]).all()
    assert batches.tokens_per_step == 12


def test_deterministic_in_seed_and_step(tok):
    texts = ["Hello.", "Hello, world!", "The lazy dog.", "The quick brown fox.", "It is 4.", "A state."]
    examples = examples_from_records([{"text": t} for t in texts], tok)
    a, b = Batches(examples, 2, 8, seed=3), Batches(examples, 2, 8, seed=3)
    for step in (5, 0, 2):  # any order: a step's batch depends on (seed, step) only
        for x, y in zip(a.batch(step), b.batch(step)):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.batch(0)[0], a.batch(1)[0])
    # Each epoch (3 steps of 2) is a permutation of the examples, in the documented order.
    for epoch in (0, 1):
        rows = np.concatenate([a.indices(s) for s in range(3 * epoch, 3 * epoch + 3)])
        np.testing.assert_array_equal(rows, np.random.default_rng((3, epoch)).permutation(6))
    other = Batches(examples, 2, 8, seed=4)
    assert any(not np.array_equal(a.indices(s), other.indices(s)) for s in range(3))


def test_fewer_examples_than_batch_size():
    one, two = example([1, 2, 3], [False, True, True]), example([4, 5], [False, True])
    batches = Batches([one, two], batch_size=5, seq_len=4, seed=0)
    indices = batches.indices(1)  # positions 5..9: the end of epoch 2, epochs 3 and 4, the start of 5
    assert sorted(indices[1:5].tolist()) == [0, 0, 1, 1]
    tokens, targets, weights = batches.batch(1)
    assert tokens.shape == (5, 4) and weights.sum() == sum(2 if i == 0 else 1 for i in indices)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"seq_len": 0}, "seq_len must be an integer >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"pad_id": 1.5}, "pad_id must be an integer >= 0"),
    ({"examples": []}, "no examples"),
    ({"examples": [example([1, 2, 3], [True, False, False])]}, "none of the 1 examples has a target"),
    ({"examples": [example([1, 2, 3, 4], [False, False, False, True])], "seq_len": 2}, "within its first 3"),
])
def test_batch_errors(kwargs, match):
    settings = {"examples": [example([1, 2], [False, True])], "batch_size": 2, "seq_len": 4, **kwargs}
    with pytest.raises(DataError, match=match):
        Batches(**settings)


def test_bad_step():
    with pytest.raises(DataError, match="step must be an integer >= 0"):
        Batches([example([1, 2], [False, True])], 1, 4).batch(-1)
