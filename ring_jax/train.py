"""Fine-tuning with optax: LoRA adapters or every parameter, resumable.

    python -m ring_jax.train --model DIR --data train.jsonl --out RUN [--config train.yaml] [flags]
    python -m ring_jax.train merge --run RUN --out MERGED

The data is JSONL (`ring_jax.train_data`): `text` lines (loss on every token) or chat `messages`
(loss on the assistant turns only). Each step is one AdamW update (`optimizer`: warmup then cosine
decay, global-norm clipping) from the mean gradient of `accumulate` micro-batches of
`batch_size` rows of `seq_len` tokens; each decoder layer is recomputed in the backward pass (remat).

What trains:
- LoRA (`lora_rank` > 0, the default): float32 adapters on the attention projections and the shared
  expert (`ring_jax.lora`); everything else is frozen, the router and its `expert_bias` included.
  Over an FP8 model (an FP8 folder, or `--quantize fp8`) only LoRA trains; `merge` then folds the
  adapters into an unquantized base (`--model` of merge: the bf16 or HF folder).
- Every parameter (`lora_rank` 0) but the routers' `expert_bias`, which steers the selection only
  (no gradient reaches it) and which this trainer does not update by load statistics: the
  selection's balance stays as the checkpoint had it.

A run folder holds `train.json` (the settings), `log.jsonl` (one line per step: loss, gradient
norm, learning rate, target tokens, seconds) and `checkpoints/` (Orbax: the trained parameters and
the optimizer state every `save_every` steps and at the end). Started again on the same folder, a
run resumes from its last checkpoint: the batches depend only on (seed, step), so a run killed and
resumed logs the same losses, bit for bit, as one that was not. `merge` folds a LoRA run's adapters
into the base model and writes a model folder that `load_model`, `generate` and `python -m convert
jax2hf` take.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.custom_derivatives import SymbolicZero
from jax.sharding import NamedSharding, PartitionSpec as P

from ring_jax import lora
from ring_jax.checkpoint import load_model, save_model
from ring_jax.errors import ArgumentParser, exit_now, one_line, run_command
from ring_jax.flags import add_model_flags, build_mesh, integer, number, positive_int
from ring_jax.io.hf import AUX_FILES
from ring_jax.model import check_model
from ring_jax.sharding import first_array, model_mesh
from ring_jax.staging import staged_folder
from ring_jax.steps import on_mesh, placer
from ring_jax.tokenizer import load_tokenizer
from ring_jax.train_data import Batches, read_examples


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of a run (`python -m ring_jax.train --help` says what each does)."""
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 4096
    accumulate: int = 1
    learning_rate: float = 1e-4
    warmup: int = 100
    end_learning_rate: float = 1e-5
    weight_decay: float = 0.0
    clip: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    remat: bool = True
    save_every: int = 100
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.lora_targets, str):                    # "attention,shared_expert", as the flag
            object.__setattr__(self, "lora_targets", [t.strip() for t in self.lora_targets.split(",") if t.strip()])
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "float" and isinstance(value, str):    # YAML reads 1e-4 (no dot) as a string
                with contextlib.suppress(ValueError):
                    value = float(value)
                    object.__setattr__(self, field.name, value)
            if field.type == "int" and (type(value) is not int):
                raise ValueError(f"{field.name} must be an integer, got {value!r}")
            if field.type == "float" and (type(value) not in (int, float) or not math.isfinite(value)):
                raise ValueError(f"{field.name} must be a finite number, got {value!r}")
            if field.type == "bool" and type(value) is not bool:
                raise ValueError(f"{field.name} must be true or false, got {value!r}")
        if (not isinstance(self.lora_targets, (list, tuple)) or not self.lora_targets
                or any(t not in lora.TARGETS for t in self.lora_targets)):
            raise ValueError(f"lora_targets {self.lora_targets!r}: choose from {sorted(lora.TARGETS)}")
        for name in ("steps", "batch_size", "seq_len", "accumulate", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "lora_rank", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup} steps) must be shorter than the run ({self.steps} steps)")
        if not self.learning_rate > 0 or self.end_learning_rate < 0 or self.clip <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate and clip must be > 0, end_learning_rate and weight_decay >= 0")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "lora_targets": list(self.lora_targets)}


