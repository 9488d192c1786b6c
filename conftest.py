"""pytest configuration shared by the tests and the docstring examples.

``pytest`` (``testpaths`` and ``addopts`` in pyproject.toml) collects ``tests/`` and the ``>>>`` examples in
``src/seqjax``; every docstring example sees ``jax``, ``jnp``, ``np``, ``nnx``, ``optax`` and ``seqjax``.
"""
import os

import numpy as np
import pytest

# Most of the suite's time is XLA:CPU compiling small programs, and most of that is LLVM optimising them. The
# tests check values, not speed, so they compile with LLVM's optimisation off, which takes about a third off the
# suite's time. XLA's own HLO passes (fusion, buffer assignment, hence the memory tests) are the same at every
# level, and seqjax's C++ kernels are built apart. A flag you set yourself (e.g.
# XLA_FLAGS=--xla_backend_optimization_level=2, XLA's default) is kept. Set here, before any test or example
# initialises a backend; example and benchmark subprocesses inherit it.
_OPT_FLAG = "--xla_backend_optimization_level"
if _OPT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_FLAG}=0".strip()


@pytest.fixture(autouse=True)
def _doctest_names(request):
    """The names every docstring example may use; nothing is imported for the other tests."""
    if not isinstance(request.node, pytest.DoctestItem):
        return
    doctest_namespace = request.getfixturevalue("doctest_namespace")
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import seqjax

    doctest_namespace.update(jax=jax, jnp=jnp, np=np, nnx=nnx, optax=optax, seqjax=seqjax)
