"""The `jax.custom_vjp` shared by the whole-recurrence kernels of `seqjax.cuda` and `seqjax.avx2`.

Both kernel libraries bind the same FFI contract (``<prefix>_forward`` and
``<prefix>_backward``): XLA computes the input projection ``px = x W_x + b`` of
all steps as one GEMM, the forward kernel runs the recurrence (and, for
training, saves the activated gates), the backward kernel runs the reverse
recurrence of the state gradients and returns ``dpx``, and XLA computes the
weight gradients as GEMMs over all ``T * B`` rows (as `seqjax.fused` does), or,
for kernels that project the input themselves, a third target
``<prefix>_weight_grads`` does: operands ``xs, ys, h0, dpx, dghn``, results
``dw_x [I, G*H], dw_h [H, G*H], db [G*H], db_hn`` (``[H]`` for the GRU, else
empty), with the same attributes.

Operands, float32, time-major: ``px [T, B, G*H]`` (or ``xs [T, B, I]``, ``w_x
[I, G*H]`` and ``b [G*H]`` for kernels that project the input themselves),
``w_h [H, G*H]``, ``b_hn [H]`` (GRU; for kernels that project, an LSTM's
peepholes ``peep [S, H]`` go here; else empty), ``h0 [B, H]``, ``c0 [B, H]``
(LSTM, else empty); the sequence arrays may be batch-major (``[B, T, .]``)
instead, where the targets' ``batch_major`` attribute says so. Kernels that
project also take ``lengths [B]`` int32 (``[0]``: every sequence has T steps)
and ``resets [T, B]`` bool (``[0]``: none) as further operands of all three
targets (the backward target then takes the ``b_hn``/``peep`` operand again and
returns ``dpeep [B, S*H]``, each batch row's peephole gradients, or ``[0]``):
past its length a sequence's carry stays, its outputs and gate
gradients are zero, and (reverse) it starts at its own last valid step; at a
valid step with a reset the carry is zero before the step, as in
`seqjax.scan`. The weight-gradient target leaves padding rows out of the sums.
Such kernels may also bring ``_pair`` forms of the three targets, which run
two recurrences (a bidirectional layer's, the second reversed) in one call:
the single target's operands and results twice, the first recurrence's first
(`native_scan_pair`).
Forward results: ``ys [T, B, H]``, ``hT``, ``cT`` (LSTM), and for training
``act [T, B, G*H]`` (the activated gates) and ``aux [T, B, H]`` (LSTM: c_t;
GRU: ``h_{t-1} W_hn + b_hn``). Backward results: ``dpx``, ``dghn [T, B, H]``
(GRU: the gradient of ``h_{t-1} W_hn + b_hn``), ``dh0``, ``dc0``. A backward
target that reads each element of ``act`` (and the GRU's ``aux``) before writing
the same element of ``dpx`` (``dghn``) may declare itself ``in_place``: XLA then
hands it those residual buffers as its results, which saves two of the train
step's largest temporaries (25 MiB at the LSTM's (B, T, H) = (64, 100, 256)).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells.base import Array, matmul
from seqjax.cells.lstm import LSTMCarry
from seqjax.fused import _start_h

__all__ = ["CELLS", "LSTM_VARIANTS", "native_scan", "native_scan_pair"]

#: kind -> the kernels' cell number (seqjax.onednn's numbering). The kernels that project their input
#: (`seqjax.avx2`) also run Greff et al.'s LSTM variants (`LSTM_VARIANTS`: 64 plus a bit per change), and any
#: LSTM with peepholes (the peep operand given).
CELLS = {"lstm": 0, "gru": 1, "rnn_tanh": 3, "rnn_relu": 4, "lstm_nig": 65, "lstm_nfg": 66, "lstm_nog": 68,
         "lstm_cifg": 72, "lstm_niaf": 80, "lstm_noaf": 96}
#: the LSTM kinds besides "lstm": Greff et al.'s variants that change one thing (NP is "lstm"; FGR is not here)
LSTM_VARIANTS = ("lstm_nig", "lstm_nfg", "lstm_nog", "lstm_cifg", "lstm_niaf", "lstm_noaf")
_LSTMS = {CELLS[k] for k in ("lstm", *LSTM_VARIANTS)}


class Target(NamedTuple):
    """The static half of a call: which FFI targets, and how to call them."""
    prefix: str  # the targets are prefix + "_forward" and prefix + "_backward"
    cell: int  # `CELLS`' number
    reverse: bool
    attrs: tuple  # the targets' further attributes, ((name, value), ...)
    in_place: bool  # the backward target may write dpx over act (and the GRU's dghn over aux)

    @property
    def batch_major(self) -> bool:
        """Whether the sequence arrays are [B, T, .] rather than [T, B, .]: the targets' own attribute."""
        return bool(dict(self.attrs).get("batch_major", False))


