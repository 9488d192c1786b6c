"""`ScanOptions`: how a recurrence is executed, one value for every runner, layer and module.

The options change how `seqjax.scan` computes a run, never what it computes
(up to float rounding): which implementation runs the loop (``kernel``), how
reverse mode differentiates it (``backward``), whether the input projection is
hoisted out of the loop (``hoist``), `lax.scan`'s unroll factor (``unroll``),
rematerialisation of each step (``remat``), which carries the backward pass
keeps (``checkpoint``), and whether the run is evaluated step by step or in
parallel over time (``method``, with ``newton``'s iteration settings).
`seqjax.backends.explain` shows what a given value picks for a call.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["BACKWARD_MODES", "CHECKPOINTS", "DAMPINGS", "KERNELS", "METHODS", "NewtonOptions", "ScanOptions",
           "resolve"]

KERNELS = ("auto", "xla", "avx2", "avx512", "onednn", "cuda")
BACKWARD_MODES = ("auto", "fused", "autodiff")
#: the named checkpointing policies; ``("budget", k)`` and ``("binomial", k)`` are the other two forms
CHECKPOINTS = ("all", "sqrt")
METHODS = ("auto", "sequential", "associative", "newton")
DAMPINGS = ("auto", "always", "never")


class NewtonOptions(NamedTuple):
    """The iteration settings of ``method="newton"`` (``ScanOptions(newton=...)``).

    ``method="newton"`` solves the whole trajectory ``c_t = step(c_{t-1}, x_t)``
    at once by quasi-Newton iterations (quasi-DEER): each iteration evaluates
    every step in parallel from the current guess, linearises each step with
    the per-unit block of its Jacobian and solves the linear recurrence with
    `jax.lax.associative_scan`. The fixed point is the sequential trajectory;
    after ``max_iters`` iterations without convergence the run is recomputed by
    the sequential loop, so the result is always the sequential one.

    Attributes:
      tol: convergence tolerance: the iteration stops when every carry is
        within ``tol`` (absolute, max over time, batch and units) of one cell
        step from the previous carry. The outputs are then one exact cell step
        from carries that far from the sequential ones. Default 1e-5 (float32;
        16-bit params need a looser tolerance, e.g. 1e-2).
      max_iters: the most iterations before the sequential fallback (a positive
        int; default 40). After k iterations the first k steps are exact, so
        T iterations always suffice up to rounding.
      damping: ``"auto"`` (default: undamped Newton steps until one overflows;
        then the overflowed and the huge entries go back to the initial guess
        and every later step is damped), ``"always"`` (damped from the first
        iteration) or ``"never"`` (an overflow ends the iteration, and the
        sequential loop computes the result). A damped step divides each unit's
        block of the linearised step by max(1, its infinity norm): the linear
        recurrence can no longer grow, so no iterate overflows; the fixed point
        and the one-more-exact-step-per-iteration guarantee are unchanged.
        NaN or Inf in the inputs ends the iteration at once (the loop propagates them).
    """

    tol: float = 1e-5
    max_iters: int = 40
    damping: str = "auto"


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
      checkpoint: what reverse mode keeps of the forward pass, on XLA's loop,
        seqjax's custom VJP and x86 kernels (oneDNN and CUDA keep everything,
        so other policies skip them; `seqjax.backends.explain` shows the
        schedule): ``"all"`` (default: every step's residuals),
        ``"sqrt"`` (only the carry every ceil(sqrt(T)) steps; the backward pass
        recomputes each segment's residuals from its saved start carry: memory
        ~ sqrt(T), one more forward pass), ``("budget", k)`` with an int
        k >= 2 (at most k saved carries at once, two nested levels of
        segments, two more forward passes; the innermost segments hold
        ceil(T / (k // 2)**2) steps of residuals), or ``("binomial", k)``
        with an int k >= 1 (the binomial "revolve" schedule: at most k carries
        besides the initial one, each step computed at most r times in all with
        r the smallest number such that C(k + r, k) >= T, the fewest any
        schedule with k carries allows; the backward pass reverses one step at a time,
        so it is slower per step; XLA's loop then differentiates through a
        custom VJP, which forward mode cannot). Results are the same up to
        float rounding (on seqjax's x86 kernels the values and the input and
        carry cotangents bitwise; the weight gradients are summed per segment
        or per step).
      method: how a cell with a linear recurrence (`seqjax.min_gru`,
        `seqjax.min_lstm`, `seqjax.lru`) is evaluated: ``"sequential"`` (a loop
        over T), ``"associative"`` (`jax.lax.associative_scan`: log-depth in T)
        or ``"auto"`` (default: the associative scan from the sequence length
        where it won the benchmark on the run's platform; on the CPU it won
        neither the forward pass nor the short train steps, so "auto" keeps the
        loop there; see `seqjax.backends.explain`). Other cells always run sequentially;
        ``"associative"`` for one of them raises. ``"newton"`` evaluates a
        nonlinear `seqjax.gru` (``reset_after=True``), `seqjax.lstm` (without
        ``proj_size`` or ``gate_recurrence``) or `seqjax.rnn` in parallel over
        time by quasi-Newton iterations (see `NewtonOptions`); it runs on XLA
        with its own VJP (reverse mode only: the backward pass is the
        sequential adjoint recurrence from the saved carries), keeps every
        carry for the backward pass (``checkpoint="all"``), and ``"auto"``
        never picks it (on the CPU it lost to the sequential loop at every
        measured T: bench/newton.py).
      newton: the `NewtonOptions` of ``method="newton"`` (ignored by the other methods).

    Example:
      >>> cell = seqjax.gru(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jnp.ones((2, 5, 3))
      >>> opts = seqjax.ScanOptions(kernel="xla", backward="autodiff")   # forward mode works
      >>> carry, ys = seqjax.scan(cell, params, xs, options=opts)
      >>> _, dys = jax.jvp(lambda x: seqjax.scan(cell, params, x, options=opts)[1], (xs,), (xs,))
      >>> layer = seqjax.multilayer(cell, 2, options=opts)
    """

    kernel: str = "auto"
    backward: str = "auto"
    hoist: bool | None = None
    unroll: int | None = None
    remat: bool = False
    checkpoint: str | tuple = "all"
    method: str = "auto"
    newton: NewtonOptions = NewtonOptions()


