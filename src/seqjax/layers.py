"""Sequence layers: whole-sequence maps built from cells, and their combinators.

A `Layer` maps a whole sequence, carry first as everywhere in seqjax::

    layer = seqjax.multilayer(seqjax.lstm(128), num_layers=2, bidirectional=True, dropout=0.3)
    params = layer.init(key, input_size=16)
    final_carry, ys = layer.apply(params, xs, lengths=lengths, key=dropout_key)   # ys [B, T, 256]
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from seqjax.cells.base import Array, Cell, chain_init, chain_initial_carry
from seqjax.options import ScanOptions, resolve
from seqjax.runners import scan_for


class Layer(NamedTuple):
    """A sequence layer.

    Attributes:
      init: ``(key, input_size) -> params``.
      apply: ``(params, xs [B, T, I], *, carry=None, lengths=None, resets=None,
        time_major=False, key=None) -> (final_carry, ys [B, T, O])``; ``key``
        enables dropout (training), ``None`` disables it (evaluation).
      initial_carry: ``(params, batch_shape) -> carry``.
      output_size: O.
      name: a short description.
    """

    init: Callable[..., Any]
    apply: Callable[..., Any]
    initial_carry: Callable[..., Any]
    output_size: int
    name: str


MERGES: dict[str | None, Callable | None] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: (a + b) / 2,
    "mul": lambda a, b: a * b,
    None: None,
}


class BidirectionalParams(NamedTuple):
    """Params of `bidirectional`: one pytree per direction."""

    forward: Any
    backward: Any


def sequence(cell: Cell, *, reverse: bool = False, options: ScanOptions | None = None, unroll: int | None = None,
             remat: bool | None = None, hoist: bool | None = None, backward: str | None = None,
             kernel: str | None = None) -> Layer:
    """The layer that runs ``cell`` over a sequence with `seqjax.scan`.

    Args:
      cell: a `Cell`.
      reverse: passed to `seqjax.scan`.
      options: a `seqjax.ScanOptions`; unroll, remat, hoist, backward, kernel
        override its fields (see `seqjax.scan`).

    Returns:
      A `Layer` with the cell's params and carry; ys [B, T, O].
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"seqjax.sequence: cell must be a seqjax Cell, got {type(cell).__name__}")
    options = resolve("seqjax.sequence", options, unroll=unroll, remat=remat, hoist=hoist, backward=backward,
                      kernel=kernel)
    return _sequence("seqjax.sequence(...).apply", cell, reverse, options)


def _sequence(call: str, cell: Cell, reverse: bool, options: ScanOptions) -> Layer:
    """`sequence`'s layer; its apply's errors name ``call``."""

    def apply(params, xs, *, carry=None, lengths=None, resets=None, time_major=False, key=None):
        del key
        return scan_for(call, cell, params, xs, carry=carry, lengths=lengths, resets=resets, reverse=reverse,
                        time_major=time_major, options=options)

    return Layer(cell.init, apply, cell.initial_carry, cell.output_size,
                 f"sequence({cell.name}{', reverse=True' if reverse else ''})")


