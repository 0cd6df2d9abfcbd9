"""python -m ring_jax demo: the whole path on a tiny random model, on any machine.

Writes a random checkpoint in the HF layout, converts it with `convert hf2jax`, loads it with
`ring_jax.load_model`, and prints logits and a few greedy tokens.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def demo(args) -> int:
    import jax.numpy as jnp

    import ring_jax
    from convert.hf2jax import convert_hf_to_jax
    from convert.random_hf import write_random_hf_checkpoint

    with open(args.config) as f:
        config = json.load(f)
    with tempfile.TemporaryDirectory() as work:
        hf_dir, jax_dir = os.path.join(work, "hf"), os.path.join(work, "jax")
        write_random_hf_checkpoint(hf_dir, config, dtype=args.dtype, seed=args.seed)
        print(f"1. random HF checkpoint of {os.path.basename(args.config)}: {sorted(os.listdir(hf_dir))}")
        convert_hf_to_jax(hf_dir, jax_dir, progress=False)
        print(f"2. python -m convert hf2jax -> {sorted(os.listdir(jax_dir))}")
        model = ring_jax.load_model(jax_dir)
        c = model.config
        print(f"3. load_model: {c.num_decoder_layers} layers {''.join('S' if t == 'softmax' else 'L' for t in c.layer_types)}"
              f" (L linear, S softmax), {c.num_experts} experts top-{c.num_experts_per_tok}, {model.dtype}")
        prompt = np.random.default_rng(args.seed).integers(0, c.vocab_size, size=(1, args.prompt_len))
        start = time.time()
        logits = model(prompt)
        print(f"4. model(input_ids {list(prompt.shape)}) -> logits {list(logits.shape)} {logits.dtype} "
              f"in {time.time() - start:.2f} s (compile included); last row[:5] = {np.asarray(logits[0, -1, :5]).round(4)}")
        # Greedy continuation by full forwards over a fixed-length buffer (one compile; causal, so
        # the zeros after position t do not change the logits at t). generate() replaces this.
        total = args.prompt_len + args.tokens
        buf = jnp.zeros((1, total), jnp.int32).at[:, : args.prompt_len].set(prompt)
        for t in range(args.prompt_len, total):
            buf = buf.at[0, t].set(jnp.argmax(model(buf)[0, t - 1]))
        print(f"5. greedy tokens after the prompt: {np.asarray(buf[0, args.prompt_len:]).tolist()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ring_jax", description="ring-jax command line")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="random tiny model: HF layout -> convert -> load -> logits and greedy tokens",
                       description=__doc__)
    d.add_argument("--config", default=os.path.join(CONFIGS, "tiny.json"), help="HF config.json to instantiate")
    d.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    d.add_argument("--prompt-len", type=int, default=12)
    d.add_argument("--tokens", type=int, default=8, help="greedy tokens to add")
    d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
