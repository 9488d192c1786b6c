"""The `jax.custom_vjp` shared by the whole-recurrence kernels of `seqjax.backends._cuda` and `seqjax.backends._x86`.

Both kernel libraries bind the same FFI contract (``<prefix>_forward`` and
``<prefix>_backward``): XLA computes the input projection ``px = x W_x + b`` of
all steps as one GEMM, the forward kernel runs the recurrence (and, for
training, saves the activated gates), the backward kernel runs the reverse
recurrence of the state gradients and returns ``dpx``, and XLA computes the
weight gradients as GEMMs over all ``T * B`` rows (as `seqjax.backends._gemm_vjp` does), or,
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

from seqjax._checkpoint import Binomial, backward, forward, put, take
from seqjax.cells.base import Array, matmul
from seqjax.cells.lstm import LSTMCarry
from seqjax._vma import explicit_replicated, match_varying
from seqjax.backends._ffi import SUM, Batch, ffi_call
from seqjax.backends._gemm_vjp import _start_h

__all__ = ["CELLS", "LSTM_VARIANTS", "native_scan"]

#: kind -> the kernels' cell number (seqjax.backends._onednn's numbering). The kernels that project their input
#: (`seqjax.backends._x86`) also run Greff et al.'s LSTM variants (`LSTM_VARIANTS`: 64 plus a bit per change), and any
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

    @property
    def batch_axis(self) -> int:
        """The axis of the batch rows in the sequence arrays."""
        return 0 if self.batch_major else 1


def _empty():
    return jnp.zeros((0,), jnp.float32)


def _sds(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _rows_at(a, axis: int):
    """``axis`` if ``a`` has batch rows there, else None (an empty placeholder): for `seqjax.backends._ffi.Batch`."""
    return axis if a.size else None


def _forward(target, training, inputs, w_h, b_hn, h0, c0, masks=()):
    """The forward target's results; ``inputs`` is ``(px,)`` or, for kernels that project, ``(xs, w_x, b)``,
    and ``masks`` their further operands ``(lengths, resets)``."""
    lead = inputs[0].shape[:2]  # (T, B) or (B, T)
    GH = w_h.shape[1]
    H = h0.shape[-1]
    residuals = training and (target.cell in _LSTMS or target.cell == CELLS["gru"])
    out = (_sds((*lead, H)), _sds(h0.shape), _sds(c0.shape), _sds((*lead, GH) if residuals else (0,)),
           _sds((*lead, H) if residuals else (0,)))
    bt = target.batch_axis
    lengths_resets = (_rows_at(masks[0], 0), _rows_at(masks[1], 1)) if masks else ()  # resets are time-major
    batch = Batch((bt,) + (None,) * (len(inputs) - 1) + (None, None, 0, _rows_at(c0, 0)) + lengths_resets,
                  (bt, 0, _rows_at(c0, 0), bt if residuals else None, bt if residuals else None))
    call = ffi_call(f"{target.prefix}_forward", out, vmap_method="sequential", batch=batch)
    return call(*inputs, w_h, b_hn, h0, c0, *masks, cell=target.cell, reverse=target.reverse, **dict(target.attrs))


def _state_grads(target, saved, cts, masks=None):
    """``(dpx, dghn, dh0, dc0, dpeep)`` from the backward target (``dghn`` empty but for the GRU).

    Kernels that project take ``masks`` ``(lengths, resets)`` and then the cell's
    extra vector (``saved[1]``) as further operands, and return ``dpeep [B, S*H]``
    (an LSTM with peepholes ``[S, H]``: each batch row's sums over its steps of
    dA_i c_{t-1}, dA_f c_{t-1} and dA_o c_t, as present; else empty) as a fifth
    result; for the others (``masks=None``) ``dpeep`` is None.
    """
    w_h, extra, h0, c0, ys, act, aux = saved
    dys, dhT, dcT = cts
    lead, H = ys.shape[:2], ys.shape[2]
    gru = target.cell == CELLS["gru"]
    out = (_sds((*lead, w_h.shape[1])), _sds((*lead, H) if gru else (0,)), _sds(h0.shape), _sds(c0.shape))
    operands = (dys, dhT, dcT, w_h, ys, h0, c0, act, aux)
    bt = target.batch_axis
    in_axes = (bt, 0, _rows_at(dcT, 0), None, bt, 0, _rows_at(c0, 0), _rows_at(act, bt), _rows_at(aux, bt))
    out_axes = (bt, bt if gru else None, 0, _rows_at(c0, 0))
    if masks is not None:
        out += (_sds((h0.shape[0], extra.size) if target.cell in _LSTMS and extra.size else (0,)),)
        operands += (*masks, extra)
        in_axes += (_rows_at(masks[0], 0), _rows_at(masks[1], 1), None)
        out_axes += (0 if out[-1].shape[0] else None,)
    # operands 7 and 8 are act and aux; results 0 and 1 are dpx and dghn
    aliases = ({7: 0, 8: 1} if gru else {7: 0}) if target.in_place and act.size else None
    call = ffi_call(f"{target.prefix}_backward", out, vmap_method="sequential", input_output_aliases=aliases,
                    batch=Batch(in_axes, out_axes))
    results = call(*operands, cell=target.cell, reverse=target.reverse, **dict(target.attrs))
    return tuple(results) if masks is not None else (*results, None)


def _backward(target, saved, cts):
    """``(dpx, dw_h, db_hn, dh0, dc0)`` from the backward target and XLA's whole-sequence GEMMs."""
    w_h, b_hn, h0, c0, ys, act, aux = saved
    dpx, dghn, dh0, dc0, _ = _state_grads(target, saved, cts)
    H = ys.shape[2]
    gru = target.cell == CELLS["gru"]
    # the recurrent GEMM's output gradient: dpx, except the GRU's n block, which saw r * (h W_hn + b_hn)
    dgh = jnp.concatenate([dpx[..., :2 * H], dghn], -1) if gru else dpx
    h_start = _start_h_batch_major(ys, h0, target.reverse) if target.batch_major else _start_h(ys, h0, target.reverse)
    db_hn = jnp.sum(dghn, (0, 1)) if gru else jnp.zeros_like(b_hn)
    dw_h = jax.lax.dot_general(h_start, dgh, _OVER_ROWS, out_sharding=explicit_replicated(dgh))
    return dpx, dw_h, db_hn, dh0, dc0


