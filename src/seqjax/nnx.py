"""Flax NNX wrappers over the functional core: `Cell`, `RNN`, `LSTM`, `GRU`, `SequenceClassifier`.

The modules hold their parameters as ``nnx.Param`` leaves of *the same*
NamedTuple pytrees the functional core uses (`seqjax.LSTMParams`, ... nested in
the tuples of `seqjax.multilayer`) and call the functional core to compute;
no maths is written twice. ``module.get_params()`` returns those pytrees with
plain arrays, so a module and the functional API can be checked against each
other::

    lstm = seqjax.nnx.LSTM(8, 32, num_layers=2, dropout=0.1, rngs=nnx.Rngs(0))
    ys = lstm(xs)                                                # [B, T, 32]
    carry, ys2 = lstm.layer.apply(lstm.get_params(), xs, key=k)  # the functional core

The layers take PyTorch's options (``num_layers``, ``bidirectional``,
``dropout`` between layers, initial carry, ``time_major`` = not
``batch_first``), plus ``lengths`` for right-padded batches. Differences from
PyTorch: outputs come carry first, ``(final_carry, ys)`` (``lax.scan``'s
order, as everywhere in seqjax) when ``return_carry=True``; the carry is the
functional layer's (an L-tuple of per-layer carries, `seqjax.LSTMCarry` for an
LSTM, a ``(forward, backward)`` pair per bidirectional layer), not ``(h_n, c_n)``.

Dropout follows flax conventions: it draws keys from the ``dropout`` stream of
the ``nnx.Rngs`` given at construction (or at call time) and is switched off by
``deterministic=True`` (constructor, call, ``model.eval()`` / ``model.train()``
or ``nnx.view(model, deterministic=...)``). Both kinds behave so: ``dropout``
between layers and ``recurrent_dropout`` on the recurrent state (one mask per
sequence, reused at every step). ``learnable_initial_carry=True`` makes the
initial carry an ``nnx.Param`` that trains with the rest.

Everything works under ``nnx.jit``, ``nnx.grad`` / ``nnx.value_and_grad``,
``nnx.Optimizer`` and ``nnx.split`` / ``nnx.merge`` (tested in tests/test_nnx.py).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from seqjax.cells.base import Cell as CoreCell
from seqjax.cells.base import symmetric_uniform
from seqjax.cells.gru import gru as _gru
from seqjax.cells.lstm import lstm as _lstm
from seqjax.cells.rnn import rnn as _rnn
from seqjax.layers import Layer as CoreLayer
from seqjax.layers import multilayer
from seqjax.losses import last_valid, mean_valid
from seqjax.options import ScanOptions, resolve

__all__ = ["Cell", "GRU", "LSTM", "RNN", "Recurrent", "SequenceClassifier", "pytorch_init"]

POOLINGS = ("last", "mean")
INITS = ("default", "pytorch")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _wrap(tree):
    """A pytree of arrays -> the same pytree with ``nnx.Param`` leaves (``None`` fields stay ``None``)."""
    return nnx.data(jax.tree.map(nnx.Param, tree))


def _unwrap(tree):
    """A pytree with ``nnx.Variable`` leaves -> the same pytree with plain arrays."""
    return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_var)


def _set(tree, arrays, call: str):
    """Writes ``arrays`` (the functional pytree) into the ``nnx.Param`` leaves of ``tree``."""
    want = jax.tree.structure(_unwrap(tree))
    got = jax.tree.structure(arrays)
    if want != got:
        raise ValueError(f"{call}: params must have the structure {want}, got {got}")
    for v, a in zip(jax.tree.leaves(tree, is_leaf=_is_var), jax.tree.leaves(arrays)):
        if jnp.shape(a) != v.shape:
            raise ValueError(f"{call}: a parameter of shape {v.shape} was given shape {jnp.shape(a)}")
        v.set_value(jnp.asarray(a, v.dtype))


def _check_int(call: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{call}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_rngs(call: str, rngs):
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{call}: rngs must be an nnx.Rngs (e.g. rngs=nnx.Rngs(0)), got {type(rngs).__name__}")


def _dropout_key(call: str, rngs, default_stream):
    """A dropout key from a call-time ``rngs`` (Rngs, RngStream or key) or the module's stream."""
    if rngs is None:
        if default_stream is None:
            raise ValueError(f"{call}: dropout is on (deterministic=False) but no rngs were given; pass "
                             f"rngs=nnx.Rngs(0) at construction or call time, or deterministic=True")
        return default_stream()
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if isinstance(rngs, jax.Array):
        return rngs
    raise TypeError(f"{call}: rngs must be an nnx.Rngs, nnx.RngStream or a jax key, got {type(rngs).__name__}")


