"""``jax.ffi.ffi_call`` for seqjax's kernels: per-shard over a sharded batch, and errors a user can act on.

seqjax's kernels run a recurrence whose batch rows are independent, so a batch
sharded over a mesh is embarrassingly parallel: each device runs the kernel on
its own rows, with the weights replicated. `ffi_call` is told, for every
operand and result, which axis is the batch (`Batch`), and then

* under `jax.jit` with `jax.sharding` Auto axes (a `NamedSharding` on the
  inputs), wraps the kernel in `jax.experimental.custom_partitioning`, whose
  Shardy rule keeps the batch axis sharded and replicates every other axis:
  the compiled HLO has the kernel's custom-call at per-shard shapes and no
  all-gather of the batch; results summed over the batch (weight gradients)
  are summed per shard and then across shards (one all-reduce);
* with Explicit mesh axes (`jax.make_mesh`'s default), where the types say
  the batch sharding, runs the kernel under `jax.shard_map` over the batch's
  mesh axes;
* inside `jax.shard_map` (manual axes) the kernel runs on the local block; its
  results vary over the operands' manual axes (``check_vma=True`` holds), and
  results summed over the batch are this block's partial sums;
* on one device it is the plain FFI call.

A sharding of anything but the batch axis (the hidden or time axis, the
weights) is not computed per shard: those operands are gathered first and the
results are the same as on one device.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from seqjax._vma import varying_axes

__all__ = ["Batch", "HIGHER_ORDER_FIX", "SUM", "ffi_call"]

HIGHER_ORDER_FIX = ("pass kernel='xla' (XLA's loop with seqjax's custom VJP is differentiable again: grad of grad, "
                    "jax.hessian), or kernel='xla', backward='autodiff' for forward mode as well")

#: a result that is a sum over the batch rows (a weight gradient): per shard a partial sum, then summed across
SUM = "sum"


class Batch(NamedTuple):
    """Where the batch is in a kernel's operands and results.

    Attributes:
      operands: for each operand, the axis of its batch rows, or None (no batch
        axis: weights, empty placeholders, scalars).
      results: for each result, the axis of its batch rows, None (no batch
        axis; the same on every shard) or `SUM` (a sum over the batch rows).
    """

    operands: tuple
    results: tuple


def _manual_type(vma: frozenset):
    from jax._src.core import ManualAxisType
    return ManualAxisType(varying=vma)


def _local_results(results, batch: Batch, operands):
    """``results`` (global ShapeDtypeStructs) at the batch size of ``operands``, typed varying like them."""
    sizes = {op.shape[a] for op, a in zip(operands, batch.operands) if a is not None}
    rows = sizes.pop() if len(sizes) == 1 else None
    vma = varying_axes(operands)
    out = []
    for r, axis in zip(results, batch.results):
        shape = list(r.shape)
        if rows is not None and isinstance(axis, int):
            shape[axis] = rows
        typed = dict(manual_axis_type=_manual_type(vma), sharding=NamedSharding(jax.sharding.get_abstract_mesh(), P()))
        out.append(jax.ShapeDtypeStruct(tuple(shape), r.dtype, **(typed if vma else {})))
    return tuple(out)


def _spec(ndim: int, axis, names) -> P:
    parts = [None] * ndim
    if isinstance(axis, int) and names:
        parts[axis] = names
    return P(*parts)


def _names(entry) -> tuple:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _batch_names(operands, batch: Batch, mesh_shape: dict, spec_of) -> tuple:
    """The mesh axes the batch rows are sharded over (those of the first batched operand), or () if they
    do not divide the rows evenly."""
    for op, axis in zip(operands, batch.operands):
        if axis is None:
            continue
        spec = spec_of(op)
        if spec is None:
            return ()
        names = _names(spec[axis]) if axis < len(spec) else ()
        shards = math.prod(mesh_shape[n] for n in names)
        return names if names and op.shape[axis] % shards == 0 else ()
    return ()


def _explicit(operands, batch: Batch):
    """``(abstract mesh, batch axes)`` when the operands' types carry an Explicit-axis sharding, else None."""
    from jax.sharding import AxisType
    for op in operands:
        sharding = getattr(jax.typeof(op), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
            continue
        spec_of = lambda a: getattr(jax.typeof(a).sharding, "spec", None)  # noqa: E731
        explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
        names = tuple(n for n in _batch_names(operands, batch, dict(mesh.shape), spec_of) if n in explicit)
        return mesh, names
    return None


def ffi_call(target: str, result_shape_dtypes, *, batch: Batch | None = None, **kwargs):
    """`jax.ffi.ffi_call` that runs per shard of a sharded batch (``batch``), and raises a seqjax TypeError
    where JAX would differentiate the kernel itself.

    ``result_shape_dtypes`` are the global shapes; a shard's are the same with
    its batch size. seqjax's kernels are differentiable once, in reverse mode,
    through their `jax.custom_vjp`; differentiating that again (grad of grad,
    `jax.hessian`) reaches the FFI call, which JAX cannot differentiate.
    """
    results = tuple(result_shape_dtypes)

    def checked(*args, **attrs):
        try:
            return _call(target, results, batch, kwargs, args, attrs)
        except (ValueError, NotImplementedError) as e:
            # JAX's words for the FFI call, and for the custom_partitioning around it on a multi-device host
            words = ("cannot be differentiated", "Differentiation rule for 'custom_partitioning'")
            if not any(w in str(e) for w in words):
                raise
            raise TypeError(f"seqjax.scan: the native kernel {target!r} is differentiable once, in reverse mode "
                            f"(jax.grad, jax.vjp); a second derivative (grad of grad, jax.hessian) or forward mode "
                            f"reached it: {HIGHER_ORDER_FIX}") from None
    return checked


def _call(target, results, batch, kwargs, args, attrs):
    def plain(*operands):
        local = _local_results(results, batch, operands) if batch is not None else results
        return tuple(jax.ffi.ffi_call(target, local, **kwargs)(*operands, **attrs))

    if batch is None or varying_axes(args) or not any(isinstance(a, jax.core.Tracer) for a in args):
        return plain(*args)  # eager, on the local block inside shard_map, or no batch to split
    explicit = _explicit(args, batch)
    if explicit is not None:
        return _shard_mapped(plain, results, batch, args, *explicit)
    if jax.device_count() == 1:
        return plain(*args)
    return _partitioned(plain, results, batch, args)


def _sum_across(outs, batch: Batch, names):
    return tuple(jax.lax.psum(o, names) if axis == SUM and names else o for o, axis in zip(outs, batch.results))


def _shard_mapped(plain, results, batch: Batch, args, mesh, names):
    """The kernel under `jax.shard_map` over the batch's Explicit mesh axes; other axes are gathered first."""
    in_specs = tuple(_spec(a.ndim, axis, names) for a, axis in zip(args, batch.operands))
    args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, in_specs))
    if not names:
        return plain(*args)
    out_specs = tuple(_spec(len(r.shape), axis, names) for r, axis in zip(results, batch.results))
    body = lambda *ops: _sum_across(plain(*ops), batch, names)  # noqa: E731
    # check_vma=False: results without a batch axis are the same on every block (empty placeholders)
    return tuple(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args))


