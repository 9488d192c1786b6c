"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates that read only the input.

Neither gate sees ``h_{t-1}``, so the state follows the linear recurrence
``h_t = a_t * h_{t-1} + b_t`` with ``a_t, b_t`` functions of ``x_t`` alone:
`seqjax.scan` can evaluate it with a parallel prefix scan (``method=``), and
``apply`` steps it like any other cell.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells.base import (Array, Cell, LinearRecurrence, check_factory_options, check_input, check_positive_int,
                               compute_dtype, gate_blocks, init_param, make_cell, matmul, zeros_carry)


class MinGRUParams(NamedTuple):
    """Parameters of `seqjax.min_gru`; columns in the order (z, h̃).

    Attributes:
      w_x: [I, 2H] input weights (``Linear_z``, ``Linear_h`` of the paper).
      b: [2H] biases.
    """

    w_x: Array
    b: Array


class MinLSTMParams(NamedTuple):
    """Parameters of `seqjax.min_lstm`; columns in the order (f, i, h̃).

    Attributes:
      w_x: [I, 3H] input weights (``Linear_f``, ``Linear_i``, ``Linear_h`` of the paper).
      b: [3H] biases.
    """

    w_x: Array
    b: Array


def positive(v: Array) -> Array:
    """The paper's ``g``: ``v + 0.5`` for ``v >= 0``, ``sigmoid(v)`` below; continuous and > 0."""
    return jnp.where(v >= 0, v + 0.5, jax.nn.sigmoid(v))


def log_positive(v: Array) -> Array:
    """``log g(v)``, computed without forming ``g(v)`` for negative ``v``."""
    return jnp.where(v >= 0, jnp.log(jax.nn.relu(v) + 0.5), -jax.nn.softplus(-v))


def _check_log_space(call: str, log_space) -> bool:
    if not isinstance(log_space, bool):
        raise ValueError(f"{call}: log_space must be a bool, got {log_space!r}")
    return log_space


def _min_cell(call: str, name: str, H: int, n_gates: int, params_type, log_space: bool, kernel_init, bias_init,
              param_dtype, coefficients, log_coefficients) -> Cell:
    """A cell whose step is ``h = a * h + b`` with ``(a, b) = coefficients(px)`` of the projection ``px`` alone.

    ``coefficients(px [..., n_gates*H]) -> (a, b)`` and ``log_coefficients(px)
    -> (log a, log b)`` (the latter used by the parallel evaluation with ``log_space``).
    """
    param_dtype = check_factory_options(call, param_dtype, kernel_init=kernel_init, bias_init=bias_init)

    def init(key, input_size: int):
        check_positive_int(call + ".init", "input_size", input_size)
        kx, kb = jax.random.split(key)
        return params_type(gate_blocks(kernel_init, kx, input_size, H, n_gates, param_dtype),
                           init_param(bias_init, kb, (n_gates * H,), param_dtype))

    def initial_carry(params, batch_shape=()) -> Array:
        return zeros_carry(batch_shape, H, params.w_x.dtype)

    def project(params, x: Array) -> Array:
        check_input(call, x, params.w_x.shape[0])
        return matmul(x, params.w_x) + params.b.astype(compute_dtype(params.w_x.dtype))

    def step(params, h: Array, px: Array):
        a, b = coefficients(px)
        h = (a * h.astype(px.dtype) + b).astype(params.w_x.dtype)
        return h, h

    linear = LinearRecurrence(
        coefficients=lambda params, px: (log_coefficients if log_space else coefficients)(px),
        state=lambda h: h,
        carry=lambda params, h: h.astype(params.w_x.dtype),
        readout=lambda params, hs, px: hs.astype(params.w_x.dtype),
        log_space=log_space)
    return make_cell(init=init, initial_carry=initial_carry, project=project, step=step,
                     input_size=lambda p: p.w_x.shape[0], hidden_size=H, output_size=H,
                     name=f"{name}(hidden_size={H}{', log_space=True' if log_space else ''})", linear=linear)


