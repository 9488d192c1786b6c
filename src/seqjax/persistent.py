"""The `jax.custom_vjp` shared by the whole-recurrence kernels of `seqjax.cuda` and `seqjax.avx2`.

Both kernel libraries bind the same FFI contract (``<prefix>_forward`` and
``<prefix>_backward``): XLA computes the input projection ``px = x W_x + b`` of
all steps as one GEMM, the forward kernel runs the recurrence (and, for
training, saves the activated gates), the backward kernel runs the reverse
recurrence of the state gradients and returns ``dpx``, and XLA computes the
weight gradients as GEMMs over all ``T * B`` rows (as `seqjax.fused` does).

Operands, float32, time-major: ``px [T, B, G*H]`` (or ``xs [T, B, I]``, ``w_x
[I, G*H]`` and ``b [G*H]`` for kernels that project the input themselves), ``w_h [H, G*H]``, ``b_hn
[H]`` (GRU, else empty), ``h0 [B, H]``, ``c0 [B, H]`` (LSTM, else empty).
Forward results: ``ys [T, B, H]``, ``hT``, ``cT`` (LSTM), and for training
``act [T, B, G*H]`` (the activated gates) and ``aux [T, B, H]`` (LSTM: c_t;
GRU: ``h_{t-1} W_hn + b_hn``). Backward results: ``dpx``, ``dghn [T, B, H]``
(GRU: the gradient of ``h_{t-1} W_hn + b_hn``), ``dh0``, ``dc0``.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from seqjax.cells.base import Array, matmul
from seqjax.cells.lstm import LSTMCarry
from seqjax.fused import _start_h

__all__ = ["CELLS", "native_scan"]

#: kind -> the kernels' cell number (seqjax.onednn's numbering)
CELLS = {"lstm": 0, "gru": 1, "rnn_tanh": 3, "rnn_relu": 4}


def _empty():
    return jnp.zeros((0,), jnp.float32)


def _sds(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward(prefix, cell, training, reverse, attrs, inputs, w_h, b_hn, h0, c0):
    """The forward target's results; ``inputs`` is ``(px,)`` or, for kernels that project, ``(xs, w_x, b)``."""
    T, B = inputs[0].shape[:2]
    GH = w_h.shape[1]
    H = h0.shape[-1]
    residuals = training and cell in (CELLS["lstm"], CELLS["gru"])
    out = (_sds((T, B, H)), _sds((B, H)), _sds(c0.shape), _sds((T, B, GH) if residuals else (0,)),
           _sds((T, B, H) if residuals else (0,)))
    call = jax.ffi.ffi_call(f"{prefix}_forward", out, vmap_method="sequential")
    return call(*inputs, w_h, b_hn, h0, c0, cell=cell, reverse=bool(reverse), **dict(attrs))


def _backward(prefix, cell, reverse, attrs, saved, cts):
    """``(dpx, dw_h, db_hn, dh0, dc0)`` from the backward target and the whole-sequence GEMM for dW_h."""
    w_h, b_hn, h0, c0, ys, act, aux = saved
    dys, dhT, dcT = cts
    T, B, H = ys.shape
    gru = cell == CELLS["gru"]
    out = (_sds((T, B, w_h.shape[1])), _sds((T, B, H) if gru else (0,)), _sds((B, H)), _sds(c0.shape))
    call = jax.ffi.ffi_call(f"{prefix}_backward", out, vmap_method="sequential")
    dpx, dghn, dh0, dc0 = call(dys, dhT, dcT, w_h, ys, h0, c0, act, aux, cell=cell, reverse=bool(reverse),
                               **dict(attrs))
    # the recurrent GEMM's output gradient: dpx, except the GRU's n block, which saw r * (h W_hn + b_hn)
    dgh = jnp.concatenate([dpx[..., :2 * H], dghn], -1) if gru else dpx
    dw_h = jax.lax.dot_general(_rows(_start_h(ys, h0, reverse)), _rows(dgh), (((0,), (0,)), ((), ())))
    db_hn = jnp.sum(_rows(dghn), 0) if gru else jnp.zeros_like(b_hn)
    return dpx, dw_h, db_hn, dh0, dc0


