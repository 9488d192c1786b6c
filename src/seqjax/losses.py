"""Sequence losses and pooling heads built on ``optax.losses``.

Every loss returns a scalar mean. Padding is described either by ``lengths``
(``[B]`` integer, the number of valid leading steps of each sequence, as
returned by the ``seqjax`` runners) or by an explicit ``mask`` (``[B, T]``,
nonzero where a step is valid). Steps past a sequence's length never
contribute to a loss or to a pooled vector.

Shape letters: ``B`` batch, ``T`` time, ``C`` classes, ``H`` features.

Input checks (ranks, shapes, label range, length range) run eagerly on the
Python side, so a mistake raises ``ValueError`` before anything is traced; the
range checks need concrete values and are skipped for tracers.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "last_valid",
    "mean_valid",
    "last_step_cross_entropy",
    "masked_cross_entropy",
    "masked_binary_cross_entropy",
    "mse",
]


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _concrete(x) -> Optional[np.ndarray]:
    """Returns ``x`` as a NumPy array if it is concrete, else ``None``."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # pragma: no cover - exotic array types
        return None


def _check_rank(fn: str, name: str, x, rank: int, layout: str, *, at_least=False):
    nd = jnp.ndim(x)
    ok = nd >= rank if at_least else nd == rank
    if not ok:
        want = f"at least {rank}" if at_least else f"{rank}"
        raise ValueError(
            f"seqjax.losses.{fn}: {name} must have rank {want} {layout}, "
            f"got shape {tuple(jnp.shape(x))}"
        )


def _check_lengths(fn: str, lengths, batch: int, steps: int, *, min_length: int = 0):
    """Checks ``lengths`` is ``[B]`` integer with values in ``[min_length, T]``."""
    shape = tuple(jnp.shape(lengths))
    if shape != (batch,):
        raise ValueError(
            f"seqjax.losses.{fn}: lengths must have shape (B,) = ({batch},), "
            f"got {shape}"
        )
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(
            f"seqjax.losses.{fn}: lengths must be an integer array, "
            f"got dtype {jnp.result_type(lengths)}"
        )
    c = _concrete(lengths)
    if c is not None and c.size and (c.min() < min_length or c.max() > steps):
        raise ValueError(
            f"seqjax.losses.{fn}: lengths must lie in [{min_length}, T={steps}], "
            f"got min {int(c.min())}, max {int(c.max())}"
        )


def _check_labels_range(fn: str, labels, num_classes: int, valid=None):
    c = _concrete(labels)
    if c is None or c.size == 0:
        return
    if valid is not None:
        v = _concrete(valid)
        if v is None:
            return
        c = c[v.astype(bool)]
        if c.size == 0:
            return
    if c.min() < 0 or c.max() >= num_classes:
        raise ValueError(
            f"seqjax.losses.{fn}: labels must lie in [0, C={num_classes}), "
            f"got min {int(c.min())}, max {int(c.max())}"
        )


def _step_mask(fn: str, lengths, mask, batch: int, steps: int):
    """Returns a float ``[B, T]`` validity mask, or ``None`` when all are valid."""
    if lengths is not None and mask is not None:
        raise ValueError(
            f"seqjax.losses.{fn}: pass either lengths or mask, not both"
        )
    if lengths is not None:
        _check_lengths(fn, lengths, batch, steps)
        return (jnp.arange(steps)[None, :] < jnp.asarray(lengths)[:, None])
    if mask is not None:
        if tuple(jnp.shape(mask)) != (batch, steps):
            raise ValueError(
                f"seqjax.losses.{fn}: mask must have shape (B, T) = "
                f"({batch}, {steps}), got {tuple(jnp.shape(mask))}"
            )
        return jnp.asarray(mask) != 0
    return None


def _masked_mean(values, step_mask):
    """Mean of ``values [B, T, ...]`` over the valid steps (and trailing dims)."""
    if step_mask is None:
        return jnp.mean(values)
    m = step_mask.reshape(step_mask.shape + (1,) * (values.ndim - 2))
    m = jnp.broadcast_to(m, values.shape).astype(values.dtype)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


# --------------------------------------------------------------------------
# pooling heads
# --------------------------------------------------------------------------


