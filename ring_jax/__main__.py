"""python -m ring_jax {demo, generate, chat}: the command line.

demo      the whole path on a tiny random model, on any machine: a random checkpoint and tokenizer
          in the HF layout -> `convert hf2jax` -> `load_model` -> generate() and chat().
generate  text (or token ids) in, the continuation out, streamed as it comes.
chat      an interactive conversation through the model's chat template, streamed.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

from ring_jax.errors import ArgumentParser, exit_now, run_command

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")   # shipped in the package


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _number(low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a float in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > low if low_open else value >= low) or (high is not None and value > high) or value != value:
            bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value
    return parse


def _folder(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no folder at {text}" if not os.path.exists(text) else f"{text} is not a folder")
    return text


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


def _sampling(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed}


def _load(args):
    import ring_jax

    from ring_jax.sharding import make_mesh

    ring_jax.enable_compilation_cache(args.compilation_cache)
    start = time.perf_counter()
    try:
        mesh = make_mesh(**args.mesh) if args.mesh else None
    except ValueError as e:
        raise SystemExit(f"error: --mesh: {e}") from None
    print(f"[loading {args.model}]", file=sys.stderr, flush=True)
    model = ring_jax.load_model(args.model, dtype=args.dtype, mesh=mesh, verify=True)
    tokenizer = ring_jax.load_tokenizer(args.tokenizer or args.model) if not getattr(args, "prompt_ids", None) else None
    print(f"[loaded {args.model} in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return model, tokenizer


def demo(args) -> int:
    import ring_jax
    from ring_jax.io.conversion import convert_hf_to_jax
    from ring_jax.io.random_checkpoint import write_random_hf_checkpoint, write_small_tokenizer

    with open(args.config) as f:
        config = json.load(f)
    if args.keep and os.path.exists(args.keep):
        raise FileExistsError(f"--keep {args.keep} exists; choose a new folder")
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as work:
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
        print(f"kept: {hf_dir} (HF layout) and {jax_dir} (converted): "
              f"python -m ring_jax chat --model {jax_dir}")
    return 0


def generate(args) -> int:
    import ring_jax
    from ring_jax.chat import text_prompt_ids
    from ring_jax.progress import CompileReport

    model, tokenizer = _load(args)
    compiles = CompileReport()
    if args.prompt_ids:
        prompts = args.prompt_ids
    else:
        prompts = [text_prompt_ids(tokenizer, p, chat=args.chat, enable_thinking=args.thinking) for p in args.prompt]
    eos = None if tokenizer is None else list(tokenizer.eos_token_ids) or None
    if len(prompts) == 1 and tokenizer is not None:   # one prompt: stream the text
        for piece in ring_jax.stream(model, prompts, eos_token_id=eos, **_sampling(args)):
            ids = [t for t in piece[0].tolist() if t not in (eos or [])]
            print(tokenizer.decode(ids, skip_special_tokens=True), end="", flush=True)
        print()
        _say_compiled(compiles)
        return 0
    print(f"[generating for {len(prompts)} prompt(s); a first call compiles]", file=sys.stderr, flush=True)
    tokens = ring_jax.generate(model, prompts, eos_token_id=eos, **_sampling(args))
    _say_compiled(compiles)
    for row in tokens:
        print(row.tolist() if tokenizer is None else tokenizer.decode(
            [t for t in row.tolist() if t not in (eos or [])], skip_special_tokens=True))
    return 0


def chat(args) -> int:
    import ring_jax
    from ring_jax.chat import prompt_ids, room_left
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
            for piece in ring_jax.chat_stream(model, tokenizer, history, enable_thinking=args.thinking,
                                              **dict(_sampling(args), max_new_tokens=min(args.max_new_tokens, room))):
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


def _mesh_sizes(text: str) -> dict:
    from ring_jax.sharding import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p):
    p.add_argument("--model", required=True, type=_folder,
                   help="converted folder (python -m convert hf2jax) or HF folder")
    p.add_argument("--tokenizer", type=_folder, help="folder with tokenizer.json (default: the model folder)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="parameter dtype (default: as stored)")
    p.add_argument("--mesh", type=_mesh_sizes,
                   help="shard over this host's devices, e.g. expert=8 or data=2,expert=4 (default: one device)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=_number(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--top-p", type=_number(0.0, 1.0, low_open=True), help="in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="the chat template's thinking switch, where the template renders the prompt "
                        "(default: the template's default)")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="keep compiled steps in DIR for later runs, or 'off' (default: "
                        "$RING_JAX_COMPILATION_CACHE, else ~/.cache/ring_jax/xla)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m ring_jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    d = sub.add_parser("demo", help="tiny random model: HF layout -> convert -> load -> generate and chat")
    d.add_argument("--config", default=os.path.join(CONFIGS, "tiny.json"), help="HF config.json to instantiate")
    d.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    d.add_argument("--prompt-len", type=int, default=12)
    d.add_argument("--tokens", type=int, default=8, help="tokens to generate")
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
    command = {"demo": demo, "generate": generate, "chat": chat}[args.command]
    return run_command(command, args, f"{parser.prog} {args.command}", getattr(args, "debug", False))


if __name__ == "__main__":
    exit_now(main())
