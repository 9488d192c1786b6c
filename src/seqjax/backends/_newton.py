"""``method="newton"``: a nonlinear cell evaluated in parallel over time by quasi-Newton iterations.

The run ``c_t = F_t(c_{t-1})`` (``F_t`` = the cell's step on input t, with
`seqjax.scan`'s lengths and resets folded in) is a system of T equations in
the T carries. Quasi-DEER (Lim et al. 2024; Gonzalez et al. 2024) solves it
by Newton iterations on the whole trajectory: from a guess ``s_1 .. s_T``,

    s'_t = F_t(s_{t-1}) + J_t (s'_{t-1} - s_{t-1})

where every ``F_t(s_{t-1})`` and ``J_t`` is computed for all t at once, and
the linear recurrence in ``s'`` is solved with `jax.lax.associative_scan`.
``J_t`` approximates the step's Jacobian by its per-unit blocks: for a carry
of k leaves of width H (k = 1 for the GRU and the Elman RNN; k = 2 for the
LSTM's (h, c)), the k x k matrices ``d new_leaf_m[i] / d old_leaf_j[i]``,
which a cell's `seqjax.cells.base.UnitwiseStep` gives as k Jacobian-vector
products. (Quasi-DEER proper keeps only the diagonal; for the LSTM the 2 x 2
block also keeps dh/dc and dc/dh of each unit.)

Whatever ``J_t`` is, the fixed point is the sequential trajectory, and after
k iterations the first k carries are exact (``s'_1 = F_1(c_0)``, and so on by
induction). Far from the fixed point products of ``|J_t| > 1`` can overflow;
a damped step divides each unit's block by ``max(1, its infinity norm)``,
which keeps the linear recurrence non-expansive, so every iterate stays
finite and the guarantee above still holds. (ELK, Gonzalez et al. 2024,
damps with a Kalman filter, a trust region around the current guess; this
is the simpler damping.) After ``max_iters`` iterations without convergence
the run is recomputed by the sequential loop, so the result is always the
sequential answer (to ``tol`` when the iteration converged).

Reverse mode: a custom VJP whose backward pass runs the sequential adjoint
recurrence from the saved carries (one step's VJP per time step), then the
parameter and input cotangents of all steps as one batched VJP.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.backends._table import zero_padding
from seqjax.cells.base import compute_dtype, form_of

__all__ = ["Stats", "blocker", "iterate", "run", "unitwise_of"]

_NONLINEAR_CELLS = ("seqjax.gru (reset_after=True), seqjax.lstm (no proj_size, no gate_recurrence) "
                    "or seqjax.rnn")


#: after an overflow, entries of the iterate above this multiple of (1 + max |c_0|) go back to the guess: with
#: damped (non-expansive) steps every later iterate then stays within T times that of it, far from overflow
_KEEP = 1e6


class Stats(NamedTuple):
    """How one ``method="newton"`` run went (for benchmarks and tests; `seqjax.scan` returns only its result).

    Attributes:
      iterations: int32 [], the Newton iterations run.
      converged: bool [], whether the residual reached ``tol`` (else the sequential loop computed the result).
      damped: bool [], whether damped steps were used.
      residual: float32 [], the last residual (max |c_t - F_t(c_{t-1})|).
    """

    iterations: jax.Array
    converged: jax.Array
    damped: jax.Array
    residual: jax.Array


def unitwise_of(cell):
    """The cell's `seqjax.cells.base.UnitwiseStep`, or None."""
    form = form_of(cell)
    return None if form is None else form.unitwise


def blocker(request) -> str | None:
    """Why ``method="newton"`` cannot run ``request`` (the message of the ValueError), or None."""
    o, cell = request.options, request.cell
    if unitwise_of(cell) is None:
        return (f"method='newton' needs a cell whose step is a GEMM of the carry and per-unit arithmetic "
                f"({_NONLINEAR_CELLS}, its project and step unchanged), got {cell.name}; "
                "pass method='sequential' or 'auto'")
    if o.kernel not in ("auto", "xla"):
        return f"method='newton' runs on XLA and cannot use kernel={o.kernel!r}; pass kernel='auto' or 'xla'"
    if o.backward != "auto":
        return (f"method='newton' is differentiated by its own VJP (the sequential adjoint recurrence) and "
                f"cannot use backward={o.backward!r}; pass backward='auto'")
    if o.checkpoint != "all":
        return (f"method='newton' keeps every carry for its backward pass and cannot use "
                f"checkpoint={o.checkpoint!r}; pass checkpoint='all'")
    widths = {jnp.shape(leaf)[-1] for leaf in jax.tree.leaves(request.carry)}
    if widths != {cell.hidden_size}:
        return f"method='newton' needs every carry leaf of width H={cell.hidden_size}, got {cell.name}"
    return None


def _where(mask, on_true, on_false):
    """Per-(time, batch) choice between two carries; ``mask`` [..., B] broadcasts against the leaves' leading dims."""
    return jax.tree.map(lambda a, b: jnp.where(mask[..., None], a, b), on_true, on_false)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _local_recurrent(unit, params, carry):
    """``unit.recurrent`` whose tangent is ``unit.local``'s: the per-unit block of the step's Jacobian."""
    return unit.recurrent(params, carry)


