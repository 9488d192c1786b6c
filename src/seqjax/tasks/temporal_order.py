"""Temporal-order classification (Hochreiter & Schmidhuber 1997, Experiments 6a/6b).

A sequence is ``B`` followed by random distractors from ``{a, b, c, d}`` and a
final ``E``; at a few random positions the distractor is replaced by ``X`` or
``Y``. The class is the ordered pattern of those X/Y symbols and must be read
out at the last step, after a long lag.

Symbols are one-hot with the NYU indices ``X=0, Y=1, a=2, b=3, c=4, d=5, B=6,
E=7`` (``SYMBOLS[i]`` is the letter of index ``i``). Like NYU
``res/sequential_tasks.py`` (``TemporalOrderExp6aSequence``) every sequence
starts with ``B`` and ends with ``E``; the 1997 paper uses the reverse (E first,
B last), which makes no difference to the task.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.tasks._common import TaskBatch, check_batch_size, check_padding, right_to_front

SYMBOLS = "XYabcdBE"
"""Letter of each one-hot index: ``SYMBOLS[i]``."""
CLASSES_6A = "QRSU"
"""Class letters of Experiment 6a: XX->Q, XY->R, YX->S, YY->U."""
CLASSES_6B = "QRSUVABC"
"""Class letters of Experiment 6b: XXX->Q, XXY->R, ..., YYY->C."""

_X, _B, _E, _PAD = 0, 6, 7, -1
_FIRST_DISTRACTOR, _END_DISTRACTOR = 2, 6  # a..d are indices 2..5


class TemporalOrderLevel(NamedTuple):
    """Ranges of a temporal-order difficulty level; every range is inclusive.

    Attributes:
      length: ``(min, max)`` sequence length L, counting B and E.
      t1: ``(min, max)`` 0-based position of the first X/Y symbol.
      t2: ``(min, max)`` 0-based position of the second X/Y symbol.

    The padded length is ``length[1] + 1`` (NYU pads to the exclusive upper
    bound of its ``length_range``), so every sequence has at least one pad row.
    """

    length: tuple[int, int]
    t1: tuple[int, int]
    t2: tuple[int, int]

    @property
    def padded_length(self) -> int:
        return self.length[1] + 1


LEVELS: dict[str, TemporalOrderLevel] = {
    "EASY": TemporalOrderLevel(length=(7, 8), t1=(1, 2), t2=(4, 5)),
    "NORMAL": TemporalOrderLevel(length=(30, 40), t1=(2, 5), t2=(20, 27)),
    "MODERATE": TemporalOrderLevel(length=(60, 80), t1=(10, 20), t2=(45, 54)),
    "HARD": TemporalOrderLevel(length=(100, 110), t1=(10, 20), t2=(50, 60)),
    "NIGHTMARE": TemporalOrderLevel(length=(300, 500), t1=(10, 80), t2=(250, 290)),
}
"""NYU ``DifficultyLevel`` settings; ``HARD`` is the 1997 Experiment 6a."""

EXP_6B_LENGTH = (100, 110)
EXP_6B_POSITIONS = ((10, 20), (33, 43), (66, 76))
"""Experiment 6b: length 100-110 and t1, t2, t3 ranges (inclusive)."""


def _check_ranges(fn: str, length, positions) -> None:
    lo, hi = length
    ok = 2 <= lo <= hi and positions[0][0] >= 1 and positions[-1][1] < lo - 1
    for (a, b) in positions:
        ok = ok and a <= b
    for (_, b), (c, _) in zip(positions[:-1], positions[1:]):
        ok = ok and b < c
    if not ok:
        raise ValueError(
            f"{fn}: ranges must satisfy 1 <= t1 < t2 < ... < min length - 1 "
            f"(inclusive, non-overlapping), got length={length}, positions={positions}"
        )


def _resolve_level(fn: str, level) -> TemporalOrderLevel:
    if isinstance(level, TemporalOrderLevel):
        lv = TemporalOrderLevel(*(tuple(int(v) for v in r) for r in level))
    elif isinstance(level, str) and level.upper() in LEVELS:
        lv = LEVELS[level.upper()]
    else:
        raise ValueError(
            f"{fn}: level must be one of {tuple(LEVELS)} or a TemporalOrderLevel, "
            f"got {level!r}"
        )
    _check_ranges(fn, lv.length, (lv.t1, lv.t2))
    return lv


@partial(jax.jit, static_argnames=("batch_size", "length", "pos_ranges", "padding"))
def _generate(key, batch_size, length, pos_ranges, padding):
    n_pos = len(pos_ranges)
    t_pad = length[1] + 1
    # One randint call (threefry is slow to compile): columns are
    # [L, class, t_1..t_K, symbol_0..symbol_{T-1}] with per-column inclusive bounds.
    lo = [length[0], 0] + [a for a, _ in pos_ranges] + [_FIRST_DISTRACTOR] * t_pad
    hi = [length[1], 2**n_pos - 1] + [b for _, b in pos_ranges] + [_END_DISTRACTOR - 1] * t_pad
    draws = jax.random.randint(
        key, (batch_size, len(lo)), jnp.asarray(lo), jnp.asarray(hi) + 1, dtype=jnp.int32
    )
    lengths, labels = draws[:, 0], draws[:, 1]
    pos = draws[:, 2 : 2 + n_pos]  # [B, K]
    idx = draws[:, 2 + n_pos :]  # [B, T] distractors a..d

    t = jnp.arange(t_pad)[None, :]
    idx = jnp.where(t == 0, _B, idx)
    idx = jnp.where(t == lengths[:, None] - 1, _E, idx)
    for k in range(n_pos):
        bit = (labels >> (n_pos - 1 - k)) & 1  # 0 -> X, 1 -> Y
        idx = jnp.where(t == pos[:, k : k + 1], _X + bit[:, None], idx)
    idx = jnp.where(t >= lengths[:, None], _PAD, idx)

    if padding == "front":
        idx = right_to_front(idx, lengths, fill=_PAD)
        pos = pos + (t_pad - lengths)[:, None]
    x = jax.nn.one_hot(idx, len(SYMBOLS), dtype=jnp.float32)  # -1 -> all-zero row
    return TaskBatch(
        x=x,
        y=labels.astype(jnp.int32),
        lengths=lengths.astype(jnp.int32),
        positions=pos.astype(jnp.int32),
    )


def temporal_order(key, batch_size: int, level="EASY", padding: str = "front") -> TaskBatch:
    """Sample a batch of the temporal-order task (H&S 1997 Experiment 6a, NYU levels).

    Each sequence of length L is ``B``, then uniform distractors from
    ``{a, b, c, d}``, then ``E`` at position L-1; positions t1 and t2 hold the
    class pattern Q=XX, R=XY, S=YX, U=YY (class drawn uniformly). L, t1, t2
    are drawn uniformly from the level's inclusive ranges:

    ========= ======= ====== ======= ======
    level     L       t1     t2      T
    ========= ======= ====== ======= ======
    EASY      7-8     1-2    4-5     9
    NORMAL    30-40   2-5    20-27   41
    MODERATE  60-80   10-20  45-54   81
    HARD      100-110 10-20  50-60   111
    NIGHTMARE 300-500 10-80  250-290 501
    ========= ======= ====== ======= ======

    The function is jitted internally with ``batch_size``, ``level`` and
    ``padding`` static (a recompilation per distinct value); ``key`` may be
    traced, so it can be called inside a jitted train step.

    Args:
      key: a ``jax.random`` key (typed or raw uint32 ``[2]``).
      batch_size: B, a positive Python int (static).
      level: a name from ``LEVELS`` (``"EASY"``, ``"NORMAL"``, ``"MODERATE"``,
        ``"HARD"``, ``"NIGHTMARE"``, case-insensitive) or a custom
        ``TemporalOrderLevel`` (static).
      padding: ``"front"`` (default, as NYU: all-zero rows before the
        sequence) or ``"right"`` (all-zero rows after it; use ``lengths``).

    Returns:
      ``TaskBatch`` with
        x: float32 ``[B, T, 8]`` one-hot symbols, ``T = level max length + 1``;
          pad rows are all zero.
        y: int32 ``[B]`` class in ``0..3`` (``CLASSES_6A[y]``).
        lengths: int32 ``[B]`` sequence length L.
        positions: int32 ``[B, 2]`` time indices of the two X/Y symbols in
          ``x`` (t1, t2 plus the pad offset ``T - L`` when padding is front).

    Example:
      >>> import jax
      >>> from seqjax.tasks import temporal_order, decode, CLASSES_6A
      >>> batch = temporal_order(jax.random.key(0), 32, level="EASY")
      >>> batch.x.shape, batch.y.shape
      ((32, 9, 8), (32,))
      >>> decode(batch.x[0]), CLASSES_6A[int(batch.y[0])]  # doctest: +SKIP
      ('BbXcXcbE', 'Q')

    References:
      Hochreiter & Schmidhuber (1997), Long Short-Term Memory, Neural
      Computation 9(8), Sec. 5.6, Experiment 6a. NYU-DLSP20
      ``res/sequential_tasks.py``, ``TemporalOrderExp6aSequence``.
    """
    fn = "seqjax.tasks.temporal_order"
    batch_size = check_batch_size(fn, batch_size)
    lv = _resolve_level(fn, level)
    padding = check_padding(fn, padding)
    return _generate(key, batch_size, lv.length, (lv.t1, lv.t2), padding)


def temporal_order_6b(key, batch_size: int, padding: str = "front") -> TaskBatch:
    """Sample a batch of the three-symbol temporal-order task (H&S 1997 Experiment 6b).

    As :func:`temporal_order` at ``HARD`` (L in 100-110, B first, E at L-1) but
    with three X/Y positions t1 in 10-20, t2 in 33-43, t3 in 66-76 and eight
    classes XXX->Q, XXY->R, XYX->S, XYY->U, YXX->V, YXY->A, YYX->B, YYY->C;
    class ``c`` has symbol ``Y`` at position k iff bit ``2-k`` of ``c`` is set.
    Jitted internally with ``batch_size`` and ``padding`` static.

    Args:
      key: a ``jax.random`` key.
      batch_size: B, a positive Python int (static).
      padding: ``"front"`` (default) or ``"right"``.

    Returns:
      ``TaskBatch`` with x float32 ``[B, 111, 8]``, y int32 ``[B]`` in
      ``0..7`` (``CLASSES_6B[y]``), lengths int32 ``[B]``, positions int32
      ``[B, 3]`` (indices into ``x``, pad offset included).

    Example:
      >>> import jax
      >>> from seqjax.tasks import temporal_order_6b
      >>> temporal_order_6b(jax.random.key(0), 4).positions.shape
      (4, 3)

    References:
      Hochreiter & Schmidhuber (1997), Neural Computation 9(8), Sec. 5.6,
      Experiment 6b.
    """
    fn = "seqjax.tasks.temporal_order_6b"
    batch_size = check_batch_size(fn, batch_size)
    padding = check_padding(fn, padding)
    return _generate(key, batch_size, EXP_6B_LENGTH, EXP_6B_POSITIONS, padding)


def decode(x) -> str:
    """Turn one one-hot sequence into its symbol string, dropping pad rows.

    Args:
      x: float ``[T, 8]`` one row of ``TaskBatch.x`` (any padding).

    Returns:
      The symbols as a string, e.g. ``"BbXcXcbE"``.

    Example:
      >>> import numpy as np
      >>> decode(np.eye(8)[[6, 3, 0, 4, 0, 4, 3, 7]])
      'BbXcXcbE'
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[-1] != len(SYMBOLS):
        raise ValueError(
            f"seqjax.tasks.decode: x must have shape (T, {len(SYMBOLS)}) (one row of a "
            f"batch), got {x.shape}; index the batch first, e.g. decode(batch.x[0])"
        )
    rows = x[np.abs(x).sum(axis=-1) > 0]
    return "".join(SYMBOLS[i] for i in np.argmax(rows, axis=-1))