def pytorch_init(kind: str, hidden_size: int) -> dict:
    """Cell keyword arguments reproducing PyTorch's ``nn.RNN/LSTM/GRU`` initialisation.

    PyTorch draws every weight and both biases from U(-k, k) with k = 1/sqrt(H).
    seqjax folds ``b_ih + b_hh`` into one bias ``b``, so ``b`` is drawn as the
    sum of two U(-k, k) (the GRU's n block and ``b_hn`` stay single draws, as in
    PyTorch). The LSTM forget-gate bias block is set to ``forget_bias=0.0``:
    seqjax's `lstm` writes a constant into that block at init, so it is exactly
    0 instead of PyTorch's random value with mean 0.

    Args:
      kind: "rnn", "lstm" or "gru".
      hidden_size: H.

    Returns:
      A dict of ``kernel_init``, ``recurrent_init``, ``bias_init`` (and
      ``forget_bias`` for the LSTM) to pass to the cell factory or layer.

    Example:
      >>> cell = seqjax.lstm(4, **pytorch_init("lstm", 4))
    """
    call = "seqjax.nnx.pytorch_init"
    if kind not in ("rnn", "lstm", "gru"):
        raise ValueError(f"{call}: kind must be one of ['gru', 'lstm', 'rnn'], got {kind!r}")
    H = _check_int(call, "hidden_size", hidden_size)
    u = symmetric_uniform(1.0 / math.sqrt(H))

    def bias(key, shape, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        two = u(k1, shape, dtype) + u(k2, shape, dtype)
        if kind == "gru" and tuple(shape) == (3 * H,):   # b = [b_ir + b_hr, b_iz + b_hz, b_in]
            return jnp.concatenate([two[:2 * H], u(k2, (H,), dtype)])
        if kind == "gru":                                # b_hn
            return u(key, shape, dtype)
        return two

    out = dict(kernel_init=u, recurrent_init=u, bias_init=bias)
    if kind == "lstm":
        out["forget_bias"] = 0.0
    return out


# --------------------------------------------------------------------------
# Cell
# --------------------------------------------------------------------------


class Cell(nnx.Module):
    """One recurrent step as an NNX module: any seqjax `Cell` with its params held as ``nnx.Param``.

    ``module(carry, x)`` is ``cell.apply(params, carry, x)``; ``module.scan(xs)``
    is ``seqjax.scan(cell, params, xs)``.

    Args:
      cell: a seqjax cell (``seqjax.lstm(64)``, ``seqjax.stack([...])``, ...).
      in_features: I, the input size.
      rngs: ``nnx.Rngs``; the ``params`` stream initialises the parameters.

    Attributes:
      cell: the functional cell.
      params: the cell's params pytree with ``nnx.Param`` leaves.

    Example:
      >>> m = seqjax.nnx.Cell(seqjax.gru(16), 8, rngs=nnx.Rngs(0))
      >>> carry = m.initial_carry((4,))
      >>> carry, y = m(carry, jnp.ones((4, 8)))      # y [4, 16]
    """

    def __init__(self, cell: CoreCell, in_features: int, *, rngs: nnx.Rngs):
        call = "seqjax.nnx.Cell"
        if not isinstance(cell, CoreCell):
            raise TypeError(f"{call}: cell must be a seqjax cell (seqjax.rnn/lstm/gru/stack), got "
                            f"{type(cell).__name__}")
        _check_int(call, "in_features", in_features)
        _check_rngs(call, rngs)
        self.cell = cell
        self.in_features = in_features
        self.hidden_size = cell.hidden_size
        self.output_size = cell.output_size
        self.params = _wrap(cell.init(rngs.params(), in_features))

    def get_params(self):
        """The params as the functional core's pytree of plain arrays."""
        return _unwrap(self.params)

    def set_params(self, params) -> None:
        """Loads a functional params pytree (same structure and shapes) into the ``nnx.Param`` leaves."""
        _set(self.params, params, "seqjax.nnx.Cell.set_params")

    def initial_carry(self, batch_shape=()):
        """The zero carry for ``batch_shape`` (an int or a tuple)."""
        return self.cell.initial_carry(self.get_params(), batch_shape)

    def __call__(self, carry, x):
        """One step: ``(carry, x [..., I]) -> (carry, y [..., O])``."""
        return self.cell.apply(self.get_params(), carry, x)

    def scan(self, xs, **kwargs):
        """``seqjax.scan(cell, params, xs, **kwargs) -> (final_carry, ys)``."""
        from seqjax.runners import scan
        return scan(self.cell, self.get_params(), xs, **kwargs)


# --------------------------------------------------------------------------
# sequence layers
# --------------------------------------------------------------------------


class Recurrent(nnx.Module):
    """A PyTorch-style multi-layer recurrent layer over any seqjax cell (`seqjax.multilayer`).

    ``RNN``, ``LSTM`` and ``GRU`` are this layer with the matching cell.

    Args:
      cell: the seqjax `Cell` used by every layer and direction.
      in_features: I.
      num_layers: L stacked layers.
      bidirectional: run every layer in both directions (outputs concatenated
        with ``merge="concat"``, PyTorch's behaviour).
      dropout: dropout rate on the outputs of every layer except the last
        (PyTorch's ``dropout``; never on the recurrent state).
      recurrent_dropout: variational dropout rate in [0, 1) on h_{t-1} in
        every layer and direction: one mask per sequence and unit, the same at
        every step (Gal & Ghahramani 2016; `seqjax.multilayer`). Training runs
        on XLA's loop while it is on; evaluation keeps the fast paths.
      learnable_initial_carry: the initial carry is a trained parameter (one
        [H] vector per layer, direction and carry component, broadcast over
        the batch; ``params`` is then a `seqjax.InitialCarryParams`); a
        ``carry`` given to ``__call__`` takes precedence.
      merge: how the two directions combine: "concat", "sum", "mean", "mul".
      return_carry: default for ``__call__``: return ``(final_carry, ys)``
        instead of ``ys``.
      time_major: default layout: ``xs`` [T, B, I] instead of [B, T, I]
        (PyTorch's ``batch_first=False``).
      options: a `seqjax.ScanOptions` (how `seqjax.scan` executes each layer);
        unroll, remat, hoist, backward, kernel override its fields.
      deterministic: disable dropout (also set by ``model.eval()``).
      rngs: ``nnx.Rngs``; ``params`` initialises the weights, ``dropout``
        (default: the default stream) draws dropout masks.

    Attributes:
      layer: the functional `seqjax.Layer`; ``layer.apply(get_params(), xs, ...)``
        computes what the module computes.
      params: the layer's params with ``nnx.Param`` leaves: an L-tuple of cell
        params (`seqjax.BidirectionalParams` per layer when bidirectional).
      output_size: O of ``ys`` (2H when bidirectional and concatenated).
    """

    _call = "seqjax.nnx.Recurrent"

    def __init__(self, cell: CoreCell, in_features: int, *, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, merge: str = "concat", return_carry: bool = False, time_major: bool = False,
                 options: ScanOptions | None = None, unroll: int | None = None, remat: bool | None = None,
                 hoist: bool | None = None, backward: str | None = None, kernel: str | None = None,
                 deterministic: bool = False, recurrent_dropout: float = 0.0, learnable_initial_carry: bool = False,
                 rngs: nnx.Rngs):
        call = self._call
        if not isinstance(cell, CoreCell):
            raise TypeError(f"{call}: cell must be a seqjax cell (seqjax.rnn/lstm/gru/...), got "
                            f"{type(cell).__name__}")
        _check_int(call, "in_features", in_features)
        _check_int(call, "num_layers", num_layers)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{call}: dropout must be a float in [0, 1), got {dropout!r}")
        for name, value in (("bidirectional", bidirectional), ("return_carry", return_carry),
                            ("time_major", time_major), ("deterministic", deterministic)):
            if not isinstance(value, bool):
                raise ValueError(f"{call}: {name} must be a bool, got {value!r}")
        if merge is None:
            raise ValueError(f"{call}: merge=None (a pair of outputs) is not supported by the NNX layers; use "
                             f"'concat', 'sum', 'mean' or 'mul', or seqjax.bidirectional directly")
        _check_rngs(call, rngs)
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{call}: dropout={dropout} has no effect with num_layers=1 (dropout acts between "
                          f"layers, as in PyTorch)", stacklevel=3)
        self.cell = cell
        if isinstance(recurrent_dropout, bool) or not isinstance(recurrent_dropout, (int, float)) or \
                not 0.0 <= recurrent_dropout < 1.0:
            raise ValueError(f"{call}: recurrent_dropout must be a float in [0, 1), got {recurrent_dropout!r}")
        if not isinstance(learnable_initial_carry, bool):
            raise ValueError(f"{call}: learnable_initial_carry must be a bool, got {learnable_initial_carry!r}")
        try:
            self.layer: CoreLayer = multilayer(
                cell, num_layers, bidirectional=bidirectional, dropout=float(dropout),
                recurrent_dropout=float(recurrent_dropout), learnable_initial_carry=learnable_initial_carry,
                merge=merge, options=resolve(call, options, unroll=unroll, remat=remat, hoist=hoist,
                                             backward=backward, kernel=kernel))
        except ValueError as e:
            raise ValueError(str(e).replace("seqjax.multilayer", call)) from None
        self.in_features = in_features
        self.hidden_size = cell.hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.dropout = float(dropout)
        self.recurrent_dropout = float(recurrent_dropout)
        self.learnable_initial_carry = learnable_initial_carry
        self.return_carry = return_carry
        self.time_major = time_major
        self.output_size = self.layer.output_size
        self.deterministic = deterministic
        self.params = _wrap(self.layer.init(rngs.params(), in_features))
        self.rngs = rngs.dropout.fork() if dropout > 0 or recurrent_dropout > 0 else nnx.data(None)

    def get_params(self):
        """The params as the functional core's pytree of plain arrays (for ``self.layer.apply``)."""
        return _unwrap(self.params)

    def set_params(self, params) -> None:
        """Loads a functional params pytree (same structure and shapes) into the ``nnx.Param`` leaves."""
        _set(self.params, params, f"{self._call}.set_params")

    def initial_carry(self, batch_size: int):
        """The carry a batch of ``batch_size`` sequences starts from (zeros, or the learned one with
        ``learnable_initial_carry``; the format ``carry=`` takes)."""
        return self.layer.initial_carry(self.get_params(), (batch_size,))

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view(model, deterministic=...)``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x, *, lengths=None, carry=None, deterministic: bool | None = None, rngs=None,
                 return_carry: bool | None = None, time_major: bool | None = None):
        """Runs the layer over a batch of sequences.

        Args:
          x: [B, T, I] float (or [T, B, I] with ``time_major``).
          lengths: optional [B] int in [0, T] for right-padded batches: outputs
            past a length are zero and the final carry is taken at the last
            valid step (the backward direction reads only the valid prefix).
          carry: optional initial carry (``initial_carry(B)``'s format); default zeros
            (the learned carry with ``learnable_initial_carry``).
          deterministic: override the module's flag (True = no dropout).
          rngs: optional ``nnx.Rngs`` / ``nnx.RngStream`` / key for dropout.
          return_carry: override the constructor's default.
          time_major: override the constructor's default.

        Returns:
          ``ys`` [B, T, O] (or [T, B, O]), or ``(final_carry, ys)`` with ``return_carry``.
        """
        call = self._call
        tm = self.time_major if time_major is None else time_major
        rc = self.return_carry if return_carry is None else return_carry
        det = self.deterministic if deterministic is None else deterministic
        shape = jnp.shape(x)
        layout, fix = ("(T, B, I)", "time_major=False for (B, T, I)") if tm else \
            ("(B, T, I)", "time_major=True for (T, B, I)")
        if len(shape) != 3 or shape[-1] != self.in_features:
            hint = "; add a batch axis, e.g. x[None]" if len(shape) == 2 and shape[-1] == self.in_features else \
                f"; pass {fix}"
            raise ValueError(f"{call}: x must have shape {layout.replace('I', f'I={self.in_features}')}, got "
                             f"{tuple(shape)}{hint}")
        key = None
        if (self.dropout > 0 or self.recurrent_dropout > 0) and not det:
            key = _dropout_key(call, rngs, self.rngs)
        final, ys = self.layer.apply(self.get_params(), x, carry=carry, lengths=lengths, time_major=tm, key=key)
        return (final, ys) if rc else ys


