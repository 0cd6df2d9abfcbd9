"""The installed package is whole: the wheel ships the configs inside ring_jax (so `python -m
ring_jax demo` runs outside a source checkout) and the formats under ring_jax/io; `convert` is only
the command line."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_formats(tmp_path):
    source = tmp_path / "src"                     # built from a copy: the build leaves files behind
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "notebooks", "docs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600, cwd=tmp_path)
    names = set(zipfile.ZipFile(glob.glob(str(tmp_path / "*.whl"))[0]).namelist())
    for config in os.listdir(os.path.join(ROOT, "configs")):
        assert f"ring_jax/configs/{config}" in names
    assert {"ring_jax/io/mapping.py", "ring_jax/io/conversion.py", "convert/__main__.py"} <= names
    assert not [n for n in names if n.startswith("configs/")]
    assert sorted(n for n in names if n.startswith("convert/")) == ["convert/__init__.py", "convert/__main__.py"]


def test_the_demo_reads_the_configs_in_the_package():
    from ring_jax.__main__ import CONFIGS

    import ring_jax

    assert os.path.dirname(CONFIGS) == os.path.dirname(ring_jax.__file__)
    assert os.path.isfile(os.path.join(CONFIGS, "tiny.json"))
