"""The gated recurrent unit (Cho et al. 2014), in both of its published forms."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells.base import (Array, Cell, UnitwiseStep, check_factory_options, check_input, check_positive_int,
                               compute_dtype, gate_blocks, init_param, make_cell, matmul, unit_local, zeros_carry)


class GRUParams(NamedTuple):
    """Parameters of `seqjax.gru`; gate columns in the order (r, z, n), PyTorch's order.

    Attributes:
      w_x: [I, 3H] input weights.
      w_h: [H, 3H] recurrent weights.
      b: [3H] bias added to the input projection (for r and z PyTorch's
        ``b_ih + b_hh``; for n only ``b_in`` when ``reset_after``).
      b_hn: [H] the recurrent bias of n, kept inside the reset product
        (``reset_after=True`` only; ``None`` otherwise, where it folds into ``b``).
    """

    w_x: Array
    w_h: Array
    b: Array
    b_hn: Array | None


def gru(hidden_size: int, *, reset_after: bool = True,
        kernel_init=jax.nn.initializers.lecun_normal(),
        recurrent_init=jax.nn.initializers.orthogonal(),
        bias_init=jax.nn.initializers.zeros,
        param_dtype=jnp.float32) -> Cell:
    """The GRU cell.

    With ``px = x_t W_x + b`` split into (px_r, px_z, px_n) and W_h into
    (W_hr, W_hz, W_hn)::

        r = sigmoid(px_r + h W_hr)
        z = sigmoid(px_z + h W_hz)
        n = tanh(px_n + r * (h W_hn + b_hn))     # reset_after=True (PyTorch, cuDNN)
        n = tanh(px_n + (r * h) W_hn)            # reset_after=False (Cho et al. 2014)
        h_t = (1 - z) * n + z * h

    Args:
      hidden_size: H.
      reset_after: where the reset gate acts (see above). Default True, which
        lets one fused [H, 3H] recurrent GEMM serve all gates.
      kernel_init, recurrent_init, bias_init: initialisers of ``w_x`` [I, 3H],
        ``w_h`` [H, 3H] (each applied per gate block) and both biases; defaults
        LeCun normal, orthogonal, zeros.
      param_dtype: dtype of params and carry (16-bit params accumulate in float32).

    Returns:
      A `Cell`; carry ``h`` [..., H], ``y = h``.

    Example:
      >>> cell = seqjax.gru(64)
      >>> params = cell.init(jax.random.key(0), input_size=8)
    """
    call = "seqjax.gru"
    hidden_size = check_positive_int(call, "hidden_size", hidden_size)
    param_dtype = check_factory_options(call, param_dtype, kernel_init=kernel_init, recurrent_init=recurrent_init, bias_init=bias_init)
    if not isinstance(reset_after, bool):
        raise ValueError(f"{call}: reset_after must be a bool, got {reset_after!r}")
    H = hidden_size

    def init(key, input_size: int) -> GRUParams:
        check_positive_int(call + ".init", "input_size", input_size)
        kx, kh, kb, kn = jax.random.split(key, 4)
        return GRUParams(gate_blocks(kernel_init, kx, input_size, H, 3, param_dtype),
                         gate_blocks(recurrent_init, kh, H, H, 3, param_dtype),
                         init_param(bias_init, kb, (3 * H,), param_dtype),
                         init_param(bias_init, kn, (H,), param_dtype) if reset_after else None)

    def initial_carry(params: GRUParams, batch_shape=()) -> Array:
        return zeros_carry(batch_shape, H, params.w_h.dtype)

    def project(params: GRUParams, x: Array) -> Array:
        check_input(call, x, params.w_x.shape[0])
        return matmul(x, params.w_x) + params.b.astype(compute_dtype(params.w_x.dtype))

    def after_gemm(params: GRUParams, h: Array, gh: Array, px: Array):
        """The reset_after step given the recurrent pre-activations ``gh = h_in W_h`` [..., 3H]."""
        hf = h.astype(px.dtype)
        r = jax.nn.sigmoid(px[..., :H] + gh[..., :H])
        z = jax.nn.sigmoid(px[..., H:2 * H] + gh[..., H:2 * H])
        n = jnp.tanh(px[..., 2 * H:] + r * (gh[..., 2 * H:] + params.b_hn.astype(px.dtype)))
        h = ((1.0 - z) * n + z * hf).astype(params.w_h.dtype)
        return h, h

    def gated(params: GRUParams, h: Array, px: Array, h_in: Array):
        """The step; ``h_in`` is the h_{t-1} the recurrent matmuls read, ``h`` the one z interpolates."""
        if reset_after:
            return after_gemm(params, h, matmul(h_in, params.w_h), px)
        hf = h.astype(px.dtype)
        gh = matmul(h_in, params.w_h[:, :2 * H])
        r = jax.nn.sigmoid(px[..., :H] + gh[..., :H])
        z = jax.nn.sigmoid(px[..., H:2 * H] + gh[..., H:])
        n = jnp.tanh(px[..., 2 * H:] + matmul(r * h_in.astype(px.dtype), params.w_h[:, 2 * H:]))
        h = ((1.0 - z) * n + z * hf).astype(params.w_h.dtype)
        return h, h

    def step(params: GRUParams, h: Array, px: Array):
        return gated(params, h, px, h)

    def masked_step(params: GRUParams, h: Array, px: Array, mask: Array):
        return gated(params, h, px, h * mask)

    # reset_after=False multiplies h by r before the GEMM of n: no per-unit split
    unitwise = UnitwiseStep(recurrent=lambda params, h: matmul(h, params.w_h),
                            local=lambda params, h: unit_local(h, params.w_h, 3),
                            pointwise=after_gemm) if reset_after else None

    return make_cell(init=init, initial_carry=initial_carry, project=project, step=step,
                     input_size=lambda p: p.w_x.shape[0], hidden_size=H, output_size=H,
                     name=f"gru(hidden_size={H}, reset_after={reset_after})",
                     kind="gru" if reset_after else "gru_cho", unitwise=unitwise, masked_step=masked_step)
