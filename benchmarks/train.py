"""Training steps at a full model shape with random weights, made on the device.

    python -m benchmarks.train [--config configs/ring-mini-linear-2.0.json] [--seq-len 4096]
                               [--batch-size 1] [--lora-rank 16] [--steps 6] [--no-remat] [--profile]

The steps are `ring_jax.train.fit`'s, the path `python -m ring_jax.train` runs, on rows of random
tokens with every position a target, in a temporary run folder (one checkpoint, at the end, outside
the timed steps). The first step's time includes compiling it; the step time is the median of the
others. FLOPs per step count the active parameters:
- forward: 2 x (active non-embedding parameters + head) per token, plus the causal softmax
  attention of the softmax layers (2 x 2 x H x D x T^2 / 2 each);
- backward: the gradients with respect to the activations cost the forward's again, and the
  weight gradients a forward's more for the parameters that train: a LoRA step (whose adapters'
  FLOPs are negligible) counts 2 forwards, an every-parameter step 3;
- remat's second forward of each layer is not counted: it is overhead, which the MFU shows.
MFU against 989 TFLOP/s (H100/H200 SXM dense bf16). --profile adds the GPU kernels of one more step
from a profiler trace, the costliest first.
"""

import argparse
import os
import re
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")    # JAX's default leaves a quarter unused
os.environ.setdefault("RING_JAX_COMPILATION_CACHE", "off")

import jax
import numpy as np

from benchmarks.generate import PEAK_FLOPS, ROOT, make_model, weight_counts
from benchmarks.timing import traced_kernels
from ring_jax import RingConfig, train
from ring_jax.train_data import Batches, Example


def step_flops(config, counts, tokens: int, T: int, every_parameter: bool) -> float:
    """FLOPs of one step over `tokens` tokens in rows of T (module docstring)."""
    per_expert, non_expert, head, n_moe = counts
    active = non_expert + n_moe * config.num_experts_per_tok * per_expert
    n_soft = sum(config.is_softmax_layer(i) for i in range(config.num_decoder_layers))
    attention = n_soft * 2 * 2 * config.num_attention_heads * config.head_dim * T * T / 2 * (tokens // T)
    forward = 2 * (active + head) * tokens + attention
    return forward * (3 if every_parameter else 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16, help="0: every parameter trains")
    parser.add_argument("--steps", type=int, default=6, help="steps run (the first compiles)")
    parser.add_argument("--no-remat", action="store_true")
    parser.add_argument("--profile", action="store_true", help="list the GPU kernels of one step, costliest first")
    args = parser.parse_args(argv)

    config = RingConfig.from_hf(args.config)
    device = jax.devices()[0]
    print(f"device: {device.device_kind}, jax {jax.__version__}, config {os.path.basename(args.config)}", flush=True)
    model = make_model(config)
    counts = weight_counts(config, model)
    T, B = args.seq_len, args.batch_size
    settings = train.TrainConfig(steps=args.steps, batch_size=B, seq_len=T, warmup=0, learning_rate=1e-5,
                                 end_learning_rate=1e-6, lora_rank=args.lora_rank, remat=not args.no_remat,
                                 save_every=args.steps)
    train.prepare(model, settings)
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(0, config.vocab_size, T + 1).astype(np.int32), np.r_[False, np.ones(T, bool)])
                for _ in range(B)]
    with tempfile.TemporaryDirectory() as folder:
        records = train.fit(model, Batches(examples, B, T, 0), settings, train.Run(folder, settings, "random", "random"),
                            say=lambda line: print(line, flush=True))
    first, step = records[0]["seconds"], float(np.median([r["seconds"] for r in records[1:]]))
    flops = step_flops(config, counts, B * T, T, every_parameter=not args.lora_rank)
    trained = f"LoRA rank {args.lora_rank}" if args.lora_rank else "every parameter"
    print()
    print("| tokens per step | trained | remat | first step s (compile incl.) | step s | tokens/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {B} x {T} | {trained} | {'yes' if settings.remat else 'no'} | {first:.1f} | {step:.3f} | "
          f"{B * T / step:,.0f} | {flops / step / 1e12:.0f} | {flops / step / PEAK_FLOPS:.1%} |")
    if args.profile:
        profile(model, settings, examples, step)
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"\npeak device memory: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")


