"""The Elman (vanilla) RNN cell."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells.base import (Array, Cell, UnitwiseStep, check_factory_options, check_input, check_positive_int,
                               compute_dtype, init_param, joint_input_recurrent, make_cell, matmul, resolve_activation,
                               unit_local, zeros_carry)

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class RNNParams(NamedTuple):
    """Parameters of `seqjax.rnn`.

    Attributes:
      w_x: [I, H] input weights.
      w_h: [H, H] recurrent weights.
      b: [H] bias (PyTorch's ``bias_ih + bias_hh``).
    """

    w_x: Array
    w_h: Array
    b: Array


def rnn(hidden_size: int, *, activation: str | Callable = "tanh",
        kernel_init=jax.nn.initializers.lecun_normal(),
        recurrent_init=jax.nn.initializers.orthogonal(),
        bias_init=jax.nn.initializers.zeros,
        param_dtype=jnp.float32) -> Cell:
    """The Elman RNN cell: ``h_t = act(x_t W_x + h_{t-1} W_h + b)``; the output is ``h_t``.

    Args:
      hidden_size: H.
      activation: ``"tanh"`` (default), ``"relu"`` or any elementwise callable.
      kernel_init: initialiser of ``w_x`` [I, H]; default LeCun normal.
      recurrent_init: initialiser of ``w_h`` [H, H]; default orthogonal.
      bias_init: initialiser of ``b`` [H]; default zeros.
      param_dtype: dtype of the parameters and the carry. With 16-bit params the
        matmuls accumulate and the activation runs in float32.

    Returns:
      A `Cell`; its carry is ``h`` [..., H] and ``y = h``.

    Example:
      >>> cell = seqjax.rnn(32, activation="relu")
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> h, y = cell.apply(params, cell.initial_carry(params, (4,)), jnp.ones((4, 8)))
    """
    call = "seqjax.rnn"
    hidden_size = check_positive_int(call, "hidden_size", hidden_size)
    param_dtype = check_factory_options(call, param_dtype, kernel_init=kernel_init, recurrent_init=recurrent_init, bias_init=bias_init)
    act = resolve_activation(call, "activation", activation, ACTIVATIONS)
    act_name = activation if isinstance(activation, str) else getattr(activation, "__name__", "custom")

    def init(key, input_size: int) -> RNNParams:
        check_positive_int(call + ".init", "input_size", input_size)
        kx, kh, kb = jax.random.split(key, 3)
        return RNNParams(init_param(kernel_init, kx, (input_size, hidden_size), param_dtype),
                         init_param(recurrent_init, kh, (hidden_size, hidden_size), param_dtype),
                         init_param(bias_init, kb, (hidden_size,), param_dtype))

    def initial_carry(params: RNNParams, batch_shape=()) -> Array:
        return zeros_carry(batch_shape, hidden_size, params.w_h.dtype)

    def project(params: RNNParams, x: Array) -> Array:
        check_input(call, x, params.w_x.shape[0])
        return matmul(x, params.w_x) + params.b.astype(compute_dtype(params.w_x.dtype))

    def finish(params: RNNParams, a: Array):
        h = act(a).astype(params.w_h.dtype)
        return h, h

    def step(params: RNNParams, h: Array, px: Array):
        return finish(params, px + matmul(h, params.w_h))

    def masked_step(params: RNNParams, h: Array, px: Array, mask: Array):
        return finish(params, px + matmul(h * mask, params.w_h))

    def joint_apply(params: RNNParams):
        return joint_input_recurrent(params.w_x, params.w_h, params.b, lambda h, a: finish(params, a))

    unitwise = UnitwiseStep(recurrent=lambda params, h: matmul(h, params.w_h),
                            local=lambda params, h: unit_local(h, params.w_h, 1),
                            pointwise=lambda params, h, u, px: finish(params, px + u))
    return make_cell(init=init, initial_carry=initial_carry, project=project, step=step,
                     input_size=lambda p: p.w_x.shape[0], hidden_size=hidden_size, output_size=hidden_size,
                     name=f"rnn(hidden_size={hidden_size}, activation={act_name})", joint_apply=joint_apply,
                     unitwise=unitwise, masked_step=masked_step,
                     kind=f"rnn_{activation}" if activation in ("tanh", "relu") else None)