def _cell_kwargs(kind: str, hidden_size: int, init: str, kwargs: dict) -> dict:
    if init not in INITS:
        raise ValueError(f"seqjax.nnx.{kind.upper()}: init must be one of {list(INITS)}, got {init!r}")
    return {**(pytorch_init(kind, hidden_size) if init == "pytorch" else {}), **kwargs}


_LAYER_DOC = """
    Args:
      in_features: I, the input size.
      hidden_size: H.
      num_layers, bidirectional, dropout, merge, return_carry, time_major,
        options, unroll, remat, hoist, backward, kernel, deterministic,
        recurrent_dropout, learnable_initial_carry, rngs: see `Recurrent`.
      init: "default" (the seqjax cell's initialisers) or "pytorch" (`pytorch_init`:
        U(+-1/sqrt(H)) weights and biases, as ``torch.nn.{name}``).
      **cell_options: passed to `seqjax.{fn}` ({opts}, initialisers, ``param_dtype``).
"""


class RNN(Recurrent):
    """PyTorch-style Elman RNN layer (``torch.nn.RNN``) on `seqjax.rnn`.

    Example:
      >>> rnn = seqjax.nnx.RNN(8, 4, activation="relu", init="pytorch", rngs=nnx.Rngs(1))
      >>> ys = rnn(jnp.zeros((32, 9, 8)))        # [32, 9, 4]
    """

    _call = "seqjax.nnx.RNN"

    def __init__(self, in_features: int, hidden_size: int, *, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, merge: str = "concat", return_carry: bool = False, time_major: bool = False,
                 options: ScanOptions | None = None, unroll: int | None = None, remat: bool | None = None,
                 hoist: bool | None = None, backward: str | None = None, kernel: str | None = None,
                 deterministic: bool = False, recurrent_dropout: float = 0.0, learnable_initial_carry: bool = False,
                 init: str = "default", rngs: nnx.Rngs, **cell_options):
        cell = _rnn(hidden_size, **_cell_kwargs("rnn", hidden_size, init, cell_options))
        super().__init__(cell, in_features, num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
                         merge=merge, return_carry=return_carry, time_major=time_major, options=options, unroll=unroll,
                         remat=remat, hoist=hoist, backward=backward, kernel=kernel, deterministic=deterministic,
                         recurrent_dropout=recurrent_dropout, learnable_initial_carry=learnable_initial_carry,
                         rngs=rngs)


