"""The Ring-linear-2.0 tokenizer and chat template, without transformers.

What comes from where in a tokenizer folder (the HF layout, docs/SPEC.md §12):

- `tokenizer.json` (required): the BPE model, pre-tokenizer, decoder, added/special tokens and any
  post-processor, read by the `tokenizers` library; `encode` and `decode` are its.
- `tokenizer_config.json` (optional): `bos_token`, `eos_token`, `pad_token` (a string or an
  AddedToken-like dict with "content"), `add_bos_token` / `add_eos_token` (booleans, default false)
  and `chat_template` (a string, or a list of {"name", "template"} dicts of which "default" is used).
- `chat_template.jinja` (optional, the newer HF layout): a chat template that overrides the config's.
- `generation_config.json` (optional): `eos_token_id` (an int or a list), joined to the config's eos
  token in `Tokenizer.eos_token_ids`, the set that stops generation.

For the Ling/Ring-2.0 tokenizer that gives bos `<|startoftext|>` = 156891, pad `<|endoftext|>` = 156892,
eos `<|role_end|>` and generation eos ids (156892, 156895).

Chat templates render as transformers renders them (`apply_chat_template`): an
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
extension, HF's `tojson` filter and the `raise_exception` and `strftime_now` globals. A folder without
any template gets `RING_CHAT_TEMPLATE`, written here from the documented format (see its note).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

RING_CHAT_TEMPLATE = (
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{%- set thinking = 'detailed thinking off' -%}"
    "{%- else -%}"
    "{%- set thinking = 'detailed thinking on' -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{{- raise_exception('the built-in Ring chat template has no tool format') -}}"
    "{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<role>SYSTEM</role>' + messages[0]['content'] + '\\n' + thinking + '<|role_end|>' -}}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<role>SYSTEM</role>' + thinking + '<|role_end|>' -}}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- set roles = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'} -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] not in roles -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<role>' + roles[message['role']] + '</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<role>ASSISTANT</role>' -}}"
    "{%- endif -%}"
)
"""The Ling/Ring-2.0 chat format as a Jinja template, used when a tokenizer folder carries none.

The exact released Ring-linear-2.0 template could not be retrieved here (docs/SPEC.md §14); this one follows
the documented format (docs/SPEC.md §12)::

    <role>SYSTEM</role>{system}\\ndetailed thinking on<|role_end|><role>HUMAN</role>{user}<|role_end|>
    <role>ASSISTANT</role>{assistant}<|role_end|> ... <role>ASSISTANT</role>