def _empty():
    return jnp.zeros((0,), jnp.float32)


def _sds(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _call(target, step, outs, operands, aliases=()):
    """Calls ``<prefix>_<step>`` with one recurrence's ``operands``, or ``<prefix>_<step>_pair`` with two
    (kernels that project; the second recurrence runs in the other direction): ``outs`` and ``operands``
    hold one tuple per recurrence, ``aliases`` one ``input_output_aliases`` dict (or None) per recurrence,
    each counted within its own operands and results. Returns one tuple of results per recurrence."""
    n_ops, n_out = len(operands[0]), len(outs[0])
    flat_aliases = {i + d * n_ops: r + d * n_out for d, al in enumerate(aliases) for i, r in (al or {}).items()}
    name = f"{target.prefix}_{step}{'_pair' if len(outs) == 2 else ''}"
    call = jax.ffi.ffi_call(name, tuple(o for out in outs for o in out), vmap_method="sequential",
                            input_output_aliases=flat_aliases or None)
    results = call(*(x for ops in operands for x in ops), cell=target.cell, reverse=target.reverse,
                   **dict(target.attrs))
    return [tuple(results[d * n_out:(d + 1) * n_out]) for d in range(len(outs))]


def _forward_outs(target, training, lead, GH, h0, c0):
    """The forward target's result shapes for sequence arrays ``lead + (.,)`` and G*H gate columns."""
    H = h0.shape[-1]
    residuals = training and (target.cell in _LSTMS or target.cell == CELLS["gru"])
    return (_sds((*lead, H)), _sds(h0.shape), _sds(c0.shape), _sds((*lead, GH) if residuals else (0,)),
            _sds((*lead, H) if residuals else (0,)))


def _forward(target, training, inputs, w_h, b_hn, h0, c0):
    """The forward target's results ``(ys, hT, cT, act, aux)`` for ``inputs = (px,)`` (kernels that do not
    project their input)."""
    out = _forward_outs(target, training, inputs[0].shape[:2], w_h.shape[1], h0, c0)
    return _call(target, "forward", [out], [(*inputs, w_h, b_hn, h0, c0)])[0]


def _forward_projecting(target, training, xs, directions, masks):
    """The forward target's results per recurrence, for kernels that project: ``directions`` holds one
    ``(w_x, b, w_h, extra, h0, c0)`` per recurrence (two: a pair call), ``masks`` is ``(lengths, resets)``."""
    outs = [_forward_outs(target, training, xs.shape[:2], w_h.shape[1], h0, c0)
            for _, _, w_h, _, h0, c0 in directions]
    return _call(target, "forward", outs, [(xs, *d, *masks) for d in directions])


def _state_grads(target, saved, cts, masks=None):
    """``(dpx, dghn, dh0, dc0, dpeep)`` from the backward target (``dghn`` empty but for the GRU), one tuple
    per recurrence: ``saved`` and ``cts`` hold one entry per recurrence (two: a pair call).

    Kernels that project take ``masks`` ``(lengths, resets)`` and then the cell's
    extra vector (``saved[d][1]``) as further operands, and return ``dpeep [B, S*H]``
    (an LSTM with peepholes ``[S, H]``: each batch row's sums over its steps of
    dA_i c_{t-1}, dA_f c_{t-1} and dA_o c_t, as present; else empty) as a fifth
    result; for the others (``masks=None``) ``dpeep`` is None.
    """
    outs, operands, aliases = [], [], []
    for (w_h, extra, h0, c0, ys, act, aux), (dys, dhT, dcT) in zip(saved, cts):
        lead, H = ys.shape[:2], ys.shape[2]
        gru = target.cell == CELLS["gru"]
        out = (_sds((*lead, w_h.shape[1])), _sds((*lead, H) if gru else (0,)), _sds(h0.shape), _sds(c0.shape))
        ops = (dys, dhT, dcT, w_h, ys, h0, c0, act, aux)
        if masks is not None:
            out += (_sds((h0.shape[0], extra.size) if target.cell in _LSTMS and extra.size else (0,)),)
            ops += (*masks, extra)
        outs.append(out), operands.append(ops)
        # operands 7 and 8 are act and aux; results 0 and 1 are dpx and dghn
        aliases.append(({7: 0, 8: 1} if gru else {7: 0}) if target.in_place and act.size else None)
    results = _call(target, "backward", outs, operands, aliases)
    return results if masks is not None else [(*r, None) for r in results]


def _backward(target, saved, cts):
    """``(dpx, dw_h, db_hn, dh0, dc0)`` from the backward target and XLA's whole-sequence GEMMs."""
    w_h, b_hn, h0, c0, ys, act, aux = saved
    dpx, dghn, dh0, dc0, _ = _state_grads(target, [saved], [cts])[0]
    H = ys.shape[2]
    gru = target.cell == CELLS["gru"]
    # the recurrent GEMM's output gradient: dpx, except the GRU's n block, which saw r * (h W_hn + b_hn)
    dgh = jnp.concatenate([dpx[..., :2 * H], dghn], -1) if gru else dpx
    h_start = _start_h_batch_major(ys, h0, target.reverse) if target.batch_major else _start_h(ys, h0, target.reverse)
    db_hn = jnp.sum(_rows(dghn), 0) if gru else jnp.zeros_like(b_hn)
    dw_h = jax.lax.dot_general(_rows(h_start), _rows(dgh), (((0,), (0,)), ((), ())))
    return dpx, dw_h, db_hn, dh0, dc0


def _kernel_weight_grads(target, xs, ys, h0, dpx, dghn, b_hn, masks):
    """``(dw_x, dw_h, db, db_hn)`` from the weight-gradient target of kernels that project."""
    return _weight_grads_projecting(target, xs, [(ys, h0, dpx, dghn, b_hn)], masks)[0]


def _weight_grads_projecting(target, xs, directions, masks):
    """`_kernel_weight_grads` per recurrence: ``directions`` holds one ``(ys, h0, dpx, dghn, b_hn)`` per
    recurrence (two: a pair call)."""
    I = xs.shape[-1]
    outs = [(_sds((I, dpx.shape[-1])), _sds((h0.shape[-1], dpx.shape[-1])), _sds((dpx.shape[-1],)), _sds(b_hn.shape))
            for _, h0, dpx, _, b_hn in directions]
    return _call(target, "weight_grads", outs, [(xs, ys, h0, dpx, dghn, *masks) for ys, h0, dpx, dghn, _ in directions])


def _start_h_batch_major(ys, h0, reverse):
    """`seqjax.fused._start_h` for ys [B, T, H]."""
    if reverse:
        return jnp.concatenate([ys[:, 1:], h0[:, None]], axis=1)
    return jnp.concatenate([h0[:, None], ys[:, :-1]], axis=1)


def _rows(a):
    """[T, B, N] -> [T*B, N]: the 2-D layout XLA:CPU's fast GEMM path wants."""
    return a.reshape(-1, a.shape[-1])


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(target, px, w_h, b_hn, h0, c0):
    ys, hT, cT, _, _ = _forward(target, False, (px,), w_h, b_hn, h0, c0)
    return ys, hT, cT


def _run_fwd(target, px, w_h, b_hn, h0, c0):
    ys, hT, cT, act, aux = _forward(target, True, (px,), w_h, b_hn, h0, c0)
    return (ys, hT, cT), (w_h, b_hn, h0, c0, ys, act, aux)


def _run_bwd(target, saved, cts):
    return _backward(target, saved, cts)


_run.defvjp(_run_fwd, _run_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run_projecting(target, xs, directions, lengths, resets):
    """``((ys, hT, cT), ...)`` per recurrence; ``directions`` as in `_forward_projecting`."""
    return tuple(r[:3] for r in _forward_projecting(target, False, xs, directions, (lengths, resets)))


def _run_projecting_fwd(target, xs, directions, lengths, resets):
    results = _forward_projecting(target, True, xs, directions, (lengths, resets))
    rests = [(w_h, extra, h0, c0, ys, act, aux)
             for (_, _, w_h, extra, h0, c0), (ys, _, _, act, aux) in zip(directions, results)]
    return tuple(r[:3] for r in results), (xs, [d[0] for d in directions], (lengths, resets), rests)


def _run_projecting_bwd(target, saved, cts):
    xs, w_xs, masks, rests = saved
    state = _state_grads(target, rests, cts, masks)
    gru = target.cell == CELLS["gru"]
    weights = _weight_grads_projecting(
        target, xs, [(ys, h0, dpx, dghn, extra if gru else _empty())
                     for (_, extra, h0, _, ys, _, _), (dpx, dghn, _, _, _) in zip(rests, state)], masks)
    dxs, grads = None, []
    for w_x, (_, extra, *_), (dpx, _, dh0, dc0, dpeep), (dw_x, dw_h, db, db_hn) in zip(w_xs, rests, state, weights):
        d_xs = (_rows(dpx) @ w_x.T).reshape(xs.shape)
        dxs = d_xs if dxs is None else dxs + d_xs
        dextra = db_hn if gru else jnp.sum(dpeep, 0).reshape(extra.shape) if dpeep.size else jnp.zeros_like(extra)
        grads.append((dw_x, db, dw_h, dextra, dh0, dc0))
    return dxs, tuple(grads), None, None


_run_projecting.defvjp(_run_projecting_fwd, _run_projecting_bwd)


def native_scan(prefix: str, kind: str, params, xs: Array, carry0, reverse: bool, attrs: tuple,
                projects: bool = False, in_place: bool = False, lengths: Array | None = None,
                resets: Array | None = None):
    """``(final_carry, ys)`` of the recurrence run by the FFI targets ``prefix + "_forward"/"_backward"``.

    Args:
      prefix: the targets' common prefix, e.g. "seqjax_cuda_rnn".
      kind: "lstm", "gru", "rnn_tanh", "rnn_relu" or (kernels that project) one of `LSTM_VARIANTS` (`CELLS`);
        an LSTM kind has peepholes where ``params.peep`` is not None (kernels that project only).
      params: the cell's params, float32.
      xs: [T, B, I] float32, or [B, T, I] where ``attrs`` hold ``("batch_major", True)``.
      carry0: `LSTMCarry` or h [B, H], float32.
      reverse: process time backwards (``ys[t]`` stays aligned with ``xs[t]``).
      attrs: the targets' further attributes, as ``((name, value), ...)``.
      projects: whether the forward target takes ``(xs, w_x, b)`` and computes
        the input projection itself, rather than ``px`` (such kernels also
        bring the ``prefix + "_weight_grads"`` target).
      in_place: whether the backward target may write ``dpx`` over ``act``
        (and ``dghn`` over ``aux``); see the module docstring.
      lengths: [B] int32, the valid steps of each sequence (`seqjax.scan`'s
        semantics), or None; only kernels that project take them.
      resets: [T, B] bool (time-major whatever the layout of ``xs``): where
        true, the carry is zero before the step (`seqjax.scan`'s semantics), or
        None; only kernels that project take them.
    """
    _check_kind(kind)
    lstm = CELLS[kind] in _LSTMS
    if not projects and (kind in LSTM_VARIANTS or (lstm and params.peep is not None)):
        raise ValueError(f"seqjax: the {prefix} kernels run the standard LSTM without peepholes only, got {kind!r}"
                         f"{' with peepholes' if lstm and params.peep is not None else ''}")
    xs = xs.astype(jnp.float32)
    target = Target(prefix, CELLS[kind], bool(reverse), tuple(attrs), bool(in_place))
    if projects:
        ((ys, hT, cT),) = _run_projecting(target, xs, (_direction(kind, params, carry0),), *_masks(lengths, resets))
    else:
        if lengths is not None or resets is not None:
            raise ValueError(f"seqjax: the {prefix} kernels take no lengths or resets")
        _, _, w_h, extra, h0, c0 = _direction(kind, params, carry0)
        px = matmul(xs, params.w_x) + params.b
        ys, hT, cT = _run(target, px, w_h, extra, h0, c0)
    return _carry(kind, hT, cT), ys


def native_scan_pair(prefix: str, kind: str, params: tuple, xs: Array, carries: tuple, attrs: tuple,
                     in_place: bool = False, lengths: Array | None = None, resets: Array | None = None):
    """A bidirectional layer's two recurrences, in one call of each target, one thread per direction.

    For kernels that project their input, with the targets ``prefix +
    "_forward_pair"``, ``"_backward_pair"`` and ``"_weight_grads_pair"``: twice
    the single targets' operands and results, the second recurrence reversed.
    Each direction gets the bits of `native_scan` with ``("threads", 1)``.

    Args:
      prefix, kind, attrs, in_place, lengths, resets: as in `native_scan`
        (``attrs`` also give the pair's ``threads``: 1 runs the two directions
        one after the other).
      params: ``(forward_params, backward_params)`` of the same kind (peepholes
        may differ; hidden sizes too).
      xs: as in `native_scan`; both directions read it.
      carries: ``(forward_carry0, backward_carry0)``.

    Returns:
      ``((forward_carry, ys_forward), (backward_carry, ys_backward))``.
    """
    _check_kind(kind)
    target = Target(prefix, CELLS[kind], False, tuple(attrs), bool(in_place))
    directions = tuple(_direction(kind, p, c) for p, c in zip(params, carries))
    results = _run_projecting(target, xs.astype(jnp.float32), directions, *_masks(lengths, resets))
    return tuple((_carry(kind, hT, cT), ys) for ys, hT, cT in results)


def _check_kind(kind):
    if kind not in CELLS:
        raise ValueError(f"seqjax: kind must be one of {list(CELLS)}, got {kind!r}")


def _direction(kind, params, carry0):
    """One recurrence's operands ``(w_x, b, w_h, extra, h0, c0)``: ``extra`` is the cell's extra parameter
    vector (the GRU's b_hn, an LSTM's peepholes [S, H], p_i, p_f, p_o as present; else empty)."""
    lstm = CELLS[kind] in _LSTMS
    h0, c0 = (carry0.h, carry0.c) if lstm else (carry0, _empty())
    extra = params.b_hn if kind == "gru" else params.peep if lstm and params.peep is not None else _empty()
    return params.w_x, params.b, params.w_h, extra, h0, c0


def _masks(lengths, resets):
    """The ``(lengths, resets)`` operands: [0]-shaped where not given."""
    return (jnp.zeros((0,), jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32),
            jnp.zeros((0,), bool) if resets is None else jnp.asarray(resets, bool))


def _carry(kind, hT, cT):
    return LSTMCarry(hT, cT, None) if CELLS[kind] in _LSTMS else hT
