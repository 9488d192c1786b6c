"""The `Cell` type shared by every cell family, and the numerics they share.

A cell is one time step written as pure functions over explicit parameters.
Every factory (`seqjax.rnn`, `seqjax.lstm`, `seqjax.gru`,
`seqjax.stack`) returns a `Cell`:

    cell = seqjax.lstm(hidden_size=256)
    params = cell.init(key, input_size=128)            # NamedTuple of arrays
    carry = cell.initial_carry(params, batch_shape=(64,))
    carry, y = cell.apply(params, carry, x)            # x [..., I] -> y [..., O]

`apply` is `project` followed by `step`: `project(params, x)` is the
time-parallel input projection `x @ W_x + b` (it may be computed for every
time step at once), `step(params, carry, px)` is the recurrent part.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]


class Cell(NamedTuple):
    """A recurrent cell: a bundle of pure functions plus static sizes.

    Attributes:
      init: ``(key, input_size) -> params``.
      initial_carry: ``(params, batch_shape) -> carry``; zeros, dtype of params.
      project: ``(params, x [..., I]) -> px [..., P]``, the time-parallel part.
      step: ``(params, carry, px [..., P]) -> (carry, y [..., O])``.
      apply: ``(params, carry, x [..., I]) -> (carry, y [..., O])``, i.e.
        ``step(params, carry, project(params, x))``.
      input_size: ``(params) -> int``, the I that ``params`` were built for.
      hidden_size: H, the width of the recurrent state.
      output_size: O, the width of ``y`` (H, or the LSTM projection size).
      name: a short description, used in error messages and reprs.

    A cell built by `seqjax.lstm`, `seqjax.gru`, `seqjax.rnn` or `seqjax.stack`
    may run on a faster path than its ``step`` (see `seqjax.backends.explain`);
    a cell whose ``project`` or ``step`` was replaced (``cell._replace(step=...)``)
    or that was written by hand always runs its own functions.
    """

    init: Callable[..., Any]
    initial_carry: Callable[..., Any]
    project: Callable[..., Array]
    step: Callable[..., Any]
    apply: Callable[..., Any]
    input_size: Callable[[Any], int]
    hidden_size: int
    output_size: int
    name: str


class Form(NamedTuple):
    """What seqjax's runners and backends know of a cell built by one of seqjax's constructors.

    Attributes:
      kind: the cell's form for the custom VJP of `seqjax.backends`: an
        `seqjax.cells.lstm.LSTMSpec`, ``"gru"``, ``"gru_cho"``, ``"rnn_tanh"``,
        ``"rnn_relu"``, or None (no fast form).
      project: the ``project`` the constructor built (a replaced one voids the form).
      joint_apply: optional ``(params) -> ((carry, x) -> (carry, y))``, the same
        step as ``apply`` with the input and recurrent GEMMs joined into one,
        ``[x, h] @ [[W_x], [W_h]]``; runners call it once outside the loop, so
        the weights are concatenated once per sequence, not per step.
      layers: for `seqjax.stack`, the stacked cells; else None.
      linear: for a cell whose state follows a linear recurrence
        ``h_t = a_t * h_{t-1} + b_t`` (`seqjax.min_gru`, `seqjax.min_lstm`,
        `seqjax.lru`), its `LinearRecurrence`, which lets `seqjax.scan`
        evaluate it with a parallel prefix scan; else None.
      unitwise: for a nonlinear cell whose step is a GEMM of the carry
        followed by per-unit arithmetic (`seqjax.gru` with ``reset_after``,
        `seqjax.lstm` without projection or gate recurrence, `seqjax.rnn`), its
        `UnitwiseStep`, which lets ``method="newton"`` evaluate it in parallel
        over time; else None.
      masked_step: ``(params, carry, px, mask [..., O]) -> (carry, y)``, the
        step with the recurrent input ``h_{t-1}`` multiplied by ``mask`` where
        it enters the recurrent matmuls only (variational recurrent dropout,
        Gal & Ghahramani 2016; a GRU's interpolation ``z * h_{t-1}`` keeps the
        unmasked state); None for a cell without a recurrent matmul.
    """

    kind: Any
    project: Callable[..., Array]
    joint_apply: Callable[..., Any] | None
    layers: tuple | None
    linear: "LinearRecurrence | None" = None
    unitwise: "UnitwiseStep | None" = None
    masked_step: Callable[..., Any] | None = None


class LinearRecurrence(NamedTuple):
    """A cell's step written as the elementwise linear recurrence ``h_t = a_t * h_{t-1} + b_t`` plus a readout.

    ``apply`` and this form compute the same sequence (up to rounding); the
    form lets a runner evaluate all T steps with `jax.lax.associative_scan`.

    Attributes:
      coefficients: ``(params, px [T, B, P]) -> (a, b)``, both [T, B, N], from
        the cell's projected inputs ``px = cell.project(params, xs)``, in the
        compute dtype (float32 for 16-bit params; complex for a complex state).
        With ``log_space`` they are ``(log a, log b)``, real, and the recurrence
        is evaluated on logarithms (a > 0 and b > 0 by construction).
      state: ``(carry) -> h [B, N]``, the recurrent state held in a carry.
      carry: ``(params, h [B, N]) -> carry``, the inverse of ``state``, in the params' dtype.
      readout: ``(params, hs [T, B, N], px [T, B, P]) -> ys [T, B, O]``, each
        step's output from its new state and its projected input, in the params' dtype.
      log_space: whether ``coefficients`` returns logarithms.
    """

    coefficients: Callable[..., tuple]
    state: Callable[[Any], Array]
    carry: Callable[..., Any]
    readout: Callable[..., Array]
    log_space: bool = False


class UnitwiseStep(NamedTuple):
    """A nonlinear cell's step split into the carry's GEMM and per-unit arithmetic.

    ``step(params, carry, px) == pointwise(params, carry, recurrent(params, carry), px)``.
    Every leaf of the carry is [..., H], and unit i of the new carry depends
    on the old carry only through unit i of each leaf and unit i of each block
    of ``u``. So the per-unit block of the step's Jacobian (the k x k matrix of
    d new_leaf_m[i] / d old_leaf_j[i] for a carry of k leaves) is one
    Jacobian-vector product per leaf, with ``local`` standing in for
    ``recurrent``: the quasi-Newton Jacobian of ``method="newton"``.

    Attributes:
      recurrent: ``(params, carry) -> u [..., G*H]``, the carry's GEMM(s), linear in the carry.
      local: ``(params, carry) -> u [..., G*H]``, the same linear map keeping
        only each unit's own weights (the diagonal of each [H, H] block).
      pointwise: ``(params, carry, u, px) -> (carry, y)``, the rest of the step.
    """

    recurrent: Callable[..., Array]
    local: Callable[..., Array]
    pointwise: Callable[..., Any]


def block_diagonals(w: Array, blocks: int) -> Array:
    """The diagonals of the ``blocks`` square blocks of ``w`` [H, blocks*H], side by side: [blocks*H]."""
    H = w.shape[0]
    return jnp.diagonal(w.reshape(H, blocks, H), axis1=0, axis2=2).reshape(blocks * H)


def unit_local(h: Array, w: Array, blocks: int) -> Array:
    """``h [..., H]`` times only the diagonal of each [H, H] block of ``w`` [H, blocks*H]: [..., blocks*H].

    The part of ``h @ w`` in which unit i of each block reads only unit i of
    ``h``; in the compute dtype (float32 for 16-bit params).
    """
    dt = compute_dtype(w.dtype)
    return jnp.tile(h.astype(dt), (1,) * (h.ndim - 1) + (blocks,)) * block_diagonals(w, blocks).astype(dt)


# step function -> its Form; weak, so a dropped cell takes its entry with it
_FORMS: "weakref.WeakKeyDictionary[Callable, Form]" = weakref.WeakKeyDictionary()


def make_cell(*, init, initial_carry, project, step, input_size, hidden_size, output_size, name, layers=None,
              joint_apply=None, kind=None, linear=None, unitwise=None, masked_step=None) -> Cell:
    """Builds a `Cell` whose ``apply`` is ``step`` after ``project``, and records its `Form`.

    ``kind``, ``joint_apply``, ``layers``, ``linear``, ``unitwise`` and
    ``masked_step``: see `Form`; they describe exactly this ``project`` and ``step``.
    """

    def apply(params, carry, x):
        return step(params, carry, project(params, x))

    if any(v is not None for v in (kind, joint_apply, layers, linear, unitwise, masked_step)):
        _FORMS[step] = Form(kind, project, joint_apply, layers, linear, unitwise, masked_step)
    return Cell(init, initial_carry, project, step, apply, input_size, hidden_size, output_size, name)


def form_of(cell: Cell) -> Form | None:
    """The `Form` of a cell built by a seqjax constructor whose ``project`` and ``step`` are its own, else None.

    None after ``cell._replace(step=...)`` or ``_replace(project=...)`` and for a
    hand-made `Cell`: such cells run their own ``step`` and are differentiated by autodiff.
    """
    if not isinstance(cell, Cell):
        return None
    try:
        form = _FORMS.get(cell.step)
    except TypeError:  # a step that cannot be weakly referenced was never registered
        return None
    return form if form is not None and form.project is cell.project else None


def joint_input_recurrent(w_x: Array, w_h: Array, b: Array, finish: Callable[[Any, Array], Any]):
    """``(carry, x) -> finish(carry, [x, h] @ [[W_x], [W_h]] + b)`` with the weights concatenated once.

    ``finish(carry, a)`` is the rest of a cell's step given the pre-activation
    ``a = x W_x + h W_h + b``; the carry's first leaf (or the carry itself) is h.
    """
    w = jnp.concatenate([w_x, w_h], axis=0)
    bias = b.astype(compute_dtype(w.dtype))

    def apply(carry, x):
        h = carry if isinstance(carry, jax.Array) else carry[0]
        return finish(carry, matmul(jnp.concatenate([x.astype(h.dtype), h], axis=-1), w) + bias)

    return apply


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype gate arithmetic runs in: float32 for 16-bit params, else the params' own."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def matmul(x: Array, w: Array) -> Array:
    """``x [..., K] @ w [K, N] -> [..., N]`` as one 2-D GEMM, accumulated in >= float32.

    Leading dimensions are flattened so XLA:CPU stays on its fast GEMM path
    (an einsum with several batch dimensions measured 3.4x slower).
    """
    acc = compute_dtype(w.dtype)
    lead = x.shape[:-1]
    out = jax.lax.dot_general(
        x.reshape(-1, x.shape[-1]).astype(w.dtype), w,
        (((1,), (0,)), ((), ())), preferred_element_type=acc)
    return out.reshape(*lead, w.shape[-1])


def check_positive_int(call: str, name: str, value) -> int:
    """Raises a ValueError unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{call}: {name} must be a positive int, got {value!r}")
    return value


