"""Checkpoints of a training loop with Orbax's `CheckpointManager`: arrays and JSON metadata per step.

A training loop saves, every ``every`` steps, a pytree of arrays (the
`seqjax.TrainState`: params, optimiser state, step; a TBPTT carry; the PRNG
key) and a JSON dict (where it is in the data, the history so far); the
manager keeps the last ``keep``. Restoring takes a pytree of the same
structure (``like``: arrays or `jax.ShapeDtypeStruct`s, with the shardings to
restore onto) and gives back the saved bits.

    ckpt = seqjax.checkpoint.Checkpoints("runs/lm/ckpt", every=100, keep=3)
    state, carry, history = seqjax.tbptt.fit(step, state, stream, initial_carry=h0, checkpoint=ckpt)
    # killed and started again with the same arguments: resumes from the latest checkpoint

Saving is synchronous: the training steps donate their buffers, so a save must
finish before the next step runs.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np

__all__ = ["Checkpoints"]


def _positive_int(call: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{call}: {name} must be a positive int, got {value!r}")
    return int(value)


def _key_data(tree):
    """Typed PRNG keys as their uint32 data (Orbax stores plain arrays)."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def _is_key(a) -> bool:
    return isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


class Checkpoints:
    """Saves and restores a training loop's arrays and metadata with `orbax.checkpoint.CheckpointManager`.

    Args:
      directory: where the checkpoints go (one folder per saved step); created.
      every: save every ``every`` steps (`should_save`).
      keep: keep the last ``keep`` checkpoints (older ones are deleted).

    Raises:
      ImportError: orbax-checkpoint is not installed (``pip install orbax-checkpoint``).
      ValueError: ``every`` or ``keep`` is not a positive int.
    """

    def __init__(self, directory, *, every: int, keep: int = 3):
        call = "seqjax.checkpoint.Checkpoints"
        self.every = _positive_int(call, "every", every)
        self.keep = _positive_int(call, "keep", keep)
        try:
            import orbax.checkpoint as ocp
        except ImportError as e:
            raise ImportError(f"{call} needs orbax-checkpoint: pip install orbax-checkpoint ({e})") from None
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, save_interval_steps=1, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        """Whether ``step`` (the number of updates done) is one to save."""
        return step % self.every == 0

    def latest(self) -> Optional[int]:
        """The latest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps still kept, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, arrays: Any, meta: dict) -> None:
        """Saves ``arrays`` (a pytree of arrays; typed PRNG keys are stored as their data) and ``meta`` (a
        JSON-serialisable dict) as step ``step``."""
        ocp = self._ocp
        self._manager.save(int(step), args=ocp.args.Composite(arrays=ocp.args.StandardSave(_key_data(arrays)),
                                                              meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, like: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """``(arrays, meta)`` of step ``step`` (default the latest), the arrays in the structure, shapes,
        dtypes and shardings of ``like`` (typed PRNG keys come back as keys of ``like``'s impl).

        Raises:
          FileNotFoundError: nothing saved (or not that step).
        """
        ocp = self._ocp
        step = self.latest() if step is None else int(step)
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"seqjax.checkpoint.Checkpoints.restore: no checkpoint "
                                    f"{'saved' if step is None else f'of step {step}'} in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _key_data(like))
        out = self._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target),
                                                                  meta=ocp.args.JsonRestore()))
        arrays = jax.tree.map(lambda a, k: jax.random.wrap_key_data(a, impl=jax.random.key_impl(k)) if _is_key(k)
                              else a, out["arrays"], like)
        return arrays, dict(out["meta"])

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()