def _kernel_weight_grads(target, xs, ys, h0, dpx, dghn, b_hn, masks):
    """``(dw_x, dw_h, db, db_hn)`` from the weight-gradient target of kernels that project."""
    I, H, GH = xs.shape[-1], h0.shape[-1], dpx.shape[-1]
    out = (_sds((I, GH)), _sds((H, GH)), _sds((GH,)), _sds(b_hn.shape))
    bt = target.batch_axis
    batch = Batch((bt, bt, 0, bt, _rows_at(dghn, bt), _rows_at(masks[0], 0), _rows_at(masks[1], 1)), (SUM,) * 4)
    call = ffi_call(f"{target.prefix}_weight_grads", out, vmap_method="sequential", batch=batch)
    return call(xs, ys, h0, dpx, dghn, *masks, cell=target.cell, reverse=target.reverse, **dict(target.attrs))


def _start_h_batch_major(ys, h0, reverse):
    """`seqjax.backends._gemm_vjp._start_h` for ys [B, T, H]."""
    if reverse:
        return jnp.concatenate([ys[:, 1:], h0[:, None]], axis=1)
    return jnp.concatenate([h0[:, None], ys[:, :-1]], axis=1)


#: dot_general dimensions that contract two [T, B, .] arrays over all T*B rows (no reshape: the batch axis may be
#: sharded, and XLA lays the contraction out as one GEMM)
_OVER_ROWS = (((0, 1), (0, 1)), ((), ()))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(target, px, w_h, b_hn, h0, c0):
    ys, hT, cT, _, _ = _forward(target, False, (px,), w_h, b_hn, h0, c0)
    return ys, hT, cT


def _run_fwd(target, px, w_h, b_hn, h0, c0):
    ys, hT, cT, act, aux = _forward(target, True, (px,), w_h, b_hn, h0, c0)
    # px[:0] keeps only px's type (its varying manual axes), which its cotangent must match
    return (ys, hT, cT), (px[:0], (w_h, b_hn, h0, c0, ys, act, aux))


