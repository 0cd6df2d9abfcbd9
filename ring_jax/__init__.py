"""ring-jax: Ring-linear-2.0 hybrid linear-attention MoE models in JAX/Flax NNX."""

import os

# Round every low-precision op's result as PyTorch does: by default XLA may keep float32 between
# the bf16 ops it fuses ("excess precision"), which makes results depend on fusion choices (and so
# on sharding). Read when JAX starts its backends: import ring_jax before running JAX code.
if "xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax  # noqa: E402

from ring_jax.cache import Cache, init_cache  # noqa: E402
from ring_jax.chat import chat, chat_stream  # noqa: E402
from ring_jax.checkpoint import load_model, save_model  # noqa: E402
from ring_jax.compilation_cache import enable_compilation_cache  # noqa: E402
from ring_jax.config import ConfigError, RingConfig  # noqa: E402
from ring_jax.generate import generate, prefill, stream, warmup  # noqa: E402
from ring_jax.model import RingModel  # noqa: E402
from ring_jax.sampling import GenerationConfig  # noqa: E402
from ring_jax.sharding import make_mesh, shard_model  # noqa: E402
from ring_jax.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

# The Python API keeps compiled steps on disk as the command lines do, so that a new process with
# the same model and shapes loads them (`ring_jax.compilation_cache`; $RING_JAX_COMPILATION_CACHE=off
# or `enable_compilation_cache("off")` before the first compilation turns it off).
if jax.config.jax_compilation_cache_dir is None:
    enable_compilation_cache()

__all__ = ["Cache", "ConfigError", "GenerationConfig", "RingConfig", "RingModel", "Tokenizer", "chat", "chat_stream",
           "enable_compilation_cache", "generate", "init_cache", "load_model", "load_tokenizer", "make_mesh",
           "prefill", "save_model", "shard_model", "stream", "warmup"]

