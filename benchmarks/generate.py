"""End-to-end generate() at a full model shape with random weights, made on the GPU.

    python -m benchmarks.generate [--config configs/ring-mini-linear-2.0.json]
                                  [--prefill 4096 32768 131008] [--decode-batch 1 8 64] [--quantize fp8]
                                  [--fp8-activations grouped]

The model is `RingModel` with random bf16 weights, or with --quantize fp8 random FP8 weights
(`RingModel.quantize`'s layout, drawn directly: Ring-flash-linear-2.0 does not fit one GPU in
bf16), the same modules and code path as a loaded checkpoint; prefill and decode go through `ring_jax.generate`'s own jitted steps. A prefill figure
is the median of three runs after the first (which compiles: its excess is the compile time), a
decode figure the run after the compiling one; each sits beside its roofline:
- prefill: FLOPs = 2 x active non-embedding parameters per token, 2 x the head's once (only the
  last position's logits) and the causal softmax attention; MFU against 989 TFLOP/s (H100 SXM
  dense bf16), of the wall time of generate()'s prefill (set-up included) and of its GPU time
  alone (kernel durations in a trace, one more call: the difference is host work and idle GPU);
  and the time to first token through `ring_jax.stream` (the prefill plus validation, cache
  set-up and the first sampled token);
- decode: bytes per step = the weights one step reads (every non-expert weight, the head, and the
  expected number of distinct experts that B x top-k picks touch; 1 byte each in FP8) + the KV
  cache and the linear states, over the copy bandwidth measured in the same run.
"""

import argparse
import functools
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# First calls are timed as compiles: no persistent compilation cache unless asked for.
os.environ.setdefault("RING_JAX_COMPILATION_CACHE", "off")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import copy_bandwidth, traced_gpu_ms, traced_kernels
from ring_jax import RingConfig, RingModel, backends
from ring_jax.cache import Cache, cache_bytes, cache_length, init_cache
from ring_jax.generate import prefill, stream
from ring_jax.batching import prefill_steps
from ring_jax.progress import CompileReport
from ring_jax.quantization import METHODS
from pallas_kernels.backend import FP8
from ring_jax.sampling import Sampling, StopRule
from ring_jax.sharding import first_array, model_mesh
from ring_jax.steps import DecodeState, decode_loop, flatten, on_mesh, placer

PEAK_FLOPS = 989e12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(config, seed: int = 0, quantize: str | None = None):
    """The model with random bf16 weights made on the device: norm weights 1, expert biases 0, the
    others normal draws scaled by 1 / sqrt(fan in) (the embedding unscaled); with quantize="fp8",
    the quantized matrices' values N(0, 1) in FP8 and their scales 1 / sqrt(fan in). The model is
    built abstractly and each parameter drawn by a small jitted call per shape, which compiles in
    seconds where jitting the model's own init (every layer's initialisers in one program) takes
    minutes at Ring-flash's depth."""
    def build():
        model = RingModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        return model if quantize is None else model.quantize(quantize)
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
    names = [jax.tree_util.keystr(path) for path in paths]
    fan_in = {name: leaf.shape[-1] for name, leaf in zip(names, leaves) if jnp.dtype(leaf.dtype) == FP8}
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def fill(name, leaf, key):
        if "norm" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "expert_bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        if jnp.dtype(leaf.dtype) == FP8:
            return _normal_fp8(key, leaf.shape)
        if name.replace("_scale", "") in fan_in:
            return jnp.full(leaf.shape, fan_in[name.replace("_scale", "")] ** -0.5, leaf.dtype)
        scale = 1.0 if "word_embeddings" in name or len(leaf.shape) < 2 else leaf.shape[-2] ** -0.5
        return _normal(key, leaf.shape, jnp.dtype(leaf.dtype), scale)

    values = [fill(name, leaf, key) for name, leaf, key in zip(names, leaves, keys)]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), values))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape, dtype, scale):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnums=1)
def _normal_fp8(key, shape):
    """N(0, 1) in FP8, drawn one entry of the leading axis at a time (a stack of every layer's
    experts would not fit the device in float32)."""
    if len(shape) < 3:
        return jax.random.normal(key, shape, jnp.float32).astype(FP8)
    return jax.lax.map(lambda k: jax.random.normal(k, shape[1:], jnp.float32).astype(FP8),
                       jax.random.split(key, shape[0]))


def weight_counts(config, model):
    """(expert params per expert, non-expert params excluding the embedding table, head params,
    MoE layers)."""
    I, hidden = config.moe_intermediate_size, config.hidden_size
    per_expert = 3 * hidden * I
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_decoder_layers))
    head = config.vocab_size * hidden
    embed = config.vocab_size * hidden
    non_expert = total - n_moe * config.num_experts * per_expert - embed - (0 if config.tie_word_embeddings else head)
    return per_expert, non_expert, head, n_moe