def _run_bwd(target, saved, cts):
    px_type, rest = saved
    grads = _backward(target, rest, cts)
    return match_varying(grads, (px_type, *rest[:4]))


_run.defvjp(_run_fwd, _run_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run_projecting(target, xs, w_x, b, w_h, extra, h0, c0, lengths, resets):
    ys, hT, cT, _, _ = _forward(target, False, (xs, w_x, b), w_h, extra, h0, c0, (lengths, resets))
    return ys, hT, cT


def _run_projecting_fwd(target, xs, w_x, b, w_h, extra, h0, c0, lengths, resets):
    ys, hT, cT, act, aux = _forward(target, True, (xs, w_x, b), w_h, extra, h0, c0, (lengths, resets))
    return (ys, hT, cT), (xs, w_x, b, (lengths, resets), (w_h, extra, h0, c0, ys, act, aux))


def _run_projecting_bwd(target, saved, cts):
    xs, w_x, b, masks, rest = saved
    _, extra, h0, _, ys, _, _ = rest
    dpx, dghn, dh0, dc0, dpeep = _state_grads(target, rest, cts, masks)
    gru = target.cell == CELLS["gru"]
    dw_x, dw_h, db, db_hn = _kernel_weight_grads(target, xs, ys, h0, dpx, dghn, extra if gru else _empty(), masks)
    dxs = jax.lax.dot_general(dpx, w_x, (((2,), (1,)), ((), ())))
    dextra = db_hn if gru else jnp.sum(dpeep, 0).reshape(extra.shape) if dpeep.size else jnp.zeros_like(extra)
    # inside jax.shard_map: the weight gradients of one block's rows are summed over the blocks
    grads = match_varying((dxs, dw_x, db, dw_h, dextra, dh0, dc0), (xs, w_x, b, *rest[:4]))
    return (*grads, None, None)


_run_projecting.defvjp(_run_projecting_fwd, _run_projecting_bwd)


# ----------------------------------------------------------------------------- checkpointed over time
# `_run_projecting` keeping only the start carry (h, c) of each outermost segment of ``sizes``
# (`seqjax._checkpoint.segment_sizes`): the backward pass calls the forward target on each segment from its saved
# start carry (training: the segment's gates), the backward target with the carry cotangent the later segment
# passed back (its dh0, dc0 are this segment's dhT, dcT), and the weight-gradient target, summing per segment.

def _segment_masks(masks, start, steps):
    """``(lengths, resets)`` of steps [start, start + steps): lengths counted from ``start``, clipped to the segment."""
    lengths, resets = masks
    if lengths.size:
        lengths = jnp.clip(lengths - start, 0, steps).astype(jnp.int32)
    if resets.size:
        resets = take(resets, start, steps)
    return lengths, resets


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _run_checkpointed(target, sizes, xs, w_x, b, w_h, extra, h0, c0, lengths, resets):
    ys, hT, cT, _, _ = _forward(target, False, (xs, w_x, b), w_h, extra, h0, c0, (lengths, resets))
    return ys, hT, cT


def _run_checkpointed_fwd(target, sizes, xs, w_x, b, w_h, extra, h0, c0, lengths, resets):
    axis = 1 if target.batch_major else 0

    def run(ys, carry, start, steps):
        masks = _segment_masks((lengths, resets), start, steps)
        ys_seg, hT, cT, _, _ = _forward(target, False, (take(xs, start, steps, axis), w_x, b), w_h, extra, *carry,
                                        masks)
        return put(ys, ys_seg, start, axis), (hT, cT)

    ys = jnp.zeros(xs.shape[:2] + h0.shape[-1:], jnp.float32)
    ys, (hT, cT), starts = forward(sizes, run, ys, (h0, c0), xs.shape[axis], target.reverse)
    return (ys, hT, cT), (xs, w_x, b, w_h, extra, lengths, resets, starts)


def _run_checkpointed_bwd(target, sizes, saved, cts):
    xs, w_x, b, w_h, extra, lengths, resets, starts = saved
    dys, dhT, dcT = cts
    axis = 1 if target.batch_major else 0
    gru = target.cell == CELLS["gru"]

    def advance(carry, start, steps):
        masks = _segment_masks((lengths, resets), start, steps)
        _, hT, cT, _, _ = _forward(target, False, (take(xs, start, steps, axis), w_x, b), w_h, extra, *carry, masks)
        return hT, cT

    def leaf(acc, carry_in, start, steps, dcarry):
        dw_x, db, dw_h, dextra, dxs = acc
        (h, c), masks, xs_seg = carry_in, _segment_masks((lengths, resets), start, steps), take(xs, start, steps, axis)
        ys, _, _, act, aux = _forward(target, True, (xs_seg, w_x, b), w_h, extra, h, c, masks)
        dpx, dghn, dh, dc, dpeep = _state_grads(target, (w_h, extra, h, c, ys, act, aux),
                                                (take(dys, start, steps, axis), *dcarry), masks)
        gw_x, gw_h, gb, gb_hn = _kernel_weight_grads(target, xs_seg, ys, h, dpx, dghn, extra if gru else _empty(),
                                                     masks)
        gextra = gb_hn if gru else jnp.sum(dpeep, 0).reshape(extra.shape) if dpeep.size else jnp.zeros_like(extra)
        dxs = put(dxs, jax.lax.dot_general(dpx, w_x, (((dpx.ndim - 1,), (1,)), ((), ()))), start, axis)
        return (dw_x + gw_x, db + gb, dw_h + gw_h, dextra + gextra, dxs), (dh, dc)

    acc = tuple(jnp.zeros_like(a) for a in (w_x, b, w_h, extra, xs))
    (dw_x, db, dw_h, dextra, dxs), (dh0, dc0) = backward(sizes, target.reverse, advance, leaf, acc, (dhT, dcT),
                                                          xs.shape[axis], starts)
    return dxs, dw_x, db, dw_h, dextra, dh0, dc0, None, None


_run_checkpointed.defvjp(_run_checkpointed_fwd, _run_checkpointed_bwd)


def native_scan(prefix: str, kind: str, params, xs: Array, carry0, reverse: bool, attrs: tuple,
                projects: bool = False, in_place: bool = False, lengths: Array | None = None,
                resets: Array | None = None, checkpoint: tuple[int, ...] = ()):
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
      checkpoint: the segment lengths per level (`seqjax._checkpoint.segment_sizes`),
        or () to keep the gates of every step: reverse mode then keeps only the
        start carry of each outermost segment and recomputes each segment's
        gates with the forward target; only kernels that project take it.
    """
    if kind not in CELLS:
        raise ValueError(f"seqjax: kind must be one of {list(CELLS)}, got {kind!r}")
    lstm = CELLS[kind] in _LSTMS
    if not projects and (kind in LSTM_VARIANTS or (lstm and params.peep is not None)):
        raise ValueError(f"seqjax: the {prefix} kernels run the standard LSTM without peepholes only, got {kind!r}"
                         f"{' with peepholes' if lstm and params.peep is not None else ''}")
    if lstm:
        h0, c0 = carry0.h, carry0.c
    else:
        h0, c0 = carry0, _empty()
    # the cell's extra parameter vector: the GRU's b_hn, an LSTM's peepholes [S, H] (p_i, p_f, p_o as present)
    extra = params.b_hn if kind == "gru" else params.peep if lstm and params.peep is not None else _empty()
    xs = xs.astype(jnp.float32)
    target = Target(prefix, CELLS[kind], bool(reverse), tuple(attrs), bool(in_place))
    if projects:
        lengths = jnp.zeros((0,), jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        resets = jnp.zeros((0,), bool) if resets is None else jnp.asarray(resets, bool)
        operands = (xs, params.w_x, params.b, params.w_h, extra, h0, c0, lengths, resets)
        if checkpoint:
            ys, hT, cT = _run_checkpointed(target, checkpoint if isinstance(checkpoint, Binomial) else tuple(checkpoint),
                                             *operands)
        else:
            ys, hT, cT = _run_projecting(target, *operands)
    else:
        if lengths is not None or resets is not None or checkpoint:
            raise ValueError(f"seqjax: the {prefix} kernels take no lengths, resets or checkpoint schedule")
        px = matmul(xs, params.w_x) + params.b
        ys, hT, cT = _run(target, px, params.w_h, extra, h0, c0)
    return (LSTMCarry(hT, cT, None) if lstm else hT), ys