def check_factory_options(call: str, param_dtype, **initializers) -> jnp.dtype:
    """Checks a cell factory's ``param_dtype`` (a floating-point dtype) and initialisers (callables).

    Returns ``param_dtype`` as a NumPy dtype; raises a ValueError naming ``call`` and the argument.
    """
    try:
        dtype = jnp.dtype(param_dtype)
    except TypeError:
        raise ValueError(f"{call}: param_dtype must be a floating-point dtype (e.g. jnp.float32), got "
                         f"{param_dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{call}: param_dtype must be a floating-point dtype (e.g. jnp.float32), got {dtype}")
    for name, init in initializers.items():
        if not callable(init):
            raise ValueError(f"{call}: {name} must be an initialiser (key, shape, dtype) -> array, such as "
                             f"jax.nn.initializers.zeros, got {init!r}")
    return dtype


def check_real(call: str, name: str, value) -> float:
    """Raises a ValueError unless ``value`` is a real number (not a bool); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{call}: {name} must be a number, got {value!r}")
    return float(value)


def check_choice(call: str, name: str, value, choices) -> Any:
    """Raises a ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{call}: {name} must be one of {sorted(map(str, choices))}, got {value!r}")
    return value


def resolve_activation(call: str, name: str, value, named: dict[str, Callable]) -> Callable:
    """A callable activation from a name in ``named`` or a callable."""
    if callable(value):
        return value
    if isinstance(value, str) and value in named:
        return named[value]
    raise ValueError(f"{call}: {name} must be one of {sorted(named)} or a callable, got {value!r}")


