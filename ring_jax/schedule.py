"""The decoder's layers as stacks of one kind each, and the order that runs them with few bodies.

A layer's kind is its attention ("linear" or "softmax") and its MLP ("dense" or "moe"):
`linear_dense`, `linear_moe`, `softmax_moe`, `softmax_dense`. The model holds one stack of
parameters per kind (`ring_jax.layers.stack`), and the cache one stack of linear states and one of
keys and values, so a layer is addressed by its kind, its index in that kind's stack and its slot in
its attention type's cache stack.

The HF schedule is periodic: groups of `layer_group_size` layers, linear layers then one softmax
layer (docs/SPEC.md §2). The longest stretch of whole groups whose layers have the same kinds runs as
one `lax.scan` over the groups, each group's runs of consecutive layers of one kind as an inner
scan; the layers before and after it (the leading dense layers, a partial group, a tail of softmax
layers) run as runs of their own, scanned when longer than one layer. The compiled program then
holds each kind's body a few times whatever the depth: Ring-mini's 20 layers run as five bodies
(layer 0, the linear layers 1-3, layer 4, and one group of four linear layers and a softmax layer,
repeated three times).
"""

from __future__ import annotations

import dataclasses

from ring_jax.config import RingConfig

KINDS = ("linear_dense", "linear_moe", "softmax_dense", "softmax_moe")


def layer_kind(config: RingConfig, i: int) -> str:
    attention = "softmax" if config.is_softmax_layer(i) else "linear"
    return f"{attention}_{'moe' if config.is_moe_layer(i) else 'dense'}"


def kind_index(config: RingConfig, i: int) -> tuple[str, int]:
    """(kind of decoder layer i, its index in that kind's stack)."""
    kind = layer_kind(config, i)
    return kind, sum(layer_kind(config, j) == kind for j in range(i))


def cache_slot(config: RingConfig, i: int) -> int:
    """Decoder layer i's slot in its attention type's cache stack (and, for a linear layer, in the
    table of decays): the layers of its attention type before it."""
    return sum(config.is_softmax_layer(j) == config.is_softmax_layer(i) for j in range(i))


def attention_of(kind: str) -> str:
    return kind.split("_")[0]


@dataclasses.dataclass(frozen=True)
class Run:
    """`length` consecutive layers of one kind: the first at `index` in its kind's stack and at
    `slot` in its attention type's cache stack, the others after it in both."""
    kind: str
    index: int
    slot: int
    length: int


@dataclasses.dataclass(frozen=True)
class Schedule:
    """head runs, then `repeats` groups (group r runs `group` with each run's index and slot
    advanced by r times the group's count of its kind and of its attention type), then tail runs."""
    counts: tuple[tuple[str, int], ...]       # (kind, layers of that kind), kinds present only
    head: tuple[Run, ...]
    group: tuple[Run, ...]
    repeats: int
    tail: tuple[Run, ...]

    @classmethod
    def of(cls, config: RingConfig) -> "Schedule":
        kinds = [layer_kind(config, i) for i in range(config.num_decoder_layers)]
        g = config.layer_group_size
        patterns = [tuple(kinds[k * g:(k + 1) * g]) for k in range(len(kinds) // g)]
        first, repeats = _longest_repeat(patterns)
        runs = _runs(kinds, g)
        head = tuple(r for r in runs if r.end <= first * g)
        tail = tuple(r for r in runs if r.start >= (first + repeats) * g)
        group = tuple(r for r in runs if first * g <= r.start and r.end <= (first + 1) * g) if repeats else ()
        counts = tuple((k, kinds.count(k)) for k in KINDS if k in kinds)
        return cls(counts, tuple(r.run for r in head), tuple(r.run for r in group), repeats,
                   tuple(r.run for r in tail))

    def index_stride(self, kind: str) -> int:
        """Layers of `kind` in one group."""
        return sum(r.length for r in self.group if r.kind == kind)

    def slot_stride(self, kind: str) -> int:
        """Layers of kind's attention type in one group."""
        return sum(r.length for r in self.group if attention_of(r.kind) == attention_of(kind))

    def count(self, attention: str) -> int:
        """Layers of one attention type ("linear" or "softmax")."""
        return sum(n for kind, n in self.counts if attention_of(kind) == attention)



@dataclasses.dataclass(frozen=True)
class _Span:
    run: Run
    start: int                                # first layer (global index)

    @property
    def end(self) -> int:
        return self.start + self.run.length


def _runs(kinds: list[str], group_size: int) -> list[_Span]:
    """Maximal runs of consecutive layers of one kind that do not cross a group boundary."""
    seen: dict[str, int] = {}
    slots: dict[str, int] = {}
    spans: list[_Span] = []
    for i, kind in enumerate(kinds):
        index, slot = seen.get(kind, 0), slots.get(attention_of(kind), 0)
        seen[kind], slots[attention_of(kind)] = index + 1, slot + 1
        last = spans[-1] if spans else None
        if last and last.run.kind == kind and last.end == i and i % group_size:
            spans[-1] = _Span(dataclasses.replace(last.run, length=last.run.length + 1), last.start)
        else:
            spans.append(_Span(Run(kind, index, slot, 1), i))
    return spans


def _longest_repeat(patterns: list[tuple]) -> tuple[int, int]:
    """(first, length) of the longest stretch of equal consecutive patterns (the first of ties)."""
    best = (0, 0)
    k = 0
    while k < len(patterns):
        n = 1
        while k + n < len(patterns) and patterns[k + n] == patterns[k]:
            n += 1
        if n > best[1]:
            best = (k, n)
        k += n
    return best
