"""A random-weight HF checkpoint of any config, written with the real layout (docs/SPEC.md §9).

For demos, tests and benchmarks: the weights are N(0, 1) / sqrt(fan_in) for projections, N(0, 1)
for embeddings, 1 + 0.1 N(0, 1) for norms and 0.05 N(0, 1) (float32) for the expert bias. Written
one tensor at a time. `write_small_tokenizer` adds a character-level BPE tokenizer with the Ring
special tokens that fits a small vocabulary (the released tokenizer has 157184 entries).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from ring_jax.io.mapping import tensor_table
from ring_jax.io.safetensors_io import write_hf_weights
from ring_jax.config import RingConfig


def write_random_hf_checkpoint(folder: str, config: dict, *, dtype="bfloat16", seed: int = 0,
                               max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json (torch_dtype = dtype) and random weights for `config` into folder."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    config = dict(config, torch_dtype=np_dtype.name)
    table = tensor_table(RingConfig.from_hf(config))
    layout, kinds = {}, {}
    for spec in table:
        for name in spec.hf_names:
            layout[name] = (np.float32 if spec.float32 else np_dtype, spec.hf_shape)
            kinds[name] = spec
    rng = np.random.default_rng(seed)

    def read(name):
        dtype, shape = layout[name]
        x = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("expert_bias"):
            x *= 0.05
        elif len(shape) == 1:
            x = 1 + 0.1 * x
        elif kinds[name].layout != "same":
            x /= np.sqrt(shape[1])
        return x.astype(dtype)

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_hf_weights(folder, layout, read, max_shard_bytes)


# The Ring special tokens, in id order: pad (0) and eos (1) first, as configs/tiny.json has them.
SPECIAL_TOKENS = ("<|endoftext|>", "<|role_end|>", "<|startoftext|>", "<role>", "</role>", "<unk>")
_CORPUS = ("You are a helpful assistant. Hello! How are you today? I am fine, thank you.",
           "Linear attention keeps a constant-size recurrent state; every fifth layer uses softmax.",
           "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > ' \" ? !")


def write_small_tokenizer(folder: str, vocab_size: int) -> None:
    """Writes tokenizer.json (a BPE over printable ASCII, merges learned from a few sentences, up to
    vocab_size entries; other characters become <unk>) and tokenizer_config.json (Ring special
    tokens, no chat template: `ring_jax.load_tokenizer` supplies the Ring one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    alphabet = [chr(c) for c in range(32, 127)] + ["\u2581"]
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size={vocab_size} is too small for a character-level tokenizer")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer)
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|role_end|>", "pad_token": "<|endoftext|>",
                   "add_bos_token": False, "add_eos_token": False}, f, indent=2)
