"""The persistent compilation cache: compiled steps kept on disk, so that a new process running the
same model and shapes loads them instead of compiling again (at the Ring-mini shape the prefill
step compiles for about 2 minutes on a GPU).

The cache is trusted code: keep it in a folder only you can write (JAX's `set_cache_dir` warns
the same).
"""

import os
import warnings

import jax

ENV = "RING_JAX_COMPILATION_CACHE"


def default_cache_dir() -> str:
    """$RING_JAX_COMPILATION_CACHE (a folder, or "off"), else $XDG_CACHE_HOME/ring_jax/xla
    (~/.cache/ring_jax/xla)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ring_jax", "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Keeps compilations in `path` (default: `default_cache_dir()`) and looks there before
    compiling; "off" (any case) turns the cache off. Call it before the first compilation.
    `import ring_jax` calls it with the default unless JAX's cache folder is already set.

    Only compilations of at least `jax_persistent_cache_min_compile_time_secs` (JAX's setting:
    1 s unless changed, e.g. by $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) are kept. A folder that
    cannot be created is a warning, and the cache stays off. Returns the folder, or None when off.
    """
    path = path or default_cache_dir()
    if path.lower() == "off":
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache off: cannot create {path}: {e}", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path
