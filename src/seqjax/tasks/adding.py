"""The adding problem of Hochreiter & Schmidhuber (1997), Experiment 4.

Not the modern fixed-length variant with target ``X1 + X2``: here lengths vary,
markers include ``-1`` at both ends, and the target is ``0.5 + (X1 + X2) / 4``.
"""

from __future__ import annotations

import operator
from functools import partial

import jax
import jax.numpy as jnp

from seqjax.tasks._common import TaskBatch, check_batch_size, check_padding, right_to_front

ADDING_TOLERANCE = 0.04
"""A sequence counts as correct when ``|prediction - target| < 0.04`` (H&S 1997)."""

_MIN_T = 11  # the first 10 pairs and the last pair must be distinct


def _check_min_length(fn: str, min_length) -> int:
    try:
        ok = not isinstance(min_length, bool) and operator.index(min_length) >= _MIN_T
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: min_length (T) must be an int >= {_MIN_T}, got {min_length!r}"
        )
    return operator.index(min_length)


@partial(jax.jit, static_argnames=("batch_size", "min_length", "padding"))
def _generate(key, batch_size, min_length, padding):
    t_max = min_length + min_length // 10
    n2 = min_length // 2 - 1
    k_int, k_val = jax.random.split(key)
    # One randint call for [L, i1, j] (threefry is slow to compile).
    lo, hi = jnp.array([min_length, 0, 0]), jnp.array([t_max + 1, 10, n2])
    draws = jax.random.randint(k_int, (batch_size, 3), lo, hi, dtype=jnp.int32)
    lengths, i1 = draws[:, 0], draws[:, 1]
    j = draws[:, 2]  # X2 is the j-th of the first T/2 - 1 pairs that are not X1
    values = jax.random.uniform(k_val, (batch_size, t_max), jnp.float32, -1.0, 1.0)
    i2 = j + (j >= i1)

    t = jnp.arange(t_max)[None, :]
    marked = (t == i1[:, None]) | (t == i2[:, None])
    ends = (t == 0) | (t == lengths[:, None] - 1)
    markers = jnp.where(marked, 1.0, jnp.where(ends, -1.0, 0.0))
    values = jnp.where(marked & (t == 0), 0.0, values)  # a marked first pair has value 0
    valid = t < lengths[:, None]
    values = jnp.where(valid, values, 0.0)
    markers = jnp.where(valid, markers, 0.0)

    x = jnp.stack([values, markers], axis=-1).astype(jnp.float32)  # [B, T, 2]
    rows = jnp.arange(batch_size)
    y = 0.5 + (values[rows, i1] + values[rows, i2]) / 4.0
    pos = jnp.stack([i1, i2], axis=1)
    if padding == "front":
        x = right_to_front(x, lengths, fill=0.0)
        pos = pos + (t_max - lengths)[:, None]
    return TaskBatch(
        x=x,
        y=y.astype(jnp.float32),
        lengths=lengths.astype(jnp.int32),
        positions=pos.astype(jnp.int32),
    )


def adding_problem(key, batch_size: int, min_length: int = 100, padding: str = "right") -> TaskBatch:
    """Sample a batch of the 1997 adding problem (H&S 1997 Experiment 4).

    Each step is a pair (value, marker). A sequence's length L is a uniform
    integer in ``[T, T + T // 10]`` and its values are U[-1, 1]. One of the
    first 10 pairs is marked 1 (its value is X1), then one of the first
    ``T // 2 - 1`` still-unmarked pairs is marked 1 (value X2). The first and
    last pairs are marked -1 unless marked 1, all others 0. If the first pair
    is marked 1 its value is set to 0 (the paper: "we set X1 to zero"); this is
    done in ``x`` so the target stays a function of the inputs. The target,
    given at the end, is ``0.5 + (X1 + X2) / 4`` in [0, 1]; a prediction is
    correct when its absolute error is below 0.04 (:func:`adding_correct`).

    Jitted internally with ``batch_size``, ``min_length`` and ``padding``
    static; ``key`` may be traced.

    Args:
      key: a ``jax.random`` key.
      batch_size: B, a positive Python int (static).
      min_length: T, the minimal sequence length, an int >= 11 (static). The
        paper uses 100, 500 and 1000.
      padding: ``"right"`` (default: pad rows after the sequence, read the
        output at step ``lengths - 1``) or ``"front"`` (pad rows before it, read
        the last step).

    Returns:
      ``TaskBatch`` with
        x: float32 ``[B, T + T // 10, 2]``, ``x[..., 0]`` values and
          ``x[..., 1]`` markers; pad rows are all zero.
        y: float32 ``[B]`` targets ``0.5 + (X1 + X2) / 4``.
        lengths: int32 ``[B]`` sequence lengths L.
        positions: int32 ``[B, 2]`` indices into ``x`` of the X1 and X2 pairs
          (pad offset included under front padding; X2 may precede X1).

    Example:
      >>> import jax
      >>> from seqjax.tasks import adding_problem
      >>> batch = adding_problem(jax.random.key(0), 8, min_length=100)
      >>> batch.x.shape, batch.y.shape
      ((8, 110, 2), (8,))

    References:
      Hochreiter & Schmidhuber (1997), Long Short-Term Memory, Neural
      Computation 9(8), Sec. 5.4, Experiment 4.
    """
    fn = "seqjax.tasks.adding_problem"
    batch_size = check_batch_size(fn, batch_size)
    min_length = _check_min_length(fn, min_length)
    padding = check_padding(fn, padding)
    return _generate(key, batch_size, min_length, padding)


def adding_correct(predictions, targets, tolerance: float = ADDING_TOLERANCE) -> jax.Array:
    """Per-sequence success criterion of the adding problem: ``|pred - target| < tol``.

    Args:
      predictions: float ``[B]`` (or ``[B, 1]``) network outputs at the last step.
      targets: float ``[B]`` targets (``TaskBatch.y``).
      tolerance: absolute-error threshold, 0.04 in H&S 1997.

    Returns:
      bool ``[B]``; ``adding_correct(p, y).mean()`` is the accuracy and
      ``(~adding_correct(p, y)).sum()`` the "wrong" count of the paper's table.

    Example:
      >>> import jax.numpy as jnp
      >>> adding_correct(jnp.array([0.5, 0.5]), jnp.array([0.53, 0.6])).tolist()
      [True, False]
    """
    predictions = jnp.asarray(predictions)
    targets = jnp.asarray(targets)
    if predictions.ndim == targets.ndim + 1 and predictions.shape[-1] == 1:
        predictions = predictions[..., 0]
    if predictions.shape != targets.shape:
        raise ValueError(
            "seqjax.tasks.adding_correct: predictions must have the targets' shape "
            f"{targets.shape} (or {targets.shape + (1,)}), got {predictions.shape}"
        )
    return jnp.abs(predictions - targets) < tolerance
