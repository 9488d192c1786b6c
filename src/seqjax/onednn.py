"""The LSTM as one oneDNN primitive on the CPU: the kernel PyTorch's CPU ``nn.LSTM`` runs.

`seqjax.scan` uses it with ``kernel="onednn"`` (and ``kernel="auto"`` where it
applies, see `seqjax.scan`); `lstm_scan` is the direct entry point. The whole
recurrence, forward or backward, is one call into oneDNN's JIT-compiled LSTM
(packed weights, batch-reduce GEMMs with the gate arithmetic fused), made through
`jax.ffi`; the backward pass is oneDNN's, wired in with a `jax.custom_vjp` (so
reverse mode only, like `seqjax.fused`).

Covered: the standard LSTM of `seqjax.lstm` (all three gates, tanh activations,
no gate recurrence), with or without peepholes and ``proj_size``, float32
params, on the CPU; no ``lengths`` or ``resets`` (oneDNN has no per-sequence
lengths). Needs ``pip install 'seqjax[onednn]'`` and a C++ compiler (`seqjax.native`).
"""
from __future__ import annotations

import ctypes
from functools import partial

import jax
import jax.numpy as jnp

from seqjax.cells.base import Array, Cell, has_own_step
from seqjax.cells.lstm import LSTMCarry, LSTMParams, LSTMSpec
from seqjax.native import NativeUnavailable, load_onednn

__all__ = ["AUTO_MIN_HIDDEN", "NativeUnavailable", "available", "lstm_scan", "unsupported_reason"]

_STANDARD = LSTMSpec()

#: ``seqjax.scan(kernel="auto")`` takes oneDNN from this hidden size up. On the 2-core CPU
#: (bench/results/peers_onednn.json) oneDNN beat XLA's loop at H=256 (standard shape: forward 59.7
#: vs 79.2 ms, train step 206 vs 235 ms) and H=128 (long: 55.3 vs 67.5 ms, train at par), and lost
#: at H=64 (small: 2.31 vs 1.65 ms, 7.76 vs 5.86 ms).
AUTO_MIN_HIDDEN = 128


def available() -> bool:
    """Whether the oneDNN kernels load here (building them on first call; see `seqjax.native`)."""
    try:
        load_onednn()
    except NativeUnavailable:
        return False
    return True


def unsupported_reason(cell: Cell, params) -> str | None:
    """Why `lstm_scan` cannot compute ``cell`` with ``params`` (None if it can).

    Checks the cell and params only; ``lengths``/``resets``, the backend and
    the installation are checked by `seqjax.scan`.
    """
    if cell.layers is not None:
        return "a stacked cell runs layer by layer (each layer is checked on its own)"
    if not has_own_step(cell) or cell.fused[0] != _STANDARD:
        return (f"{cell.name} is not the standard LSTM (oneDNN computes seqjax.lstm with all gates, tanh "
                "activations and no gate recurrence, optionally with peepholes and/or proj_size)")
    if not isinstance(params, LSTMParams) or params.w_gates is not None:
        return "params are not LSTMParams without w_gates"
    dtypes = {jnp.result_type(a) for a in jax.tree.leaves(params)}
    if dtypes != {jnp.dtype(jnp.float32)}:
        return f"oneDNN's LSTM kernel here is float32 only, got params of dtype(s) {sorted(map(str, dtypes))}"
    H = cell.hidden_size
    if params.w_x.shape[-1] != 4 * H or params.w_h.shape[-1] != 4 * H:
        return f"params do not have 4 gate blocks of H={H} columns"
    if params.peep is not None and params.peep.shape != (3, H):
        return f"peep must have shape (3, {H}), got {params.peep.shape}"
    return None


def _workspace_bytes(T, N, I, H, P, peep, proj, reverse) -> int:
    error = ctypes.create_string_buffer(1024)
    size = load_onednn().seqjax_onednn_lstm_workspace_bytes(T, N, I, H, P, int(peep), int(proj), int(reverse),
                                                            error, len(error))
    if size < 0:
        raise NativeUnavailable(f"oneDNN rejected an LSTM with T={T}, B={N}, I={I}, H={H}, P={P}, peepholes={peep}, "
                                f"projection={proj}: {error.value.decode(errors='replace')}")
    return size


def _forward(training, reverse, xs, h0, c0, w_x, w_h, b, peep, w_proj):
    T, N, I = xs.shape
    H, P = c0.shape[-1], h0.shape[-1]
    ws = _workspace_bytes(T, N, I, H, P, peep.size > 0, w_proj.size > 0, reverse) if training else 0
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct((T, N, P), f32), jax.ShapeDtypeStruct((N, P), f32),
           jax.ShapeDtypeStruct((N, H), f32), jax.ShapeDtypeStruct((ws,), jnp.uint8))
    call = jax.ffi.ffi_call("seqjax_onednn_lstm_forward", out, vmap_method="sequential")
    return call(xs, h0, c0, w_x, w_h, b, peep, w_proj, training=bool(training), reverse=bool(reverse))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm(reverse, xs, h0, c0, w_x, w_h, b, peep, w_proj):
    ys, hT, cT, _ = _forward(False, reverse, xs, h0, c0, w_x, w_h, b, peep, w_proj)
    return ys, hT, cT


def _lstm_fwd(reverse, *inputs):
    ys, hT, cT, ws = _forward(True, reverse, *inputs)
    return (ys, hT, cT), (inputs, ys, hT, cT, ws)


def _lstm_bwd(reverse, saved, cts):
    inputs, ys, hT, cT, ws = saved
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs)
    call = jax.ffi.ffi_call("seqjax_onednn_lstm_backward", out, vmap_method="sequential")
    return tuple(call(*inputs, ys, hT, cT, ws, *cts, reverse=bool(reverse)))


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


def lstm_scan(params: LSTMParams, xs_tm: Array, carry0: LSTMCarry, reverse: bool = False):
    """The standard LSTM over a time-major sequence in one oneDNN call: ``(final_carry, ys [T, B, P])``.

    Same results as ``seqjax.scan(seqjax.lstm(H, ...), params, xs_tm,
    carry=carry0, time_major=True, reverse=reverse)`` to float32 rounding.
    Differentiable in reverse mode (oneDNN's backward primitive).

    Args:
      params: `LSTMParams` of a standard `seqjax.lstm` (see `unsupported_reason`), float32.
      xs_tm: [T, B, I] float32.
      carry0: `LSTMCarry` with h [B, P] and c [B, H], float32.
      reverse: process time backwards (``ys[t]`` stays aligned with ``xs[t]``).

    Raises:
      NativeUnavailable: the kernels cannot be built or loaded here.
    """
    load_onednn()
    f32 = jnp.float32
    empty = jnp.zeros((0,), f32)
    peep = empty if params.peep is None else params.peep
    w_proj = empty if params.w_proj is None else params.w_proj
    ys, hT, cT = _lstm(bool(reverse), xs_tm.astype(f32), carry0.h, carry0.c, params.w_x, params.w_h, params.b,
                       peep, w_proj)
    return LSTMCarry(hT, cT, None), ys
