import json
import os

import jax
import pytest

jax.config.update("jax_enable_x64", False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def load_config_dict(name: str) -> dict:
    with open(os.path.join(CONFIGS, name)) as f:
        return json.load(f)


@pytest.fixture
def tiny_dict() -> dict:
    return load_config_dict("tiny.json")


def rel_err(got, want) -> float:
    """max |got - want| / max |want|: relative to the tensor's scale, not elementwise."""
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def pytest_collection_modifyitems(config, items):
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def recurrence64(q, k, v, g, state=None, scale=None):
    """Lightning attention in float64 numpy, token by token: S = exp(g) S + k^T v; o = scale q S.

    q, k: [B, T, H, D]; v: [B, T, H, Dv]; g: [H]; state: [B, H, D, Dv] or None.
    """
    import numpy as np

    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    S = np.zeros((B, H, D, v.shape[-1])) if state is None else np.array(state, np.float64)
    decay = np.exp(np.asarray(g, np.float64))[None, :, None, None]
    o = np.zeros(v.shape)
    for t in range(T):
        S = decay * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhd,bhde->bhe", q[:, t], S)
    return o, S
