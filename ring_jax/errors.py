"""What a command line does with an error its user caused (a bad value, a missing or damaged
file, a full or read-only disk, work too large for the device's memory): one line on stderr and
exit status 2, not a traceback."""

import argparse
import logging
import os
import re
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a wrong argument as one line on stderr (exit status 2), without the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class CheckpointError(ValueError):
    """A checkpoint file or tensor that is missing, malformed, damaged or does not fit the config."""


def user_errors() -> tuple[type, ...]:
    """The exception types that report the user's input or environment, not a bug (ConfigError and
    CheckpointError among the ValueErrors)."""
    return ValueError, OSError


# TensorStore's annotations after the cause: the spec of the array it was opening (a JSON object of
# several hundred characters) and the source lines; the cause ("File too large") comes before them.
_TENSORSTORE_ANNOTATIONS = re.compile(r" ?\[(?:tensorstore_spec|source locations)='[^']*'\]")


def one_line(error: BaseException, limit: int = 500) -> str:
    """The error's message on one line of about `limit` characters at most, without TensorStore's
    pointer to its details and its annotations: a longer one keeps its start and its end (where
    TensorStore puts the cause), its middle cut."""
    text = _TENSORSTORE_ANNOTATIONS.sub("", str(error).split(" See full TensorStore details")[0])
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


def quiet_closed_event_loops() -> None:
    """Drops Python's reports of `RuntimeError: Event loop is closed` raised in callbacks. When an
    Orbax read or write fails (a damaged file, a full disk), TensorStore's threads still complete
    the operations Orbax gave up on and hand each to Orbax's closed event loop; Python reports
    each as unraisable, a traceback apiece around the one-line error. Other reports pass."""
    report = sys.unraisablehook
    if getattr(report, "quiet_closed_event_loops", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            report(unraisable)

    hook.quiet_closed_event_loops = True
    sys.unraisablehook = hook


def out_of_memory(error: BaseException) -> str | None:
    """XLA's report of a device out of memory (RESOURCE_EXHAUSTED, compiling or running) as one line
    that says what to change, or None for any other error."""
    from jax.errors import JaxRuntimeError

    if not (isinstance(error, JaxRuntimeError) and str(error).startswith("RESOURCE_EXHAUSTED")):
        return None
    fraction = ("" if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ else
                "; JAX takes 75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION allows more")
    return (f"out of device memory ({one_line(error, 300)}): use a smaller batch, shorter rows or prompts, "
            f"remat when training, or more devices{fraction}")


def run_command(command, args, prog: str, debug: bool = False) -> int:
    """command(args) -> its exit status; a user error (or a device out of memory) is one line
    `prog: error: ...` and 2 (with debug, the error is raised: its traceback and 1), Ctrl-C is 130. Without debug, the
    error logs of Orbax's writer and reader threads (absl's logger) are not shown: they repeat the
    error with a traceback."""
    quiet_closed_event_loops()
    if not debug:
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return command(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = one_line(e) if isinstance(e, user_errors()) else out_of_memory(e)
        if debug or line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 2


def exit_now(code: int) -> None:
    """Ends the process with `code`. After an error, without Python's teardown: a failed checkpoint
    read leaves TensorStore and Orbax work pending, whose own tracebacks the teardown prints."""
    if code == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
