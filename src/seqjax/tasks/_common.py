"""Shared pieces of the task generators: the batch type, padding and argument checks."""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

PADDINGS = ("front", "right")


class TaskBatch(NamedTuple):
    """One batch of a sequence-classification or regression task.

    Attributes:
      x: inputs, float32 ``[B, T, I]``; pad rows are all zero.
      y: targets, ``[B]``: int32 class labels for classification tasks,
        float32 values for regression tasks (adding problem).
      lengths: int32 ``[B]``, the number of real (non-pad) time steps of each
        sequence. With front padding the real steps are ``x[b, T - lengths[b]:]``;
        with right padding they are ``x[b, :lengths[b]]``.
      positions: int32 ``[B, K]`` time indices into ``x`` (pad offset included)
        of the K relevant elements (e.g. the X/Y symbols at t1, t2), or ``None``
        for tasks without such positions.
    """

    x: jax.Array
    y: jax.Array
    lengths: jax.Array
    positions: Optional[jax.Array] = None


def check_batch_size(fn: str, batch_size) -> int:
    """Return ``batch_size`` as an int or raise a ValueError naming ``fn``."""
    if isinstance(batch_size, bool):
        ok = False
    else:
        try:
            batch_size = operator.index(batch_size)
            ok = batch_size >= 1
        except TypeError:
            ok = False
    if not ok:
        raise ValueError(
            f"{fn}: batch_size must be a positive int (>= 1), got {batch_size!r}"
        )
    return batch_size


def check_padding(fn: str, padding) -> str:
    """Return ``padding`` or raise a ValueError listing the accepted values."""
    if padding not in PADDINGS:
        raise ValueError(
            f"{fn}: padding must be one of {PADDINGS}, got {padding!r}"
        )
    return padding


def right_to_front(x: jax.Array, lengths: jax.Array, fill=0) -> jax.Array:
    """Move each row's valid prefix to the end of the time axis.

    Args:
      x: ``[B, T, ...]`` right-padded array (valid steps ``x[b, :lengths[b]]``).
      lengths: int32 ``[B]``.
      fill: value written to the pad steps.

    Returns:
      ``[B, T, ...]`` array whose valid steps are ``x[b, T - lengths[b]:]``.
    """
    t = x.shape[1]
    src = jnp.arange(t)[None, :] - (t - lengths)[:, None]  # [B, T]
    valid = src >= 0
    src = jnp.clip(src, 0, t - 1)
    extra = (1,) * (x.ndim - 2)
    gathered = jnp.take_along_axis(x, src.reshape(src.shape + extra), axis=1)
    return jnp.where(valid.reshape(valid.shape + extra), gathered, fill)
