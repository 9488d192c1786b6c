"""Deterministic data generators for the documented sequence tasks.

Every generator takes an explicit ``jax.random`` key (no global RNG) and
returns a :class:`TaskBatch` ``(x, y, lengths, positions)``.
"""

from seqjax.tasks._common import TaskBatch
from seqjax.tasks.adding import ADDING_TOLERANCE, adding_correct, adding_problem
from seqjax.tasks.compare import (
    COMPARE_SPLITS,
    CompareSplits,
    compare_batch,
    compare_dataset,
)
from seqjax.tasks.selective_copy import BLANK, copy_accuracy, selective_copy
from seqjax.tasks.temporal_order import (
    CLASSES_6A,
    CLASSES_6B,
    LEVELS,
    SYMBOLS,
    TemporalOrderLevel,
    decode,
    temporal_order,
    temporal_order_6b,
)

__all__ = [
    "ADDING_TOLERANCE",
    "BLANK",
    "CLASSES_6A",
    "CLASSES_6B",
    "COMPARE_SPLITS",
    "CompareSplits",
    "LEVELS",
    "SYMBOLS",
    "TaskBatch",
    "TemporalOrderLevel",
    "adding_correct",
    "adding_problem",
    "compare_batch",
    "compare_dataset",
    "copy_accuracy",
    "decode",
    "selective_copy",
    "temporal_order",
    "temporal_order_6b",
]
