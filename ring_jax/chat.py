"""chat() and chat_stream(): messages -> chat template -> generate() -> the assistant's text."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ring_jax.generate import generate, stream


def prompt_ids(tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    """The token ids of `messages` through the chat template, with the generation prompt."""
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


def _prompt_and_eos(model, tokenizer, messages, enable_thinking, eos_token_id, max_new_tokens, max_len):
    """(prompt ids, eos ids, max_new_tokens capped to the room left in the context)."""
    ids = prompt_ids(tokenizer, messages, enable_thinking)
    room = room_left(model, ids, max_len)
    if room < 1:
        raise ValueError(f"the conversation is {len(ids)} tokens and fills the context of "
                         f"{len(ids) + room}: leave out earlier turns")
    if eos_token_id is None:
        eos_token_id = list(tokenizer.eos_token_ids) or list(model.config.eos_token_ids)
    return ids, [int(e) for e in np.atleast_1d(eos_token_id)], min(max_new_tokens, room)


def _reply(tokens, eos: list[int]) -> list[int]:
    """The generated ids up to (without) the first end-of-sequence token."""
    tokens = [int(t) for t in tokens]
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[: ends[0]] if ends else tokens


def chat(model, tokenizer, messages: list[dict], *, enable_thinking: bool | None = None,
         max_new_tokens: int = 512, eos_token_id=None, max_len: int | None = None, **generate_kwargs) -> str:
    """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content": str}]).

    The prompt is the tokenizer's chat template with the generation prompt (enable_thinking is
    passed to it when not None); generation stops at the tokenizer's end-of-sequence ids (or
    eos_token_id) or after max_new_tokens, capped to the room the context (max_len, default the
    model's max_position_embeddings) leaves after the prompt; a conversation that fills the
    context is a ValueError. Other keyword arguments go to `generate` (temperature, top_k, top_p,
    seed, ...).
    """
    ids, eos, max_new_tokens = _prompt_and_eos(model, tokenizer, messages, enable_thinking, eos_token_id,
                                               max_new_tokens, max_len)
    tokens = generate(model, [ids], max_new_tokens=max_new_tokens, eos_token_id=eos, max_len=max_len,
                      **generate_kwargs)[0]
    return tokenizer.decode(_reply(tokens, eos), skip_special_tokens=True)


def chat_stream(model, tokenizer, messages: list[dict], *, enable_thinking: bool | None = None,
                max_new_tokens: int = 512, eos_token_id=None, max_len: int | None = None,
                **stream_kwargs) -> Iterator[str]:
    """chat(), yielding the reply's text as it grows (pieces that concatenate to chat()'s result)."""
    ids, eos, max_new_tokens = _prompt_and_eos(model, tokenizer, messages, enable_thinking, eos_token_id,
                                               max_new_tokens, max_len)
    tokens, shown = [], ""
    for piece in stream(model, [ids], max_new_tokens=max_new_tokens, eos_token_id=eos, max_len=max_len,
                        **stream_kwargs):
        tokens += piece[0].tolist()
        text = tokenizer.decode(_reply(tokens, eos), skip_special_tokens=True)
        if text.endswith("\ufffd"):        # an incomplete UTF-8 sequence: wait for its next bytes
            continue
        if text[len(shown):]:
            yield text[len(shown):]
        shown = text