def profile(model, settings, examples, step_seconds: float, top: int = 40) -> None:
    """The GPU kernels of one `train.train_step` (after a warm-up one), from a profiler trace:
    each one's time and count, the costliest `top` first; then their time summed by the Python
    line of the operation that launched them."""
    graphdef, params, frozen = train.split(model, settings)
    tx = train.optimizer(settings)
    # Placed as `fit` places them, so that this is fit's program and JAX reuses its compilation (the
    # compiled HLO names the kernels' operations).
    where = jax.tree.leaves(params)[0].sharding
    opt_state = jax.device_put(tx.init(params), where)
    batch = tuple(jax.device_put(np.stack([part]), where)
                  for part in Batches(examples, settings.batch_size, settings.seq_len, 0).batch(0))
    state = [params, opt_state]
    compiled = train.train_step.lower(graphdef, tx, *state, frozen, batch).compile()

    def step():             # donates the model's own arrays: the model is not used after this
        state[:] = compiled(*state, frozen, batch)[:2]
        jax.block_until_ready(state)
    step()
    kernels = traced_kernels(step, by_op=True)
    total = sum(ns for ns, _ in kernels.values())
    if not total:
        print("\nno GPU kernels in the profiler trace: --profile lists a GPU's")
        return
    sources = op_sources(compiled.as_text())
    print(f"\nGPU time of one step: {total / 1e9:.3f} s ({total / 1e9 / step_seconds:.0%} of the step's wall time)")
    print("| kernel | XLA op | source | ms | calls | share |")
    print("|---|---|---|---|---|---|")
    for (name, op), (ns, count) in sorted(kernels.items(), key=lambda item: -item[1][0])[:top]:
        print(f"| {name[:60]} | {op} | {sources.get(op, '')} | {ns / 1e6:.2f} | {count} | {ns / total:.1%} |")
    lines = {}
    for (name, op), (ns, count) in kernels.items():
        line = sources.get(op, " @ ").split(" @ ")[1].split(" < ")[0] or "(no source)"
        line_ns, line_count = lines.get(line, (0, 0))
        lines[line] = (line_ns + ns, line_count + count)
    print("\nThe same time by the Python line whose operation launched each kernel:")
    print("| source line | ms | kernels | share |")
    print("|---|---|---|---|")
    for line, (ns, count) in sorted(lines.items(), key=lambda item: -item[1][0])[:top]:
        print(f"| {line} | {ns / 1e6:.2f} | {count} | {ns / total:.1%} |")


def op_sources(hlo: str, depth: int = 3) -> dict[str, str]:
    """{instruction name: "op name @ folder/file:line < caller's ..."} of the compiled HLO text's
    instructions (their metadata's innermost `depth` Python frames, from the text's FileNames,
    FileLocations and StackFrames tables): where in the Python a kernel's work comes from."""
    def rows(section, pattern):
        body = re.search(rf"^{section}\n(.*?)\n\n", hlo, re.S | re.M)
        return re.findall(pattern, body.group(1)) if body else []
    files = {int(i): "/".join(name.split("/")[-2:]) for i, name in rows("FileNames", r'(\d+) "([^"]*)"')}
    locations = {int(i): (int(file), line) for i, file, line in
                 rows("FileLocations", r"(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)")}
    frames = {int(i): (int(location), int(parent)) for i, location, parent in
              rows("StackFrames", r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")}

    def where(frame):
        out = []
        while frame in frames and len(out) < depth:
            location, parent = frames[frame]
            file, line = locations.get(location, (0, "?"))
            out.append(f"{files.get(file, '?')}:{line}")
            frame = parent - 1            # the text prints a frame's parent id plus one (0: none)
        return " < ".join(out)

    sources = {}
    for name, meta in re.findall(r"%?([\w.-]+) = [^\n]*?metadata=\{([^}\n]*)\}", hlo):
        fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', meta))
        if "stack_frame_id" in fields:
            op = fields.get("op_name", "").strip('"').split("/")[-1]
            sources[name] = f"{op} @ {where(int(fields['stack_frame_id']))}"
    return sources

if __name__ == "__main__":
    main()
