"""Helpers of the benchmarks that the CPU can check."""

import inspect

import jax
import jax.numpy as jnp

from benchmarks.train import op_sources


def inner(x):
    return jnp.sin(x) @ x


def outer(x):
    return inner(x) * 2


def test_op_sources_name_each_instruction_with_its_python_frames():
    """A profile's kernels are attributed through the compiled HLO's instruction names: the dot
    of `inner`, called from `outer`, reads as dot_general at inner's line < outer's line."""
    hlo = jax.jit(outer).lower(jnp.ones((8, 8))).compile().as_text()
    sources = op_sources(hlo, depth=2)
    body = lambda f: f"tests/test_benchmarks.py:{inspect.getsourcelines(f)[1] + 1}"     # its return line
    dots = [where for where in sources.values() if where.startswith("dot_general @ ")]
    assert dots and all(where == f"dot_general @ {body(inner)} < {body(outer)}" for where in dots), sources
