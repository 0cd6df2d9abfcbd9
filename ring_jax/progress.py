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
    """Counts and times the XLA compilations of this process (a `jax.monitoring` listener), so that
    a command can say what a first call spent compiling."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **_):
        if event == self.EVENT:
            self.count, self.seconds = self.count + 1, self.seconds + duration

    def take(self) -> str:
        """What was compiled since the last call ("" if nothing), and starts counting again."""
        text = (f"compiled {self.count} program(s) in {self.seconds:.1f} s; a later call of the same shapes "
                "reuses them") if self.count else ""
        self.count, self.seconds = 0, 0.0
        return text
