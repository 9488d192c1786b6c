"""Whole recurrences as single hand-written kernels for x86 CPUs with AVX2 and FMA, or AVX-512.

`seqjax.scan` uses them with ``kernel="avx2"`` or ``kernel="avx512"`` (and
``kernel="auto"`` takes them on the CPU wherever they apply, `AUTO`: the AVX-512
build where the CPU has AVX-512F and the hidden size is a multiple of 16, else
the AVX2 one); `avx2_scan` is the direct entry point. Both builds come from one
source (``csrc/cpu_rnn.cc``) and give the same bits: a vector register holds 8
(AVX2) or 16 (AVX-512) hidden units, and each unit sees the same operations in
the same order.

XLA runs a recurrence as a loop of a GEMM and a few fused elementwise kernels
per step, each a separate call with its own overhead, and the gate
pre-activations make a round trip through memory. Here one call runs the whole
time loop (``csrc/cpu_rnn.cc``): each step multiplies ``[x_t, h_{t-1}]`` by
``[W_x; W_h]`` (packed once per call) in tiles of a few batch rows x one
register of hidden units x all gates, and applies the gate arithmetic while the
tile is still in registers; no ``[T, B, G*H]`` input-projection buffer is
built. The kernels read ``xs`` and write ``ys`` in the caller's layout, time-
or batch-major, so XLA transposes nothing. The backward pass runs the reverse
recurrence of the state gradients the same way, writing the gate gradients over
the forward pass's saved gates. A third kernel computes the weight and bias
gradients as one GEMM over all T*B rows (``[x_t, h_{t-1}]^T`` times the gate
gradients, blocked and packed so that its operands stay in the caches, the bias
sums taken while packing); XLA computes ``dxs``. A `jax.custom_vjp` joins them
(reverse mode only; `seqjax.backends._kernel_vjp`, shared with `seqjax.backends._cuda`).

Passes with enough work per step (2 B G H (I + H) >= 2^19 flops) are shared
between the calling thread and one helper from XLA's intra-op thread pool:
either by batch rows (each thread runs its half of the batch through all the
steps, no synchronisation: the backward pass from B = 16, the forward for the
RNN and small steps) or by chunks of one register of hidden units with one
barrier per step; the results do not depend on it.

Covered, float32 params, with or without ``lengths``, ``resets`` and ``checkpoint``, without ``remat``: the
standard LSTM of `seqjax.lstm` with or without peepholes (the "vanilla" LSTM of
Greff et al.) and Greff et al.'s variants of it (`seqjax.lstm_variant` "NIG",
"NFG", "NOG", "CIFG", "NIAF", "NOAF", "NP"; not FGR, no projection), `seqjax.gru` with
``reset_after=True`` and `seqjax.rnn` with tanh or relu, for hidden sizes that
are multiples of 8 (AVX2) or 16 (AVX-512). Needs an x86-64 CPU with AVX2 and FMA
(or AVX-512F); both builds are compiled when seqjax is installed
(`seqjax.backends._library.load_avx2`). tanh and sigmoid are a
vectorised rational approximation (Eigen's, as XLA:CPU's), so results match
XLA's to float32 rounding, not bit for bit.

Semantics are those of ``kernel="xla"`` (``tests/test_kernel_semantics.py``):
a NaN or an Inf in ``xs``, the initial carry or a weight propagates through
tanh, sigmoid and relu, forward and backward, to exactly the outputs and
gradients where XLA's loop puts it (the clamps are NaN-preserving, the relu
backward is a select); tanh saturates to exactly +-1 from XLA's bound
(|x| >= 7.9988, derivative exactly 0). Steps past ``lengths`` or cut off by a
reset take no part in any result, whatever their inputs hold (NaN included).
One difference remains: sigmoid is ``(1 + tanh(x / 2)) / 2``, exactly 0 (derivative
0) for x <= -15.9977, where XLA's ``1 / (1 + exp(-x))`` still gives about e^x
(1.1e-7 down to 1e-38) until x <= -87.34, and exactly 1 from x >= 15.9977
(XLA's from 16.636).
"""
from __future__ import annotations

import jax.numpy as jnp

from seqjax.cells.base import Array, Cell
from seqjax.backends._gemm_vjp import native_kind
from seqjax.backends import _library as native
from seqjax.backends._library import NativeUnavailable, load_avx2
from seqjax.backends._kernel_vjp import CELLS, native_scan

__all__ = ["AUTO", "ISAS", "NativeUnavailable", "auto_isa", "avx2_scan", "kind_of", "shape_blocker"]

#: The instruction sets the kernels are built for, and the hidden units one vector register holds in each.
ISAS = {"avx2": 8, "avx512": 16}

#: Whether ``seqjax.scan(kernel="auto")`` takes these kernels on the CPU wherever they apply (and the CPU has
#: AVX2 and FMA and the install built the kernels). On both 2-core CPUs measured they beat XLA's loop in forward and
#: train step for the LSTM, GRU and RNN at the three benchmark shapes, e.g. on an AMD EPYC (AVX2) LSTM (B, T,
#: I, H) = (16, 1000, 32, 128), median ms fwd / train: 34.3 / 153 against 67.7 / 203, and on an Intel Xeon
#: (AVX-512) LSTM (64, 100, 128, 256) 29.8 / 143 against 49.1 / 159 (docs/design/performance.md, the x86
#: kernels; bench/results/peers.json).
AUTO = True


def kind_of(cell: Cell, params) -> tuple[str | None, str | None]:
    """``(kind, None)`` if the AVX2 kernels compute ``cell`` with ``params``, else ``(None, why not)``.

    Checks the cell and params only; the call's options and the shape are
    checked by `seqjax.scan` and `shape_blocker`.
    """
    return native_kind(cell, params, CELLS, False,
                       "they compute seqjax.lstm with or without peepholes, no projection or gate recurrence: the "
                       "standard LSTM and Greff et al.'s NIG, NFG, NOG, CIFG, NIAF and NOAF, seqjax.gru with "
                       "reset_after=True and seqjax.rnn with tanh or relu",
                       "seqjax's x86 kernels", peepholes=True)