class LSTM(Recurrent):
    """PyTorch-style LSTM layer (``torch.nn.LSTM``) on `seqjax.lstm`.

    Example:
      >>> lstm = seqjax.nnx.LSTM(8, 32, num_layers=2, dropout=0.2, proj_size=16, rngs=nnx.Rngs(0))
      >>> carry, ys = lstm(jnp.zeros((4, 20, 8)), return_carry=True)   # ys [4, 20, 16]
    """

    _call = "seqjax.nnx.LSTM"

    def __init__(self, in_features: int, hidden_size: int, *, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, merge: str = "concat", return_carry: bool = False, time_major: bool = False,
                 options: ScanOptions | None = None, unroll: int | None = None, remat: bool | None = None,
                 hoist: bool | None = None, backward: str | None = None, kernel: str | None = None,
                 deterministic: bool = False, recurrent_dropout: float = 0.0, learnable_initial_carry: bool = False,
                 init: str = "default", rngs: nnx.Rngs, **cell_options):
        cell = _lstm(hidden_size, **_cell_kwargs("lstm", hidden_size, init, cell_options))
        super().__init__(cell, in_features, num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
                         merge=merge, return_carry=return_carry, time_major=time_major, options=options, unroll=unroll,
                         remat=remat, hoist=hoist, backward=backward, kernel=kernel, deterministic=deterministic,
                         recurrent_dropout=recurrent_dropout, learnable_initial_carry=learnable_initial_carry,
                         rngs=rngs)


