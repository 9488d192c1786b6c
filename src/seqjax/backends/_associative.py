"""The parallel evaluation of a cell's linear recurrence ``h_t = a_t * h_{t-1} + b_t``.

A cell built by `seqjax.min_gru`, `seqjax.min_lstm` or `seqjax.lru` carries a
`seqjax.cells.base.LinearRecurrence`. ``method="associative"`` evaluates it
with `jax.lax.associative_scan` over the pairs ``(a_t, b_t)`` under the
composition ``(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)``: O(T) work in
O(log T) depth, against the T dependent steps of the sequential loop.
`seqjax.scan`'s semantics are folded into the pairs before the scan:

* a padded step (past ``lengths[b]``) keeps the carry: ``(a, b) = (1, 0)``;
* a reset before step t restarts from the cell's zero carry ``h_z``:
  ``(a, b) = (0, a_t h_z + b_t)``;
* ``reverse`` scans from the last step; the initial carry ``h_0`` enters as
  ``h_t = A_t h_0 + B_t`` with ``(A_t, B_t)`` the scanned pairs.

The pairs are computed in the cell's compute dtype (float32, or complex64,
for 16-bit params), so the scan accumulates in at least float32. A
``log_space`` form scans ``(log a, log b)`` under ``(la1 + la2,
logaddexp(la2 + lb1, lb2))``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.cells.base import form_of

__all__ = ["AUTO_MIN_T", "method_of", "run"]

#: ``method="auto"``: the sequence length T from which the associative scan runs, per platform (None: never).
#: Measured with ``python bench/parallel_scan.py`` (bench/results/parallel_scan_cpu.json; 2-core AMD EPYC,
#: B=4, I=16, H=32, float32, T = 64 ... 65,536, one run on a shared machine): on XLA:CPU the sequential loop
#: was faster in the forward pass at every T for every linear cell (associative / sequential 1.07-3.3, the
#: log-space variant 4-14); in the train step the associative scan won at most lengths (0.5-0.9) but lost at
#: T=4,096 for every cell (1.2-1.6), the log-space variant everywhere. No T wins both modes, so "auto" keeps
#: the loop on the CPU. No GPU or TPU was measured: there too "auto" keeps the loop until a benchmark sets a T.
AUTO_MIN_T: dict[str, int | None] = {"cpu": None, "gpu": None, "tpu": None}

_LINEAR_CELLS = "seqjax.min_gru, seqjax.min_lstm, seqjax.lru or seqjax.rg_lru"


def _linear_of(cell):
    form = form_of(cell)
    return None if form is None else form.linear


def method_of(request) -> tuple[str, str]:
    """``(method, why)``: "sequential", "associative" or "newton" for a validated `Request`, and the reason.

    Raises:
      ValueError: ``method="associative"`` for a cell with no linear recurrence,
        ``method="newton"`` for a cell it cannot iterate (`seqjax.backends._newton.blocker`),
        or either with a ``kernel``/``backward`` that only the sequential loop has.
    """
    options, cell = request.options, request.cell
    linear, method = _linear_of(cell), options.method
    if method == "newton":
        from seqjax.backends import _newton
        reason = _newton.blocker(request)
        if reason is not None:
            raise ValueError(f"{request.caller}: {reason}")
        if request.reference:
            return "sequential", "seqjax.unrolled is the step-by-step reference"
        n = options.newton
        return "newton", (f"method='newton': quasi-Newton iterations over T={request.xs_tm.shape[0]} steps, each a "
                          f"jax.lax.associative_scan (tol={n.tol:g}, max_iters={n.max_iters}, damping={n.damping!r}); "
                          "the sequential loop if they do not converge")
    if method == "associative":
        if linear is None:
            raise ValueError(f"{request.caller}: method='associative' needs a cell with a linear recurrence "
                             f"(built by {_LINEAR_CELLS}, its project and step unchanged), got {cell.name}; "
                             "pass method='sequential' or 'auto'")
        if options.kernel not in ("auto", "xla"):
            raise ValueError(f"{request.caller}: method='associative' runs on XLA and cannot use "
                             f"kernel={options.kernel!r}; pass kernel='auto' or 'xla'")
        if options.backward == "fused":
            raise ValueError(f"{request.caller}: method='associative' is differentiated by autodiff and has no "
                             "fused backward pass; pass backward='auto' or 'autodiff'")
    if request.reference:
        return "sequential", "seqjax.unrolled is the step-by-step reference"
    if linear is None:
        return "sequential", f"{cell.name} has no linear recurrence to scan in parallel"
    if method == "sequential":
        return "sequential", "method='sequential'"
    T = request.xs_tm.shape[0]
    if method == "associative":
        return "associative", f"method='associative': jax.lax.associative_scan over T={T} steps"
    if options.kernel not in ("auto", "xla") or options.backward == "fused":
        return "sequential", (f"method='auto' keeps the loop for kernel={options.kernel!r}, "
                              f"backward={options.backward!r}")
    least = AUTO_MIN_T.get(request.platform)
    if least is None:
        return "sequential", (f"method='auto' has no crossover T on {request.platform.upper()} where the "
                              "associative scan won (bench/parallel_scan.py); pass method='associative' to scan "
                              "in parallel")
    if T < least:
        return "sequential", (f"method='auto' takes the associative scan from T={least} on "
                              f"{request.platform.upper()} (measured, bench/parallel_scan.py), got T={T}")
    return "associative", (f"method='auto' takes jax.lax.associative_scan from T={least} on "
                           f"{request.platform.upper()} (measured, bench/parallel_scan.py); T={T}")


def _compose(x, y):
    (a1, b1), (a2, b2) = x, y
    return a2 * a1, a2 * b1 + b2


def _compose_log(x, y):
    (a1, b1), (a2, b2) = x, y
    return a1 + a2, jnp.logaddexp(a2 + b1, b2)


def _evaluate(request, linear, params, xs_tm, carry):
    """``(final_carry, ys [T, B, O])`` of the linear recurrence over ``xs_tm`` [T, B, I]."""
    cell = request.cell
    px = cell.project(params, xs_tm)
    a, b = linear.coefficients(params, px)                 # [T, B, N]
    h0 = linear.state(carry).astype(a.dtype)             # [B, N]
    if linear.log_space:
        identity, zero, compose = 0.0, -jnp.inf, _compose_log
    else:
        identity, zero, compose = 1.0, 0.0, _compose
    if request.resets_tm is not None:
        reset = request.resets_tm[:, :, None]
        h_reset = linear.state(request.init_carry).astype(a.dtype)
        if linear.log_space:
            b = jnp.where(reset, jnp.logaddexp(a + jnp.log(h_reset), b), b)
            a = jnp.where(reset, -jnp.inf, a)
        else:
            b = jnp.where(reset, a * h_reset + b, b)
            a = jnp.where(reset, jnp.zeros((), a.dtype), a)
    if request.valid is not None:
        valid = request.valid[:, :, None]
        a = jnp.where(valid, a, jnp.asarray(identity, a.dtype))
        b = jnp.where(valid, b, jnp.asarray(zero, b.dtype))
    a, b = jax.lax.associative_scan(compose, (a, b), reverse=request.reverse, axis=0)
    hs = jnp.exp(a) * h0 + jnp.exp(b) if linear.log_space else a * h0 + b
    ys = linear.readout(params, hs, px)
    if request.valid is not None:
        ys = jnp.where(request.valid[:, :, None], ys, jnp.zeros((), ys.dtype))
    return linear.carry(params, hs[0] if request.reverse else hs[-1]), ys


def run(request):
    """``(final_carry, ys)`` in the caller's layout, by `jax.lax.associative_scan`; ``remat`` checkpoints the scan."""
    linear = _linear_of(request.cell)
    T, B = request.xs_tm.shape[:2]
    if T == 0:
        carry, ys = request.carry, jnp.zeros((0, B, request.cell.output_size), jax.tree.leaves(request.carry)[0].dtype)
    else:
        evaluate = lambda params, xs, carry: _evaluate(request, linear, params, xs, carry)  # noqa: E731
        if request.options.remat:
            evaluate = jax.checkpoint(evaluate)
        carry, ys = evaluate(request.params, request.xs_tm, request.carry)
    return carry, (ys if request.time_major else jnp.swapaxes(ys, 0, 1))
