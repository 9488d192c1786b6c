"""Data-parallel training over a `jax.sharding.Mesh`: the params replicated, the batch split over one mesh axis.

seqjax's recurrences treat batch rows independently, so data parallelism needs
no collective inside the model: place the training state replicated and each
batch sharded over the mesh's batch axis, and `jax.jit` runs every device on
its rows (the native kernels too, `seqjax.backends`), and XLA averages the
gradients with one all-reduce. The results equal the single-device run with
the same global batch, up to float32 rounding of the sums.

`DataParallel` does the placing for any training loop::

    mesh = jax.make_mesh((jax.device_count(),), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    dp = seqjax.sharding.data_parallel(mesh)
    state = dp.replicate(state)                  # a TrainState, or any pytree of arrays
    dp.replicate_nnx(model, optimizer)           # flax.nnx objects, in place
    state, metrics = train_step(state, dp.shard(batch))   # batch [B, ...]: rows split over "b"

`seqjax.fit(..., mesh=mesh)` and `seqjax.tbptt.fit(..., mesh=mesh)` use it
for the state and the batches (and the TBPTT carry).

With several processes (`jax.distributed.initialize`, the mesh spanning every
process's devices), every process places the same global value: each takes
the rows of its own devices from its host copy.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DataParallel", "data_parallel"]


class DataParallel(NamedTuple):
    """Places training state and batches on a mesh for data-parallel training (from `data_parallel`).

    Attributes:
      mesh: the `jax.sharding.Mesh`.
      axis: the mesh axis (or tuple of axes) the batch rows are split over.
    """

    mesh: Mesh
    axis: Any

    @property
    def size(self) -> int:
        """How many shards the batch is split into (the batch size must be a multiple)."""
        names = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        return math.prod(self.mesh.shape[n] for n in names)

    def replicated(self) -> NamedSharding:
        """The sharding of the params and optimiser state: a full copy on every device."""
        return NamedSharding(self.mesh, P())

    def batch_sharding(self, ndim: int, axis: int = 0) -> NamedSharding:
        """The sharding of an ``ndim``-dimensional array whose ``axis`` holds the batch rows."""
        parts = [None] * ndim
        parts[axis] = self.axis
        return NamedSharding(self.mesh, P(*parts))

    def replicate(self, tree):
        """``tree`` (params, a `seqjax.TrainState`, an optimiser state: any pytree of arrays) copied to every
        device of the mesh."""
        return jax.tree.map(lambda leaf: _put(leaf, self.replicated()), tree)

    def replicate_nnx(self, *objects) -> None:
        """Replicates the state of ``flax.nnx`` objects (a model, its ``nnx.Optimizer``) in place."""
        from flax import nnx
        state = nnx.state(objects)
        nnx.update(objects, self.replicate(state))

    def shard(self, tree, axis: int = 0, *, call: str = "seqjax.sharding.DataParallel.shard"):
        """``tree`` (a batch, a carry: arrays whose ``axis`` holds the batch rows) split over the batch axis.

        Leaves without that axis (scalars) are replicated; None stays None.

        Raises:
          ValueError: a leaf's batch size is not a multiple of the shard count.
        """
        def put(leaf):
            if leaf is None:
                return None
            ndim = np.ndim(leaf)
            if ndim <= axis:
                return _put(leaf, self.replicated())
            rows = np.shape(leaf)[axis]
            if rows % self.size:
                raise ValueError(f"{call}: the batch size along axis {axis} must be a multiple of the {self.size} "
                                 f"shards of mesh axis {self.axis!r}, got an array of shape {tuple(np.shape(leaf))}")
            return _put(leaf, self.batch_sharding(ndim, axis))
        return jax.tree.map(put, tree, is_leaf=lambda x: x is None)


def _put(leaf, sharding: NamedSharding):
    """``leaf`` placed with ``sharding``. A mesh that spans several processes (`jax.distributed`) takes the value
    from this process's host copy, as every process holds the same global value; one process: `jax.device_put`."""
    if sharding.is_fully_addressable or (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
        return jax.device_put(leaf, sharding)
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(leaf), sharding), impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def data_parallel(mesh: Mesh, axis=None, *, call: str = "seqjax.sharding.data_parallel") -> DataParallel:
    """A `DataParallel` that splits batches over ``axis`` of ``mesh`` (default: the mesh's first axis).

    Args:
      mesh: a `jax.sharding.Mesh` (e.g. from `jax.make_mesh`); Auto axes let
        `jax.jit` place every intermediate, Explicit axes type them.
      axis: a mesh axis name, or a tuple of names (the batch split over their
        product); default ``mesh.axis_names[0]``.

    Raises:
      TypeError: ``mesh`` is not a `jax.sharding.Mesh`.
      ValueError: ``axis`` names no axis of ``mesh``.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{call}: mesh must be a jax.sharding.Mesh (e.g. from jax.make_mesh), got "
                        f"{type(mesh).__name__}")
    axis = mesh.axis_names[0] if axis is None else axis
    names = axis if isinstance(axis, tuple) else (axis,)
    unknown = [n for n in names if n not in mesh.axis_names]
    if unknown or not names:
        raise ValueError(f"{call}: axis must name axes of the mesh {tuple(mesh.axis_names)}, got {axis!r}")
    return DataParallel(mesh, axis)
