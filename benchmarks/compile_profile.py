"""Where a fresh process's first call spends its time before the first token: tracing, lowering
(most of it Pallas kernels), XLA's compile passes and autotuning.

    python -m benchmarks.compile_profile [--config configs/ring-mini-linear-2.0.json]
                                         [--prompt 32768] [--top 25] [--num-experts N]

The model is `RingModel` with random bf16 weights (not timed), the persistent compilation cache off.
Timed: the first `ring_jax.stream` call on a [1, prompt] prompt up to its first token, under
Python's profiler and JAX's (host events only). Printed: the stages (`CompileReport`), the Python
functions of JAX, Pallas and this package with the most cumulative time (nested: a caller's time
holds its callees'), and XLA's host events by total time (nested too: a compile pass holds its
sub-passes).
"""

import argparse
import cProfile
import glob
import os
import pstats
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ["RING_JAX_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import ring_jax  # noqa: E402
from benchmarks.generate import make_model  # noqa: E402
from ring_jax.progress import CompileReport  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_SCOPES = ("pallas", "mosaic", "ring_jax", "flax", "interpreters", "jax/_src/pjit", "jax/_src/lax")


def short(file: str) -> str:
    """A source file's path from the repository or from site-packages."""
    return os.path.relpath(file, ROOT) if file.startswith(ROOT) else file.rpartition("site-packages/")[2]


def host_events(trace_dir) -> dict[str, tuple[int, int]]:
    """{event name: (total ns, count)} over the host threads of a JAX profiler trace."""
    from jax.profiler import ProfileData

    events = {}
    data = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    for plane in data.planes:
        if plane.name.startswith("/host"):
            for line in plane.lines:
                for event in line.events:
                    ns, count = events.get(event.name, (0, 0))
                    events[event.name] = (ns + event.duration_ns, count + 1)
    return events


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--prompt", type=int, default=32768, help="prompt tokens")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--num-experts", type=int, help="fewer routed experts than the config's")
    args = parser.parse_args(argv)

    overrides = {} if args.num_experts is None else {"num_experts": args.num_experts}
    config = ring_jax.RingConfig.from_hf(args.config, **overrides)
    model = make_model(config)
    jax.block_until_ready(nnx.state(model))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt))

    compiles, profile = CompileReport(), cProfile.Profile()
    with tempfile.TemporaryDirectory() as trace:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0
        with jax.profiler.trace(trace, profiler_options=options):
            t = time.perf_counter()
            profile.enable()
            next(ring_jax.stream(model, ids, max_new_tokens=2, steps_per_call=1, eos_token_id=[]))
            profile.disable()
            first = time.perf_counter() - t
        events = host_events(trace)
    stages = compiles.stages()

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {os.path.basename(args.config)}, "
          f"prompt {args.prompt}")
    print(f"first token in {first:.1f} s (under both profilers): trace {stages['trace']:.1f} s, lower "
          f"{stages['lower']:.1f} s, XLA compile {stages['compile']:.1f} s\n")

    print("| Python function | cumulative s | calls |\n|---|---|---|")
    rows = [(cumulative, calls, f"{short(file)}:{line} {name}")
            for (file, line, name), (_, calls, _, cumulative, _) in pstats.Stats(profile).stats.items()
            if any(scope in file for scope in PYTHON_SCOPES)]
    for cumulative, calls, where in sorted(rows, reverse=True)[:args.top]:
        print(f"| {where} | {cumulative:.2f} | {calls} |")

    print("\n| XLA host event | total s | count |\n|---|---|---|")
    for name, (ns, count) in sorted(events.items(), key=lambda item: -item[1][0])[:args.top]:
        print(f"| {name[:110]} | {ns / 1e9:.2f} | {count} |")


if __name__ == "__main__":
    main()