def last_valid(ys: jax.Array, lengths: Optional[jax.Array] = None) -> jax.Array:
    """Selects each sequence's output at its last valid step.

    ``out[b] = ys[b, lengths[b] - 1]``; a sequence of length 0 gives zeros.
    Without ``lengths`` this is ``ys[:, -1]``.

    Args:
      ys: ``[B, T, H]`` float array of per-step outputs (batch-major).
      lengths: optional ``[B]`` integer array, valid steps per sequence, in
        ``[0, T]``.

    Returns:
      ``[B, H]`` array, same dtype as ``ys``.

    Example:
      >>> ys = jnp.arange(12.0).reshape(2, 3, 2)
      >>> last_valid(ys, jnp.array([1, 3])).tolist()
      [[0.0, 1.0], [10.0, 11.0]]
    """
    ys = jnp.asarray(ys)
    _check_rank("last_valid", "ys", ys, 3, "(B, T, H)")
    B, T = ys.shape[:2]
    if lengths is None:
        return ys[:, -1]
    _check_lengths("last_valid", lengths, B, T)
    lengths = jnp.asarray(lengths)
    idx = jnp.clip(lengths - 1, 0, T - 1)
    out = jnp.take_along_axis(ys, idx[:, None, None], axis=1)[:, 0]
    return jnp.where((lengths > 0)[:, None], out, jnp.zeros_like(out))


def mean_valid(ys: jax.Array, lengths: Optional[jax.Array] = None) -> jax.Array:
    """Averages each sequence's outputs over its valid steps only.

    ``out[b] = sum_{t < lengths[b]} ys[b, t] / max(lengths[b], 1)``; a sequence
    of length 0 gives zeros. Without ``lengths`` this is ``ys.mean(axis=1)``.

    Args:
      ys: ``[B, T, H]`` float array of per-step outputs.
      lengths: optional ``[B]`` integer array in ``[0, T]``.

    Returns:
      ``[B, H]`` array, same dtype as ``ys``.

    Example:
      >>> ys = jnp.arange(12.0).reshape(2, 3, 2)
      >>> mean_valid(ys, jnp.array([2, 3])).tolist()
      [[1.0, 2.0], [8.0, 9.0]]
    """
    ys = jnp.asarray(ys)
    _check_rank("mean_valid", "ys", ys, 3, "(B, T, H)")
    B, T = ys.shape[:2]
    if lengths is None:
        return jnp.mean(ys, axis=1)
    _check_lengths("mean_valid", lengths, B, T)
    lengths = jnp.asarray(lengths)
    m = (jnp.arange(T)[None, :] < lengths[:, None]).astype(ys.dtype)
    total = jnp.einsum("bth,bt->bh", ys, m)
    return total / jnp.maximum(lengths, 1).astype(ys.dtype)[:, None]


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------


def last_step_cross_entropy(
    logits: jax.Array, labels: jax.Array, lengths: Optional[jax.Array] = None
) -> jax.Array:
    """Softmax cross-entropy of the prediction at each sequence's last valid step.

    ``loss = mean_b [ -log softmax(logits[b, t_b])[labels[b]] ]`` with
    ``t_b = lengths[b] - 1`` (or ``T - 1`` without ``lengths``). Built on
    ``optax.losses.softmax_cross_entropy_with_integer_labels``.

    Args:
      logits: ``[B, T, C]`` float array of per-step class scores.
      labels: ``[B]`` integer array of class ids in ``[0, C)``.
      lengths: optional ``[B]`` integer array in ``[1, T]``.

    Returns:
      Scalar float array (mean over the batch).

    Example:
      >>> logits = jnp.zeros((4, 5, 3))
      >>> float(last_step_cross_entropy(logits, jnp.array([0, 1, 2, 0])))  # log 3
      1.0986...
    """
    fn = "last_step_cross_entropy"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_rank(fn, "logits", logits, 3, "(B, T, C)")
    _check_rank(fn, "labels", labels, 1, "(B,)")
    B, T, C = logits.shape
    if labels.shape[0] != B:
        raise ValueError(
            f"seqjax.losses.{fn}: labels must have shape (B,) = ({B},) to match "
            f"logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"seqjax.losses.{fn}: labels must be integer class ids, got dtype "
            f"{labels.dtype}"
        )
    _check_labels_range(fn, labels, C)
    if lengths is not None:
        _check_lengths(fn, lengths, B, T, min_length=1)
    last = last_valid(logits, lengths)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(last, labels)
    return jnp.mean(ce)


