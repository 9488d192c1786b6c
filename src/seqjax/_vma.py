"""The types `jax.sharding` gives values: manual axes inside `jax.shard_map`, Explicit-axis shardings.

Inside `jax.shard_map` (``check_vma=True``) every value is typed with the
manual mesh axes it varies over (its "vma"); on a mesh with Explicit axes
(`jax.make_mesh`'s default) every value's type carries its sharding. A loop
carry must keep its type, and a `jax.custom_vjp`'s cotangents must have their
primals' types: seqjax's runners and custom VJPs use these helpers so that
both hold. Elsewhere they change nothing.
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

__all__ = ["batch_sharded_like", "explicit_replicated", "match_varying", "vary_over", "varying_axes"]


def varying_axes(*trees) -> frozenset:
    """The manual mesh axes (inside `jax.shard_map`) over which any leaf of ``trees`` varies."""
    out = frozenset()
    for leaf in jax.tree.leaves(trees):
        mat = getattr(jax.typeof(leaf), "mat", None)
        if mat is not None:
            out |= mat.varying
    return out


def match_varying(cts, primals):
    """Each cotangent of ``cts`` typed like its primal in ``primals``: summed (`jax.lax.psum`) over the manual
    axes it varies over and the primal does not (a replicated weight's gradient from one block of the batch),
    cast to varying over those the primal varies over and it does not. Outside `jax.shard_map`, ``cts``."""
    def match(ct, primal):
        if ct is None:
            return None
        have, want = varying_axes(ct), varying_axes(primal)
        if have - want:
            ct = jax.lax.psum(ct, tuple(sorted(have - want)))
        if want - have:
            ct = jax.lax.pcast(ct, tuple(sorted(want - have)), to="varying")
        return ct
    return jax.tree.map(match, cts, primals, is_leaf=lambda x: x is None)


def vary_over(tree, axes: frozenset):
    """Every leaf of ``tree`` cast (`jax.lax.pcast`) to vary over ``axes`` too (e.g. a zero initial carry that
    a loop body will make vary over the batch's axes)."""
    def cast(leaf):
        missing = tuple(sorted(axes - varying_axes(leaf)))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf
    return jax.tree.map(cast, tree)


def batch_sharded_like(tree, xs, axis: int, leaf_axis: int = 0):
    """``tree`` with its batch axis (``leaf_axis`` of every leaf) sharded as ``xs``'s ``axis`` is, where ``xs``'s
    type carries an Explicit-axis sharding (a zero carry, lengths or resets beside a sharded batch); else ``tree``."""
    sharding = getattr(jax.typeof(xs), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return tree
    spec = sharding.spec
    entry = spec[axis] if axis < len(spec) else None

    def put(leaf):
        if leaf is None or jax.numpy.ndim(leaf) <= leaf_axis:
            return leaf
        parts = [None] * jax.numpy.ndim(leaf)
        parts[leaf_axis] = entry
        want = P(*parts)
        have = getattr(jax.typeof(leaf).sharding, "spec", None)
        return leaf if have == want else jax.sharding.reshard(leaf, NamedSharding(mesh, want))
    return jax.tree.map(put, tree)


def explicit_replicated(x):
    """The replicated sharding of ``x``'s Explicit mesh (the ``out_sharding`` of a sum over a sharded batch,
    e.g. a weight gradient), or None where ``x``'s type carries no Explicit-axis sharding."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return None
    return NamedSharding(mesh, P())
