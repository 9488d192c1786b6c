"""The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long Sequences")."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells.base import (Array, Cell, LinearRecurrence, check_factory_options, check_input, check_positive_int,
                               check_real, compute_dtype, make_cell, matmul, zeros_carry)


class LRUParams(NamedTuple):
    """Parameters of `seqjax.lru` (N complex state dimensions, input size I, output size O).

    Attributes:
      nu_log: [N], ``log nu``: the eigenvalues' magnitudes are ``exp(-exp(nu_log))``.
      theta_log: [N], ``log theta``: their phases are ``exp(theta_log)``.
      gamma_log: [N], ``log gamma``, the input normalisation (``sqrt(1 - |lambda|^2)`` at init).
      b_re, b_im: [I, N], real and imaginary parts of the input matrix ``B`` (transposed).
      c_re, c_im: [N, O], real and imaginary parts of the output matrix ``C`` (transposed).
      d: [I, O], the real feed-through matrix ``D`` (transposed).
    """

    nu_log: Array
    theta_log: Array
    gamma_log: Array
    b_re: Array
    b_im: Array
    c_re: Array
    c_im: Array
    d: Array


def ring_init(key, n: int, r_min: float, r_max: float, max_phase: float):
    """``(nu_log, theta_log, gamma_log)`` [n] float32: eigenvalues drawn uniformly on the ring r_min <= |lambda| <= r_max.

    The paper's Lemma 3.2: ``|lambda|^2 ~ U(r_min^2, r_max^2)`` (uniform density
    on the ring's area) and ``arg(lambda) ~ U(0, max_phase)``; ``gamma = sqrt(1 - |lambda|^2)``.
    """
    k1, k2 = jax.random.split(key)
    tiny = jnp.finfo(jnp.float32).tiny
    u1, u2 = jax.random.uniform(k1, (n,)), jax.random.uniform(k2, (n,))
    r2 = jnp.clip(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2, tiny, 1.0 - jnp.finfo(jnp.float32).epsneg)
    nu_log = jnp.log(-0.5 * jnp.log(r2))
    theta_log = jnp.log(jnp.maximum(max_phase * u2, tiny))
    gamma_log = 0.5 * jnp.log1p(-r2)
    return nu_log, theta_log, gamma_log


def eigenvalues(params: LRUParams, dtype) -> tuple[Array, Array]:
    """``(Re lambda, Im lambda)`` [N] in ``dtype``: ``lambda = exp(-exp(nu_log) + i exp(theta_log))``."""
    magnitude = jnp.exp(-jnp.exp(params.nu_log.astype(dtype)))
    phase = jnp.exp(params.theta_log.astype(dtype))
    return magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)


def lru(hidden_size: int, *, output_size: int | None = None, r_min: float = 0.0, r_max: float = 1.0,
        max_phase: float = 2 * math.pi, param_dtype=jnp.float32) -> Cell:
    """The LRU: a complex diagonal linear recurrence with a real output projection (Orvieto et al. 2023).

    With N = ``hidden_size`` complex state dimensions::

        lambda = exp(-exp(nu_log) + i exp(theta_log))          # [N], |lambda| < 1
        gamma  = exp(gamma_log)                                 # [N]
        x_t = lambda * x_{t-1} + gamma * (u_t B)                # x complex [..., N], B complex [I, N]
        y_t = Re(x_t C) + u_t D                                 # C complex [N, O], D real [I, O]

    (the paper's column-vector equations, transposed: ``B u_t`` is ``u_t B`` here).
    The paper's code uses a diagonal D for I = O; here D is the full [I, O]
    matrix of its general equation, so the cell takes any input size.
    Initialisation (section 3 and appendix A): eigenvalues uniform on the ring
    ``r_min <= |lambda| <= r_max`` with phase in ``[0, max_phase]``,
    ``gamma = sqrt(1 - |lambda|^2)``, B ~ N(0, 1/(2I)) per real and imaginary
    part, C ~ N(0, 1/N) likewise, D ~ N(0, 1/I).

    The carry holds the complex state as real numbers, ``[Re x, Im x]``
    [..., 2N], in the params' dtype; the parallel evaluation
    (``seqjax.scan(..., method="associative")``) runs in complex arithmetic.

    Args:
      hidden_size: N, the number of complex state dimensions.
      output_size: O; default N.
      r_min, r_max: the ring's radii, 0 <= r_min < r_max <= 1; default 0 and 1
        (the paper uses e.g. 0.9 and 0.999 for long-range tasks).
      max_phase: the largest initial phase, > 0; default 2 pi (the paper's pi/10 for long-range tasks).
      param_dtype: dtype of params and carry (16-bit params compute in float32).

    Returns:
      A `Cell` with `LRUParams`; carry [..., 2N], ``y`` [..., O].

    Example:
      >>> cell = seqjax.lru(64, r_min=0.9, r_max=0.999, max_phase=math.pi / 10)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> carry, ys = seqjax.scan(cell, params, jnp.ones((4, 4096, 8)), method="associative")
    """
    call = "seqjax.lru"
    N = check_positive_int(call, "hidden_size", hidden_size)
    O = N if output_size is None else check_positive_int(call, "output_size", output_size)
    param_dtype = check_factory_options(call, param_dtype)
    r_min, r_max = check_real(call, "r_min", r_min), check_real(call, "r_max", r_max)
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(f"{call}: the ring needs 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
    max_phase = check_real(call, "max_phase", max_phase)
    if not max_phase > 0.0:
        raise ValueError(f"{call}: max_phase must be > 0, got {max_phase}")

    def init(key, input_size: int) -> LRUParams:
        I = check_positive_int(call + ".init", "input_size", input_size)
        k_ring, kb_re, kb_im, kc_re, kc_im, kd = jax.random.split(key, 6)
        nu_log, theta_log, gamma_log = ring_init(k_ring, N, r_min, r_max, max_phase)

        def normal(k, shape, fan):
            return jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan)

        leaves = (nu_log, theta_log, gamma_log, normal(kb_re, (I, N), 2 * I), normal(kb_im, (I, N), 2 * I),
                  normal(kc_re, (N, O), N), normal(kc_im, (N, O), N), normal(kd, (I, O), I))
        return LRUParams(*(a.astype(param_dtype) for a in leaves))

    def initial_carry(params: LRUParams, batch_shape=()) -> Array:
        return zeros_carry(batch_shape, 2 * N, params.nu_log.dtype)

    def project(params: LRUParams, x: Array) -> Array:
        """``[gamma Re(u B), gamma Im(u B), u D]`` [..., 2N + O]."""
        check_input(call, x, params.b_re.shape[0])
        px = matmul(x, jnp.concatenate([params.b_re, params.b_im, params.d], axis=-1))
        gamma = jnp.exp(params.gamma_log.astype(px.dtype))
        return jnp.concatenate([px[..., :N] * gamma, px[..., N:2 * N] * gamma, px[..., 2 * N:]], axis=-1)

    def readout(params: LRUParams, x_re: Array, x_im: Array, px: Array) -> Array:
        return (matmul(x_re, params.c_re) - matmul(x_im, params.c_im) + px[..., 2 * N:]).astype(params.nu_log.dtype)

    def step(params: LRUParams, carry: Array, px: Array):
        l_re, l_im = eigenvalues(params, px.dtype)
        h = carry.astype(px.dtype)
        h_re, h_im = h[..., :N], h[..., N:]
        x_re = l_re * h_re - l_im * h_im + px[..., :N]
        x_im = l_re * h_im + l_im * h_re + px[..., N:2 * N]
        carry = jnp.concatenate([x_re, x_im], axis=-1).astype(params.nu_log.dtype)
        return carry, readout(params, x_re, x_im, px)

    def complex_dtype(dtype):
        return jnp.result_type(dtype, jnp.complex64)

    def coefficients(params: LRUParams, px: Array):
        l_re, l_im = eigenvalues(params, px.dtype)
        lam = jax.lax.complex(l_re, l_im)
        return jnp.broadcast_to(lam, px.shape[:-1] + (N,)), jax.lax.complex(px[..., :N], px[..., N:2 * N])

    def state(carry: Array) -> Array:
        h = carry.astype(compute_dtype(carry.dtype))
        return jax.lax.complex(h[..., :N], h[..., N:]).astype(complex_dtype(h.dtype))

    def to_carry(params: LRUParams, h: Array) -> Array:
        return jnp.concatenate([h.real, h.imag], axis=-1).astype(params.nu_log.dtype)

    linear = LinearRecurrence(coefficients=coefficients, state=state, carry=to_carry,
                              readout=lambda params, hs, px: readout(params, hs.real, hs.imag, px))
    return make_cell(init=init, initial_carry=initial_carry, project=project, step=step,
                     input_size=lambda p: p.b_re.shape[0], hidden_size=N, output_size=O,
                     name=f"lru(hidden_size={N}, output_size={O}, r_min={r_min:g}, r_max={r_max:g}, "
                          f"max_phase={max_phase:g})", linear=linear)
