"""Peak host memory of `python -m convert hf2jax` on a synthetic checkpoint, against its size.

Writes a random HF checkpoint (default about 2.7 GB, bf16: Ring-mini's layers, 1024 per expert
and a 32768-token vocabulary, so that the largest stacked tensor is one layer's expert projection),
converts it in a child process (--outputs: as stored, bf16, and/or quantized, fp8), and prints a
table: checkpoint bytes, largest stacked tensor, the child's peak RSS, and the RSS of a child that
only imports the same modules (the baseline the conversion adds to).

    python -m benchmarks.convert_memory [--workdir DIR] [--layers 4] [--experts 64] [--outputs bf16 fp8]
    python -m benchmarks.convert_memory --config configs/ring-flash-linear-2.0.json --layers 2 \
        --experts 256 --vocab 157184 --outputs fp8 --workdir DIR     # Ring-flash's width, 2 layers

With --workdir the folders stay: DIR/hf (the checkpoint) and DIR/jax (the last output).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_peak_rss(code: str) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a fresh Python running `code`. The peak is Linux's VmHWM,
    which starts afresh at exec; getrusage's ru_maxrss would carry this process's RSS at the fork."""
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code + "\nprint([line.split()[1] for line in open('/proc/self/status') "
                          "if line.startswith('VmHWM:')][0])"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return int(out.stdout.split()[-1]) * 1024, time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--outputs", nargs="+", choices=("bf16", "fp8"), default=["bf16"],
                   help="the conversions to run: as stored (bf16), with --quantize fp8 (fp8)")
    args = p.parse_args()

    from ring_jax.io.mapping import tensor_table
    from ring_jax.io.random_checkpoint import write_random_hf_checkpoint
    from ring_jax.config import RingConfig

    with open(args.config) as f:
        config = json.load(f)
    config.update(num_hidden_layers=args.layers, layer_group_size=args.layers, num_experts=args.experts,
                  moe_intermediate_size=1024, vocab_size=args.vocab)
    table = tensor_table(RingConfig.from_hf(config))
    sizes = [2 * len(s.hf_names) * int.__mul__(*s.hf_shape[:2]) if len(s.hf_shape) == 2 else 0 for s in table]
    work = args.workdir or tempfile.mkdtemp(prefix="convert-memory-")
    try:
        hf, out = os.path.join(work, "hf"), os.path.join(work, "jax")
        print(f"writing a random checkpoint to {hf} ...", file=sys.stderr)
        write_random_hf_checkpoint(hf, config, dtype="bfloat16", max_shard_bytes=2**30)
        ckpt_bytes = sum(os.path.getsize(os.path.join(hf, n)) for n in os.listdir(hf) if n.endswith(".safetensors"))
        base, _ = child_peak_rss("import ring_jax.io.conversion, ring_jax.checkpoint, orbax.checkpoint")
        gib = 2**30
        print("| output | checkpoint (bf16) | largest stacked tensor | peak RSS | import-only RSS | peak - import | time |")
        print("|---|---|---|---|---|---|---|")
        for output in args.outputs:
            quantize = None if output == "bf16" else output
            shutil.rmtree(out, ignore_errors=True)
            peak, secs = child_peak_rss(f"from ring_jax.io.conversion import convert_hf_to_jax\n"
                                        f"convert_hf_to_jax({hf!r}, {out!r}, progress=False, quantize={quantize!r})")
            print(f"| {output} | {ckpt_bytes / gib:.2f} GiB | {max(sizes) / gib:.3f} GiB | {peak / gib:.2f} GiB | "
                  f"{base / gib:.2f} GiB | {(peak - base) / gib:.2f} GiB ({(peak - base) / max(sizes):.1f}x largest) | "
                  f"{secs:.0f} s |", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
