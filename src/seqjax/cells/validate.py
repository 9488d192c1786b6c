"""Checks that params belong to a cell, before tracing, with messages that name the cell and the mismatch."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqjax.cells.base import Cell

__all__ = ["check_params"]


@functools.lru_cache(maxsize=512)
def _expected(cell: Cell, input_size: int):
    """The params ``cell.init`` makes for ``input_size``, as ShapeDtypeStructs (None where init cannot be traced)."""
    try:
        return jax.eval_shape(lambda: cell.init(jax.random.key(0), input_size))
    except Exception:  # a hand-made init that needs concrete values: nothing to compare with
        return None


def _structure(tree) -> str:
    return str(jax.tree.structure(tree)).replace("PyTreeDef", "")


def check_params(call: str, cell: Cell, params) -> int:
    """The input size I of ``params``, after checking that they have the structure and shapes ``cell.init`` makes.

    Dtypes may differ from the cell's ``param_dtype`` (params cast to bfloat16
    still run), but every leaf must be a floating-point array.

    Raises:
      ValueError: naming ``call``, the cell, and the first mismatch.
    """
    try:
        input_size = cell.input_size(params)
    except Exception as e:
        raise ValueError(f"{call}: params do not belong to {cell.name}: its input_size(params) failed "
                         f"({type(e).__name__}: {e}); got params {_structure(params)}") from None
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(f"{call}: params do not belong to {cell.name}: input size {input_size!r}")
    try:
        expected = _expected(cell, input_size)
    except TypeError:  # an unhashable hand-made cell
        expected = None
    if expected is None:
        return input_size
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise ValueError(f"{call}: params do not belong to {cell.name}: expected the structure "
                         f"{_structure(expected)} that {cell.name}.init makes, got {_structure(params)}")
    paths = jax.tree_util.tree_leaves_with_path(expected)
    for (path, want), got in zip(paths, jax.tree.leaves(params)):
        name = jax.tree_util.keystr(path).lstrip(".") or "params"
        shape = tuple(jnp.shape(got))
        if shape != want.shape:
            raise ValueError(f"{call}: params do not belong to {cell.name}: {name} has shape {shape}, expected "
                             f"{want.shape} for input size {input_size}")
        if not jnp.issubdtype(jnp.result_type(got), jnp.floating):
            raise ValueError(f"{call}: params do not belong to {cell.name}: {name} has dtype {jnp.result_type(got)}, "
                             "expected a floating-point dtype")
    return input_size