@_local_recurrent.defjvp
def _local_recurrent_jvp(unit, primals, tangents):
    params, carry = primals
    return unit.recurrent(params, carry), unit.local(params, tangents[1])


class _Steps(NamedTuple):
    """The masked steps of one run: ``(params, prev, px, valid, resets, init) -> (carry, y)``, any leading dims."""

    exact: Any
    local: Any


def _steps(unit) -> _Steps:
    def make(recurrent):
        def step(params, prev, px, valid, resets, init_carry):
            start = prev if resets is None else _where(resets, init_carry, prev)
            new, y = unit.pointwise(params, start, recurrent(params, start), px)
            if valid is not None:
                new = _where(valid, new, prev)
                y = jnp.where(valid[..., None], y, jnp.zeros((), y.dtype))
            return new, y
        return step
    return _Steps(make(unit.recurrent), make(functools.partial(_local_recurrent, unit)))


def _shift(s0, S):
    """The carry before each step: ``[c_0, s_1, ..., s_{T-1}]`` per leaf."""
    return [jnp.concatenate([a[None], b[:-1]], axis=0) for a, b in zip(s0, S)]


def _compose(x, y):
    """``x`` then ``y`` of the affine maps ``s -> A s + b`` with k x k blocks per unit (nested lists of arrays)."""
    (a1, b1), (a2, b2) = x, y
    k = len(b1)
    a = [[sum(a2[m][l] * a1[l][j] for l in range(k)) for j in range(k)] for m in range(k)]
    b = [sum(a2[m][l] * b1[l] for l in range(k)) + b2[m] for m in range(k)]
    return a, b


def _damp(a, damped):
    """Each unit's block divided by max(1, its infinity norm) where ``damped``."""
    norm = functools.reduce(jnp.maximum, [sum(jnp.abs(x) for x in row) for row in a])
    scale = jnp.where(damped, jnp.maximum(norm, 1.0), 1.0)
    return [[x / scale for x in row] for row in a]


def _max_abs(x):
    """max |x|, or inf if any element is not finite (XLA's max reduction may skip NaN)."""
    return jnp.where(jnp.all(jnp.isfinite(x)), jnp.max(jnp.abs(x)), jnp.inf)


def _linearise(steps, params, px, valid, resets, init_carry, s0, S, treedef, dt):
    """One iteration from the guess ``S`` (carry leaves [T, B, H]): ``(residual, solve)``.

    ``solve(damped)`` is the next iterate: the linearised recurrence solved by
    `jax.lax.associative_scan`, with damped blocks where ``damped`` (a bool []).
    """
    prev = _shift(s0, S)
    prev_tree = jax.tree.unflatten(treedef, prev)

    def new_carry(c):
        return jax.tree.leaves(steps.local(params, c, px, valid, resets, init_carry)[0])

    F, lin = jax.linearize(new_carry, prev_tree)
    k = len(S)
    cols = []
    for j in range(k):
        e = [jnp.ones_like(p) if i == j else jnp.zeros_like(p) for i, p in enumerate(prev)]
        cols.append(lin(jax.tree.unflatten(treedef, e)))
    jac = [[cols[j][m].astype(dt) for j in range(k)] for m in range(k)]     # jac[m][j] = d new_m / d old_j
    F32, prev32 = [f.astype(dt) for f in F], [p.astype(dt) for p in prev]
    residual = functools.reduce(jnp.maximum, [_max_abs(f - s.astype(dt)) for f, s in zip(F32, S)])

    def solve(damped):
        a = _damp(jac, damped)
        b = [F32[m] - sum(a[m][j] * prev32[j] for j in range(k)) for m in range(k)]
        # s'_1 = F_1(c_0) exactly: the first step does not read the guess
        a = [[x.at[0].set(0) for x in row] for row in a]
        b = [bm.at[0].set(F32[m][0]) for m, bm in enumerate(b)]
        _, S_new = jax.lax.associative_scan(_compose, (a, b), axis=0)
        return [s.astype(old.dtype) for s, old in zip(S_new, S)]

    return residual, solve


def _all_finite(leaves):
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves])


