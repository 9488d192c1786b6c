"""Whole recurrences as single oneDNN primitives on the CPU: the kernels PyTorch's CPU ``nn.LSTM`` runs.

`seqjax.scan` uses them with ``kernel="onednn"`` (and with ``kernel="auto"``
where they won the benchmarks, `AUTO_MIN_HIDDEN`); `onednn_scan` is the direct
entry point. The whole recurrence, forward or backward, is one call into one of
oneDNN's JIT-compiled RNN primitives (packed weights, batch-reduce GEMMs with
the gate arithmetic fused), made through `jax.ffi`; the backward pass is
oneDNN's, wired in with a `jax.custom_vjp` (reverse mode only, like `seqjax.backends._gemm_vjp`).

Covered, float32 params on the CPU, without ``lengths`` or ``resets`` (oneDNN
has no per-sequence lengths):

* the standard LSTM of `seqjax.lstm` (all three gates, tanh activations, no
  gate recurrence), with or without peepholes and ``proj_size``: oneDNN's
  ``vanilla_lstm``;
* `seqjax.gru` with ``reset_after=True`` (PyTorch's and cuDNN's form):
  ``lbr_gru``; with ``reset_after=False`` (Cho et al.): ``vanilla_gru``;
* `seqjax.rnn` with tanh or relu: ``vanilla_rnn``.

oneDNN orders the GRU's gates (u=z, r, n) where seqjax has (r, z, n): the
params are permuted on the way in (and their gradients on the way out by autodiff).
Needs ``pip install -e '.[onednn]' -C seqjax.onednn=true`` (`seqjax.backends._library`).
"""
from __future__ import annotations

import ctypes
from functools import partial

import jax
import jax.numpy as jnp

from seqjax.cells.base import Array, Cell
from seqjax.cells.lstm import LSTMCarry
from seqjax.backends._gemm_vjp import native_kind
from seqjax.backends._ffi import ffi_call
from seqjax.backends._library import NativeUnavailable, load_onednn

__all__ = ["AUTO_MIN_HIDDEN", "NativeUnavailable", "available", "kind_of", "onednn_scan"]

# kind (as `seqjax.backends._gemm_vjp.fusable` names it; "lstm" for the standard LSTMSpec) -> the C++ `Cell` enum
_CELLS = {"lstm": 0, "gru": 1, "gru_cho": 2, "rnn_tanh": 3, "rnn_relu": 4}

#: ``seqjax.scan(kernel="auto")`` takes oneDNN for these kinds from this hidden size up: where it beat
#: XLA's loop on a 2-core AMD EPYC (docs/design/performance.md, oneDNN; median ms, oneDNN vs XLA):
#: LSTM H=256 (B=64, T=100) train 204 vs 253, H=128 (T=1000) train 199 vs 216, but H=64 (T=50) train
#: 7.21 vs 6.11; GRU H=256 forward 39.4 vs 58.0, train 164 vs 191, H=128 at par, H=64 behind. The RNN
#: lost at every size (H=256 train 85.5 vs 81.0) and Cho's GRU was not measured: they never go to
#: oneDNN by default.
AUTO_MIN_HIDDEN = {"lstm": 128, "gru": 256}


def available() -> bool:
    """Whether the oneDNN kernels load here (`seqjax.backends._library.unavailable` says why not)."""
    try:
        load_onednn()
    except NativeUnavailable:
        return False
    return True


def kind_of(cell: Cell, params) -> tuple[str | None, str | None]:
    """``(kind, None)`` if oneDNN computes ``cell`` with ``params``, else ``(None, why not)``.

    Checks the cell and params only; ``lengths``/``resets``, the backend and
    the installation are checked by `seqjax.scan`.
    """
    return native_kind(cell, params, _CELLS, True,
                       "oneDNN computes seqjax.lstm with all gates, tanh activations and no gate recurrence, "
                       "optionally with peepholes and/or proj_size, seqjax.gru in both forms and seqjax.rnn with "
                       "tanh or relu", "the oneDNN kernels")


def _workspace_bytes(cell, T, N, I, H, P, peep, proj, reverse) -> int:
    error = ctypes.create_string_buffer(1024)
    size = load_onednn().seqjax_onednn_workspace_bytes(cell, T, N, I, H, P, int(peep), int(proj), int(reverse),
                                                       error, len(error))
    if size < 0:
        raise NativeUnavailable(f"oneDNN rejected cell {cell} with T={T}, B={N}, I={I}, H={H}, P={P}, "
                                f"peepholes={peep}, projection={proj}: {error.value.decode(errors='replace')}")
    return size