def check_input(call: str, px_or_x: Array, expected: int, what: str = "x") -> None:
    """Checks the trailing feature size of an input (static shapes, so before tracing)."""
    shape = jnp.shape(px_or_x)
    if len(shape) < 1 or shape[-1] != expected:
        raise ValueError(f"{call}: {what} must have shape (..., {expected}), got {tuple(shape)}")


def symmetric_uniform(scale: float) -> Initializer:
    """Initialiser drawing from U(-scale, scale) (PyTorch's RNN default is scale = 1/sqrt(H))."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def zeros_carry(batch_shape, width: int, dtype) -> Array:
    """A zero state of shape ``batch_shape + (width,)``."""
    if isinstance(batch_shape, int):
        batch_shape = (batch_shape,)
    return jnp.zeros((*tuple(batch_shape), width), dtype)


def init_param(init: Initializer, key, shape, dtype) -> Array:
    """``init(key, shape)`` as ``dtype``; 16-bit params are drawn in float32, then rounded.

    Drawing in float32 keeps the statistics of the float32 draw, e.g. an
    orthogonal matrix stays orthogonal to the 16-bit rounding. It also avoids
    initialisers without 16-bit kernels: the QR behind `orthogonal` has none on CPU.
    """
    return init(key, shape, compute_dtype(dtype)).astype(dtype)


def gate_blocks(init: Initializer, key, fan_in: int, width: int, n: int, dtype) -> Array:
    """``n`` independently initialised [fan_in, width] blocks side by side: [fan_in, n * width].

    Initialising per gate keeps e.g. each recurrent gate matrix orthogonal.
    """
    keys = jax.random.split(key, n)
    return jnp.concatenate([init_param(init, k, (fan_in, width), dtype) for k in keys], axis=-1)


def chain_init(parts, key, input_size: int) -> tuple:
    """Initialises cells or layers in sequence, each reading the previous one's output: a tuple of params."""
    params = []
    for part, k in zip(parts, jax.random.split(key, len(parts))):
        params.append(part.init(k, input_size))
        input_size = part.output_size
    return tuple(params)


def chain_initial_carry(parts, params, batch_shape) -> tuple:
    """The tuple of each part's initial carry."""
    return tuple(part.initial_carry(p, batch_shape) for part, p in zip(parts, params))