def resolve(call: str, options: ScanOptions | None, **given) -> ScanOptions:
    """``options`` (default `ScanOptions()`) with the keyword arguments a caller gave (those not None) on top.

    Validates every field and raises a ValueError naming ``call`` and the argument.
    """
    if options is None:
        options = ScanOptions()
    elif not isinstance(options, ScanOptions):
        raise TypeError(f"{call}: options must be a seqjax.ScanOptions, got {type(options).__name__}")
    options = options._replace(**{k: v for k, v in given.items() if v is not None})
    kernel, backward, hoist, unroll, remat = (options.kernel, options.backward, options.hoist, options.unroll,
                                              options.remat)
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
    checkpoint = options.checkpoint
    if isinstance(checkpoint, list):
        checkpoint = tuple(checkpoint)
    if isinstance(checkpoint, tuple) and len(checkpoint) == 2 and checkpoint[0] in ("budget", "binomial") and \
            isinstance(checkpoint[1], (int, np.integer)) and not isinstance(checkpoint[1], bool) and \
            checkpoint[1] >= (2 if checkpoint[0] == "budget" else 1):
        checkpoint = (checkpoint[0], int(checkpoint[1]))
    elif not (isinstance(checkpoint, str) and checkpoint in CHECKPOINTS):
        raise ValueError(f"{call}: checkpoint must be 'all', 'sqrt', ('budget', k) with an int k >= 2 or "
                         f"('binomial', k) with an int k >= 1 (the most carries kept at once), got {checkpoint!r}")
    if not isinstance(options.method, str) or options.method not in METHODS:
        raise ValueError(f"{call}: method must be one of {list(METHODS)}, got {options.method!r}")
    return options._replace(checkpoint=checkpoint, newton=_check_newton(call, options.newton))


def _check_newton(call: str, newton) -> NewtonOptions:
    if not isinstance(newton, NewtonOptions):
        raise TypeError(f"{call}: newton must be a seqjax.NewtonOptions, got {type(newton).__name__}")
    tol, max_iters, damping = newton
    real = isinstance(tol, (int, float, np.integer, np.floating)) and not isinstance(tol, bool)
    if not real or not 0 < tol < float("inf"):
        raise ValueError(f"{call}: newton.tol must be a positive finite number, got {tol!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
        raise ValueError(f"{call}: newton.max_iters must be a positive int, got {max_iters!r}")
    if not isinstance(damping, str) or damping not in DAMPINGS:
        raise ValueError(f"{call}: newton.damping must be one of {list(DAMPINGS)}, got {damping!r}")
    return NewtonOptions(float(tol), int(max_iters), damping)
