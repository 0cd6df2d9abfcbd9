"""chat() and chat_stream(): messages -> chat template -> generate() -> the assistant's text."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ring_jax.generate import generate, stream
from ring_jax.model import check_model
from ring_jax.sampling import GenerationConfig, eos_ids, until_eos


def prompt_ids(tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    """The token ids of `messages` through the chat template, with the generation prompt."""
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(f"tokenizer must be a tokenizer with a chat template (ring_jax.load_tokenizer(folder)), got "
                        f"{type(tokenizer).__name__} {tokenizer!r:.80}")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         enable_thinking=enable_thinking)


def text_prompt_ids(tokenizer, text: str, *, chat: bool, enable_thinking: bool | None = None) -> list[int]:
    """The one rule for a text prompt (`python -m ring_jax generate --prompt`, a job's "prompt"
    line): tokenized as is; with chat=True, one user message through the chat template, as
    `prompt_ids` renders a chat."""
    if chat:
        return prompt_ids(tokenizer, [{"role": "user", "content": text}], enable_thinking)
    return tokenizer.encode(text)


def room_left(model, ids: list[int], max_len: int | None = None) -> int:
    """New tokens that fit after the prompt `ids` (max_len: default the model's
    max_position_embeddings, as generate() takes it)."""
    return (model.config.max_position_embeddings if max_len is None else max_len) - len(ids)


# A reply's length when the call does not say.
REPLY_TOKENS = 512


def _call(model, tokenizer, messages, enable_thinking, config, settings) -> tuple[list[int], GenerationConfig]:
    """(the prompt ids, the call's settings: eos by `eos_ids` with the tokenizer, max_new_tokens
    (default REPLY_TOKENS) capped to the room left in the context)."""
    check_model(model)
    config = GenerationConfig.of(config, **settings)
    ids = prompt_ids(tokenizer, messages, enable_thinking)
    room = room_left(model, ids, config.max_len)
    if room < 1:
        raise ValueError(f"the conversation is {len(ids)} tokens and fills the context of "
                         f"{len(ids) + room}: leave out earlier turns")
    wanted = REPLY_TOKENS if config.max_new_tokens is None else config.max_new_tokens
    return ids, dataclasses.replace(config, max_new_tokens=min(wanted, room),
                                    eos_token_id=eos_ids(model.config, tokenizer, config.eos_token_id))


def chat(model, tokenizer, messages: list[dict], config: GenerationConfig | None = None, *,
         enable_thinking: bool | None = None, **settings) -> str:
    """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content": str}]).

    The prompt is the tokenizer's chat template with the generation prompt (enable_thinking is
    passed to it when not None). config and settings: as for `generate` (max_new_tokens default
    REPLY_TOKENS); generation stops at the tokenizer's end-of-sequence ids (or eos_token_id) or
    after max_new_tokens, capped to the room the context (max_len, default the model's
    max_position_embeddings) leaves after the prompt; a conversation that fills the context is a
    ValueError.
    """
    ids, config = _call(model, tokenizer, messages, enable_thinking, config, settings)
    tokens = generate(model, [ids], config)[0]
    return tokenizer.decode(until_eos(tokens, config.eos_token_id), skip_special_tokens=True)


def chat_stream(model, tokenizer, messages: list[dict], config: GenerationConfig | None = None, *,
                enable_thinking: bool | None = None, steps_per_call: int = 8, **settings) -> Iterator[str]:
    """chat(), yielding the reply's text as it grows (pieces that concatenate to chat()'s result)."""
    ids, config = _call(model, tokenizer, messages, enable_thinking, config, settings)
    yield from text_pieces(tokenizer, stream(model, [ids], config, steps_per_call=steps_per_call),
                           config.eos_token_id)


def text_pieces(tokenizer, pieces: Iterator[np.ndarray], eos) -> Iterator[str]:
    """The text of one sequence's streamed tokens (`stream` pieces [1, n]) up to its first eos, as
    it grows: pieces of text that concatenate to the decoded whole. A piece that ends inside a
    UTF-8 sequence waits for its next bytes."""
    tokens, shown = [], ""
    for piece in pieces:
        tokens += piece[0].tolist()
        text = tokenizer.decode(until_eos(tokens, eos), skip_special_tokens=True)
        if text.endswith("\ufffd"):        # an incomplete UTF-8 sequence: wait for its next bytes
            continue
        if text[len(shown):]:
            yield text[len(shown):]
        shown = text
