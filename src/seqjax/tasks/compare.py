"""Two-integer comparison: the toy task of Shubhang Desai's 2017 RNN post (seed 004).

A sequence is two integers in 1..9 (2 steps, 1 feature); the label is 1 when
the first is larger than the second, else 0 (ties give 0, so the majority class
is 0 with probability 45/81 ~ 55.6%).
"""

from __future__ import annotations

import operator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqjax.tasks._common import TaskBatch, check_batch_size

COMPARE_SPLITS = (8000, 4000, 4000)
"""Ordered train / validation / test sizes of the original loader (16 000 in all)."""


class CompareSplits(NamedTuple):
    """Train, validation and test parts of the comparison data set (each a ``TaskBatch``)."""

    train: TaskBatch
    valid: TaskBatch
    test: TaskBatch


@partial(jax.jit, static_argnames=("batch_size",))
def _generate(key, batch_size):
    x = jax.random.randint(key, (batch_size, 2, 1), 1, 10)
    y = (x[:, 0, 0] - x[:, 1, 0] > 0).astype(jnp.int32)
    return TaskBatch(
        x=x.astype(jnp.float32),
        y=y,
        lengths=jnp.full((batch_size,), 2, jnp.int32),
    )


def compare_batch(key, batch_size: int) -> TaskBatch:
    """Sample ``batch_size`` sequences of the two-integer comparison task.

    ``x[b] = (n0, n1)`` with ``n0, n1`` uniform in 1..9 and
    ``y[b] = 1 if n0 - n1 > 0 else 0``. Jitted with ``batch_size`` static.

    Args:
      key: a ``jax.random`` key.
      batch_size: N, a positive Python int (static).

    Returns:
      ``TaskBatch`` with x float32 ``[N, 2, 1]`` (integer values), y int32
      ``[N]`` in {0, 1}, lengths int32 ``[N]`` (all 2), positions ``None``.

    Example:
      >>> import jax
      >>> compare_batch(jax.random.key(0), 4).x.shape
      (4, 2, 1)

    References:
      ShubhangDesai/krikos ``examples/RecurrentTestLoader.py`` (the loader
      of the seed-004 post).
    """
    batch_size = check_batch_size("seqjax.tasks.compare_batch", batch_size)
    return _generate(key, batch_size)


def compare_dataset(key, sizes=COMPARE_SPLITS) -> CompareSplits:
    """Build the fixed comparison data set with the original ordered split.

    Draws ``sum(sizes)`` sequences as :func:`compare_batch` does and cuts them
    in order into train, validation and test parts (8000 / 4000 / 4000 by
    default, as ``RecurrentTestLoader.load_data``).

    Args:
      key: a ``jax.random`` key.
      sizes: three positive ints, the train, validation and test sizes.

    Returns:
      ``CompareSplits(train, valid, test)``; each part is a ``TaskBatch`` with
      x float32 ``[n, 2, 1]``, y int32 ``[n]``, lengths int32 ``[n]``.

    Example:
      >>> import jax
      >>> data = compare_dataset(jax.random.key(0))
      >>> data.train.x.shape, data.valid.x.shape, data.test.x.shape
      ((8000, 2, 1), (4000, 2, 1), (4000, 2, 1))

    References:
      ShubhangDesai/krikos ``examples/RecurrentTestLoader.py``.
    """
    try:
        sizes = tuple(operator.index(s) for s in sizes)
        ok = len(sizes) == 3 and all(s >= 1 for s in sizes)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            "seqjax.tasks.compare_dataset: sizes must be three positive ints "
            f"(train, valid, test), e.g. {COMPARE_SPLITS}; got {sizes!r}"
        )
    return _dataset(key, sizes)


@partial(jax.jit, static_argnames=("sizes",))
def _dataset(key, sizes):
    full = _generate(key, sum(sizes))
    a, b = sizes[0], sizes[0] + sizes[1]
    parts = [jax.tree.map(lambda v: v[lo:hi], full) for lo, hi in ((0, a), (a, b), (b, None))]
    return CompareSplits(*parts)