def iterate(unit, newton, unroll, params, px, carry0, init_carry, valid, resets):
    """The run's carries after every step and its outputs, by Newton iterations (sequential fallback).

    Time-major, forward in time (``reverse`` is a flip outside). ``px`` [T, B, P]
    projected inputs (zero in padding), ``carry0``/``init_carry`` carries [B, ...],
    ``valid``/``resets`` [T, B] bool or None.

    Returns:
      ``(carries, ys, stats)``: carries with leaves [T, B, H] (the carry after
      each step), ys [T, B, O], a `Stats`.
    """
    steps = _steps(unit)
    s0, treedef = jax.tree.flatten(carry0)
    T = px.shape[0]
    dt = jnp.promote_types(compute_dtype(s0[0].dtype), jnp.float32)
    guess = [jnp.broadcast_to(a, (T,) + a.shape) for a in s0]
    tol = jnp.asarray(newton.tol, dt)
    bound = _KEEP * (1 + functools.reduce(jnp.maximum, [jnp.max(jnp.abs(a), initial=0) for a in s0]))

    def cond(state):
        _, it, _, residual, stuck = state
        return (it < newton.max_iters) & ~(residual <= tol) & ~stuck

    def body(state):
        S, it, damped, _, _ = state
        res, solve = _linearise(steps, params, px, valid, resets, init_carry, s0, S, treedef, dt)
        S_new = solve(damped)
        if newton.damping == "auto":
            # the undamped step overflowed: keep its moderate entries (any guess has the same fixed point),
            # put the initial guess back in the others, and take damped steps from now on
            overflow = ~damped & ~_all_finite(S_new)
            S_new = [jnp.where(overflow & ~(jnp.abs(n) <= bound), g, n) for n, g in zip(S_new, guess)]
            damped = damped | overflow
        # S is finite unless an undamped step overflowed ("never"), so a residual that is not finite also
        # means NaN/Inf in the inputs or params: stop, and let the loop compute (and propagate) it
        stuck = ~jnp.isfinite(res)
        S_next = [jnp.where(res <= tol, s, n) for s, n in zip(S, S_new)]
        return S_next, it + 1, damped, res, stuck

    damped0 = jnp.asarray(newton.damping == "always")
    inf = jnp.asarray(jnp.inf, dt)
    S, iterations, damped, residual, _ = jax.lax.while_loop(
        cond, body, (guess, jnp.zeros((), jnp.int32), damped0, inf, jnp.zeros((), bool)))
    converged = residual <= tol

    def from_newton():
        return steps.exact(params, jax.tree.unflatten(treedef, _shift(s0, S)), px, valid, resets, init_carry)

    def sequential():
        def body(c, inputs):
            new, y = steps.exact(params, c, *inputs, init_carry)
            return new, (new, y)
        return jax.lax.scan(body, carry0, (px, valid, resets), unroll=unroll)[1]

    carries, ys = jax.lax.cond(converged, from_newton, sequential)
    return carries, ys, Stats(iterations, converged, damped, residual.astype(jnp.float32))


def _solve(unit, newton, unroll):
    """``(params, px, carry0, init_carry, valid, resets) -> (final_carry, ys)`` with the adjoint as its VJP."""
    steps = _steps(unit)

    @jax.custom_vjp
    def solve(params, px, carry0, init_carry, valid, resets):
        carries, ys, _ = iterate(unit, newton, unroll, params, px, carry0, init_carry, valid, resets)
        return jax.tree.map(lambda a: a[-1], carries), ys

    def fwd(params, px, carry0, init_carry, valid, resets):
        carries, ys, _ = iterate(unit, newton, unroll, params, px, carry0, init_carry, valid, resets)
        prev = jax.tree.map(lambda a, c: jnp.concatenate([a[None], c[:-1]], axis=0), carry0, carries)
        return (jax.tree.map(lambda a: a[-1], carries), ys), (params, px, prev, init_carry, valid, resets)

    def bwd(res, cotangents):
        params, px, prev, init_carry, valid, resets = res
        d_final, d_ys = cotangents

        def back(lam, inputs):           # lam: the cotangent of the carry after step t
            prev_t, px_t, valid_t, resets_t, dy_t = inputs
            _, vjp = jax.vjp(lambda c: steps.exact(params, c, px_t, valid_t, resets_t, init_carry), prev_t)
            return vjp((lam, dy_t))[0], lam

        d_carry0, lams = jax.lax.scan(back, d_final, (prev, px, valid, resets, d_ys), reverse=True, unroll=unroll)
        _, vjp = jax.vjp(lambda p, x, z: steps.exact(p, prev, x, valid, resets, z), params, px, init_carry)
        d_params, d_px, d_init = vjp((lams, d_ys))
        return d_params, d_px, d_carry0, d_init, None, None

    solve.defvjp(fwd, bwd)
    return solve


def _flip(x):
    return None if x is None else jnp.flip(x, axis=0)


def run(request):
    """``(final_carry, ys)`` in the caller's layout, by quasi-Newton iterations over the whole sequence."""
    unit, o = unitwise_of(request.cell), request.options
    T, B = request.xs_tm.shape[:2]
    if T == 0:
        ys = jnp.zeros((0, B, request.cell.output_size), jax.tree.leaves(request.carry)[0].dtype)
        return request.carry, (ys if request.time_major else jnp.swapaxes(ys, 0, 1))
    px = request.cell.project(request.params, zero_padding(request.xs_tm, request.valid))
    valid, resets = request.valid, request.resets_tm
    if request.reverse:
        px, valid, resets = _flip(px), _flip(valid), _flip(resets)
    carry, ys = _solve(unit, o.newton, o.unroll)(request.params, px, request.carry, request.init_carry, valid,
                                                  resets)
    if request.reverse:
        ys = _flip(ys)
    return carry, (ys if request.time_major else jnp.swapaxes(ys, 0, 1))
