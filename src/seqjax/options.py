"""`ScanOptions`: how a recurrence is executed, one value for every runner, layer and module.

The options change how `seqjax.scan` computes a run, never what it computes
(up to float rounding): which implementation runs the loop (``kernel``), how
reverse mode differentiates it (``backward``), whether the input projection is
hoisted out of the loop (``hoist``), `lax.scan`'s unroll factor (``unroll``),
rematerialisation (``remat``), and whether a cell with a linear recurrence is
evaluated step by step or by a parallel prefix scan (``method``). `seqjax.backends.explain` shows what a given
value picks for a call.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["BACKWARD_MODES", "KERNELS", "METHODS", "ScanOptions", "resolve"]

KERNELS = ("auto", "xla", "avx2", "avx512", "onednn", "cuda")
BACKWARD_MODES = ("auto", "fused", "autodiff")
METHODS = ("auto", "sequential", "associative")


class ScanOptions(NamedTuple):
    """The execution knobs of `seqjax.scan`, accepted as ``options=`` by every runner, layer and NNX module.

    Attributes:
      kernel: ``"auto"`` (default: the fastest implementation that applies, by
        measurement), ``"xla"`` (XLA's loop), ``"avx2"`` / ``"avx512"``
        (seqjax's x86 kernels), ``"onednn"`` (oneDNN's RNN primitives) or
        ``"cuda"`` (seqjax's persistent CUDA kernels). A named kernel that
        cannot run a call raises, naming the reason.
      backward: ``"auto"`` (default), ``"fused"`` (demand seqjax's custom VJP
        on XLA's loop) or ``"autodiff"`` (differentiate the loop with JAX's
        autodiff: the choice that allows forward mode, `jax.jvp`/`jax.hessian`).
      hoist: compute the input projection of all steps as one GEMM before the
        loop; None: the platform's measured default (off on CPU, on elsewhere).
      unroll: `lax.scan`'s unroll factor; None: the platform's measured default
        (1 on CPU, 8 on accelerators).
      remat: rematerialise each step in the backward pass (memory for compute).
      method: how a cell with a linear recurrence (`seqjax.min_gru`,
        `seqjax.min_lstm`, `seqjax.lru`) is evaluated: ``"sequential"`` (a loop
        over T), ``"associative"`` (`jax.lax.associative_scan`: log-depth in T)
        or ``"auto"`` (default: the associative scan from the sequence length
        where it won the benchmark on the run's platform; on the CPU it won
        neither the forward pass nor the short train steps, so "auto" keeps the
        loop there; see `seqjax.backends.explain`). Other cells always run sequentially;
        ``"associative"`` for one of them raises.

    Example:
      >>> opts = seqjax.ScanOptions(kernel="xla", backward="autodiff")   # forward mode works
      >>> carry, ys = seqjax.scan(cell, params, xs, options=opts)
      >>> layer = seqjax.multilayer(cell, 2, options=opts)
    """

    kernel: str = "auto"
    backward: str = "auto"
    hoist: bool | None = None
    unroll: int | None = None
    remat: bool = False
    method: str = "auto"


def resolve(call: str, options: ScanOptions | None, **given) -> ScanOptions:
    """``options`` (default `ScanOptions()`) with the keyword arguments a caller gave (those not None) on top.

    Validates every field and raises a ValueError naming ``call`` and the argument.
    """
    if options is None:
        options = ScanOptions()
    elif not isinstance(options, ScanOptions):
        raise TypeError(f"{call}: options must be a seqjax.ScanOptions, got {type(options).__name__}")
    options = options._replace(**{k: v for k, v in given.items() if v is not None})
    kernel, backward, hoist, unroll, remat = options[:5]
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"{call}: kernel must be one of {list(KERNELS)}, got {kernel!r}")
    if not isinstance(backward, str) or backward not in BACKWARD_MODES:
        raise ValueError(f"{call}: backward must be one of {list(BACKWARD_MODES)}, got {backward!r}")
    if hoist is not None and not isinstance(hoist, (bool, np.bool_)):
        raise ValueError(f"{call}: hoist must be a bool or None, got {hoist!r}")
    if unroll is not None and (isinstance(unroll, bool) or not isinstance(unroll, (int, np.integer)) or unroll < 1):
        raise ValueError(f"{call}: unroll must be a positive int or None, got {unroll!r}")
    if not isinstance(remat, (bool, np.bool_)):
        raise ValueError(f"{call}: remat must be a bool, got {remat!r}")
    if not isinstance(options.method, str) or options.method not in METHODS:
        raise ValueError(f"{call}: method must be one of {list(METHODS)}, got {options.method!r}")
    return options