class GRU(Recurrent):
    """PyTorch-style GRU layer (``torch.nn.GRU``) on `seqjax.gru`.

    Example:
      >>> gru = seqjax.nnx.GRU(8, 16, bidirectional=True, rngs=nnx.Rngs(0))
      >>> ys = gru(jnp.zeros((4, 20, 8)), lengths=jnp.array([20, 3, 7, 0]))   # [4, 20, 32]
    """

    _call = "seqjax.nnx.GRU"

    def __init__(self, in_features: int, hidden_size: int, *, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, merge: str = "concat", return_carry: bool = False, time_major: bool = False,
                 options: ScanOptions | None = None, unroll: int | None = None, remat: bool | None = None,
                 hoist: bool | None = None, backward: str | None = None, kernel: str | None = None,
                 deterministic: bool = False, recurrent_dropout: float = 0.0, learnable_initial_carry: bool = False,
                 init: str = "default", rngs: nnx.Rngs, **cell_options):
        cell = _gru(hidden_size, **_cell_kwargs("gru", hidden_size, init, cell_options))
        super().__init__(cell, in_features, num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
                         merge=merge, return_carry=return_carry, time_major=time_major, options=options, unroll=unroll,
                         remat=remat, hoist=hoist, backward=backward, kernel=kernel, deterministic=deterministic,
                         recurrent_dropout=recurrent_dropout, learnable_initial_carry=learnable_initial_carry,
                         rngs=rngs)


