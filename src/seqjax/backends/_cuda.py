"""Whole recurrences as single persistent CUDA kernels on Hopper GPUs (H100, H200).

`seqjax.scan` uses them with ``kernel="cuda"``; ``kernel="auto"`` (the default)
will take them on a GPU wherever they apply and a launch plan fits once `AUTO`
is switched on (`auto_eligible`); `cuda_scan` is the direct entry point.

XLA runs a recurrence as a loop of small dependent kernels, about two per step,
and at a few microseconds per launch the loop, not the arithmetic, sets the
time of long sequences (docs/design/performance.md, the GPU). Here one kernel runs
the whole time loop, forward or backward (``csrc/cuda_rnn.cu``):

* one thread-block cluster of up to 16 blocks; each block keeps the recurrent
  weights of its share of the hidden units in registers for the whole sequence;
* forward, each step: every block multiplies the full ``h_{t-1}`` by its weight
  slice, applies the gate arithmetic to its units and copies its part of ``h_t``
  into every block's shared memory (distributed shared memory); each block waits
  on its own barrier for exactly those bytes, with no cluster-wide barrier;
* backward: the same weight slice, transposed, turns each block's gate
  gradients into partial ``dA_t W_h^T`` sums that are reduce-scattered to the
  blocks owning the units.

The input projection of all steps (one GEMM) and the weight gradients (GEMMs
over all T*B rows, as in `seqjax.backends._gemm_vjp`) stay in XLA, so ``jax.grad`` works as
usual through a `jax.custom_vjp` (reverse mode only). The recurrence is exact
float32 (CUDA-core FMAs; the GEMMs around it follow JAX's matmul precision).

Covered, float32 params, without ``lengths``, ``resets`` or ``remat``: the
standard LSTM of `seqjax.lstm` (no peepholes or projection), `seqjax.gru` with
``reset_after=True`` and `seqjax.rnn` with tanh or relu, for hidden sizes that
split into blocks of a multiple of 4 units (H a multiple of 4) and batches small
enough that one block holds a step's ``h`` (`plan` says). Needs a GPU of compute
capability 9.0 (thread-block clusters); the kernels are built when seqjax is installed
where ``nvcc`` is found (`seqjax.backends._library.load_cuda`).
"""
from __future__ import annotations

import ctypes
import functools

from seqjax.cells.base import Array, Cell
from seqjax.backends._gemm_vjp import native_kind
from seqjax.backends._library import NativeUnavailable, load_cuda
from seqjax.backends._kernel_vjp import CELLS, native_scan

__all__ = ["AUTO", "NativeUnavailable", "auto_eligible", "cuda_scan", "kind_of", "plan"]

# the kinds these kernels run (the LSTM variants of `seqjax.backends._kernel_vjp` are the CPU kernels' alone)
_CELLS = {kind: number for kind, number in CELLS.items() if kind in ("lstm", "gru", "rnn_tanh", "rnn_relu")}


def kind_of(cell: Cell, params) -> tuple[str | None, str | None]:
    """``(kind, None)`` if the CUDA kernels compute ``cell`` with ``params``, else ``(None, why not)``.

    Checks the cell and params only; the call's options, the shape and the
    device are checked by `seqjax.scan` and `plan`.
    """
    return native_kind(cell, params, _CELLS, False,
                       "they compute seqjax.lstm with all gates, tanh activations, no peepholes, projection or gate "
                       "recurrence, seqjax.gru with reset_after=True and seqjax.rnn with tanh or relu",
                       "the CUDA kernels")


def plan(kind: str, batch: int, hidden: int, cluster: int = 0, threads: int = 0, model: bool = False) -> dict:
    """The launch plan the kernels use for this cell and shape (asks the GPU; builds the kernels first).

    Returns a dict: ``cluster`` (blocks), ``forward_threads``/``backward_threads``
    (per block) and ``forward_smem``/``backward_smem`` (bytes per block).
    ``cluster`` and ``threads`` request a cluster size and a target thread count
    for the matmuls (0: chosen here). ``model=True`` plans for a model H100
    (no GPU needed; for tests).

    Raises:
      ValueError: no plan fits (the reason is in the message: the GPU's compute
        capability, shared memory per block, threads or registers).
      NativeUnavailable: the kernels cannot be built here.
    """
    found = _plan(kind, int(batch), int(hidden), int(cluster), int(threads), bool(model))
    if isinstance(found, str):
        raise ValueError(f"seqjax.backends._cuda: no launch plan for {kind} with B={batch}, H={hidden}"
                         f"{f', cluster={cluster}' if cluster else ''}: {found}")
    return dict(found)


