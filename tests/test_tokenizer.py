"""ring_jax.tokenizer on a small BPE tokenizer trained here, in the Ling/Ring-2.0 layout (docs/SPEC.md §12)."""

import datetime
import json
import os

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ring_jax.tokenizer import RING_CHAT_TEMPLATE, ChatTemplateError, TokenizerError, load_tokenizer

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|role_end|>", "<role>", "</role>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. What is 2 + 2? It is 4.",
    "Linear attention keeps a constant-size recurrent state.",
    "Hello, world! Hello again.",
]
CONFIG = {
    "bos_token": "<|startoftext|>",
    "eos_token": {"content": "<|role_end|>", "lstrip": False, "normalized": False, "special": True},
    "pad_token": "<|endoftext|>",
    "add_bos_token": False,
    "add_eos_token": False,
}
MESSAGES = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]


def _backend() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


BACKEND = _backend()


def make_folder(folder, config=CONFIG, generation=None, jinja=None):
    """Write a tokenizer folder: tokenizer.json, and the other files when given."""
    os.makedirs(folder, exist_ok=True)
    BACKEND.save(os.path.join(folder, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    if generation is not None:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(generation, f)
    if jinja is not None:
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(jinja)
    return folder


@pytest.fixture
def tok(tmp_path):
    return load_tokenizer(make_folder(tmp_path, generation={"eos_token_id": [1, 2]}))


def with_template(tmp_path, template):
    return load_tokenizer(make_folder(tmp_path, config={**CONFIG, "chat_template": template}))


# --- encode / decode / special tokens


TEXTS = ["Hello, world!", "Grüße, 世界 — ça va? 🦊", "  spaces\tand\nnewlines  ", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.batch_encode([text, "fox"]) == [ids, tok.encode("fox")]


def test_special_tokens(tok):
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id] == [0, 1, 2]  # the trainer's order
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    assert tok.vocab_size == BACKEND.get_vocab_size(with_added_tokens=True)
    with pytest.raises(KeyError, match="not in the tokenizer's vocabulary"):
        tok.token_to_id("<|no_such_token|>")
    # special tokens come out whole from encode and go back out of decode
    text = "<role>HUMAN</role>Hi<|role_end|>"
    ids = tok.encode(text)
    assert ids[0] == 3 and ids[-1] == 2 and 4 in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "HUMANHi"
    assert tok.encode("fox") == tok.encode("fox", add_special_tokens=False)  # add_bos/add_eos false


def test_add_bos_eos(tmp_path):
    tok = load_tokenizer(make_folder(tmp_path, config={**CONFIG, "add_bos_token": True, "add_eos_token": True}))
    plain = tok.encode("fox", add_special_tokens=False)
    assert tok.encode("fox") == [0] + plain + [2]
    assert tok.batch_encode(["fox"]) == [[0] + plain + [2]]
    assert tok.encode("<|startoftext|>fox<|role_end|>") == [0] + plain + [2]  # not doubled


@pytest.mark.parametrize(
    "generation, want",
    [(None, (2,)), ({"eos_token_id": 1}, (2, 1)), ({"eos_token_id": [1, 2, 4, 1]}, (2, 1, 4))],
)
def test_eos_token_ids(tmp_path, generation, want):
    assert load_tokenizer(make_folder(tmp_path, generation=generation)).eos_token_ids == want


def test_no_config(tmp_path):
    tok = load_tokenizer(make_folder(tmp_path, config=None, generation={"eos_token_id": [1]}))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, None, None)
    assert tok.eos_token_ids == (1,)
    assert tok.chat_template == RING_CHAT_TEMPLATE


# --- the built-in Ring template


def test_ring_template_multi_turn(tok):
    assert tok.chat_template == RING_CHAT_TEMPLATE
    head = (
        "<role>SYSTEM</role>You are kind.\ndetailed thinking on<|role_end|>"
        "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>Hello!<|role_end|>"
        "<role>HUMAN</role>2+2?<|role_end|>"
    )
    assert tok.apply_chat_template(MESSAGES) == head + "<role>ASSISTANT</role>"
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == head


@pytest.mark.parametrize("enable_thinking, switch", [(True, "on"), (False, "off"), (None, "on")])
def test_ring_template_thinking(tok, enable_thinking, switch):
    user = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(user, enable_thinking=enable_thinking) == (
        f"<role>SYSTEM</role>detailed thinking {switch}<|role_end|>"
        "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    )
    assert tok.apply_chat_template(MESSAGES[:2], enable_thinking=enable_thinking) == (
        f"<role>SYSTEM</role>You are kind.\ndetailed thinking {switch}<|role_end|>"
        "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    )


def test_ring_template_later_system_and_errors(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<role>SYSTEM</role>detailed thinking on<|role_end|><role>HUMAN</role>Hi<|role_end|>"
        "<role>SYSTEM</role>Be brief.<|role_end|>"
    )
    with pytest.raises(ChatTemplateError, match="unknown chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "4"}])
    with pytest.raises(ChatTemplateError, match="no tool format"):
        tok.apply_chat_template(MESSAGES, tools=[{"type": "function"}])
    # a conversation of another shape is named before any template sees it
    for messages, match in (("Hi", "messages must be a list of .* dicts, got str"),
                            ([{"content": "Hi"}], "message 0 must be a dict with a \"role\" string"),
                            ([MESSAGES[0], {"role": "user", "content": 5}], 'message 1: "content" must be a string')):
        with pytest.raises(TokenizerError, match=match):
            tok.apply_chat_template(messages)


def test_tokenize(tmp_path):
    tok = load_tokenizer(make_folder(tmp_path, config={**CONFIG, "add_bos_token": True}))
    text = tok.apply_chat_template(MESSAGES)
    ids = tok.apply_chat_template(MESSAGES, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.token_to_id("<role>") and ids[-1] == tok.token_to_id("</role>")  # no bos added
    assert tok.decode(ids) == text


# --- templates from the folder, rendered as transformers renders them


def test_config_template_variables(tmp_path):
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ add_generation_prompt }}|"
        "{{ enable_thinking is defined }}|{{ tools | tojson }}|{{ extra }}"
    )
    tok = with_template(tmp_path, template)
    specials = "<|startoftext|>|<|role_end|>|<|endoftext|>"
    assert tok.apply_chat_template([], extra=7) == specials + "|True|False|null|7"
    got = tok.apply_chat_template([], add_generation_prompt=False, enable_thinking=False, tools=[{"n": "é"}])
    assert got == specials + '|False|True|[{"n": "é"}]|'


def test_unset_special_tokens_are_undefined(tmp_path):
    tok = load_tokenizer(make_folder(tmp_path, config={"chat_template": "{{ bos_token is defined }}"}))
    assert tok.apply_chat_template([]) == "False"


def test_environment_like_transformers(tmp_path):
    # trim_blocks + lstrip_blocks: block tags on their own (indented) lines leave nothing behind
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "U: {{ m.content }}\n"
        "    {% elif m.role == 'system' %}{% continue %}{% else %}\n"
        "A: {{ m.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{{ messages[0] | tojson(indent=1) }}\n"
        "{{ strftime_now('%Y') }}"
    )
    tok = with_template(tmp_path, template)
    year = datetime.datetime.now().strftime("%Y")
    got = tok.apply_chat_template(MESSAGES)
    assert got == 'U: Hi\nA: Hello!\nU: 2+2?\n{\n "role": "system",\n "content": "You are kind."\n}\n' + year
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox is immutable
        with_template(tmp_path, "{{ messages.append(1) }}").apply_chat_template([])


def test_raise_exception(tmp_path):
    template = "{% if messages | length == 0 %}{{ raise_exception('need a message') }}{% endif %}ok"
    tok = with_template(tmp_path, template)
    assert tok.apply_chat_template(MESSAGES) == "ok"
    with pytest.raises(ChatTemplateError, match="need a message"):
        tok.apply_chat_template([])
    assert issubclass(ChatTemplateError, jinja2.TemplateError)  # as HF raises it


def test_named_templates(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]
    assert with_template(tmp_path / "a", named).apply_chat_template([]) == "default"
    with pytest.raises(TokenizerError, match="no 'default' template"):
        with_template(tmp_path / "b", named[:1])
    with pytest.raises(TokenizerError, match="chat_template must be"):
        with_template(tmp_path / "c", 3)


def test_jinja_file_overrides(tmp_path):
    config = {**CONFIG, "chat_template": "config"}
    folder = make_folder(tmp_path, config=config, jinja="file {{ messages | length }}")
    assert load_tokenizer(folder).apply_chat_template(MESSAGES) == "file 4"


# --- errors


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_no_template(tmp_path):
    tok = load_tokenizer(make_folder(tmp_path), default_chat_template=False)
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
    assert tok.encode("fox")  # the rest still works


@pytest.mark.parametrize(
    "file, content, match",
    [
        ("tokenizer_config.json", {"bos_token": 5}, "bos_token must be a string"),
        ("tokenizer_config.json", {"eos_token": "<|missing|>"}, r"eos_token '<\|missing\|>' is not in the"),
        ("tokenizer_config.json", {"add_bos_token": "yes"}, "add_bos_token must be true or false"),
        ("tokenizer_config.json", [], "expected a JSON object"),
        ("generation_config.json", {"eos_token_id": "2"}, "eos_token_id must be an int or a list"),
        ("generation_config.json", "{not json", "not valid JSON"),
    ],
)
def test_bad_fields(tmp_path, file, content, match):
    folder = make_folder(tmp_path, config=None)
    with open(os.path.join(folder, file), "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(TokenizerError, match=match):
        load_tokenizer(folder)
