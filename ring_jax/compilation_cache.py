"""The persistent compilation cache: compiled steps kept on disk, so that a new process running the
same model and shapes loads them instead of compiling again (at the Ring-mini shape the prefill
step compiles for about 2 minutes on a GPU).

The cache is trusted code: keep it in a folder only you can write (JAX's `set_cache_dir` warns
the same).
"""

import os

import jax

ENV = "RING_JAX_COMPILATION_CACHE"


def default_cache_dir() -> str:
    """$RING_JAX_COMPILATION_CACHE (a folder, or "off" for none: the command lines then leave the
    cache off), else $XDG_CACHE_HOME/ring_jax/xla (~/.cache/ring_jax/xla)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ring_jax", "xla")


def enable_compilation_cache(path: str | None = None, *, min_compile_seconds: float = 1.0) -> str:
    """Keeps every compilation that took at least `min_compile_seconds` in `path` (default:
    `default_cache_dir()`) and looks there before compiling. Call it before the first compilation.
    Returns the folder."""
    path = os.path.abspath(os.path.expanduser(path or default_cache_dir()))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return path
