"""What `seqjax.fit` adds around its loops: data-parallel placement on a mesh, and resuming from Orbax checkpoints.

`Placement` replicates the training state over a `jax.sharding.Mesh` and
splits each batch's rows over the mesh's batch axis (`seqjax.sharding`); the
jitted step is unchanged and XLA averages the gradients. `Resume` saves the
loop's position with a `seqjax.checkpoint.Checkpoints` and restores it, so a
run killed after any saved step and started again with the same arguments
ends with the same bits as one that never stopped.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np

WHERE = "seqjax.train.fit"


def _is_nnx_pair(state) -> bool:
    if not (isinstance(state, tuple) and len(state) == 2):
        return False
    from flax import nnx
    return isinstance(state[1], nnx.Optimizer)


class Placement:
    """Where `fit` puts the state and the batches on ``mesh``.

    Args:
      mesh: the `jax.sharding.Mesh`.
      batch_axis: its axis (or tuple of axes) the batch rows are split over; default the first.
      num_runs: with runs in lockstep every batch leads with the run axis, so its rows are axis 1.
    """

    def __init__(self, mesh, batch_axis, num_runs: Optional[int]):
        from seqjax.sharding import data_parallel
        self.dp = data_parallel(mesh, batch_axis, call=WHERE)
        self.rows = 0 if num_runs is None else 1

    def state(self, state):
        """``state`` replicated on every device: a pytree of arrays, or a ``(model, nnx.Optimizer)`` pair
        (updated in place)."""
        if _is_nnx_pair(state):
            self.dp.replicate_nnx(*state)
            return state
        return self.dp.replicate(state)

    def check(self, batch, stacked: bool = False, per_run: bool = False) -> None:
        """Raises a ValueError naming ``batches`` when a leaf's rows do not split evenly over the mesh axis.

        ``batch`` holds arrays or `jax.ShapeDtypeStruct`s (``per_run``: one run's batch, without the run axis);
        leaves with no batch axis (scalars) are replicated.
        """
        axis = (0 if per_run else self.rows) + int(stacked)
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
            shape = tuple(np.shape(leaf))
            if len(shape) > axis and shape[axis] % self.dp.size:
                rows = "axis 1, after the run axis" if self.rows and not per_run else "axis 0"
                raise ValueError(
                    f"{WHERE}: with mesh=, every array of a batch from `batches` needs its batch rows ({rows}) to "
                    f"split evenly over the {self.dp.size} devices of mesh axis {self.dp.axis!r}; "
                    f"batch{jax.tree_util.keystr(path)} has shape {shape}")

    def batch(self, batch, stacked: bool = False):
        """``batch`` with its rows split over the mesh axis (``stacked``: batches stacked ``[k, ...]``)."""
        self.check(batch, stacked)
        return self.dp.shard(batch, self.rows + int(stacked), call=WHERE)

    def constrain(self, batch):
        """Inside a jitted function: ``batch``'s rows constrained to the mesh axis."""
        axis = self.rows

        def put(leaf):
            if np.ndim(leaf) <= axis:
                return leaf
            return jax.lax.with_sharding_constraint(leaf, self.dp.batch_sharding(np.ndim(leaf), axis))
        return jax.tree.map(put, batch)

    def __hash__(self):  # a static argument of the compiled chunk
        return hash((self.dp, self.rows))

    def __eq__(self, other):
        return isinstance(other, Placement) and (self.dp, self.rows) == (other.dp, other.rows)


class Resume:
    """Saves and restores `fit`'s position with a `seqjax.checkpoint.Checkpoints`.

    A checkpoint holds the state's arrays (params, optimiser state, step) and, as JSON, the loop's position:
    ``start`` (the global step the call began at), ``done`` (steps this call has run), ``consumed`` (batches
    pulled from an iterator, skipped on resume), ``seed`` (callable batches draw step ``s`` from
    ``fold_in(key(seed), s)``, so the seed and the step are the data's PRNG state), each run's ``active`` flag
    and history, and ``halted``.
    """

    def __init__(self, checkpoint, *, seed: int, steps_per_call: int, draws_keys: bool):
        from seqjax.checkpoint import Checkpoints
        if not isinstance(checkpoint, Checkpoints):
            raise TypeError(f"{WHERE}: checkpoint must be a seqjax.checkpoint.Checkpoints, got "
                            f"{type(checkpoint).__name__}")
        if checkpoint.every % steps_per_call:
            raise ValueError(f"{WHERE}: checkpoint.every ({checkpoint.every}) must be a multiple of steps_per_call "
                             f"({steps_per_call}): checkpoints are saved between jitted calls")
        self.ckpt, self.seed, self.draws_keys = checkpoint, seed, draws_keys

    def due(self, step: int) -> bool:
        return self.ckpt.should_save(step)

    @staticmethod
    def _arrays(state):
        if _is_nnx_pair(state):
            from flax import nnx
            return {"nnx": nnx.to_pure_dict(nnx.state(state))}
        return {"state": state}

    def save(self, step: int, state, *, start: int, done: int, consumed: int, histories, active, halted) -> None:
        meta = {"start": int(start), "done": int(done), "consumed": int(consumed), "seed": int(self.seed),
                "draws_keys": self.draws_keys, "active": [bool(a) for a in active], "halted": bool(halted),
                "histories": [{"train": h.train, "eval": h.eval, "stop_reason": h.stop_reason} for h in histories]}
        self.ckpt.save(step, self._arrays(state), meta)

    def restore(self, state, histories) -> Optional[dict]:
        """The latest checkpoint's position (None when there is none); the state comes back in ``meta["state"]``
        (an NNX pair is updated in place) and ``histories`` get the saved rows."""
        if self.ckpt.latest() is None:
            return None
        arrays, meta = self.ckpt.restore(self._arrays(state))
        if meta["draws_keys"] != self.draws_keys:
            raise ValueError(f"{WHERE}: the checkpoint in {self.ckpt.directory} was saved by a run whose batches "
                             f"were {'a callable' if meta['draws_keys'] else 'an iterator'}; this call's are not")
        if self.draws_keys and meta["seed"] != self.seed:
            raise ValueError(f"{WHERE}: the checkpoint in {self.ckpt.directory} was saved with seed={meta['seed']}, "
                             f"got seed={self.seed}: resume with the seed that drew its batches")
        if len(meta["histories"]) != len(histories):
            raise ValueError(f"{WHERE}: the checkpoint in {self.ckpt.directory} holds {len(meta['histories'])} "
                             f"run(s), this call trains {len(histories)}")
        if "nnx" in arrays:
            from flax import nnx
            pure = nnx.state(state)
            nnx.replace_by_pure_dict(pure, arrays["nnx"])
            nnx.update(state, pure)
        else:
            state = arrays["state"]
        for h, saved in zip(histories, meta["histories"]):
            h.train, h.eval, h.stop_reason = list(saved["train"]), list(saved["eval"]), saved["stop_reason"]
        return {**meta, "state": state}


def skip(batches, n: int) -> None:
    """Pulls the ``n`` batches an earlier run consumed from the iterator ``batches``."""
    for _ in range(n):
        next(batches)


def writes_files() -> bool:
    """Only one process of a multi-process run writes the history files."""
    return jax.process_index() == 0

