"""The flags that every command line shares (`python -m ring_jax generate|chat`, `python -m
ring_jax.job`): the model, its mesh and the generation settings, parsed and checked by argparse so
that a bad value is one line naming the flag.

One --mesh default everywhere (`build_mesh`): every device of the run, the experts split over as
many as divide them and the rest as data replicas (one device: no split).
"""

from __future__ import annotations

import argparse
import math
import os

from ring_jax.quantization import METHODS
from ring_jax.sampling import GenerationConfig


def integer(minimum: int):
    """An argparse type: an int of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    return parse


positive_int = integer(1)


def number(low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a float in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if (not math.isfinite(value) or not (value > low if low_open else value >= low)
                or (high is not None and value > high)):
            bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value
    return parse


def folder(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no folder at {text}" if not os.path.exists(text) else f"{text} is not a folder")
    return text


def mesh_sizes(text: str) -> dict:
    """--mesh data=2,expert=4 -> {"data": 2, "expert": 4} (`ring_jax.sharding.parse_mesh`)."""
    from ring_jax.sharding import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --dtype, --quantize, --mesh, --compilation-cache, --debug."""
    p.add_argument("--model", required=True, type=folder,
                   help="converted folder (python -m convert hf2jax) or HF folder")
    p.add_argument("--tokenizer", type=folder, help="folder with tokenizer.json (default: the model folder)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="parameter dtype (default: as stored)")
    p.add_argument("--quantize", choices=METHODS, help="quantize the weights as they load (docs/FP8.md; default: "
                                                        "as stored)")
    p.add_argument("--mesh", type=mesh_sizes,
                   help="device mesh, e.g. expert=8 or data=2,expert=4,tensor=1 (axes left out: 1; its size is "
                        "the device count of the run; default: expert = every device)")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="keep compiled steps in DIR for later runs (on a shared filesystem for multi-host runs), "
                        "or 'off' (default: $RING_JAX_COMPILATION_CACHE, else ~/.cache/ring_jax/xla)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_generation_flags(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed, --thinking."""
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=number(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), help="in (0, 1]")
    p.add_argument("--seed", type=integer(0), default=0, help="sampling seed")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="the chat template's thinking switch, where the template renders the prompt "
                        "(default: the template's default)")


def generation_config(args: argparse.Namespace, **settings) -> GenerationConfig:
    """The generation flags as a `GenerationConfig`, with `settings` replacing them."""
    flags = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed)
    return GenerationConfig.of(**{**flags, **settings})


def build_mesh(sizes: dict | None, num_experts: int):
    """The mesh of --mesh (sizes from `mesh_sizes`) over every device of every process; without
    sizes, the default: `expert` = the devices' greatest common divisor with num_experts, `data` =
    the rest. A ValueError, naming --mesh, says why it does not fit the run's devices."""
    import jax

    from ring_jax.sharding import make_mesh

    if sizes is None:
        expert = math.gcd(jax.device_count(), num_experts)
        sizes = {"data": jax.device_count() // expert, "expert": expert}
    try:
        return make_mesh(**sizes)
    except ValueError as e:
        given = ','.join(f'{k}={v}' for k, v in sizes.items() if v is not None)
        raise ValueError(f"--mesh {given} does not fit this run's "
                         f"devices: {e}") from None