def _rows(a):
    """[T, B, N] -> [T*B, N]: the 2-D layout XLA:CPU's fast GEMM path wants."""
    return a.reshape(-1, a.shape[-1])


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _run(prefix, cell, reverse, attrs, px, w_h, b_hn, h0, c0):
    ys, hT, cT, _, _ = _forward(prefix, cell, False, reverse, attrs, (px,), w_h, b_hn, h0, c0)
    return ys, hT, cT


def _run_fwd(prefix, cell, reverse, attrs, px, w_h, b_hn, h0, c0):
    ys, hT, cT, act, aux = _forward(prefix, cell, True, reverse, attrs, (px,), w_h, b_hn, h0, c0)
    return (ys, hT, cT), (w_h, b_hn, h0, c0, ys, act, aux)


def _run_bwd(prefix, cell, reverse, attrs, saved, cts):
    return _backward(prefix, cell, reverse, attrs, saved, cts)


_run.defvjp(_run_fwd, _run_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _run_projecting(prefix, cell, reverse, attrs, xs, w_x, b, w_h, b_hn, h0, c0):
    ys, hT, cT, _, _ = _forward(prefix, cell, False, reverse, attrs, (xs, w_x, b), w_h, b_hn, h0, c0)
    return ys, hT, cT


def _run_projecting_fwd(prefix, cell, reverse, attrs, xs, w_x, b, w_h, b_hn, h0, c0):
    ys, hT, cT, act, aux = _forward(prefix, cell, True, reverse, attrs, (xs, w_x, b), w_h, b_hn, h0, c0)
    return (ys, hT, cT), (xs, w_x, (w_h, b_hn, h0, c0, ys, act, aux))


def _run_projecting_bwd(prefix, cell, reverse, attrs, saved, cts):
    xs, w_x, rest = saved
    dpx, dw_h, db_hn, dh0, dc0 = _backward(prefix, cell, reverse, attrs, rest, cts)
    dpx2 = _rows(dpx)
    dxs = (dpx2 @ w_x.T).reshape(xs.shape)
    dw_x = jax.lax.dot_general(_rows(xs), dpx2, (((0,), (0,)), ((), ())))
    return dxs, dw_x, jnp.sum(dpx2, 0), dw_h, db_hn, dh0, dc0


_run_projecting.defvjp(_run_projecting_fwd, _run_projecting_bwd)


def native_scan(prefix: str, kind: str, params, xs_tm: Array, carry0, reverse: bool, attrs: tuple,
                projects: bool = False):
    """``(final_carry, ys [T, B, H])`` of the recurrence run by the FFI targets ``prefix + "_forward"/"_backward"``.

    Args:
      prefix: the targets' common prefix, e.g. "seqjax_cuda_rnn".
      kind: "lstm", "gru", "rnn_tanh" or "rnn_relu" (`CELLS`).
      params: the cell's params, float32.
      xs_tm: [T, B, I] float32.
      carry0: `LSTMCarry` or h [B, H], float32.
      reverse: process time backwards (``ys[t]`` stays aligned with ``xs[t]``).
      attrs: the targets' further attributes, as ``((name, value), ...)``.
      projects: whether the forward target takes ``(xs, w_x, b)`` and computes
        the input projection itself, rather than ``px``.
    """
    if kind not in CELLS:
        raise ValueError(f"seqjax: kind must be one of {list(CELLS)}, got {kind!r}")
    if kind == "lstm":
        h0, c0 = carry0.h, carry0.c
    else:
        h0, c0 = carry0, _empty()
    b_hn = params.b_hn if kind == "gru" else _empty()
    xs_tm = xs_tm.astype(jnp.float32)
    if projects:
        ys, hT, cT = _run_projecting(prefix, CELLS[kind], bool(reverse), tuple(attrs), xs_tm, params.w_x, params.b,
                                     params.w_h, b_hn, h0, c0)
    else:
        px = matmul(xs_tm, params.w_x) + params.b
        ys, hT, cT = _run(prefix, CELLS[kind], bool(reverse), tuple(attrs), px, params.w_h, b_hn, h0, c0)
    return (LSTMCarry(hT, cT, None) if kind == "lstm" else hT), ys
