"""Time to the first token in a fresh process, with a cold or a warm persistent compilation cache.

    python -m benchmarks.first_token --cache DIR [--config configs/ring-mini-linear-2.0.json]
                                     [--prompt 4096] [--num-experts N]

The model is `RingModel` with random bf16 weights made on the device first (not timed). Timed: the
first `ring_jax.stream` call on a [1, prompt] prompt up to its first token on the host (tracing,
compiling or loading the compiled steps from DIR, the prefill, the first sampled token), the
seconds it spent tracing, lowering and compiling (`ring_jax.progress.CompileReport`; "compile"
includes reading DIR), a second call (no compile) for comparison, and the rest: the first call
less these stages and the second call (Python work outside the traced functions, and one-time work
at a program's first launch, such as compiling its Mosaic GPU kernels). Run it twice with the same
DIR: the first run (DIR empty) gives the cold figure, the second the warm one. --num-experts shrinks a model that does not fit one GPU (Ring-flash)
for a compile measurement: the programs have the same structure, with smaller expert stacks.
"""

import argparse
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import ring_jax  # noqa: E402
from benchmarks.generate import make_model  # noqa: E402
from ring_jax.progress import CompileReport  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_token_seconds(model, ids) -> float:
    t = time.perf_counter()
    next(ring_jax.stream(model, ids, max_new_tokens=2, steps_per_call=1, eos_token_id=[]))
    return time.perf_counter() - t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--cache", required=True, help="the persistent compilation cache's folder")
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--num-experts", type=int, help="fewer routed experts than the config's")
    args = parser.parse_args(argv)

    cached = os.path.isdir(args.cache) and bool(os.listdir(args.cache))
    ring_jax.enable_compilation_cache(args.cache)
    overrides = {} if args.num_experts is None else {"num_experts": args.num_experts}
    config = ring_jax.RingConfig.from_hf(args.config, **overrides)
    t = time.perf_counter()
    model = make_model(config)
    jax.block_until_ready(nnx.state(model))
    made = time.perf_counter() - t
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt))
    compiles = CompileReport()
    first = first_token_seconds(model, ids)
    programs, stages = compiles.count, compiles.stages()
    second = first_token_seconds(model, ids)
    rest = first - sum(stages.values()) - second
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {os.path.basename(args.config)}"
          f"{'' if args.num_experts is None else f' with {args.num_experts} experts'}; model made in {made:.1f} s")
    print("| prompt | compilation cache | first token s | programs | trace s | lower s | compile s | "
          "rest of the first call s | a second call s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.prompt} | {'warm' if cached else 'cold'} | {first:.2f} | {programs} | {stages['trace']:.1f} | "
          f"{stages['lower']:.1f} | {stages['compile']:.1f} | {rest:.1f} | {second:.3f} |", flush=True)


if __name__ == "__main__":
    main()
