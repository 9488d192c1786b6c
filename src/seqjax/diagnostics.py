"""Vanishing and exploding gradients, measured: per-step gradient norms and the spectral bound.

BPTT multiplies one Jacobian per step, so ``dL/dh_t`` shrinks or grows
geometrically with the distance ``s - t`` to where the loss is taken. For the
Elman RNN ``h_{k+1} = act(x W_x + h_k W_h + b)`` with ``|act'| <= 1`` (tanh, relu)::

    ||dL/dh_t|| <= sigma_max(W_h) ** (s - t) * ||dL/dh_s||          (seed 003)

`step_gradients` measures ``||dL/dh_t||`` and ``||dL/dx_t||`` for every t in
one backward pass; `spectral_norm` / `spectral_radius` / `rnn_gradient_bound`
evaluate the right-hand side.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.backends._table import platform_of, zero_padding
from seqjax.cells.base import Array, Cell
from seqjax.options import ScanOptions, resolve
from seqjax.runners import _body, _hoist_default, _plan, _unroll_default


class StepGradients(NamedTuple):
    """Per-example, per-step gradient norms.

    Attributes:
      carry: [B, T] float32, ``||dL/dcarry_t||`` where ``carry_t`` is the carry
        after step t (all carry leaves together, e.g. LSTM's h and c).
      x: [B, T] float32, ``||dL/dx_t||``.
      loss: scalar, the loss value.
    """

    carry: Array
    x: Array
    loss: Array


def _row_norms(tree, B: int, T: int) -> Array:
    """L2 norm over everything but the [T, B] leading axes of each leaf, summed over leaves -> [B, T]."""
    sq = sum(jnp.sum(jnp.reshape(a, (T, B, -1)).astype(jnp.float32) ** 2, axis=-1) for a in jax.tree.leaves(tree))
    return jnp.sqrt(sq).T


def step_gradients(cell, params, xs: Array, loss_fn: Callable[[Array, object], Array], *, carry=None,
                   lengths: Array | None = None, options: ScanOptions | None = None) -> StepGradients:
    """``||dL/dh_t||`` and ``||dL/dx_t||`` for every step t, from a single backward pass.

    A zero perturbation ``d_t`` is added to the carry after each step; the
    gradient of the loss with respect to ``d_t`` is the total derivative
    ``dL/dcarry_t`` (through every later step), so one `jax.grad` gives all T
    of them instead of T separate backward passes.

    Args:
      cell: a `Cell` (a `seqjax.stack` cell's carry is the tuple of all layers'),
        or a `seqjax.nnx.Cell` module (then pass ``params=None``).
      params: the cell's params (None for an NNX module, whose own are used).
      xs: [B, T, I] float inputs.
      loss_fn: ``(ys [B, T, O], final_carry) -> scalar``.
      carry: optional initial carry for batch (B,).
      lengths: optional [B] int valid lengths (as in `seqjax.scan`).
      options: a `seqjax.ScanOptions` for the loop (``hoist``, ``unroll``,
        ``remat``). The perturbed step runs in XLA's loop differentiated by
        autodiff whatever the cell: ``kernel`` may be ``"auto"`` or ``"xla"`` and
        ``backward`` ``"auto"`` or ``"autodiff"``; a native kernel or
        ``backward="fused"`` raises a ValueError.

    Returns:
      `StepGradients` with [B, T] norms.

    Example:
      >>> cell = seqjax.rnn(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (2, 20, 3))        # [B, T, I]
      >>> g = seqjax.diagnostics.step_gradients(cell, params, xs, lambda ys, c: jnp.sum(ys[:, -1] ** 2))
      >>> g.carry.shape, g.x.shape                                     # [B, T] norms
      ((2, 20), (2, 20))
      >>> bool(jnp.all(g.x[:, 0] < g.x[:, -1]))   # the gradient reaching the first step is the smaller
      True
    """
    call = "seqjax.diagnostics.step_gradients"
    options = _loop_options(call, options)
    if not isinstance(cell, Cell):
        cell, params = _from_module(cell, params)
    plan = _plan(call, cell, params, xs, carry, lengths, None, time_major=False)
    T, B = plan.xs.shape[:2]
    platform = platform_of(xs, params, carry)
    hoist = _hoist_default(platform) if options.hoist is None else bool(options.hoist)
    unroll = _unroll_default(platform) if options.unroll is None else int(options.unroll)
    zeros = jax.tree.map(lambda a: jnp.zeros((T,) + a.shape, a.dtype), plan.carry)

    def perturbed_cell_step(p, c, inp):
        x, delta = inp
        c, y = (cell.step if hoist else cell.apply)(p, c, x)
        return jax.tree.map(jnp.add, c, delta), y

    # The perturbation rides along as part of the input of the step.
    wrapped = cell._replace(step=perturbed_cell_step)
    body = _body(wrapped, params, plan.init_carry, projected=True, remat=options.remat)

    def total(xs_tm, deltas):
        xs_tm = zero_padding(xs_tm, plan.valid)
        inputs = cell.project(params, xs_tm) if hoist else xs_tm
        c, ys = jax.lax.scan(body, plan.carry, ((inputs, deltas), plan.valid, None), unroll=unroll)
        return loss_fn(jnp.swapaxes(ys, 0, 1), c)

    loss, (gx, gd) = jax.value_and_grad(total, argnums=(0, 1))(plan.xs, zeros)
    return StepGradients(_row_norms(gd, B, T), _row_norms(gx, B, T), loss)


def _loop_options(call: str, options: ScanOptions | None) -> ScanOptions:
    """``options`` validated for a loop whose step seqjax wraps (it runs only in XLA's loop, under autodiff)."""
    options = resolve(call, options)
    if options.kernel not in ("auto", "xla"):
        raise ValueError(f"{call}: kernel={options.kernel!r} cannot run this call: it perturbs the carry after "
                         "every step, which only XLA's loop can do; pass kernel='auto' or 'xla'")
    if options.backward == "fused":
        raise ValueError(f"{call}: backward='fused' cannot run this call: seqjax's custom VJP does not take the "
                         "per-step perturbation; pass backward='auto' or 'autodiff'")
    return options


def _from_module(module, params):
    """The functional cell and params of a `seqjax.nnx.Cell` module."""
    from seqjax.nnx import Cell as CellModule

    if not isinstance(module, CellModule):
        raise TypeError("seqjax.diagnostics.step_gradients: cell must be a seqjax Cell or a seqjax.nnx.Cell module, "
                        f"got {type(module).__name__}")
    if params is not None:
        raise ValueError("seqjax.diagnostics.step_gradients: pass params=None with an NNX module (it holds its own)")
    return module.cell, module.get_params()


def spectral_norm(w: Array) -> Array:
    """The largest singular value sigma_max of a matrix w [M, N]."""
    return jnp.linalg.norm(w.astype(jnp.float32), ord=2)


def spectral_radius(w: Array) -> Array:
    """The largest eigenvalue modulus of a square matrix w [N, N]."""
    return jnp.max(jnp.abs(jnp.linalg.eigvals(w.astype(jnp.float32))))


def recurrent_matrices(params) -> dict[str, Array]:
    """The recurrent weight blocks of a cell's params, by gate: {"h"} for RNN, {"i","f","g","o"} LSTM, {"r","z","n"} GRU.

    Works on the params of `seqjax.rnn`, `seqjax.gru` and the standard 4-gate `seqjax.lstm`.
    """
    from seqjax.cells.gru import GRUParams
    from seqjax.cells.lstm import LSTMParams
    from seqjax.cells.rnn import RNNParams

    if isinstance(params, RNNParams):
        return {"h": params.w_h}
    names = {GRUParams: "rzn", LSTMParams: "ifgo"}.get(type(params))
    if names is None:
        raise TypeError(f"seqjax.diagnostics.recurrent_matrices: params must be RNNParams, LSTMParams or GRUParams, "
                        f"got {type(params).__name__}")
    H = params.w_h.shape[0]
    if isinstance(params, LSTMParams):
        H = params.w_proj.shape[0] if params.w_proj is not None else H
        if params.w_h.shape[1] != 4 * H:
            raise TypeError("seqjax.diagnostics.recurrent_matrices: only the standard 4-gate LSTM layout is "
                            f"supported, got w_h of shape {tuple(params.w_h.shape)} for H={H}")
    return {g: params.w_h[:, k * H:(k + 1) * H] for k, g in enumerate(names)}


def rnn_gradient_bound(w_h: Array, grad_norm_at_s: Array, distance: Array, act_derivative_bound: float = 1.0) -> Array:
    """The upper bound ``(c * sigma_max(W_h)) ** (s - t) * ||dL/dh_s||`` on ``||dL/dh_t||`` for an Elman RNN.

    Args:
      w_h: [H, H] recurrent matrix.
      grad_norm_at_s: ``||dL/dh_s||``, scalar or [...] float.
      distance: ``s - t`` (>= 0), int or float array broadcastable with ``grad_norm_at_s``.
      act_derivative_bound: c = sup |act'| (1 for tanh and relu).

    Returns:
      The bound, broadcast shape of ``grad_norm_at_s`` and ``distance``.
    """
    return grad_norm_at_s * (act_derivative_bound * spectral_norm(w_h)) ** jnp.asarray(distance, jnp.float32)


__all__ = ["StepGradients", "recurrent_matrices", "rnn_gradient_bound", "spectral_norm", "spectral_radius",
           "step_gradients"]