def shape_blocker(hidden: int, isa: str = "avx2") -> str | None:
    """Why the ``isa`` kernels cannot run this hidden size, or None."""
    _check_isa("seqjax.backends._x86.shape_blocker", isa)
    if hidden % ISAS[isa]:
        return f"the {isa} kernels need a hidden size that is a multiple of {ISAS[isa]}, got {hidden}"
    return None


def auto_isa(hidden: int) -> str:
    """The build ``kernel="auto"`` runs for this hidden size: "avx512" where this CPU has AVX-512F, the
    install built that library and ``hidden`` is a multiple of 16, else "avx2"."""
    if not shape_blocker(hidden, "avx512") and native.avx2_installed("avx512"):
        return "avx512"
    return "avx2"


def _check_isa(call: str, isa) -> None:
    if isa not in ISAS:
        raise ValueError(f"{call}: isa must be one of {list(ISAS)}, got {isa!r}")


def avx2_scan(kind: str, params, xs: Array, carry0, reverse: bool = False, threads: int = 0,
              isa: str = "avx2", time_major: bool = True, lengths: Array | None = None,
              resets: Array | None = None, checkpoint: tuple[int, ...] = ()):
    """A whole recurrence in one kernel call: ``(final_carry, ys)``, ys [T, B, H] (or [B, T, H]).

    Same results as ``seqjax.scan(cell, params, xs, carry=carry0,
    time_major=time_major, reverse=reverse, lengths=lengths, resets=resets)`` to float32
    rounding, for the cell whose `kind_of` is ``kind``. Differentiable in
    reverse mode.

    Args:
      kind: from `kind_of`: "lstm" or one of Greff et al.'s variants
        (`seqjax.backends._kernel_vjp.LSTM_VARIANTS`: "lstm_nig", "lstm_nfg", "lstm_nog",
        "lstm_cifg", "lstm_niaf", "lstm_noaf"; with peepholes where
        ``params.peep`` is given), "gru", "rnn_tanh" or "rnn_relu".
      params: the cell's params, float32, hidden size a multiple of ``ISAS[isa]``.
      xs: [T, B, I] (or [B, T, I] with ``time_major=False``) float32.
      carry0: the cell's carry for batch B, float32 (`LSTMCarry` or h [B, H]).
      reverse: process time backwards (``ys[t]`` stays aligned with ``xs[t]``).
      threads: how many threads share each step (1 or 2; 0: two where a step
        has enough work); for benchmarks.
      isa: "avx2" or "avx512" (same results; `auto_isa` picks one).
      time_major: whether xs and ys are [T, B, .] or [B, T, .]; the kernels
        read and write either as it is (XLA transposes nothing).
      lengths: [B] int, the valid steps of each sequence, or None (all T).
        Past its length a sequence's carry stays and its outputs are zero;
        ``reverse`` starts each sequence at its own last valid step. Values
        outside [0, T] act as 0 or T. The kernels take the batch rows
        longest first, and tiles of rows that are all padding skip their
        products (the order changes no bits).
      resets: [T, B] bool (or [B, T] with ``time_major=False``), or None: where
        true (at a valid step), the carry is set back to zero before the step.
      checkpoint: segment lengths per level (`seqjax._checkpoint.segment_sizes`;
        `seqjax.scan`'s ``checkpoint=``), or () to keep every step's gates for
        the backward pass.

    Raises:
      ValueError: an unknown kind or isa, a hidden size the kernels do not
        take, ``threads`` out of range, ``lengths`` not an integer array of
        shape (B,), or ``resets`` not of shape (T, B) (``time_major``) or (B, T).
      NativeUnavailable: the kernels cannot be built or loaded here (e.g. a CPU
        without the isa's instructions).
    """
    if kind not in CELLS:
        raise ValueError(f"seqjax.backends._x86.avx2_scan: kind must be one of {list(CELLS)}, got {kind!r}")
    _check_isa("seqjax.backends._x86.avx2_scan", isa)
    why = shape_blocker(params.w_h.shape[0], isa)
    if why:
        raise ValueError(f"seqjax.backends._x86.avx2_scan: {why}")
    if threads not in (0, 1, 2):
        raise ValueError(f"seqjax.backends._x86.avx2_scan: threads must be 0 (automatic), 1 or 2, got {threads!r}")
    if lengths is not None:
        B = jnp.shape(xs)[1 if time_major else 0]
        if jnp.shape(lengths) != (B,) or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
            raise ValueError(f"seqjax.backends._x86.avx2_scan: lengths must be an integer array of shape (B,)=({B},), got "
                             f"shape {tuple(jnp.shape(lengths))} dtype {jnp.result_type(lengths)}")
    if resets is not None:
        want = tuple(jnp.shape(xs)[:2])
        if tuple(jnp.shape(resets)) != want:
            layout = "(T, B)" if time_major else "(B, T)"
            raise ValueError(f"seqjax.backends._x86.avx2_scan: resets must have shape {layout}={want}, got "
                             f"{tuple(jnp.shape(resets))}")
        resets = jnp.asarray(resets).astype(bool)
        resets = resets if time_major else resets.T
    load_avx2(isa)
    attrs = (("threads", int(threads)), ("batch_major", not time_major))
    return native_scan(f"seqjax_{isa}_rnn", kind, params, xs, carry0, reverse, attrs, projects=True, in_place=True,
                       lengths=lengths, resets=resets, checkpoint=checkpoint)