def bidirectional(forward: Cell, backward: Cell | None = None, *, merge: str | None = "concat",
                  options: ScanOptions | None = None, unroll: int | None = None, remat: bool | None = None,
                  hoist: bool | None = None, kernel: str | None = None) -> Layer:
    """A bidirectional layer: ``forward`` reads the sequence left to right, ``backward`` right to left.

    With ``lengths`` the backward direction reads only each sequence's valid
    prefix, from its last valid step down to step 0 (as PyTorch's packed sequences).

    Args:
      forward: the `Cell` of the forward direction.
      backward: the `Cell` of the backward direction (separate params); default
        the same cell definition as ``forward``.
      merge: how the two output sequences combine: "concat" (ys [B, T, 2O]),
        "sum", "mean", "mul" (ys [B, T, O]), or None (ys is the pair
        ``(ys_forward, ys_backward)``).
      options: a `seqjax.ScanOptions` for both directions; unroll, remat, hoist,
        kernel override its fields (``options.backward`` sets the gradient mode).

    Returns:
      A `Layer` with `BidirectionalParams` and carry ``(forward_carry, backward_carry)``.
    """
    call = "seqjax.bidirectional"
    backward = forward if backward is None else backward
    for name, c in (("forward", forward), ("backward", backward)):
        if not isinstance(c, Cell):
            raise TypeError(f"{call}: {name} must be a seqjax Cell, got {type(c).__name__}")
    if merge not in MERGES:
        raise ValueError(f"{call}: merge must be one of {list(MERGES)}, got {merge!r}")
    if merge in ("sum", "mean", "mul") and forward.output_size != backward.output_size:
        raise ValueError(f"{call}: merge={merge!r} needs equal output sizes, got forward {forward.output_size} and "
                         f"backward {backward.output_size}")
    options = resolve(call, options, unroll=unroll, remat=remat, hoist=hoist, kernel=kernel)
    return _bidirectional_layer(f"{call}(...).apply", forward, backward, merge, options)


def _bidirectional_layer(call: str, forward: Cell, backward: Cell, merge, options: ScanOptions) -> Layer:
    """`bidirectional`'s layer (arguments checked); its apply's errors name ``call``."""
    combine = MERGES[merge]
    opts = dict(options=options)

    def init(key, input_size):
        kf, kb = jax.random.split(key)
        return BidirectionalParams(forward.init(kf, input_size), backward.init(kb, input_size))

    def initial_carry(params, batch_shape=()):
        return (forward.initial_carry(params.forward, batch_shape), backward.initial_carry(params.backward, batch_shape))

    def apply(params, xs, *, carry=None, lengths=None, resets=None, time_major=False, key=None):
        del key
        cf, cb = (None, None) if carry is None else carry
        cf, yf = scan_for(call, forward, params.forward, xs, carry=cf, lengths=lengths, resets=resets,
                          time_major=time_major, **opts)
        cb, yb = scan_for(call, backward, params.backward, xs, carry=cb, lengths=lengths, resets=resets,
                          reverse=True, time_major=time_major, **opts)
        return (cf, cb), ((yf, yb) if combine is None else combine(yf, yb))

    out = forward.output_size + backward.output_size if merge == "concat" else forward.output_size
    return Layer(init, apply, initial_carry, out, f"bidirectional({forward.name}, {backward.name}, merge={merge!r})")


_bidirectional = bidirectional  # multilayer's keyword argument shadows the name


def _check_rate(call: str, name: str, rate) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{call}: {name} must be a float in [0, 1), got {rate!r}")


