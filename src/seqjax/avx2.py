"""Whole recurrences as single hand-written kernels for x86 CPUs with AVX2 and FMA.

`seqjax.scan` uses them with ``kernel="avx2"`` (and ``kernel="auto"`` takes them on
the CPU wherever they apply, `AUTO`); `avx2_scan` is the direct entry point.
XLA runs a recurrence as a loop of a GEMM and a few fused elementwise kernels
per step, each a separate call with its own overhead, and the gate
pre-activations make a round trip through memory. Here one call runs the whole
time loop (``csrc/cpu_rnn.cc``): each step multiplies ``[x_t, h_{t-1}]`` by
``[W_x; W_h]`` (packed once per call) in tiles of a few batch rows x 8 hidden
units x all gates, and applies the gate arithmetic while the tile is still in
registers; no ``[T, B, G*H]`` input-projection buffer is built. The backward
pass runs the reverse recurrence of the state gradients the same way; XLA
computes the weight gradients and ``dxs`` as GEMMs over all T*B rows, joined to
the kernels by a `jax.custom_vjp` (reverse mode only; `seqjax.persistent`,
shared with `seqjax.cuda`).

Steps with enough work (2 B G H (I + H) >= 2^19 flops) are split between the
calling thread and one helper from XLA's intra-op thread pool, by chunks of 8
hidden units, with one barrier per step; the results do not depend on it.

Covered, float32 params, without ``lengths``, ``resets`` or ``remat``: the
standard LSTM of `seqjax.lstm` (no peepholes or projection), `seqjax.gru` with
``reset_after=True`` and `seqjax.rnn` with tanh or relu, for hidden sizes that
are multiples of 8. Needs an x86-64 CPU with AVX2 and FMA and a C++ compiler
(`seqjax.native.load_avx2`, about 8 s once, cached). tanh and sigmoid are a
vectorised rational approximation (Eigen's, as XLA:CPU's), so results match
XLA's to float32 rounding, not bit for bit.
"""
from __future__ import annotations

from seqjax.cells.base import Array, Cell
from seqjax.fused import native_kind
from seqjax.native import NativeUnavailable, load_avx2
from seqjax.persistent import CELLS, native_scan

__all__ = ["AUTO", "NativeUnavailable", "avx2_scan", "kind_of", "shape_blocker"]

#: Whether ``seqjax.scan(kernel="auto")`` takes these kernels on the CPU wherever they apply (and the CPU has
#: AVX2 and FMA and a C++ compiler is here). On the 2-core CPU they beat XLA's loop in forward and train
#: step for the LSTM, GRU and RNN at the three benchmark shapes, e.g. LSTM (B, T, I, H) = (16, 1000, 32,
#: 128), median ms fwd / train: 34.3 / 153 against 67.7 / 203, GRU (64, 100, 128, 256) 34.6 / 141 against
#: 59.9 / 181 (bench/results/levers.md, session 7; bench/results/peers_avx2*.json).
AUTO = True


def kind_of(cell: Cell, params) -> tuple[str | None, str | None]:
    """``(kind, None)`` if the AVX2 kernels compute ``cell`` with ``params``, else ``(None, why not)``.

    Checks the cell and params only; the call's options and the shape are
    checked by `seqjax.scan` and `shape_blocker`.
    """
    return native_kind(cell, params, CELLS, False,
                       "they compute seqjax.lstm with all gates, tanh activations, no peepholes, projection or gate "
                       "recurrence, seqjax.gru with reset_after=True and seqjax.rnn with tanh or relu",
                       "the AVX2 kernels")


def shape_blocker(hidden: int) -> str | None:
    """Why the kernels cannot run this hidden size, or None."""
    if hidden % 8:
        return f"the AVX2 kernels need a hidden size that is a multiple of 8, got {hidden}"
    return None


def avx2_scan(kind: str, params, xs_tm: Array, carry0, reverse: bool = False, threads: int = 0):
    """A whole recurrence in one AVX2 kernel call, time-major: ``(final_carry, ys [T, B, H])``.

    Same results as ``seqjax.scan(cell, params, xs_tm, carry=carry0,
    time_major=True, reverse=reverse)`` to float32 rounding, for the cell whose
    `kind_of` is ``kind``. Differentiable in reverse mode.

    Args:
      kind: from `kind_of`: "lstm", "gru", "rnn_tanh" or "rnn_relu".
      params: the cell's params, float32, hidden size a multiple of 8.
      xs_tm: [T, B, I] float32.
      carry0: the cell's carry for batch B, float32 (`LSTMCarry` or h [B, H]).
      reverse: process time backwards (``ys[t]`` stays aligned with ``xs[t]``).
      threads: how many threads share each step (1 or 2; 0: two where a step
        has enough work); for benchmarks.

    Raises:
      ValueError: an unknown kind, a hidden size the kernels do not take, or
        ``threads`` out of range.
      NativeUnavailable: the kernels cannot be built or loaded here.
    """
    if kind not in CELLS:
        raise ValueError(f"seqjax.avx2.avx2_scan: kind must be one of {list(CELLS)}, got {kind!r}")
    why = shape_blocker(params.w_h.shape[0])
    if why:
        raise ValueError(f"seqjax.avx2.avx2_scan: {why}")
    if threads not in (0, 1, 2):
        raise ValueError(f"seqjax.avx2.avx2_scan: threads must be 0 (automatic), 1 or 2, got {threads!r}")
    load_avx2()
    return native_scan("seqjax_avx2_rnn", kind, params, xs_tm, carry0, reverse, (("threads", int(threads)),),
                       projects=True, in_place=True)