@functools.cache
def _plan(kind, batch, hidden, cluster, threads, model) -> tuple | str:
    """`plan`'s answer, asked of the GPU once per process: the plan's items, or why there is none."""
    lib = load_cuda()
    planner = lib.seqjax_cuda_plan_model if model else lib.seqjax_cuda_plan
    out = (ctypes.c_int64 * 5)()
    error = ctypes.create_string_buffer(1024)
    if planner(_CELLS[kind], batch, hidden, cluster, threads, out, error, len(error)) != 0:
        return error.value.decode(errors="replace")
    return tuple(zip(("cluster", "forward_threads", "backward_threads", "forward_smem", "backward_smem"), out))


#: Whether ``seqjax.scan(kernel="auto")`` may take the CUDA kernels on a GPU. Off for now: the kernels
#: beat XLA's loop at every shape they ran on the H100 (bench/results/gpu/cuda_sweep_gpu.json, median ms,
#: CUDA vs XLA, forward / train step; LSTM, GRU, RNN at (B, T, H) = (16, 1000, 128): 3.12 vs 4.46 /
#: 6.16 vs 11.2, 2.67 vs 4.10 / 5.50 vs 9.93, 2.03 vs 4.04 / 3.98 vs 7.57; at (32, 50, 64): 0.386 vs
#: 0.411 / 0.545 vs 0.854, 0.335 vs 0.402 / 0.509 vs 0.788, 0.415 vs 0.450 / 0.580 vs 0.653), but
#: seqjax's GPU test suite routed through them (``bash bench/gpu.sh OUT cuda tests-cuda-auto``) has not yet
#: passed on a GPU with the final launch planner. Pass ``kernel="cuda"`` to use them.
AUTO = False


def auto_eligible(kind: str, T: int, B: int, H: int) -> bool:
    """Whether ``kernel="auto"`` takes the CUDA kernels for this shape: where `AUTO` allows and `plan` fits.

    Shapes whose batch needs more than 1024 gate threads per block (B * H / 16,
    e.g. (B, H) = (64, 256)) have no plan and stay on XLA's loop, which beats
    cuDNN there.
    """
    del T
    if not AUTO:
        return False
    try:
        plan(kind, B, H)
    except ValueError:
        return False
    return True


def cuda_scan(kind: str, params, xs_tm: Array, carry0, reverse: bool = False, cluster: int = 0, threads: int = 0):
    """A whole recurrence in one persistent CUDA kernel, time-major: ``(final_carry, ys [T, B, H])``.

    Same results as ``seqjax.scan(cell, params, xs_tm, carry=carry0,
    time_major=True, reverse=reverse)`` to float32 rounding, for the cell whose
    `kind_of` is ``kind``. Differentiable in reverse mode.

    Args:
      kind: from `kind_of`: "lstm", "gru", "rnn_tanh" or "rnn_relu".
      params: the cell's params, float32.
      xs_tm: [T, B, I] float32, T and B at least 1.
      carry0: the cell's carry for batch B, float32 (`LSTMCarry` or h [B, H]).
      reverse: process time backwards (``ys[t]`` stays aligned with ``xs[t]``).
      cluster, threads: `plan`'s requests (0: automatic); for benchmarks.

    Raises:
      ValueError: no launch plan fits this shape on this GPU (`plan`).
      NativeUnavailable: the kernels cannot be built or loaded here.
    """
    if kind not in _CELLS:
        raise ValueError(f"seqjax.backends._cuda.cuda_scan: kind must be one of {list(_CELLS)}, got {kind!r}")
    _, B, _ = xs_tm.shape
    plan(kind, B, params.w_h.shape[0], cluster, threads)  # raises at trace time where the kernel could not launch
    return native_scan("seqjax_cuda_rnn", kind, params, xs_tm, carry0, reverse,
                       (("cluster", int(cluster)), ("threads", int(threads))))
