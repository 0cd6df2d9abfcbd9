"""python -m convert {hf2jax,jax2hf}: checkpoint conversion between HF safetensors and ring_jax
(the command line of `ring_jax.io.conversion`)."""

from ring_jax.errors import ArgumentParser, exit_now, run_command
from ring_jax.flags import folder, number
from ring_jax.quantization import METHODS


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    a = sub.add_parser("hf2jax", help="HF safetensors folder -> ring_jax folder (Orbax)",
                       description="Streams an HF Ring-linear-2.0 checkpoint (model.safetensors or a "
                                   "sharded set with model.safetensors.index.json) into an Orbax checkpoint.")
    a.add_argument("--hf-dir", required=True, type=folder, help="folder with config.json and the safetensors files")
    a.add_argument("--out", required=True, help="new output folder (must not exist)")
    a.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="parameter dtype (default: the config's torch_dtype); expert_bias stays float32")
    a.add_argument("--quantize", choices=METHODS, default=None,
                   help="fp8: projection and expert weights and the LM head as float8_e4m3fn with a float32 "
                        "scale per output channel (docs/FP8.md); default: as stored (a per-channel FP8 HF "
                        "checkpoint stays FP8, a block-scaled one is dequantized)")
    a.add_argument("--quiet", action="store_true", help="no progress lines")
    a.add_argument("--debug", action="store_true", help="show the traceback of an error")
    b = sub.add_parser("jax2hf", help="ring_jax folder -> HF safetensors folder",
                       description="Writes the HF layout back from a folder made by hf2jax (an FP8 one in "
                                   "FBGEMM's FP8 layout: float8_e4m3fn weights and weight_scale [out, 1]).")
    b.add_argument("--model-dir", required=True, type=folder, help="folder written by hf2jax")
    b.add_argument("--out", required=True, help="new output folder (must not exist)")
    b.add_argument("--max-shard-gb", type=number(0, low_open=True), default=5.0,
                   help="largest safetensors shard, in GiB")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if not args.out:
        sub.choices[args.command].error("--out is empty: name a new output folder")
    if args.command == "jax2hf" and int(args.max_shard_gb * 2**30) < 1:
        b.error(f"argument --max-shard-gb: {args.max_shard_gb} GiB is under one byte")
    return run_command(_run, args, f"{parser.prog} {args.command}", args.debug)


def _run(args) -> int:
    from ring_jax.io.conversion import convert_hf_to_jax, convert_jax_to_hf

    if args.command == "hf2jax":
        convert_hf_to_jax(args.hf_dir, args.out, dtype=args.dtype, progress=not args.quiet, quantize=args.quantize)
    else:
        convert_jax_to_hf(args.model_dir, args.out, int(args.max_shard_gb * 2**30), progress=not args.quiet)
    return 0


if __name__ == "__main__":
    exit_now(main())
