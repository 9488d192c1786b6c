"""`seqjax.stack`: several cells stacked into one deep cell."""
from __future__ import annotations

from typing import Sequence

from seqjax.cells.base import Cell, chain_init, chain_initial_carry, make_cell


def stack(cells: Sequence[Cell]) -> Cell:
    """Stacks cells into one cell: layer k's output is layer k+1's input at the same step.

    The stacked cell's params and carry are tuples with one entry per layer; its
    ``project`` is the first layer's projection, so a runner can still hoist it.
    `seqjax.scan` runs a stacked cell layer by layer over the whole sequence
    (each layer's projection hoisted), which gives the same result as stepping
    it; step-by-step use (``apply``) is what decoding and generation need.

    Args:
      cells: one or more `Cell`s; layer k+1's input size is layer k's output size.

    Returns:
      A `Cell`; params ``(p_0, ..., p_{L-1})``, carry ``(c_0, ..., c_{L-1})``,
      ``y`` [..., O_{L-1}].

    Example:
      >>> cell = seqjax.stack([seqjax.lstm(128), seqjax.lstm(128)])
      >>> params = cell.init(jax.random.key(0), input_size=16)
    """
    cells = tuple(cells)
    if not cells or not all(isinstance(c, Cell) for c in cells):
        raise ValueError(f"seqjax.stack: cells must be a non-empty sequence of seqjax cells, got {cells!r}")

    def init(key, input_size: int):
        return chain_init(cells, key, input_size)

    def initial_carry(params, batch_shape=()):
        return chain_initial_carry(cells, params, batch_shape)

    def project(params, x):
        return cells[0].project(params[0], x)

    def step(params, carry, px):
        new_carry = []
        y = px
        for k, (cell, p, c) in enumerate(zip(cells, params, carry)):
            c, y = cell.step(p, c, y) if k == 0 else cell.apply(p, c, y)
            new_carry.append(c)
        return tuple(new_carry), y

    def input_size(params):
        return cells[0].input_size(params[0])

    return make_cell(init=init, initial_carry=initial_carry, project=project, step=step, input_size=input_size,
                     hidden_size=cells[-1].hidden_size, output_size=cells[-1].output_size,
                     name="stack([" + ", ".join(c.name for c in cells) + "])", layers=cells)