def prefill_flops(config, counts, T):
    per_expert, non_expert, head, n_moe = counts
    active = non_expert + n_moe * config.num_experts_per_tok * per_expert
    n_soft = sum(config.is_softmax_layer(i) for i in range(config.num_decoder_layers))
    attention = n_soft * 2 * 2 * config.num_attention_heads * config.head_dim * T * T / 2
    return 2 * active * T + 2 * head + attention   # the head runs on the last position only


def decode_bytes(config, counts, B, context, weight_bytes=2):
    per_expert, non_expert, head, n_moe = counts
    E, k = config.num_experts, config.num_experts_per_tok
    distinct = E * (1 - (1 - 1 / E) ** (B * k))            # expected experts touched per layer
    weights = weight_bytes * (non_expert + head + n_moe * distinct * per_expert)
    cache = cache_bytes(config, B, context)
    return weights + cache["softmax"] + 2 * cache["linear"]   # states are read and written


def run_prefill(model, T, chunk, cache_len, gpu_time=False, repeats=3):
    """Seconds of the first (compiling, if this cache_len is new) prefill of [1, T], its seconds
    tracing, lowering and compiling ({stage: s}), the median of `repeats` more, and with gpu_time the
    GPU time of one more (its kernels' durations in a trace; None without a GPU or gpu_time)."""
    ids = np.random.default_rng(T).integers(0, model.config.vocab_size, (1, T))

    def run():
        state = prefill(model, ids, max_new_tokens=1, eos_token_id=[], prefill_chunk=chunk, cache_len=cache_len).state
        return jax.block_until_ready(state)

    def seconds():
        t = time.perf_counter()
        state = run()
        elapsed = time.perf_counter() - t
        del state                                       # freed outside the timing
        return elapsed

    compiles = CompileReport()
    times = [seconds()]
    stages = compiles.stages()
    times += [seconds() for _ in range(repeats)]
    gpu = traced_gpu_ms(run, 1) * 1e-3 if gpu_time and jax.devices()[0].platform == "gpu" else None
    return times[0], stages, float(np.median(times[1:])), gpu


