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