(one line; the last `<role>ASSISTANT</role>` only with `add_generation_prompt`). The first message, if
its role is "system", opens the SYSTEM turn and the thinking switch follows it after a newline (the
separator of the later Ling-3.0 template, as third-party renderers of it show; §12 leaves it out); without
one the SYSTEM turn holds the switch alone. The switch is "detailed thinking off" when
`enable_thinking` is false and "detailed thinking on" when it is true or not given. Later system
messages become SYSTEM turns of their own. Roles other than system/user/assistant, and `tools`, raise:
their Ring format is not documented.
"""


class TokenizerError(ValueError):
    """A tokenizer folder whose files are malformed, or a request the tokenizer cannot serve."""


class ChatTemplateError(jinja2.TemplateError):
    """Raised by a chat template through `raise_exception(message)`."""


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens, eos set and chat template of its folder.

    Build one with `load_tokenizer(path)`. Token ids are Python ints; a sequence of T tokens is a
    `list[int]` of length T.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        generation_eos_token_ids: Sequence[int] = (),
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        for field, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"{field} {token!r} is not in the tokenizer's vocabulary")
        ids = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(generation_eos_token_ids)
        self._eos_token_ids = tuple(dict.fromkeys(ids))

    @property
    def bos_token_id(self) -> int | None:
        """Id of `bos_token`, or None when the folder names none."""
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of tokenizer_config's `eos_token`, or None when it names none."""
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Id of `pad_token`, or None when the folder names none."""
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the config's eos, then generation_config's, without repeats."""
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (HF `len(tokenizer)`; the model's embedding may be
        padded larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """Id of one token string (special or not); KeyError if it is not in the vocabulary."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids [T]. With `add_special_tokens`, tokenizer.json's post-processor runs and
        bos / eos are added where `add_bos_token` / `add_eos_token` ask and it has not added them."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._specials(ids, add_special_tokens)

    def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """N texts -> N lists of token ids (unpadded, each of its own length), as `encode`."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [self._specials(e.ids, add_special_tokens) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Token ids [T] (any iterable of ints, numpy / jax arrays included) -> text."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        enable_thinking: bool | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the chat template, as transformers' `apply_chat_template` does.

        messages: [{"role": "system" | "user" | "assistant" | ..., "content": str, ...}, ...].
        The template sees `messages`, `add_generation_prompt`, `tools`, the `bos_token`, `eos_token`
        and `pad_token` strings the folder names (the others stay undefined, as in HF),
        `enable_thinking` when it is not None, and every extra keyword. Returns the prompt string, or
        with `tokenize=True` its token ids [T], encoded without added special tokens (the template
        writes the ones it wants).
        """
        _check_messages(messages)
        if self.chat_template is None:
            raise TokenizerError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json, no "
                "chat_template.jinja, and the built-in one was not asked for)"
            )
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        variables = {name: token for name, token in specials.items() if token is not None}
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        variables.update(kwargs)
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, **variables
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _specials(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if not add_special_tokens:
            return ids
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        if self.add_eos_token and self.eos_token_id is not None and ids[-1:] != [self.eos_token_id]:
            ids = ids + [self.eos_token_id]
        return ids


def _check_messages(messages: Any) -> None:
    """A TokenizerError unless messages is a list of {"role": str, "content": ...} dicts (content a
    string, or absent or None as in a tool call's turn, or a list of parts), said in one line."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f'messages must be a list of {{"role": ..., "content": ...}} dicts, got '
                             f'{type(messages).__name__}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TokenizerError(f'message {i} must be a dict with a "role" string, got {str(m)[:80]}')
        if not isinstance(m.get("content"), (str, list, type(None))):
            raise TokenizerError(f'message {i}: "content" must be a string, got {type(m["content"]).__name__}')


def load_tokenizer(path: str | os.PathLike, default_chat_template: bool = True) -> Tokenizer:
    """Read a tokenizer folder (HF layout, see the module docstring) into a `Tokenizer`.

    default_chat_template: give the tokenizer `RING_CHAT_TEMPLATE` when the folder has no template of
    its own; with False such a tokenizer's `apply_chat_template` raises.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"{path!r} has no tokenizer.json (the HF `tokenizers` file)")
    try:
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    except Exception as e:
        raise TokenizerError(f"{tokenizer_file}: not a valid `tokenizers` file: {e}") from e

    config = _read_json(path, "tokenizer_config.json")
    generation = _read_json(path, "generation_config.json")
    template_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            chat_template = f.read()
    else:
        chat_template = _config_template(config.get("chat_template"))
    if chat_template is None and default_chat_template:
        chat_template = RING_CHAT_TEMPLATE

    return Tokenizer(
        backend,
        bos_token=_token(config, "bos_token"),
        eos_token=_token(config, "eos_token"),
        pad_token=_token(config, "pad_token"),
        add_bos_token=_flag(config, "add_bos_token"),
        add_eos_token=_flag(config, "add_eos_token"),
        chat_template=chat_template,
        generation_eos_token_ids=_eos_ids(generation.get("eos_token_id")),
    )


def _read_json(folder: str, name: str) -> dict:
    """The JSON object in folder/name, or {} when there is no such file."""
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _token(config: dict, field: str) -> str | None:
    value = config.get(field)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(
            f"tokenizer_config.json: {field} must be a string or a dict with a string 'content', "
            f"got {config[field]!r}"
        )
    return value


def _flag(config: dict, field: str) -> bool:
    value = config.get(field, False)
    if not isinstance(value, bool):
        raise TokenizerError(f"tokenizer_config.json: {field} must be true or false, got {value!r}")
    return value


def _config_template(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or the "default" of a list of named ones."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" not in named:
            raise TokenizerError(
                f"tokenizer_config.json: chat_template has no 'default' template (has {sorted(named)})"
            )
        return named["default"]
    raise TokenizerError(
        "tokenizer_config.json: chat_template must be a string or a list of {'name', 'template'} dicts, "
        f"got {type(value).__name__}"
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    ids = [value] if isinstance(value, int) else value
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(
            f"generation_config.json: eos_token_id must be an int or a list of ints, got {value!r}"
        )
    return tuple(ids)


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson` filter: json.dumps keeping non-ASCII text as it is."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """A chat template compiled in transformers' environment."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