def min_gru(hidden_size: int, *, log_space: bool = False,
            kernel_init=jax.nn.initializers.lecun_normal(),
            bias_init=jax.nn.initializers.zeros,
            param_dtype=jnp.float32) -> Cell:
    """The minGRU cell (Feng et al. 2024, section 3.1.3): a GRU whose gate and candidate read only ``x_t``.

    With ``px = x_t W_x + b`` split into (k, v)::

        z_t = sigmoid(k)
        h̃_t = v                       # g(v) with log_space (g below)
        h_t = (1 - z_t) * h_{t-1} + z_t * h̃_t

    ``log_space=True`` is the paper's log-space variant (its appendix): the
    candidate goes through ``g(v) = v + 0.5 if v >= 0 else sigmoid(v)``, so it is
    positive, and `seqjax.scan`'s parallel evaluation (``method="associative"``)
    combines ``log(1 - z)`` and ``log(z) + log g(v)`` with ``logaddexp``. ``apply``
    and the sequential scan compute the same recurrence in linear space.

    Args:
      hidden_size: H.
      log_space: the log-space variant (see above); default False.
      kernel_init, bias_init: initialisers of ``w_x`` [I, 2H] (per block) and
        ``b`` [2H]; default LeCun normal and zeros.
      param_dtype: dtype of params and carry (16-bit params compute in float32).

    Returns:
      A `Cell` with `MinGRUParams`; carry ``h`` [..., H], ``y = h``. It exposes
      its linear recurrence, so ``seqjax.scan(cell, params, xs, method="associative")``
      evaluates all steps with `jax.lax.associative_scan`.

    Example:
      >>> cell = seqjax.min_gru(64)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> carry, ys = seqjax.scan(cell, params, jnp.ones((4, 1000, 8)), method="associative")
    """
    call = "seqjax.min_gru"
    H = check_positive_int(call, "hidden_size", hidden_size)
    log_space = _check_log_space(call, log_space)
    candidate = positive if log_space else (lambda v: v)

    def coefficients(px):
        k, v = px[..., :H], px[..., H:]
        return jax.nn.sigmoid(-k), jax.nn.sigmoid(k) * candidate(v)

    def log_coefficients(px):
        k, v = px[..., :H], px[..., H:]
        return -jax.nn.softplus(k), -jax.nn.softplus(-k) + log_positive(v)

    return _min_cell(call, "min_gru", H, 2, MinGRUParams, log_space, kernel_init, bias_init, param_dtype,
                     coefficients, log_coefficients)


def min_lstm(hidden_size: int, *, log_space: bool = False,
             kernel_init=jax.nn.initializers.lecun_normal(),
             bias_init=jax.nn.initializers.zeros,
             param_dtype=jnp.float32) -> Cell:
    """The minLSTM cell (Feng et al. 2024, section 3.2.3): forget and input gates of ``x_t`` alone, normalised.

    With ``px = x_t W_x + b`` split into (k_f, k_i, v)::

        f_t = sigmoid(k_f),  i_t = sigmoid(k_i)
        f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)
        h̃_t = v                       # g(v) with log_space
        h_t = f'_t * h_{t-1} + i'_t * h̃_t

    The normalised gates are computed as ``f' = sigmoid(-d)``, ``i' = sigmoid(d)``
    with ``d = softplus(-k_f) - softplus(-k_i) = log(i / f)``, which is exact and
    never divides. ``log_space=True`` is the paper's log-space variant, as for
    `seqjax.min_gru`.

    Args:
      hidden_size: H.
      log_space: the log-space variant; default False.
      kernel_init, bias_init: initialisers of ``w_x`` [I, 3H] (per block) and
        ``b`` [3H]; default LeCun normal and zeros.
      param_dtype: dtype of params and carry (16-bit params compute in float32).

    Returns:
      A `Cell` with `MinLSTMParams`; carry ``h`` [..., H], ``y = h``; it exposes
      its linear recurrence (``seqjax.scan(..., method="associative")``).

    Example:
      >>> cell = seqjax.min_lstm(64, log_space=True)
      >>> params = cell.init(jax.random.key(0), input_size=8)
    """
    call = "seqjax.min_lstm"
    H = check_positive_int(call, "hidden_size", hidden_size)
    log_space = _check_log_space(call, log_space)
    candidate = positive if log_space else (lambda v: v)

    def log_ratio(px):
        return jax.nn.softplus(-px[..., :H]) - jax.nn.softplus(-px[..., H:2 * H])

    def coefficients(px):
        d = log_ratio(px)
        return jax.nn.sigmoid(-d), jax.nn.sigmoid(d) * candidate(px[..., 2 * H:])

    def log_coefficients(px):
        d = log_ratio(px)
        return -jax.nn.softplus(d), -jax.nn.softplus(-d) + log_positive(px[..., 2 * H:])

    return _min_cell(call, "min_lstm", H, 3, MinLSTMParams, log_space, kernel_init, bias_init, param_dtype,
                     coefficients, log_coefficients)