def _forward(cell, training, reverse, xs, h0, c0, w_x, w_h, b, peep, w_proj):
    T, N, I = xs.shape
    P = w_h.shape[0]
    H = c0.shape[-1] if cell == _CELLS["lstm"] else P  # only the LSTM has a c (and a projection)
    ws = _workspace_bytes(cell, T, N, I, H, P, peep.size > 0, w_proj.size > 0, reverse)  # checks the shape now
    ws = ws if training else 0
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct((T, N, P), f32), jax.ShapeDtypeStruct((N, P), f32),
           jax.ShapeDtypeStruct(c0.shape, f32), jax.ShapeDtypeStruct((ws,), jnp.uint8))
    call = ffi_call("seqjax_onednn_rnn_forward", out, vmap_method="sequential")
    return call(xs, h0, c0, w_x, w_h, b, peep, w_proj, cell=cell, training=bool(training), reverse=bool(reverse))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _run(cell, reverse, xs, h0, c0, w_x, w_h, b, peep, w_proj):
    ys, hT, cT, _ = _forward(cell, False, reverse, xs, h0, c0, w_x, w_h, b, peep, w_proj)
    return ys, hT, cT


def _run_fwd(cell, reverse, *inputs):
    ys, hT, cT, ws = _forward(cell, True, reverse, *inputs)
    return (ys, hT, cT), (inputs, ys, hT, cT, ws)


def _run_bwd(cell, reverse, saved, cts):
    inputs, ys, hT, cT, ws = saved
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs)
    call = ffi_call("seqjax_onednn_rnn_backward", out, vmap_method="sequential")
    return tuple(call(*inputs, ys, hT, cT, ws, *cts, cell=cell, reverse=bool(reverse)))


_run.defvjp(_run_fwd, _run_bwd)


def _gru_to_onednn(w, H):
    """Gate column blocks (r, z, n) -> oneDNN's (u=z, r, n); [..., 3H]."""
    return jnp.concatenate([w[..., H:2 * H], w[..., :H], w[..., 2 * H:]], axis=-1)


def onednn_scan(kind: str, params, xs_tm: Array, carry0, reverse: bool = False):
    """A whole recurrence in one oneDNN primitive, time-major: ``(final_carry, ys [T, B, O])``.

    Same results as ``seqjax.scan(cell, params, xs_tm, carry=carry0,
    time_major=True, reverse=reverse)`` to float32 rounding, for the cell whose
    `kind_of` is ``kind``. Differentiable in reverse mode (oneDNN's backward primitive).

    Args:
      kind: from `kind_of`: "lstm", "gru", "gru_cho", "rnn_tanh" or "rnn_relu".
      params: the cell's params, float32.
      xs_tm: [T, B, I] float32.
      carry0: the cell's carry for batch B, float32 (`LSTMCarry` with h [B, P] and c [B, H],
        or h [B, H]).
      reverse: process time backwards (``ys[t]`` stays aligned with ``xs[t]``).

    Raises:
      NativeUnavailable: the kernels cannot be built or loaded here.
    """
    if kind not in _CELLS:
        raise ValueError(f"seqjax.backends._onednn.onednn_scan: kind must be one of {list(_CELLS)}, got {kind!r}")
    load_onednn()
    empty = jnp.zeros((0,), jnp.float32)
    w_x, w_h, b = params.w_x, params.w_h, params.b
    if kind == "lstm":
        h0, c0 = carry0.h, carry0.c
        peep = empty if params.peep is None else params.peep
        w_proj = empty if params.w_proj is None else params.w_proj
    else:
        h0, c0, peep, w_proj = carry0, empty, empty, empty
        if kind.startswith("gru"):
            H = w_h.shape[0]
            w_x, w_h, b = _gru_to_onednn(w_x, H), _gru_to_onednn(w_h, H), _gru_to_onednn(b, H)
            if kind == "gru":
                b = jnp.concatenate([b, params.b_hn])
    ys, hT, cT = _run(_CELLS[kind], bool(reverse), xs_tm.astype(jnp.float32), h0, c0, w_x, w_h, b, peep, w_proj)
    return (LSTMCarry(hT, cT, None) if kind == "lstm" else hT), ys