for _cls, _fn, _opts in ((RNN, "rnn", "``activation``"),
                         (LSTM, "lstm", "``peepholes``, ``proj_size``, ``forget_bias``, variant flags"),
                         (GRU, "gru", "``reset_after``")):
    _cls.__doc__ = _cls.__doc__.rstrip() + "\n" + _LAYER_DOC.format(name=_cls.__name__, fn=_fn, opts=_opts)


# --------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------


class SequenceClassifier(nnx.Module):
    """A recurrent layer, a pooling over time, and a linear head: ``[B, T, I] -> logits [B, C]``.

    ``pooling="last"`` reads each sequence's output at its last valid step
    (`seqjax.losses.last_valid`: ``ys[:, -1]`` without ``lengths``, which is the
    right step for front-padded batches such as NYU's); ``"mean"`` averages the
    valid steps (`seqjax.losses.mean_valid`). With ``lengths`` the batch must be
    right-padded.

    Args:
      rnn: a `Recurrent` layer (`RNN`, `LSTM`, `GRU`, ...).
      num_classes: C.
      pooling: "last" or "mean".
      rngs: ``nnx.Rngs`` for the head's initialisation.
      kernel_init, bias_init: initialisers of the head (default flax's
        ``nnx.Linear`` ones; ``seqjax.symmetric_uniform(1/sqrt(O))`` for both
        reproduces ``torch.nn.Linear``).

    Example:
      >>> rngs = nnx.Rngs(0)
      >>> model = seqjax.nnx.SequenceClassifier(seqjax.nnx.LSTM(8, 4, rngs=rngs), 4, rngs=rngs)
      >>> logits = model(jnp.zeros((32, 9, 8)))                  # [32, 4]
    """

    def __init__(self, rnn: Recurrent, num_classes: int, *, pooling: str = "last", rngs: nnx.Rngs,
                 kernel_init: Callable | None = None, bias_init: Callable | None = None):
        call = "seqjax.nnx.SequenceClassifier"
        if not isinstance(rnn, Recurrent):
            raise TypeError(f"{call}: rnn must be a seqjax.nnx recurrent layer (RNN, LSTM, GRU, Recurrent), got "
                            f"{type(rnn).__name__}")
        _check_int(call, "num_classes", num_classes)
        if pooling not in POOLINGS:
            raise ValueError(f"{call}: pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        _check_rngs(call, rngs)
        inits = {}
        if kernel_init is not None:
            inits["kernel_init"] = kernel_init
        if bias_init is not None:
            inits["bias_init"] = bias_init
        self.rnn = rnn
        self.num_classes = num_classes
        self.pooling = pooling
        self.head = nnx.Linear(rnn.output_size, num_classes, rngs=rngs, **inits)

    def features(self, x, *, lengths=None, deterministic: bool | None = None, rngs=None):
        """The pooled features ``[B, O]`` fed to the head."""
        ys = self.rnn(x, lengths=lengths, deterministic=deterministic, rngs=rngs, return_carry=False)
        if self.rnn.time_major:
            ys = jnp.swapaxes(ys, 0, 1)
        pool = last_valid if self.pooling == "last" else mean_valid
        return pool(ys, lengths)

    def __call__(self, x, *, lengths=None, deterministic: bool | None = None, rngs=None):
        """Class scores.

        Args:
          x: [B, T, I] float (the rnn's layout).
          lengths: optional [B] int valid steps (right padding).
          deterministic, rngs: passed to the recurrent layer (dropout).

        Returns:
          logits [B, C].
        """
        return self.head(self.features(x, lengths=lengths, deterministic=deterministic, rngs=rngs))