def schedule(config: TrainConfig) -> optax.Schedule:
    """The learning rate of each step: linear warmup from 0, then cosine decay to the end rate."""
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup, config.steps,
                                              end_value=config.end_learning_rate)


@functools.cache
def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW on `schedule`, after clipping the gradients' global norm. One object per settings:
    `train_step` takes it as a static argument, so another object would compile the step again."""
    return optax.chain(optax.clip_by_global_norm(config.clip),
                       optax.adamw(schedule(config), weight_decay=config.weight_decay))


def trainable(config: TrainConfig):
    """The NNX filter of the parameters that train."""
    if config.lora_rank:
        return nnx.LoRAParam
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("expert_bias")))


def check_quantized(quantization: str | None, config: TrainConfig) -> None:
    """A quantized model (`quantization`, e.g. "fp8") trains LoRA adapters only: a ValueError otherwise."""
    if quantization is not None and not config.lora_rank:
        raise ValueError(f"an {quantization} model trains LoRA adapters only (lora_rank > 0): its quantized "
                         "weights take no gradient steps; train every parameter of the unquantized model")


def prepare(model, config: TrainConfig) -> None:
    """Readies `model` for training in place: the LoRA adapters."""
    check_model(model)
    check_quantized(model.quantization, config)
    if config.lora_rank:
        lora.attach(model, config.lora_rank, config.lora_alpha, config.lora_targets, seed=config.seed)


def split(model, config: TrainConfig):
    """(graphdef, params, frozen) of `model` (readied by `prepare`) for `train_step`: the parameters
    that train, the rest, and the graph in its training layout: each layer recomputed in the
    backward pass (remat), or without remat every layer unrolled (`RingModel.unroll`). The model
    itself keeps its layout for inference."""
    kept = model.remat, model.unroll
    model.remat, model.unroll = config.remat, not config.remat
    try:
        return nnx.split(model, trainable(config), ...)
    finally:
        model.remat, model.unroll = kept


# Tokens per piece of the loss: the logits exist for this many tokens at a time, whatever the batch
# (a 4096-token row's would be 2.6 GB in float32 at Ring's 157k vocabulary).
LOSS_TOKENS = 2048


def loss(model, tokens, targets, weights, chunk: int | None = None) -> jax.Array:
    """The weighted mean next-token loss (nats): tokens, targets: [B, L] int32; weights: [B, L]
    float32 (0 where a position is not a target). Logits in float32, as the scoring steps, computed
    `chunk` positions of every row at a time (default: LOSS_TOKENS // B), once (`_head_loss`), so
    that their memory is bounded."""
    fn, head = model.head()
    chunk = chunk or max(1, LOSS_TOKENS // tokens.shape[0])
    return _head_loss(fn, chunk, head, model.hidden_states(tokens), targets, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _head_loss(fn, chunk, head, hidden, targets, weights):
    """sum(weights * (logsumexp(logits) - logits[targets])) / max(sum(weights), 1), logits =
    fn(head, hidden): [B, L, vocab]; hidden: [B, L, hidden]; targets, weights: [B, L].

    Its gradients are made in the forward pass, piece by piece (`_head_pieces`): each piece's
    logits are computed once, where autodiff of a loop of pieces would compute them again in the
    backward pass (or keep every piece's); only the hidden states' gradient, [B, L, hidden], and
    the head's, if it trains, wait for the backward pass. They are those of the loss itself
    (cotangent 1), rounded to their dtypes: the backward pass scales them by its cotangent, which
    `train_step` gives as 1 (another one rounds bf16 gradients a second time). weights get no
    gradient (a clear error if asked for one); forward-mode autodiff (jax.jvp) does not go
    through this custom VJP."""
    return _head_pieces(fn, chunk, head, hidden, targets, weights, want=None)[0]


def _head_pieces(fn, chunk, head, hidden, targets, weights, want):
    """(loss, its gradient w.r.t. the head or None, its gradient w.r.t. hidden or None): want is
    None (the loss only), "hidden" or "both"."""
    B, L, _ = hidden.shape
    size = min(chunk, L)
    pad = -L % size
    normalizer = jnp.maximum(jnp.sum(weights), 1.0)
    scale = 1 / normalizer                     # the cotangent of a piece's sum: d loss / d sum

    def pieces(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, (L + pad) // size, size, *x.shape[2:]), 1, 0)

    def piece(carry, part):
        total, d_head = carry
        h, t, w = part                                                               # [B, size, ...]
        if want is None:
            return (total + _cross_entropy(fn(head, h), t, w)[0], d_head), None
        logits, pullback = jax.vjp(fn, head, h)                       # [B, size, V] in the model's dtype
        value, d_logits = _cross_entropy(logits, t, w)
        g_head, g_h = pullback((d_logits * scale).astype(logits.dtype))
        if want == "both":
            d_head = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), d_head, g_head)
        return (total + value, d_head), g_h

    d_head = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), head) if want == "both" else None
    (total, d_head), d_hidden = jax.lax.scan(piece, (jnp.float32(0), d_head),
                                             (pieces(hidden), pieces(targets), pieces(weights)))
    if d_hidden is not None:
        d_hidden = jnp.moveaxis(d_hidden, 0, 1).reshape(B, L + pad, -1)[:, :L]
    if d_head is not None:
        d_head = jax.tree.map(lambda g, w: g.astype(w.dtype), d_head, head)
    return total / normalizer, d_head, d_hidden


def _cross_entropy(logits, targets, weights):
    """(sum(weights * (logsumexp(logits) - logits[targets])), its gradient w.r.t. logits, float32):
    logits [..., V] in the model's dtype, targets and weights [...]; the loss and its gradient are
    computed in float32, as `RingModel.logits` casts them for scoring. The gradient, weights *
    (softmax - one-hot), is written out rather than left to autodiff, whose take_along_axis
    transposes to a scatter: so that it is one elementwise pass over the logits. The targets'
    logits are gathered (one value per position, not a pass over the logits); a target outside
    [0, V) picks 0, as it matches no column of the one-hot. The max and the gather read the
    logits in their dtype (exact), so that only the sum's and the gradient's passes cast them."""
    top = jnp.max(logits, axis=-1).astype(jnp.float32)
    wide = logits.astype(jnp.float32)
    lse = top + jnp.log(jnp.sum(jnp.exp(wide - top[..., None]), axis=-1))        # logsumexp's formula
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="fill", fill_value=0,
                                 wrap_negative_indices=False)[..., 0].astype(jnp.float32)
    value = jnp.sum((lse - picked) * weights)
    target = jnp.arange(logits.shape[-1]) == targets[..., None]
    return value, (jnp.exp(wide - lse[..., None]) - target) * weights[..., None]


def _head_loss_forward(fn, chunk, head, hidden, targets, weights):
    if weights.perturbed:
        raise ValueError("the loss takes no gradient with respect to its weights (the positions' "
                         "weights are data): differentiate with respect to the model's parameters")
    trains_head = any(leaf.perturbed for leaf in jax.tree.leaves(head))
    values = [x.value for x in (hidden, targets, weights)]
    head = jax.tree.map(lambda leaf: leaf.value, head)
    value, d_head, d_hidden = _head_pieces(fn, chunk, head, *values, want="both" if trains_head else "hidden")
    return value, (d_head, d_hidden)


def _head_loss_backward(fn, chunk, residuals, cotangent):
    d_head, d_hidden = residuals
    if isinstance(cotangent, SymbolicZero):
        return None, None, None, None
    scaled = lambda g: (g * cotangent).astype(g.dtype)
    return (None if d_head is None else jax.tree.map(scaled, d_head)), scaled(d_hidden), None, None


_head_loss.defvjp(_head_loss_forward, _head_loss_backward, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(graphdef, tx, params, opt_state, frozen, batch):
    """One update from the micro-batches `batch` = (tokens, targets, weights), each [A, B, L]: the
    mean of their gradients. Returns (params, opt_state, mean loss, gradient global norm)."""
    def gradient(micro_batch):
        return jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p, frozen), *micro_batch))(params)

    def accumulate(total, micro_batch):
        return jax.tree.map(jnp.add, total, gradient(micro_batch)), None

    count = batch[0].shape[0]
    if count == 1:      # no scan of one turn: it would carry a zero-filled accumulator of the gradients
        value, grads = gradient(jax.tree.map(lambda b: b[0], batch))
    else:
        zeros = (jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
        (value, grads), _ = jax.lax.scan(accumulate, zeros, batch)
    value, grads = value / count, jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value, optax.global_norm(grads)


class Run:
    """A run folder: its settings, its log and its checkpoints."""

    def __init__(self, folder: str, config: TrainConfig, model_path: str, data_path: str,
                 quantize: str | None = None):
        self.folder = os.path.abspath(folder)
        self.settings = {"model": os.path.abspath(model_path), "data": os.path.abspath(data_path),
                         "config": config.as_dict()}
        if quantize is not None:                  # the base model quantized as it loads (--quantize)
            self.settings["quantize"] = quantize
        before = read_settings(folder)
        if before is not None:
            changed = [k for k in self.settings["config"] if before["config"].get(k) != self.settings["config"][k]]
            changed += [k for k in ("model", "data", "quantize") if before.get(k) != self.settings.get(k)]
            if changed:
                raise ValueError(f"{folder} holds a run with other settings ({', '.join(changed)}); "
                                 f"resume it with its own or give a new --out")
        elif os.path.isfile(folder):
            raise ValueError(f"{folder} is a file; --out is the run's folder")
        elif os.path.isdir(folder) and os.listdir(folder):
            raise ValueError(f"{folder} holds files but no run (no train.json); give a new or empty folder")

    @functools.cached_property
    def manager(self):
        """The Orbax manager of checkpoints/ (made when first used: it makes the folder)."""
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        return ocp.CheckpointManager(os.path.join(self.folder, "checkpoints"), options=options)

    def begin(self) -> None:
        """Writes the run's settings (train.json), unless it holds them: a run folder is made only
        once its settings are known to work."""
        path = os.path.join(self.folder, "train.json")
        if not os.path.exists(path):
            os.makedirs(self.folder, exist_ok=True)
            with open(path, "w") as f:
                json.dump(self.settings, f, indent=1)

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, "log.jsonl")

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state) -> None:
        import orbax.checkpoint as ocp

        tree = {"params": jax.tree.leaves(params), "opt_state": jax.tree.leaves(opt_state)}
        self.manager.save(step, args=ocp.args.StandardSave(tree))
        self.manager.wait_until_finished()

    def restore(self, step: int, params, opt_state):
        """(params, opt_state) of checkpoint `step`, laid out as the given ones."""
        import orbax.checkpoint as ocp

        target = {"params": jax.tree.leaves(params), "opt_state": jax.tree.leaves(opt_state)}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        try:
            tree = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError as e:          # Orbax's words for another tree or shapes
            raise ValueError(f"{self.folder}: checkpoint {step} does not fit this model and settings (was the run made "
                             f"with another model?): {one_line(e, 200)}") from None
        return (jax.tree.unflatten(jax.tree.structure(params), tree["params"]),
                jax.tree.unflatten(jax.tree.structure(opt_state), tree["opt_state"]))

    def log(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Keeps the log's lines of steps before `step` (a resumed run writes the later ones again;
        a line cut short by a kill is dropped)."""
        if not os.path.exists(self.log_path):
            return
        kept = []
        with open(self.log_path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] < step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        with open(self.log_path, "w") as f:
            f.writelines(kept)


def read_settings(folder: str) -> dict | None:
    """The settings a run folder holds (its train.json), or None if it holds none."""
    path = os.path.join(folder, "train.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a run's settings: {one_line(e)}") from None
    keys = {"model", "data", "config"}
    if not isinstance(settings, dict) or not keys <= set(settings) or not isinstance(settings["config"], dict):
        raise ValueError(f"{path}: not a run's settings (needs {sorted(keys)})")
    return settings


def fit(model, batches: Batches, config: TrainConfig, run: Run, say=print) -> list[dict]:
    """Trains `model` (readied by `prepare`) on `batches` for config.steps steps, resuming from the
    run's last checkpoint. Returns the log records of the steps it ran."""
    tx = optimizer(config)
    graphdef, params, frozen = split(model, config)
    mesh = model_mesh(model)

    def committed(x):
        """x committed to its devices (on the mesh: replicated where it is not laid out over it), as
        the step's outputs are: a step whose operands differ in that from the last one's compiles
        again."""
        where = x.sharding if mesh is None or isinstance(x.sharding, NamedSharding) else NamedSharding(mesh, P())
        return jax.device_put(x, where)

    params, opt_state = jax.tree.map(committed, (params, jax.jit(tx.init)(params)))
    run.begin()
    start = run.latest() or 0
    if start:
        params, opt_state = run.restore(start, params, opt_state)
        say(f"resuming {run.folder} at step {start}")
    run.truncate_log(start)
    place = placer(first_array(model).sharding)
    rate = jax.jit(schedule(config))
    records = []
    with on_mesh(mesh):
        for step in range(start, config.steps):
            micro = [batches.batch(step * config.accumulate + a) for a in range(config.accumulate)]
            batch = tuple(place(np.stack(parts), (None, "batch", None)) for parts in zip(*micro))
            t = time.perf_counter()
            params, opt_state, value, norm = train_step(graphdef, tx, params, opt_state, frozen, batch)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"step {step + 1}: the loss is {value}; the run stops before saving it (a learning "
                                 f"rate too high? damaged weights?)")
            seconds = time.perf_counter() - t
            targets = int(sum(float(np.sum(w)) for _, _, w in micro))
            record = {"step": step, "loss": value, "grad_norm": float(norm), "lr": float(rate(step)),
                      "tokens": targets, "seconds": round(seconds, 4)}
            run.log(record)
            records.append(record)
            say(f"step {step + 1}/{config.steps}  loss {value:.4f}  grad-norm {record['grad_norm']:.3g}  "
                f"lr {record['lr']:.3g}  {targets / seconds:,.0f} target tokens/s")
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                run.save(step + 1, params, opt_state)
    nnx.update(model, params)
    return records


def merge_run(run_folder: str, out: str, model_path: str | None = None, say=print) -> None:
    """Writes the base model of a LoRA run with the adapters of its last checkpoint merged in, and
    the base folder's tokenizer files, to a new model folder `out`."""
    settings = read_settings(run_folder)
    if settings is None:
        raise FileNotFoundError(f"no training run at {run_folder} (no train.json)")
    config = TrainConfig(**settings["config"])
    if not config.lora_rank:
        raise ValueError(f"{run_folder} trained every parameter: its checkpoints hold the model, there are no "
                         f"adapters to merge")
    base = model_path or settings["model"]
    model = load_model(base)
    prepare(model, config)
    run = Run(run_folder, config, settings["model"], settings["data"], settings.get("quantize"))
    step = run.latest()
    if step is None:
        raise ValueError(f"{run_folder} has no checkpoint yet")
    tx = optimizer(config)
    _, params, _ = nnx.split(model, trainable(config), ...)
    params, _ = run.restore(step, params, tx.init(params))
    nnx.update(model, params)
    merged = lora.merge(model)
    with staged_folder(out) as tmp:      # the model and the tokenizer files appear at once
        os.rmdir(tmp)                     # save_model stages its own folder, which must not exist yet
        save_model(model, tmp)
        for name in AUX_FILES:
            if os.path.isfile(os.path.join(base, name)):
                shutil.copy(os.path.join(base, name), tmp)
    say(f"merged {merged} adapted projections of step {step} into {out}")


# ------------------------------------------------------------------------------------ command line
FLAGS = {   # name: (type, help)
    "steps": (positive_int, "optimizer steps"),
    "batch_size": (positive_int, "rows per micro-batch (one example per row)"),
    "seq_len": (positive_int, "tokens per row: longer examples are cut, shorter ones padded"),
    "accumulate": (positive_int, "micro-batches per step (their gradients averaged)"),
    "learning_rate": (number(0, low_open=True), "peak learning rate"),
    "warmup": (integer(0), "steps of linear warmup from 0"),
    "end_learning_rate": (number(0), "learning rate at the end of the cosine decay"),
    "weight_decay": (number(0), "AdamW weight decay"),
    "clip": (number(0, low_open=True), "clip the gradients' global norm to this"),
    "lora_rank": (integer(0), "LoRA rank; 0 trains every parameter"),
    "lora_alpha": (number(0, low_open=True), "LoRA alpha (the update is scaled by alpha / rank)"),
    "save_every": (positive_int, "steps between checkpoints"),
    "seed": (integer(0), "data order and LoRA initialisation"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        p = ArgumentParser(prog="python -m ring_jax.train merge",
                           description="Merge a LoRA run's adapters into its base model: a new model folder.")
        p.add_argument("--run", required=True, help="the run folder (--out of the training)")
        p.add_argument("--out", required=True, help="the merged model folder to write (must not exist)")
        p.add_argument("--model", help="the base model folder (default: the run's)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        args = p.parse_args(argv[1:])
        args.command = "merge"
        return args
    p = ArgumentParser(prog="python -m ring_jax.train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--data", required=True, help="training data, JSONL: {'text': ...} or {'messages': [...]} lines")
    p.add_argument("--out", required=True, help="the run folder (made, or resumed when it holds a run)")
    p.add_argument("--config", help="a YAML or JSON file of these settings (flag names, - or _); flags override it")
    defaults = TrainConfig()
    for name, (kind, text) in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"{text} (default {getattr(defaults, name)})")
    p.add_argument("--lora-targets", help=f"comma-separated, of {sorted(lora.TARGETS)} (default "
                                          f"{','.join(defaults.lora_targets)})")
    p.add_argument("--no-remat", action="store_true", help="keep every layer's activations (faster, more memory)")
    args = p.parse_args(argv)
    args.command = "train"
    try:
        args.train = train_config(args)
    except ValueError as e:
        p.error(str(e))
    return args


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The settings: the defaults, then the --config file, then the flags given."""
    settings = {}
    if args.config:
        import yaml

        try:
            with open(args.config, encoding="utf-8") as f:
                text = f.read()
            settings = (yaml.safe_load(text) if args.config.endswith((".yaml", ".yml")) else json.loads(text)) or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"--config {args.config}: {one_line(e)}") from None
        if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
            raise ValueError(f"--config {args.config}: expected a mapping of settings by name")
        settings = {k.replace("-", "_"): v for k, v in settings.items()}
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"--config {args.config}: unknown settings {unknown}")
    for name in FLAGS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.lora_targets:
        settings["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.no_remat:
        settings["remat"] = False
    return TrainConfig(**settings)


def run(args: argparse.Namespace) -> int:
    if args.command == "merge":
        merge_run(args.run, args.out, args.model, say=lambda line: print(line, file=sys.stderr))
        return 0
    from ring_jax.compilation_cache import enable_compilation_cache
    from ring_jax.config import RingConfig

    enable_compilation_cache(args.compilation_cache)
    config = args.train
    model_config = RingConfig.from_hf(args.model)                       # bad input first: before loading
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"seq_len={config.seq_len} is longer than the model's max_position_embeddings="
                         f"{model_config.max_position_embeddings}")
    check_quantized(args.quantize, config)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    examples = read_examples(args.data, tokenizer)
    top = max(int(example.tokens.max()) for example in examples)
    if top >= model_config.vocab_size:
        raise ValueError(f"{args.data}: token id {top} is outside the model's vocabulary [0, "
                         f"{model_config.vocab_size}) (a tokenizer of another model?)")
    batches = Batches(examples, config.batch_size, config.seq_len, config.seed)
    run_folder = Run(args.out, config, args.model, args.data, args.quantize)
    mesh = build_mesh(args.mesh, model_config.num_experts)
    model = load_model(args.model, args.dtype, mesh=mesh, verify=True, quantize=args.quantize)
    prepare(model, config)
    fit(model, batches, config, run_folder, say=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(run, args, "python -m ring_jax.train", args.debug)


if __name__ == "__main__":
    exit_now(main())
