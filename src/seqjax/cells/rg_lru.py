"""The Real-Gated Linear Recurrent Unit (De et al. 2024, "Griffin", the recurrence of Griffin and Hawk)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells.base import (Array, Cell, LinearRecurrence, check_factory_options, check_input, check_positive_int,
                               check_real, compute_dtype, gate_blocks, init_param, make_cell, matmul, zeros_carry)


class RGLRUParams(NamedTuple):
    """Parameters of `seqjax.rg_lru` (hidden size H, input size I); columns in the order (r, i, v).

    Attributes:
      w_x: [I, 3H] input weights of the recurrence gate ``r``, the input gate
        ``i`` and the value ``v`` ([I, 2H], no value block, with ``value_projection=False``).
      b: [3H] (or [2H]) biases.
      a_param: [H]: the per-unit decay is ``a = exp(-softplus(a_param))`` in (0, 1)
        (the paper's ``a = sigmoid(Lambda)`` with ``Lambda = -a_param``).
    """

    w_x: Array
    b: Array
    a_param: Array


def decay_init(key, n: int, a_min: float, a_max: float) -> Array:
    """``a_param`` [n] float32 with ``a = exp(-softplus(a_param))`` such that ``a^2 ~ U(a_min^2, a_max^2)``.

    The paper's initialisation (section 2.4): ``a^c`` lies in [0.9, 0.999] for
    its default; drawing ``a^2`` uniformly is the ring's area law of the LRU.
    """
    u = jax.random.uniform(key, (n,), jnp.float32)
    log_a = 0.5 * jnp.log(u * (a_max ** 2 - a_min ** 2) + a_min ** 2)       # log a < 0
    return jnp.log(jnp.expm1(-log_a))                                      # softplus^-1(-log a)


_SQRT_MAX_DERIVATIVE = 1000.0


@jax.custom_jvp
def _sqrt_bounded_derivative(x: Array) -> Array:
    """``sqrt(x)`` whose derivative is capped at ``_SQRT_MAX_DERIVATIVE`` (it is infinite at x = 0).

    ``1 - a_t^2`` reaches 0 when the decay saturates at 1 (a recurrence gate of exactly 0); the cap keeps the
    gradient finite there, as recurrentgemma's ``sqrt_bound_derivative`` does (with the same bound).
    """
    return jnp.sqrt(x)


@_sqrt_bounded_derivative.defjvp
def _sqrt_bounded_derivative_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = jnp.sqrt(x)
    return y, t * (0.5 / jnp.maximum(y, 0.5 / _SQRT_MAX_DERIVATIVE))


def rg_lru(hidden_size: int, *, c: float = 8.0, a_min: float = 0.9, a_max: float = 0.999,
           value_projection: bool = True, kernel_init=jax.nn.initializers.lecun_normal(),
           bias_init=jax.nn.initializers.zeros, param_dtype=jnp.float32) -> Cell:
    """The RG-LRU (De et al. 2024, section 2.4): a real diagonal recurrence with input-dependent decay.

    With ``px = x_t W_x + b`` split into (k_r, k_i, v)::

        r_t = sigmoid(k_r)                         # recurrence gate
        i_t = sigmoid(k_i)                         # input gate
        log a_t = -c * r_t * softplus(a_param)     # a_t = a^(c r_t), a = exp(-softplus(a_param))
        h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * v)

    and ``y_t = h_t``. ``sqrt(1 - a_t^2)`` is computed as ``sqrt(-expm1(2 log a_t))``,
    accurate when ``a_t`` is close to 1, with its derivative capped at 1000 (infinite
    where ``a_t`` saturates at 1), as in recurrentgemma. Both gates read only ``x_t``, so the
    state follows a linear recurrence and ``seqjax.scan(..., method="associative")``
    evaluates it in parallel over time.

    How this differs from the paper's code (recurrentgemma): the gate matrices
    are dense [I, H], not block-diagonal per head; the value ``v`` is a linear
    map of ``x_t`` inside the cell (``value_projection=True``), so the cell takes
    any input size, where Griffin feeds the RG-LRU the output of its own linear
    layer and convolution (``value_projection=False``: ``v = x_t``, and the
    input size must equal H); and a ``resets`` flag (`seqjax.scan`) restarts the
    state from the initial carry but keeps the ``sqrt(1 - a_t^2)`` factor, which
    recurrentgemma drops at a document's first token.

    Args:
      hidden_size: H.
      c: the decay's temperature, > 0; default 8 (the paper's).
      a_min, a_max: the range of the initial decay ``a``, 0 < a_min < a_max < 1
        (``a^2`` uniform between their squares); default 0.9 and 0.999.
      value_projection: whether the value is ``x_t W_v + b_v`` (default) or ``x_t`` itself.
      kernel_init, bias_init: initialisers of ``w_x`` (per [I, H] block) and ``b``;
        default LeCun normal and zeros.
      param_dtype: dtype of params and carry (16-bit params compute in float32).

    Returns:
      A `Cell` with `RGLRUParams`; carry ``h`` [..., H], ``y = h``.

    Example:
      >>> cell = seqjax.rg_lru(64)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> carry, ys = seqjax.scan(cell, params, jnp.ones((4, 1000, 8)), method="associative")
      >>> ys.shape
      (4, 1000, 64)
    """
    call = "seqjax.rg_lru"
    H = check_positive_int(call, "hidden_size", hidden_size)
    param_dtype = check_factory_options(call, param_dtype, kernel_init=kernel_init, bias_init=bias_init)
    c = check_real(call, "c", c)
    if not c > 0.0:
        raise ValueError(f"{call}: c must be > 0, got {c}")
    a_min, a_max = check_real(call, "a_min", a_min), check_real(call, "a_max", a_max)
    if not 0.0 < a_min < a_max < 1.0:
        raise ValueError(f"{call}: the initial decay needs 0 < a_min < a_max < 1, got a_min={a_min}, a_max={a_max}")
    if not isinstance(value_projection, bool):
        raise ValueError(f"{call}: value_projection must be a bool, got {value_projection!r}")
    n_blocks = 3 if value_projection else 2

    def init(key, input_size: int) -> RGLRUParams:
        I = check_positive_int(call + ".init", "input_size", input_size)
        if not value_projection and I != H:
            raise ValueError(f"{call}(value_projection=False).init: input_size must equal hidden_size={H} (the "
                             f"value is x_t itself), got {I}")
        kx, kb, ka = jax.random.split(key, 3)
        return RGLRUParams(gate_blocks(kernel_init, kx, I, H, n_blocks, param_dtype),
                           init_param(bias_init, kb, (n_blocks * H,), param_dtype),
                           decay_init(ka, H, a_min, a_max).astype(param_dtype))

    def initial_carry(params: RGLRUParams, batch_shape=()) -> Array:
        return zeros_carry(batch_shape, H, params.w_x.dtype)

    def project(params: RGLRUParams, x: Array) -> Array:
        """``[k_r, k_i, v]`` [..., 3H]: the gates' pre-activations and the value."""
        check_input(call, x, params.w_x.shape[0])
        px = matmul(x, params.w_x) + params.b.astype(compute_dtype(params.w_x.dtype))
        return px if value_projection else jnp.concatenate([px, x.astype(px.dtype)], axis=-1)

    def coefficients(params: RGLRUParams, px: Array):
        r, i = jax.nn.sigmoid(px[..., :H]), jax.nn.sigmoid(px[..., H:2 * H])
        log_a = -c * r * jax.nn.softplus(params.a_param.astype(px.dtype))
        return jnp.exp(log_a), _sqrt_bounded_derivative(-jnp.expm1(2.0 * log_a)) * (i * px[..., 2 * H:])

    def step(params: RGLRUParams, h: Array, px: Array):
        a, b = coefficients(params, px)
        h = (a * h.astype(px.dtype) + b).astype(params.w_x.dtype)
        return h, h

    linear = LinearRecurrence(coefficients=coefficients, state=lambda h: h,
                              carry=lambda params, h: h.astype(params.w_x.dtype),
                              readout=lambda params, hs, px: hs.astype(params.w_x.dtype))
    return make_cell(init=init, initial_carry=initial_carry, project=project, step=step,
                     input_size=lambda p: p.w_x.shape[0], hidden_size=H, output_size=H,
                     name=f"rg_lru(hidden_size={H}, c={c:g}, a_min={a_min:g}, a_max={a_max:g}"
                          f"{'' if value_projection else ', value_projection=False'})", linear=linear)