def time_to_first_token(model, T, chunk, cache_len, repeats=3):
    """Seconds from calling `ring_jax.stream` on a [1, T] prompt to its first token on the host
    (validation, cache set-up, prefill, the first sampled token): the median of `repeats` calls
    after one that compiles."""
    ids = np.random.default_rng(T).integers(0, model.config.vocab_size, (1, T))
    times = []
    for _ in range(1 + repeats):
        t = time.perf_counter()
        next(stream(model, ids, steps_per_call=1, max_new_tokens=1, eos_token_id=[], prefill_chunk=chunk,
                    cache_len=cache_len))
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def run_decode(model, B, context, steps, profile=0):
    """Seconds of the compiling first 8 steps and of `steps` more, on a cache holding `context`
    tokens per sequence (random keys, values and states: the cost of a step does not depend on
    them, and this skips compiling a prefill for every batch size). profile > 0: then the
    `profile` kernels that take most GPU time in 8 more steps, [(name, us per step, launches per
    step)], the first the sum of them all."""
    config, mesh = model.config, model_mesh(model)
    cache = init_cache(config, B, cache_length(context + 8 + steps), np.zeros(B, np.int32), model.dtype, mesh)

    def noise(x, key, scale=1.0):
        return jax.jit(lambda k: scale * jax.random.normal(k, x.shape, x.dtype), out_shardings=x.sharding)(key)

    keys = jax.random.split(jax.random.key(B), 3)
    place = placer(first_array(model).sharding)
    cache = Cache(noise(cache.states, keys[0], 0.01), noise(cache.keys, keys[1]), noise(cache.values, keys[2]),
                  place(np.asarray(cache.start), ("batch",)), place(np.int32(context), ()))
    logits = np.random.default_rng(0).standard_normal((B, config.vocab_size), np.float32)
    state = DecodeState(cache, place(logits, ("batch", "vocab")), place(np.zeros((B, 8 + steps), np.int32), ("batch", None)),
                        place(np.int32(0), ()), place(np.zeros(B, bool), ("batch",)),
                        place(np.full((B, 1), -1, np.int32), ("batch", None)), place(np.uint32(0), ()))
    sampling, rule = Sampling(), StopRule((), (), 0)
    flat = flatten(model)
    with on_mesh(mesh):
        t = time.perf_counter()
        state = decode_loop(*flat, state, np.int32(8), sampling=sampling, rule=rule)
        jax.block_until_ready(state.tokens)
        first = time.perf_counter() - t
        t = time.perf_counter()
        state = decode_loop(*flat, state, np.int32(8 + steps), sampling=sampling, rule=rule)
        jax.block_until_ready(state.tokens)
        elapsed = time.perf_counter() - t
        assert int(state.step) == 8 + steps
        if not profile:
            return first, elapsed, []

        def more():
            jax.block_until_ready(decode_loop(*flat, state, np.int32(16 + steps), sampling=sampling,
                                              rule=rule).tokens)
        kernels = traced_kernels(more)
        total = (sum(ns for ns, _ in kernels.values()), sum(count for _, count in kernels.values()))
        top = [("every kernel", total)] + sorted(kernels.items(), key=lambda item: -item[1][0])[:profile]
    return first, elapsed, [(name, ns / 8e3, count / 8) for name, (ns, count) in top]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "ring-mini-linear-2.0.json"))
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096, 32768, 131008],
                        help="prompt lengths for the prefill table (batch 1)")
    parser.add_argument("--decode-batch", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=4096, help="prompt length before decoding")
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after each decode row, the N kernels that take most of a step's GPU time")
    parser.add_argument("--chunk", type=int, default=None,
                        help="prefill chunk (tokens; default: generate()'s, 32768 for bf16 models on Hopper GPUs, else 4096)")
    parser.add_argument("--quantize", choices=METHODS, default=None, help="FP8 weights (`RingModel.quantize`)")
    parser.add_argument("--fp8-activations", choices=("none", "grouped"), default="none",
                        help="with --quantize fp8: the config switch `fp8_activations` (docs/FP8.md)")
    args = parser.parse_args(argv)
    if args.fp8_activations != "none" and args.quantize is None:
        parser.error("--fp8-activations grouped needs FP8 weights: add --quantize fp8")

    config = RingConfig.from_hf(args.config, fp8_activations=args.fp8_activations)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, config {os.path.basename(args.config)}, "
          f"weights {args.quantize or 'bf16'}", flush=True)
    bw = copy_bandwidth()
    t = time.perf_counter()
    model = make_model(config, quantize=args.quantize)
    jax.block_until_ready(nnx.state(model))
    counts = weight_counts(config, model)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    args.chunk = args.chunk or backends.prefill_chunk(config, model.dtype)
    print(f"random model: {total / 1e9:.2f}B params in {time.perf_counter() - t:.1f} s; copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; prefill chunk {args.chunk}", flush=True)

    print("\n| prefill tokens | first call s (compile incl.) | of it trace / lower / compile s | s (median of 3) | "
          "tokens/s | TFLOP/s | MFU | GPU s | MFU of GPU s | time to first token s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    # One cache length for every prompt: the prefill step compiles once.
    cache_len = cache_length(max((sum(prefill_steps(T, args.chunk)) for T in args.prefill), default=0) + 1)
    for T in args.prefill:
        first, stages, median, gpu = run_prefill(model, T, args.chunk, cache_len, gpu_time=True)
        flops = prefill_flops(config, counts, T)
        ttft = time_to_first_token(model, T, args.chunk, cache_len)
        on_gpu = "- | - |" if gpu is None else f"{gpu:.3f} | {flops / gpu / PEAK_FLOPS:.1%} |"
        print(f"| {T} | {first:.2f} | {stages['trace']:.1f} / {stages['lower']:.1f} / {stages['compile']:.1f} | {median:.3f} | {T / median:,.0f} | {flops / median / 1e12:.0f} | "
              f"{flops / median / PEAK_FLOPS:.1%} | {on_gpu} {ttft:.3f} |", flush=True)

    print("\n| decode batch | context | first 8 steps s (compile incl.) | ms/step | tokens/s | roofline tokens/s | % |")
    print("|---|---|---|---|---|---|---|")
    for B in args.decode_batch:
        first, second, kernels = run_decode(model, B, args.context, args.steps, args.profile)
        step = second / args.steps
        roof = B / (decode_bytes(config, counts, B, args.context + 8 + args.steps, 1 if args.quantize else 2) / bw)
        print(f"| {B} | {args.context} | {first:.2f} | {step * 1e3:.2f} | {B / step:,.0f} | {roof:,.0f} | "
              f"{B / step / roof:.0%} |", flush=True)
        for name, us, count in kernels:
            print(f"|   {us:8.1f} us/step | {count:5.1f} launches/step | {name[:100]} |", flush=True)

    stats = jax.devices()[0].memory_stats() or {}
    print(f"\npeak device memory: {stats.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
