"""Sequence layers: whole-sequence maps built from cells, and their combinators.

A `Layer` maps a whole sequence, carry first as everywhere in seqjax::

    layer = seqjax.multilayer(seqjax.lstm(128), num_layers=2, bidirectional=True, dropout=0.3)
    params = layer.init(key, input_size=16)
    final_carry, ys = layer.apply(params, xs, lengths=lengths, key=dropout_key)   # ys [B, T, 256]

Two regularisers act inside a layer rather than between layers:
``recurrent_dropout=`` (variational dropout of h_{t-1}, one mask per sequence
reused at every step) and ``learnable_initial_carry=True`` (the carry a
sequence starts from is a trained parameter).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from seqjax.cells.base import Array, Cell, chain_init, chain_initial_carry, form_of
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


class InitialCarryParams(NamedTuple):
    """Params of a layer built with ``learnable_initial_carry=True``.

    Attributes:
      layer: the params the layer has without a learned carry.
      carry: the learned initial carry: the layer's carry pytree without a
        batch axis (one [H] vector per layer, direction and carry component,
        e.g. an `seqjax.LSTMCarry` of ``h`` [P] and ``c`` [H]), in the params'
        dtype, initialised to zeros. ``apply`` broadcasts it over the batch.
    """

    layer: Any
    carry: Any


def _check_bool(call: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{call}: {name} must be a bool, got {value!r}")


def _batch_size(xs, time_major: bool) -> int | None:
    shape = jnp.shape(xs)
    return (shape[1] if time_major else shape[0]) if len(shape) == 3 else None


def _learned_carry(layer: Layer) -> Layer:
    """``layer`` whose initial carry is a trained parameter (`InitialCarryParams`), broadcast over the batch.

    ``apply(params, xs, carry=None, ...)`` starts every sequence from
    ``params.carry``; a ``carry`` the caller passes (and the carry
    `seqjax.tbptt` hands from one window to the next) takes precedence.
    ``resets`` restore the cell's zero carry, as in `seqjax.scan`. The learned
    carry is an ordinary input of the run, so gradients reach it on every path.
    """

    def init(key, input_size):
        params = layer.init(key, input_size)
        return InitialCarryParams(params, layer.initial_carry(params, ()))

    def initial_carry(params, batch_shape=()):
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, batch_shape + a.shape), params.carry)

    def apply(params, xs, *, carry=None, lengths=None, resets=None, time_major=False, key=None):
        B = _batch_size(xs, time_major)
        if carry is None and B is not None:      # a bad xs is reported by the layer's own apply
            carry = initial_carry(params, (B,))
        return layer.apply(params.layer, xs, carry=carry, lengths=lengths, resets=resets, time_major=time_major,
                           key=key)

    return Layer(init, apply, initial_carry, layer.output_size, f"{layer.name} with a learned initial carry")


def _recurrent_mask(cell: Cell, key, xs, time_major: bool, rate: float):
    """The [B, O] variational dropout mask ``bernoulli(key, 1 - rate, (B, O)) / (1 - rate)``; None when off.

    Drawn in JAX's default float dtype; `seqjax.scan` casts it to the carry's dtype.
    """
    B = _batch_size(xs, time_major)
    if key is None or rate == 0.0 or B is None:
        return None
    keep = jax.random.bernoulli(key, 1.0 - rate, (B, cell.output_size))
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(jnp.result_type(float))


def _check_recurrent_dropout(call: str, cell: Cell, rate) -> float:
    """``rate`` checked (a float in [0, 1)) and, when on, that the cell has a recurrent matmul to mask."""
    _check_rate(call, "recurrent_dropout", rate)
    form = form_of(cell)
    if rate > 0 and (form is None or form.masked_step is None):
        raise ValueError(f"{call}: recurrent_dropout needs a cell whose h_(t-1) enters a recurrent matmul (built by "
                         f"seqjax.rnn, seqjax.lstm or seqjax.gru), got {cell.name}")
    return float(rate)


def sequence(cell: Cell, *, reverse: bool = False, recurrent_dropout: float = 0.0,
             learnable_initial_carry: bool = False, options: ScanOptions | None = None, unroll: int | None = None,
             remat: bool | None = None, hoist: bool | None = None, backward: str | None = None,
             kernel: str | None = None) -> Layer:
    """The layer that runs ``cell`` over a sequence with `seqjax.scan`.

    Args:
      cell: a `Cell`.
      reverse: passed to `seqjax.scan`.
      recurrent_dropout: variational dropout rate in [0, 1) on h_{t-1} where it
        enters the recurrent matmul (Gal & Ghahramani 2016): ``apply(...,
        key=k)`` draws one mask per call, ``bernoulli(k, 1 - rate, (B, O)) /
        (1 - rate)`` (one draw per sequence and unit), and reuses it at every
        step (`seqjax.scan`'s ``recurrent_mask``); ``key=None`` turns it off
        (evaluation). Cells built
        by `seqjax.rnn`, `seqjax.lstm`, `seqjax.gru` only. A masked run takes
        XLA's loop (the native kernels have no per-row mask; see `seqjax.scan`).
      learnable_initial_carry: start from a trained carry (`InitialCarryParams`;
        see `multilayer`) instead of zeros.
      options: a `seqjax.ScanOptions`; unroll, remat, hoist, backward, kernel
        override its fields (see `seqjax.scan`).

    Returns:
      A `Layer` with the cell's params and carry; ys [B, T, O].
    """
    call = "seqjax.sequence"
    if not isinstance(cell, Cell):
        raise TypeError(f"{call}: cell must be a seqjax Cell, got {type(cell).__name__}")
    rate = _check_recurrent_dropout(call, cell, recurrent_dropout)
    _check_bool(call, "learnable_initial_carry", learnable_initial_carry)
    options = resolve(call, options, unroll=unroll, remat=remat, hoist=hoist, backward=backward, kernel=kernel)
    layer = _sequence(f"{call}(...).apply", cell, reverse, options, rate)
    return _learned_carry(layer) if learnable_initial_carry else layer


def _sequence(call: str, cell: Cell, reverse: bool, options: ScanOptions, recurrent_dropout: float = 0.0) -> Layer:
    """`sequence`'s layer; its apply's errors name ``call``."""

    def apply(params, xs, *, carry=None, lengths=None, resets=None, time_major=False, key=None):
        mask = _recurrent_mask(cell, key, xs, time_major, recurrent_dropout)
        return scan_for(call, cell, params, xs, carry=carry, lengths=lengths, resets=resets, reverse=reverse,
                        time_major=time_major, options=options, recurrent_mask=mask)

    opts = (", reverse=True" if reverse else "") + (f", recurrent_dropout={recurrent_dropout}" if recurrent_dropout
                                                     else "")
    return Layer(cell.init, apply, cell.initial_carry, cell.output_size, f"sequence({cell.name}{opts})")


def bidirectional(forward: Cell, backward: Cell | None = None, *, merge: str | None = "concat",
                  recurrent_dropout: float = 0.0, learnable_initial_carry: bool = False,
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
      recurrent_dropout: variational dropout rate on h_{t-1} (see `sequence`);
        each direction draws its own mask, from ``jax.random.split(key)``'s
        first and second key.
      learnable_initial_carry: a trained initial carry per direction (see `multilayer`).
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
    rate = max(_check_recurrent_dropout(call, forward, recurrent_dropout),
               _check_recurrent_dropout(call, backward, recurrent_dropout))
    _check_bool(call, "learnable_initial_carry", learnable_initial_carry)
    options = resolve(call, options, unroll=unroll, remat=remat, hoist=hoist, kernel=kernel)
    layer = _bidirectional_layer(f"{call}(...).apply", forward, backward, merge, options, rate)
    return _learned_carry(layer) if learnable_initial_carry else layer


def _bidirectional_layer(call: str, forward: Cell, backward: Cell, merge, options: ScanOptions,
                         recurrent_dropout: float = 0.0) -> Layer:
    """`bidirectional`'s layer (arguments checked); its apply's errors name ``call``."""
    combine = MERGES[merge]
    opts = dict(options=options)

    def init(key, input_size):
        kf, kb = jax.random.split(key)
        return BidirectionalParams(forward.init(kf, input_size), backward.init(kb, input_size))

    def initial_carry(params, batch_shape=()):
        return (forward.initial_carry(params.forward, batch_shape), backward.initial_carry(params.backward, batch_shape))

    def apply(params, xs, *, carry=None, lengths=None, resets=None, time_major=False, key=None):
        kf, kb = (None, None) if key is None else jax.random.split(key)
        mf = _recurrent_mask(forward, kf, xs, time_major, recurrent_dropout)
        mb = _recurrent_mask(backward, kb, xs, time_major, recurrent_dropout)
        cf, cb = (None, None) if carry is None else carry
        cf, yf = scan_for(call, forward, params.forward, xs, carry=cf, lengths=lengths, resets=resets,
                          time_major=time_major, recurrent_mask=mf, **opts)
        cb, yb = scan_for(call, backward, params.backward, xs, carry=cb, lengths=lengths, resets=resets,
                          reverse=True, time_major=time_major, recurrent_mask=mb, **opts)
        return (cf, cb), ((yf, yb) if combine is None else combine(yf, yb))

    out = forward.output_size + backward.output_size if merge == "concat" else forward.output_size
    rd = f", recurrent_dropout={recurrent_dropout}" if recurrent_dropout else ""
    return Layer(init, apply, initial_carry, out,
                 f"bidirectional({forward.name}, {backward.name}, merge={merge!r}{rd})")


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


def deep(layers: Sequence[Layer | Cell], *, dropout_rate: float = 0.0, recurrent_dropout: float = 0.0,
         learnable_initial_carry: bool = False, options: ScanOptions | None = None) -> Layer:
    """Layers applied one after another over the whole sequence, with dropout between them.

    Dropout acts on the outputs passed from one layer to the next (the
    non-recurrent connections), never on the recurrent state, as Zaremba et al.
    (2014) prescribe; no dropout after the last layer (PyTorch's convention).
    Masks are drawn independently per element and time step from ``key`` in
    ``apply``; with ``key=None`` dropout is off. ``recurrent_dropout`` acts on
    the recurrent state instead, one mask per sequence for all steps (Gal &
    Ghahramani 2016); the two combine. ``apply``'s ``key`` reaches every layer
    (``fold_in(split(key, L)[k], 1)`` for layer k), so layers built with their
    own dropout draw their masks too.

    Args:
      layers: `Layer`s or `Cell`s (a cell becomes ``sequence(cell,
        recurrent_dropout=recurrent_dropout, options=options)``).
      dropout_rate: probability in [0, 1) of dropping an input of layers 2..L.
      recurrent_dropout: variational dropout rate in [0, 1) on h_{t-1} of every
        layer given as a cell (see `sequence`); a `Layer` sets its own.
      learnable_initial_carry: start every layer from a trained carry
        (`InitialCarryParams` over the tuple; see `multilayer`).
      options: the `seqjax.ScanOptions` of the layers given as cells.

    Returns:
      A `Layer`; params and carry are tuples with one entry per layer
      (`InitialCarryParams` of those tuples with ``learnable_initial_carry``).
    """
    call = "seqjax.deep"
    options = resolve(call, options)
    _check_rate(call, "recurrent_dropout", recurrent_dropout)
    _check_bool(call, "learnable_initial_carry", learnable_initial_carry)
    layers = tuple(layers) if isinstance(layers, (list, tuple)) else layers
    if isinstance(layers, tuple) and recurrent_dropout > 0 and any(isinstance(layer, Layer) for layer in layers):
        raise ValueError(f"{call}: recurrent_dropout={recurrent_dropout} applies to layers given as cells; give "
                         f"cells, or build each Layer with its own recurrent_dropout (seqjax.sequence, "
                         f"seqjax.bidirectional)")
    layers = tuple(_sequence(f"{call}(...).apply", layer, False, options,
                             _check_recurrent_dropout(call, layer, recurrent_dropout))
                   if isinstance(layer, Cell) else layer for layer in layers)
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
                                time_major=time_major, key=None if key is None else jax.random.fold_in(keys[k], 1))
            carries.append(c)
        return tuple(carries), ys

    layer = Layer(init, apply, initial_carry, layers[-1].output_size,
                  f"deep([{', '.join(layer.name for layer in layers)}], dropout_rate={dropout_rate})")
    return _learned_carry(layer) if learnable_initial_carry else layer


def multilayer(cell: Cell, num_layers: int = 1, *, bidirectional: bool = False, dropout: float = 0.0,
               recurrent_dropout: float = 0.0, learnable_initial_carry: bool = False,
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
      recurrent_dropout: variational dropout rate in [0, 1) on h_{t-1} of every
        layer and direction: one mask [B, O] per sequence, reused at every step
        (Gal & Ghahramani 2016; training only, drawn from ``key``). Runs on
        XLA's loop while a mask is drawn (see `seqjax.scan`'s ``recurrent_mask``);
        evaluation (``key=None``) keeps the fast paths.
      learnable_initial_carry: start from a trained carry, one [H] vector per
        layer, direction and carry component (params `InitialCarryParams`; a
        ``carry`` passed to ``apply`` takes precedence; see `multilayer`).
      merge: how directions combine when bidirectional (see `bidirectional`).
      options: a `seqjax.ScanOptions`; unroll, remat, hoist, backward, kernel
        override its fields (see `seqjax.scan`).

    Returns:
      A `Layer`: params and carry are L-tuples (per layer; a bidirectional
      layer's carry is ``(forward, backward)``; params wrapped in
      `InitialCarryParams` with ``learnable_initial_carry``), ys [B, T, O or 2O].

    Example:
      >>> layer = seqjax.multilayer(seqjax.gru(64), num_layers=3, bidirectional=True, dropout=0.2)
      >>> params = layer.init(jax.random.key(0), input_size=10)
      >>> carries, ys = layer.apply(params, jnp.ones((8, 30, 10)), key=jax.random.key(1))
      >>> varlayer = seqjax.multilayer(seqjax.lstm(64), 2, recurrent_dropout=0.25, learnable_initial_carry=True)
      >>> params = varlayer.init(jax.random.key(0), input_size=10)
      >>> carries, ys = varlayer.apply(params, jnp.ones((8, 30, 10)), key=jax.random.key(1))
    """
    call = "seqjax.multilayer"
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{call}: num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(bidirectional, bool):
        raise ValueError(f"{call}: bidirectional must be a bool, got {bidirectional!r}")
    _check_rate(call, "dropout", dropout)
    if not isinstance(cell, Cell):
        raise TypeError(f"{call}: cell must be a seqjax Cell, got {type(cell).__name__}")
    rate = _check_recurrent_dropout(call, cell, recurrent_dropout)
    _check_bool(call, "learnable_initial_carry", learnable_initial_carry)
    options = resolve(call, options, unroll=unroll, remat=remat, hoist=hoist, backward=backward, kernel=kernel)
    if bidirectional:
        _bidirectional(cell, merge=merge, options=options)  # checks the cell and merge
        make = lambda: _bidirectional_layer(f"{call}(...).apply", cell, cell, merge, options, rate)  # noqa: E731
    else:
        make = lambda: _sequence(f"{call}(...).apply", cell, False, options, rate)  # noqa: E731
    return deep([make() for _ in range(num_layers)], dropout_rate=dropout,
                learnable_initial_carry=learnable_initial_carry)
