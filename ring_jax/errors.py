"""What a command line does with an error its user caused (a bad value, a missing or damaged
file, a full or read-only disk): one line on stderr and exit status 2, not a traceback."""

import os
import sys


def user_errors() -> tuple[type, ...]:
    """The exception types that report the user's input or environment, not a bug."""
    from convert.safetensors_io import CheckpointError
    from ring_jax.config import ConfigError

    return ConfigError, CheckpointError, ValueError, OSError


def one_line(error: BaseException, limit: int = 500) -> str:
    """The error's message on one line of at most `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def run_command(command, args, prog: str, debug: bool = False) -> int:
    """command(args) -> its exit status; a user error is one line `prog: error: ...` and 2 (the
    traceback too with debug), Ctrl-C is 130."""
    try:
        return command(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


def exit_now(code: int) -> None:
    """Ends the process with `code`. After an error, without Python's teardown: a failed checkpoint
    read leaves TensorStore and Orbax work pending, whose own tracebacks the teardown prints."""
    if code == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
