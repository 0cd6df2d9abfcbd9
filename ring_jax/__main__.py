"""python -m ring_jax {demo, generate, chat}: the command line.

demo      the whole path on a tiny random model, on any machine: a random checkpoint and tokenizer
          in the HF layout -> `convert hf2jax` -> `load_model` -> generate() and chat().
generate  text (or token ids) in, the continuation out, streamed as it comes.
chat      an interactive conversation through the model's chat template, streamed.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from ring_jax.errors import ArgumentParser, exit_now, run_command
from ring_jax.flags import add_generation_flags, add_model_flags, positive_int

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")   # shipped in the package


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token ids (integers: '1 2 3')") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more token ids >= 0")
    return ids


def _say_compiled(compiles) -> None:
    """Says on stderr what was compiled since the last time (`ring_jax.progress.CompileReport`)."""
    text = compiles.take()
    if text:
        print(f"[{text}]", file=sys.stderr, flush=True)


def _load(args):
    import ring_jax

    from ring_jax.flags import build_mesh

    ring_jax.enable_compilation_cache(args.compilation_cache)
    start = time.perf_counter()
    mesh = build_mesh(args.mesh, ring_jax.RingConfig.from_hf(args.model).num_experts)
    print(f"[loading {args.model}]", file=sys.stderr, flush=True)
    model = ring_jax.load_model(args.model, dtype=args.dtype, mesh=mesh, verify=True, quantize=args.quantize)
    tokenizer = ring_jax.load_tokenizer(args.tokenizer or args.model) if not getattr(args, "prompt_ids", None) else None
    print(f"[loaded {args.model} in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return model, tokenizer


def demo(args) -> int:
    import ring_jax
    from ring_jax.io.conversion import convert_hf_to_jax
    from ring_jax.io.random_checkpoint import write_random_hf_checkpoint, write_small_tokenizer
    from ring_jax.staging import staged_folder

    ring_jax.RingConfig.from_hf(args.config)                 # a config error names its field, before any work
    with open(args.config) as f:
        config = json.load(f)
    if args.keep and os.path.exists(args.keep):
        raise FileExistsError(f"--keep {args.keep} exists; choose a new folder")
    # --keep: built in a temporary folder beside it and renamed at the end, so a failure keeps nothing
    with (staged_folder(args.keep) if args.keep else tempfile.TemporaryDirectory()) as work:
        hf_dir, jax_dir = os.path.join(work, "hf"), os.path.join(work, "jax")
        write_random_hf_checkpoint(hf_dir, config, dtype=args.dtype, seed=args.seed)
        write_small_tokenizer(hf_dir, config["vocab_size"])
        print(f"1. random HF checkpoint and tokenizer of {os.path.basename(args.config)}: {sorted(os.listdir(hf_dir))}")
        convert_hf_to_jax(hf_dir, jax_dir, progress=False)
        print(f"2. python -m convert hf2jax -> {sorted(os.listdir(jax_dir))}")
        model, tokenizer = ring_jax.load_model(jax_dir), ring_jax.load_tokenizer(jax_dir)
        c = model.config
        print(f"3. load_model: {c.num_decoder_layers} layers {''.join('S' if t == 'softmax' else 'L' for t in c.layer_types)}"
              f" (L linear, S softmax), {c.num_experts} experts top-{c.num_experts_per_tok}, {model.dtype}")
        prompt = np.random.default_rng(args.seed).integers(0, c.vocab_size, size=(1, args.prompt_len))
        logits = model(prompt)
        print(f"4. model(input_ids {list(prompt.shape)}) -> logits {list(logits.shape)} {logits.dtype}; "
              f"last row[:5] = {np.asarray(logits[0, -1, :5]).round(4)}")
        for run in ("compile + run", "run"):
            start = time.perf_counter()
            tokens = ring_jax.generate(model, prompt, max_new_tokens=args.tokens, eos_token_id=[])
            print(f"5. generate(greedy, {args.tokens} tokens) [{run}: {time.perf_counter() - start:.2f} s]: "
                  f"{tokens[0].tolist()}")
        reply = ring_jax.chat(model, tokenizer, [{"role": "user", "content": "Hello!"}],
                              max_new_tokens=args.tokens, temperature=0.8, seed=args.seed)
        print(f"6. chat('Hello!') with the Ring chat template (random weights, so noise): {reply!r}")
    if args.keep:
        hf_dir, jax_dir = os.path.join(args.keep, "hf"), os.path.join(args.keep, "jax")
        print(f"kept: {hf_dir} (HF layout) and {jax_dir} (converted): "
              f"python -m ring_jax chat --model {jax_dir}")
    return 0


def generate(args) -> int:
    import ring_jax
    from ring_jax.chat import text_pieces, text_prompt_ids
    from ring_jax.flags import generation_config
    from ring_jax.progress import CompileReport
    from ring_jax.sampling import eos_ids, until_eos

    model, tokenizer = _load(args)
    compiles = CompileReport()
    if args.prompt_ids:
        prompts = args.prompt_ids
    else:
        prompts = [text_prompt_ids(tokenizer, p, chat=args.chat, enable_thinking=args.thinking) for p in args.prompt]
    eos = eos_ids(model.config, tokenizer)
    settings = generation_config(args, eos_token_id=eos)
    if len(prompts) == 1 and tokenizer is not None:   # one prompt: stream the text
        for text in text_pieces(tokenizer, ring_jax.stream(model, prompts, settings), eos):
            print(text, end="", flush=True)
        print()
        _say_compiled(compiles)
        return 0
    print(f"[generating for {len(prompts)} prompt(s); a first call compiles]", file=sys.stderr, flush=True)
    tokens = ring_jax.generate(model, prompts, settings)
    _say_compiled(compiles)
    for row in tokens:
        print(row.tolist() if tokenizer is None else tokenizer.decode(until_eos(row, eos), skip_special_tokens=True))
    return 0


def chat(args) -> int:
    import ring_jax
    from ring_jax.chat import prompt_ids, room_left
    from ring_jax.flags import generation_config
    from ring_jax.progress import CompileReport

    model, tokenizer = _load(args)
    compiles = CompileReport()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print("Type a message; /reset clears the conversation, /exit (or end of input) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history = list(system)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        history, room = _fit(model, tokenizer, history, len(system), args.thinking, prompt_ids, room_left)
        if room < 1:
            continue
        reply = ""
        try:
            settings = generation_config(args, max_new_tokens=min(args.max_new_tokens, room))
            for piece in ring_jax.chat_stream(model, tokenizer, history, settings, enable_thinking=args.thinking):
                reply += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="", file=sys.stderr)
        print()
        _say_compiled(compiles)
        history.append({"role": "assistant", "content": reply})


def _fit(model, tokenizer, history, keep, thinking, prompt_ids, room_left):
    """(history, the new tokens it leaves room for): the oldest turns after the first `keep`
    messages dropped, and said so, until the prompt leaves room; a last message that does not fit
    on its own is refused (dropped, and room 0)."""
    dropped = 0
    while True:
        room = room_left(model, prompt_ids(tokenizer, history, thinking))
        if room >= 1 or len(history) <= keep + 1:
            break
        del history[keep]                       # the oldest message after the system prompt
        dropped += 1
    if dropped:
        print(f"[context full: dropped the {dropped} oldest message(s)]", file=sys.stderr)
    if room < 1:
        print(f"[message not sent: it does not fit in the context of {model.config.max_position_embeddings} "
              "tokens with the chat template; send a shorter one]", file=sys.stderr)
        history.pop()
    return history, room


def _add_model_args(p):
    add_model_flags(p)
    add_generation_flags(p)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m ring_jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    d = sub.add_parser("demo", help="tiny random model: HF layout -> convert -> load -> generate and chat")
    d.add_argument("--config", default=os.path.join(CONFIGS, "tiny.json"), help="HF config.json to instantiate")
    d.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    d.add_argument("--prompt-len", type=positive_int, default=12)
    d.add_argument("--tokens", type=positive_int, default=8, help="tokens to generate")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--keep", metavar="DIR", help="keep the tiny model in DIR/hf (HF layout) and DIR/jax (converted)")
    g = sub.add_parser("generate", help="continue prompts (streamed for one prompt)")
    _add_model_args(g)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    source.add_argument("--prompt-ids", action="append", type=_token_ids,
                        help="prompt token ids, '1 2 3' (repeat for a batch)")
    g.add_argument("--chat", action="store_true",
                   help="render each prompt as a user message with the chat template (default: the text as is, "
                        "as python -m ring_jax.job takes a \"prompt\" line)")
    c = sub.add_parser("chat", help="interactive chat through the chat template, streamed")
    _add_model_args(c)
    c.add_argument("--system", help="system prompt")
    args = parser.parse_args(argv)
    if args.command == "generate" and args.chat and args.prompt_ids:
        g.error("--chat renders text prompts (--prompt) with the chat template, not --prompt-ids")
    command = {"demo": demo, "generate": generate, "chat": chat}[args.command]
    return run_command(command, args, f"{parser.prog} {args.command}", getattr(args, "debug", False))


if __name__ == "__main__":
    exit_now(main())
