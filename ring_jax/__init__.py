"""ring-jax: Ring-linear-2.0 hybrid linear-attention MoE models in JAX/Flax NNX."""

from ring_jax.cache import Cache, init_cache
from ring_jax.chat import chat, chat_stream
from ring_jax.config import ConfigError, RingConfig
from ring_jax.generate import generate, stream
from ring_jax.model import RingModel
from ring_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Cache", "ConfigError", "RingConfig", "RingModel", "Tokenizer", "chat", "chat_stream",
           "generate", "init_cache", "load_model", "load_tokenizer", "save_model", "stream"]


def __getattr__(name):
    # checkpoint.py reads convert.mapping, which reads ring_jax.config: import it on first use so
    # that `import convert...` and `import ring_jax` work in either order.
    if name in ("load_model", "save_model"):
        from ring_jax import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'ring_jax' has no attribute {name!r}")
