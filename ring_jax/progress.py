"""Progress of long work on stderr, for the command lines: a tqdm bar where stderr is a terminal,
a plain line per step elsewhere (logs, pipes, CI); and what a first call spent compiling."""

from __future__ import annotations

import sys
import time


class Progress:
    """`total` units of work (tensors' bytes, prompts), `done` of them already done.

    update() advances by n units and says `line` (the plain-text record of this step, which a
    log keeps); on a terminal the bar replaces the lines, with `note` beside it. bar: None to
    decide by whether stderr is a terminal, or True / False."""

    def __init__(self, total: int, *, unit: str, done: int = 0, in_bytes: bool = False, bar: bool | None = None):
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty() if bar is None else bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit=unit, file=sys.stderr, dynamic_ncols=True,
                            unit_scale=in_bytes, unit_divisor=1024 if in_bytes else 1000)

    @property
    def seconds(self) -> float:
        """Seconds since the work began."""
        return time.perf_counter() - self.start

    def update(self, n: int, line: str, note: str = "") -> None:
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)
            return
        self.bar.update(n)
        if note:
            self.bar.set_postfix_str(note, refresh=False)

    def say(self, line: str) -> None:
        """A line of its own (above the bar, on a terminal)."""
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CompileReport:
    """Counts and times the compilations of this process (a `jax.monitoring` listener), so that a
    command can say what a first call spent compiling: tracing to a jaxpr, lowering it to StableHLO,
    and XLA's compile (or, with a warm persistent cache, reading the program from it).

    Time a first call spends beyond these is run time, including one-time work that happens at a
    program's first launch (Mosaic GPU kernels are compiled then, in every new process).
    """

    STAGES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "compile"}

    def __init__(self):
        import jax

        self._reset()
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _reset(self):
        self.count = 0
        self.seconds = dict.fromkeys(self.STAGES.values(), 0.0)

    def _on(self, event, duration, **_):
        stage = self.STAGES.get(event)
        if stage is not None:
            self.seconds[stage] += duration
            self.count += stage == "compile"

    def stages(self) -> dict[str, float]:
        """{"trace", "lower", "compile": seconds} since the last `take`, and starts counting again."""
        seconds = dict(self.seconds)
        self._reset()
        return seconds

    def take(self) -> str:
        """What was compiled since the last call ("" if nothing), and starts counting again."""
        count, seconds = self.count, self.stages()
        if not count:
            return ""
        return (f"compiled {count} program(s) in {seconds['compile']:.1f} s (traced in {seconds['trace']:.1f} s, "
                f"lowered in {seconds['lower']:.1f} s); a later call of the same shapes reuses them")