def dropout(key: Array | None, x: Array, rate: float) -> Array:
    """Inverted dropout: zeroes each element with probability ``rate`` and scales the rest by 1/(1-rate).

    ``key=None`` or ``rate=0`` returns ``x`` unchanged (evaluation).
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def deep(layers: Sequence[Layer | Cell], *, dropout_rate: float = 0.0, options: ScanOptions | None = None) -> Layer:
    """Layers applied one after another over the whole sequence, with dropout between them.

    Dropout acts on the outputs passed from one layer to the next (the
    non-recurrent connections), never on the recurrent state, as Zaremba et al.
    (2014) prescribe; no dropout after the last layer (PyTorch's convention).
    Masks are drawn independently per element and time step from ``key`` in
    ``apply``; with ``key=None`` dropout is off.

    Args:
      layers: `Layer`s or `Cell`s (a cell becomes ``sequence(cell, options=options)``).
      dropout_rate: probability in [0, 1) of dropping an input of layers 2..L.
      options: the `seqjax.ScanOptions` of the layers given as cells.

    Returns:
      A `Layer`; params and carry are tuples with one entry per layer.
    """
    call = "seqjax.deep"
    options = resolve(call, options)
    layers = tuple(sequence(layer, options=options) if isinstance(layer, Cell) else layer for layer in layers)
    if not layers or not all(isinstance(layer, Layer) for layer in layers):
        raise TypeError(f"{call}: layers must be a non-empty sequence of seqjax Layers or Cells, got {layers!r}")
    _check_rate(call, "dropout_rate", dropout_rate)

    def init(key, input_size):
        return chain_init(layers, key, input_size)

    def initial_carry(params, batch_shape=()):
        return chain_initial_carry(layers, params, batch_shape)

    def apply(params, xs, *, carry=None, lengths=None, resets=None, time_major=False, key=None):
        if carry is not None and (not isinstance(carry, (tuple, list)) or len(carry) != len(layers)):
            raise ValueError(f"{call}: carry must be a tuple of {len(layers)} per-layer carries, got {type(carry).__name__}"
                             f"{'' if not isinstance(carry, (tuple, list)) else f' of length {len(carry)}'}")
        keys = [None] * len(layers) if key is None else list(jax.random.split(key, len(layers)))
        carries, ys = [], xs
        for k, (layer, p) in enumerate(zip(layers, params)):
            if k > 0:
                ys = dropout(keys[k], ys, dropout_rate)
            c, ys = layer.apply(p, ys, carry=None if carry is None else carry[k], lengths=lengths, resets=resets,
                                time_major=time_major, key=None)
            carries.append(c)
        return tuple(carries), ys

    return Layer(init, apply, initial_carry, layers[-1].output_size,
                 f"deep([{', '.join(layer.name for layer in layers)}], dropout_rate={dropout_rate})")


def multilayer(cell: Cell, num_layers: int = 1, *, bidirectional: bool = False, dropout: float = 0.0,
               merge: str = "concat", options: ScanOptions | None = None, unroll: int | None = None,
               remat: bool | None = None, hoist: bool | None = None, backward: str | None = None,
               kernel: str | None = None) -> Layer:
    """The PyTorch-style multi-layer RNN layer (``nn.LSTM(num_layers=..., bidirectional=..., dropout=...)``).

    Every layer uses the same cell definition (layer k > 0 reads layer k-1's
    outputs: O, or 2O when bidirectional with ``merge="concat"``).

    Args:
      cell: the `Cell` of every layer and direction.
      num_layers: number of stacked layers L.
      bidirectional: run each layer in both directions.
      dropout: dropout rate between layers (training only: pass ``key`` to ``apply``).
      merge: how directions combine when bidirectional (see `bidirectional`).
      options: a `seqjax.ScanOptions`; unroll, remat, hoist, backward, kernel
        override its fields (see `seqjax.scan`).

    Returns:
      A `Layer`: params and carry are L-tuples (per layer; a bidirectional
      layer's carry is ``(forward, backward)``), ys [B, T, O or 2O].

    Example:
      >>> layer = seqjax.multilayer(seqjax.gru(64), num_layers=3, bidirectional=True, dropout=0.2)
      >>> params = layer.init(jax.random.key(0), input_size=10)
      >>> carries, ys = layer.apply(params, jnp.ones((8, 30, 10)), key=jax.random.key(1))
    """
    call = "seqjax.multilayer"
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{call}: num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(bidirectional, bool):
        raise ValueError(f"{call}: bidirectional must be a bool, got {bidirectional!r}")
    _check_rate(call, "dropout", dropout)
    options = resolve(call, options, unroll=unroll, remat=remat, hoist=hoist, backward=backward, kernel=kernel)
    if bidirectional:
        _bidirectional(cell, merge=merge, options=options)  # checks the cell and merge
        make = lambda: _bidirectional_layer(f"{call}(...).apply", cell, cell, merge, options)  # noqa: E731
    else:
        make = lambda: _sequence(f"{call}(...).apply", cell, False, options)  # noqa: E731
    return deep([make() for _ in range(num_layers)], dropout_rate=dropout)