def masked_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    lengths: Optional[jax.Array] = None,
    *,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Per-step softmax cross-entropy, averaged over the valid steps.

    ``loss = sum_{b,t} m[b,t] * CE(logits[b,t], labels[b,t]) / sum_{b,t} m[b,t]``
    where ``m[b,t] = t < lengths[b]`` (or ``mask``, or all ones). Labels at
    invalid steps are ignored (they may be any value, e.g. padding ``-1``).

    Args:
      logits: ``[B, T, C]`` float array.
      labels: ``[B, T]`` integer array of class ids in ``[0, C)`` at valid steps.
      lengths: optional ``[B]`` integer array in ``[0, T]``.
      mask: optional ``[B, T]`` bool/float array, nonzero at valid steps
        (exclusive with ``lengths``).

    Returns:
      Scalar float array (0 if no step is valid).

    Example:
      >>> logits = jnp.zeros((2, 4, 3)); labels = jnp.zeros((2, 4), jnp.int32)
      >>> float(masked_cross_entropy(logits, labels, jnp.array([4, 2])))
      1.0986...
    """
    fn = "masked_cross_entropy"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_rank(fn, "logits", logits, 3, "(B, T, C)")
    B, T, C = logits.shape
    if tuple(labels.shape) != (B, T):
        raise ValueError(
            f"seqjax.losses.{fn}: labels must have shape (B, T) = ({B}, {T}) to "
            f"match logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"seqjax.losses.{fn}: labels must be integer class ids, got dtype "
            f"{labels.dtype}"
        )
    m = _step_mask(fn, lengths, mask, B, T)
    _check_labels_range(fn, labels, C, valid=m)
    safe = labels if m is None else jnp.where(m, labels, 0)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, safe)
    return _masked_mean(ce, m)


def masked_binary_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    lengths: Optional[jax.Array] = None,
    *,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Sigmoid binary cross-entropy with logits, averaged over valid elements.

    ``l = -(y log s(x) + (1 - y) log(1 - s(x)))`` (``optax.losses.
    sigmoid_binary_cross_entropy``, numerically stable), averaged over every
    element of every valid step.

    Args:
      logits: ``[B, T, ...]`` float array.
      targets: same shape as ``logits``, float in ``[0, 1]``.
      lengths: optional ``[B]`` integer array in ``[0, T]``.
      mask: optional ``[B, T]`` array, nonzero at valid steps (exclusive with
        ``lengths``).

    Returns:
      Scalar float array.

    Example:
      >>> x = jnp.zeros((2, 3, 4)); y = jnp.ones((2, 3, 4))
      >>> float(masked_binary_cross_entropy(x, y, jnp.array([3, 1])))  # log 2
      0.6931...
    """
    fn = "masked_binary_cross_entropy"
    logits = jnp.asarray(logits)
    _check_rank(fn, "logits", logits, 2, "(B, T, ...)", at_least=True)
    if tuple(jnp.shape(targets)) != tuple(logits.shape):
        raise ValueError(
            f"seqjax.losses.{fn}: targets must have the shape of logits "
            f"{tuple(logits.shape)}, got {tuple(jnp.shape(targets))}"
        )
    B, T = logits.shape[:2]
    m = _step_mask(fn, lengths, mask, B, T)
    targets = jnp.asarray(targets, dtype=logits.dtype)
    bce = optax.losses.sigmoid_binary_cross_entropy(logits, targets)
    return _masked_mean(bce, m)


def mse(
    predictions: jax.Array,
    targets: jax.Array,
    lengths: Optional[jax.Array] = None,
    *,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Mean squared error, optionally over the valid steps only.

    ``loss = mean over valid elements of (predictions - targets)^2``
    (``optax.losses.squared_error``; no factor 1/2). With ``lengths`` or
    ``mask`` the arrays are ``[B, T, ...]``; otherwise any equal shapes.

    Args:
      predictions: float array, ``[B, T, ...]`` when masking, else any shape.
      targets: float array, same shape as ``predictions``.
      lengths: optional ``[B]`` integer array in ``[0, T]``.
      mask: optional ``[B, T]`` array, nonzero at valid steps.

    Returns:
      Scalar float array.

    Example:
      >>> float(mse(jnp.ones((2, 3)), jnp.zeros((2, 3))))
      1.0
    """
    fn = "mse"
    if tuple(jnp.shape(predictions)) != tuple(jnp.shape(targets)):
        raise ValueError(
            f"seqjax.losses.{fn}: targets must have the shape of predictions "
            f"{tuple(jnp.shape(predictions))}, got {tuple(jnp.shape(targets))}"
        )
    predictions = jnp.asarray(predictions)
    targets = jnp.asarray(targets, dtype=predictions.dtype)
    if lengths is None and mask is None:
        return jnp.mean(optax.losses.squared_error(predictions, targets))
    _check_rank(fn, "predictions", predictions, 2, "(B, T, ...)", at_least=True)
    B, T = predictions.shape[:2]
    m = _step_mask(fn, lengths, mask, B, T)
    return _masked_mean(optax.losses.squared_error(predictions, targets), m)