def _partitioned(plain, results, batch: Batch, args):
    """The kernel under `custom_partitioning`: per shard of the batch under Auto axes (and under `jax.vmap`,
    which `custom_partitioning` does not batch, the plain call's own vmap rule)."""

    def partition(mesh, arg_shapes, result_shape):
        spec_of = lambda a: a.sharding.spec if isinstance(a.sharding, NamedSharding) else None  # noqa: E731
        names = _batch_names(arg_shapes, batch, dict(mesh.shape), spec_of)
        arg_shardings = tuple(NamedSharding(mesh, _spec(len(a.shape), axis, names))
                              for a, axis in zip(arg_shapes, batch.operands))
        out_shardings = tuple(NamedSharding(mesh, _spec(len(r.shape), axis, names))
                              for r, axis in zip(result_shape, batch.results))
        return mesh, lambda *ops: _sum_across(plain(*ops), batch, names), out_shardings, arg_shardings

    fn = custom_partitioning(lambda *ops: plain(*ops))
    fn.def_partition(partition=partition, sharding_rule=_sharding_rule(args, results, batch),
                     **_rule_factors(args, results, batch))

    @jax.custom_batching.custom_vmap
    def call(*ops):
        return fn(*ops)

    @call.def_vmap
    def _vmap(axis_size, in_batched, *ops):
        del axis_size
        outs = jax.vmap(plain, in_axes=tuple(0 if b else None for b in in_batched))(*ops)
        return outs, (True,) * len(outs)

    return call(*args)


def _factors(args, results, batch: Batch):
    """Each operand's and result's dimension factors: ``"b"`` at the batch axis, a factor of its own elsewhere."""
    def names(kind, k, ndim, axis):
        return ["b" if d == axis else f"{kind}{k}_{d}" for d in range(ndim)]
    ins = [names("i", k, a.ndim, axis) for k, (a, axis) in enumerate(zip(args, batch.operands))]
    outs = [names("o", k, len(r.shape), axis) for k, (r, axis) in enumerate(zip(results, batch.results))]
    return ins, outs


def _sharding_rule(args, results, batch: Batch) -> str:
    ins, outs = _factors(args, results, batch)
    side = lambda groups: ", ".join(" ".join(g) for g in groups)  # noqa: E731
    return f"{side(ins)} -> {side(outs)}"


def _rule_factors(args, results, batch: Batch) -> dict:
    """Every factor but the batch's must stay whole; the batch is a reduction where a result sums over it."""
    ins, outs = _factors(args, results, batch)
    others = tuple(f for g in ins + outs for f in g if f != "b")
    used = {f for g in ins for f in g}
    out = {"need_replication_factors": others}
    if "b" in used and SUM in batch.results:
        out["reduction_factors"] = ("b",)
    return out

