"""Checkpointing over time: which carries reverse mode keeps, and the loops that recompute the rest.

A policy (`seqjax.ScanOptions`' ``checkpoint``) becomes a static schedule for a
sequence of T steps, `segment_sizes`: the segment lengths of each level of
nesting, outermost first (``()`` keeps everything). The forward pass saves the
carry at the start of each outermost segment; the backward pass visits the
segments in reverse processing order and, per segment, recomputes what it
needs from the segment's saved start carry (at an inner level: the start
carries of its sub-segments; at the innermost: the residuals of its steps),
then passes the carry cotangent on to the segment before it.

T need not be a multiple of a segment length: a range of L steps split by S
is ``L // S`` segments of S steps (the head, run by one `jax.lax.scan`) and
one remainder segment of ``L % S`` steps (the tail, after the head in time).
``reverse`` visits the tail first, then the head's segments from the last.

``("binomial", k)`` is the other kind of schedule, a `Binomial` plan: the
binomial (revolve) checkpointing of Griewank & Walther, which keeps at most k
carries besides the initial one and computes each step at most r times in all
(the forward pass once, the backward pass at most r - 1 more times), r the
smallest number with C(k + r, k) >= T: no schedule with k carries does with
fewer. Its backward pass reverses one step at a time;
the schedule of which carry to restore, how far to advance and where to save
the next carry runs in a `jax.lax.while_loop` over a stack of pending ranges
(the carries are used last-in first-out), so the compiled program does not
grow with T.

Two forms, one per kind of path:

* `checkpointed_scan`: `jax.lax.scan` as nested scans whose inner segments are
  `jax.checkpoint`-ed, for XLA's loop differentiated by autodiff.
* `forward_segments` / `backward_segments`: the schedule as plain loops over
  ``(start, steps)`` ranges, for the custom VJPs (`seqjax.backends._gemm_vjp`,
  `seqjax.backends._kernel_vjp`), which run each segment with their own
  forward and backward code.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Binomial", "backward", "backward_segments", "binomial_plan", "checkpointed_scan", "describe", "forward",
           "forward_segments", "put", "segment_sizes", "take"]


@dataclasses.dataclass(frozen=True)
class Binomial:
    """The static plan of ``("binomial", k)`` for T steps (hashable: it is a static argument of the custom VJPs).

    Steps are counted in processing order (``reverse`` runs step 0 at time
    T - 1). A pending range is a task ``(a, n, top, s, r)``: reverse steps
    [a, a + n) whose start carry is in slot ``top``, with ``s`` free slots and
    at most ``r`` computations of each step (the one that saved its start carry
    included). A range of one step is reversed
    from its slot; a longer one advances ``m = max(1, n - C(s - 1 + r, s - 1))``
    steps, saves that carry in slot ``top + 1`` and becomes the tasks
    ``(a + m, n - m, top + 1, s - 1, r)`` (done first) and ``(a, m, top, s, r - 1)``.
    The forward pass itself takes the first chain of those saves.

    Attributes:
      T: the number of steps; k: carries kept besides the initial one;
      sweeps: r, the most times a step is computed, forward pass included.
      saves: the steps (processing order) whose start carries the forward pass
        keeps, in slots 1, 2, ...; tasks: the backward pass's initial stack
        (bottom first); depth: the stack's largest size.
    """

    T: int
    k: int
    sweeps: int
    saves: tuple[int, ...]
    tasks: tuple[tuple[int, int, int, int, int], ...]
    depth: int


def _eta(s: int, r: int) -> int:
    """C(s + r, s): the most steps s free carries reverse with each step computed at most r times."""
    return math.comb(s + r, s)


def binomial_plan(T: int, k: int) -> Binomial:
    """`Binomial`'s plan for T >= 2 steps and k >= 1 carries."""
    r = 1
    while _eta(k, r) < T:
        r += 1
    a, n, top, s = 0, T, 0, k
    saves, tasks = [], []
    while n > 1:
        m = max(1, n - _eta(s - 1, r))
        tasks.append((a, m, top, s, r - 1))
        saves.append(a + m)
        a, n, top, s = a + m, n - m, top + 1, s - 1
    tasks.append((a, n, top, s, r))
    return Binomial(T, k, r, tuple(saves), tuple(tasks), depth=len(tasks) + k + r + 2)


def segment_sizes(checkpoint, T: int):
    """The static schedule of a (validated) policy for T steps: segment lengths per level, outermost first.

    ``"all"`` -> ``()``; ``"sqrt"`` -> ``(ceil(sqrt(T)),)``; ``("budget", k)``
    -> ``(n * S, S)`` with ``n = k // 2`` and ``S = ceil(T / n**2)``: at most n
    outer and n inner segment-start carries are kept at once (``<= k``), and
    the innermost segments hold S steps of residuals; ``("binomial", k)`` ->
    its `Binomial` plan. Sequences of fewer than two steps keep everything.
    """
    if checkpoint == "all" or T < 2:
        return ()
    if checkpoint[0] == "binomial":
        return binomial_plan(T, checkpoint[1])
    if checkpoint == "sqrt":
        return (math.isqrt(T - 1) + 1,)
    n = max(1, checkpoint[1] // 2)
    inner = -(-T // (n * n))
    return (n * inner,) if inner == 1 else (n * inner, inner)


def describe(checkpoint, T: int) -> str:
    """One line for `seqjax.backends.explain`: what the policy keeps for T steps."""
    sizes = segment_sizes(checkpoint, T)
    if isinstance(sizes, Binomial):
        return (f"checkpoint={checkpoint!r}: a binomial (revolve) schedule keeps at most {sizes.k} carries besides "
                f"the initial one and recomputes each step at most {sizes.sweeps - 1} times (T={T}); the backward "
                "pass reverses one step at a time")
    if not sizes:
        return f"checkpoint={checkpoint!r}: every step's residuals are kept (T={T})"
    outer = -(-T // sizes[0])
    line = f"checkpoint={checkpoint!r}: the carry every {sizes[0]} steps is kept ({outer} segments of T={T})"
    if len(sizes) > 1:
        line += f", and within a segment every {sizes[1]} steps while it is recomputed"
    return line + "; each segment's residuals are recomputed in the backward pass"


# ----------------------------------------------------------------------------- XLA's loop, autodiff

def checkpointed_scan(body: Callable, carry, xs, reverse: bool, unroll: int, sizes: tuple[int, ...]):
    """``jax.lax.scan(body, carry, xs, reverse=reverse, unroll=unroll)`` with the schedule ``sizes``.

    ``xs`` is a pytree of time-major arrays (None leaves allowed), T >= 1 steps.
    Same values as the flat scan (same per-step arithmetic); reverse mode keeps
    only the start carry of each outermost segment and recomputes the rest.
    """
    if not sizes:
        return jax.lax.scan(body, carry, xs, reverse=reverse, unroll=unroll)
    if isinstance(sizes, Binomial):
        return _binomial_scan(body, carry, xs, reverse, unroll, sizes)
    T = jax.tree.leaves(xs)[0].shape[0]
    S = sizes[0]
    n, R = divmod(T, S)
    inner = jax.checkpoint(lambda c, seg: checkpointed_scan(body, c, seg, reverse, unroll, sizes[1:]),
                           prevent_cse=False)
    head = jax.tree.map(lambda a: a[:n * S].reshape((n, S) + a.shape[1:]), xs)
    tail = jax.tree.map(lambda a: a[n * S:], xs)
    ys_head = ys_tail = None
    if R and reverse:
        carry, ys_tail = inner(carry, tail)
    if n:
        carry, ys_head = jax.lax.scan(inner, carry, head, reverse=reverse)
        ys_head = jax.tree.map(lambda a: a.reshape((n * S,) + a.shape[2:]), ys_head)
    if R and not reverse:
        carry, ys_tail = inner(carry, tail)
    if ys_head is None:
        return carry, ys_tail
    if ys_tail is None:
        return carry, ys_head
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), ys_head, ys_tail)


# ----------------------------------------------------------------------------- the custom VJPs

#: run(state, carry, start, steps) -> (state, carry): one segment [start, start + steps) of the forward pass;
#: start is a (possibly traced) int32 scalar, steps a Python int
Run = Callable[[Any, Any, Any, int], tuple]


def forward_segments(run: Run, state, carry, offset, length: int, size: int, reverse: bool):
    """Runs steps [offset, offset + length) as segments of ``size`` steps in processing order.

    Returns ``(state, final carry, starts)``: ``starts = (head, tail_start)``,
    the start carry of each of the ``length // size`` head segments stacked
    ([n, ...], None if n = 0) and that of the remainder segment.
    """
    n, R = divmod(length, size)
    tail_start, head = carry, None
    if R and reverse:
        state, carry = run(state, carry, offset + n * size, R)
    if n:
        def body(sc, j):
            st, cur = sc
            st, new = run(st, cur, offset + j * size, size)
            return (st, new), cur
        (state, carry), head = jax.lax.scan(body, (state, carry), jnp.arange(n, dtype=jnp.int32), reverse=reverse)
    if R and not reverse:
        tail_start = carry
        state, carry = run(state, carry, offset + n * size, R)
    return state, carry, (head, tail_start)


def backward_segments(sizes: tuple[int, ...], reverse: bool, advance: Callable, leaf: Callable, acc, dcarry,
                      offset, length: int, starts):
    """The backward pass of steps [offset, offset + length) split by ``sizes[0]``, from `forward_segments`' ``starts``.

    ``advance(carry, start, steps) -> carry`` runs a segment forward (to
    recompute an inner level's start carries); ``leaf(acc, carry_in, start,
    steps, dcarry_out) -> (acc, dcarry_in)`` recomputes an innermost segment's
    residuals from its start carry and runs its reverse recurrence, adding
    what it computes (weight gradients, input cotangents) to ``acc``.
    Returns ``(acc, d initial carry)``.
    """
    S = sizes[0]
    n, R = divmod(length, S)
    head, tail_start = starts

    def segment(acc, carry_in, start, steps, d):
        if len(sizes) == 1 or steps <= sizes[1]:
            return leaf(acc, carry_in, start, steps, d)
        _, _, sub = forward_segments(lambda st, c, s0, k: (st, advance(c, s0, k)), None, carry_in, start, steps,
                                     sizes[1], reverse)
        return backward_segments(sizes[1:], reverse, advance, leaf, acc, d, start, steps, sub)

    if R and not reverse:
        acc, dcarry = segment(acc, tail_start, offset + n * S, R, dcarry)
    if n:
        def body(ad, inp):
            j, carry_in = inp
            return segment(ad[0], carry_in, offset + j * S, S, ad[1]), None
        (acc, dcarry), _ = jax.lax.scan(body, (acc, dcarry), (jnp.arange(n, dtype=jnp.int32), head),
                                        reverse=not reverse)
    if R and reverse:
        acc, dcarry = segment(acc, tail_start, offset + n * S, R, dcarry)
    return acc, dcarry


def take(a, start, steps: int, axis: int = 0):
    """Steps [start, start + steps) of ``a`` along its time ``axis`` (None stays None)."""
    return None if a is None else jax.lax.dynamic_slice_in_dim(a, start, steps, axis)


def put(buf, value, start, axis: int = 0):
    """``buf`` with ``value`` written at time ``start`` along ``axis``."""
    return jax.lax.dynamic_update_slice_in_dim(buf, value.astype(buf.dtype), start, axis)


def forward(schedule, run: Run, state, carry, length: int, reverse: bool):
    """The forward pass of steps [0, length) under ``schedule`` (`segment_sizes`' value, not ``()``).

    Returns ``(state, final carry, saved)``; ``saved`` is what `backward` takes.
    """
    if isinstance(schedule, Binomial):
        return _binomial_forward(schedule, run, state, carry, reverse)
    return forward_segments(run, state, carry, 0, length, schedule[0], reverse)


def backward(schedule, reverse: bool, advance: Callable, leaf: Callable, acc, dcarry, length: int, saved):
    """The backward pass of `forward`: ``(acc, d initial carry)`` (``advance``, ``leaf``: see `backward_segments`)."""
    if isinstance(schedule, Binomial):
        return _binomial_backward(schedule, reverse, advance, leaf, acc, dcarry, saved)
    return backward_segments(schedule, reverse, advance, leaf, acc, dcarry, 0, length, saved)


# ----------------------------------------------------------------------------- the binomial schedule

def _time_start(plan: Binomial, reverse: bool, a, n):
    """The first time index of steps [a, a + n) in processing order."""
    return plan.T - a - n if reverse else a


def _chunk(plan: Binomial) -> int:
    """The most steps one run of the forward pass or of a recomputation covers: a power of two >= sqrt(T), so
    no temporary (a run's outputs) holds more than about sqrt(T) steps."""
    return 1 << max(0, math.isqrt(plan.T - 1).bit_length())


def _binomial_forward(plan: Binomial, run: Run, state, carry, reverse: bool):
    """Runs the T steps as the pieces between `Binomial.saves`, keeping the carry at each piece's start.

    Each piece runs in runs of at most `_chunk` steps. ``saved`` is the slot
    stack: [k + 1, ...] per carry leaf, slot 0 the initial carry.
    """
    slots = jax.tree.map(lambda c: jnp.zeros((plan.k + 1,) + c.shape, c.dtype).at[0].set(c), carry)
    bounds = (0,) + plan.saves + (plan.T,)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if i:
            slots = jax.tree.map(lambda buf, c: buf.at[i].set(c), slots, carry)
        state, carry, _ = forward_segments(run, state, carry, _time_start(plan, reverse, a, b - a), b - a,
                                           _chunk(plan), reverse)
    return state, carry, slots


def _advance_by(plan: Binomial, reverse: bool, advance: Callable, carry, a, m):
    """``carry`` advanced by a traced number ``m`` of steps from step ``a``: whole chunks of C steps, then the
    binary digits of the rest (each a static length), so no temporary holds more than C steps."""
    chunk = _chunk(plan)

    def whole(i, c):
        return advance(c, _time_start(plan, reverse, a + i * chunk, chunk), chunk)

    carry = jax.lax.fori_loop(0, m // chunk, whole, carry)
    pos, rest = a + (m // chunk) * chunk, m % chunk
    for bit in reversed(range(chunk.bit_length() - 1)):
        L = 1 << bit
        carry, pos = jax.lax.cond(
            (rest >> bit) & 1,
            lambda c, p, L=L: (advance(c, _time_start(plan, reverse, p, L), L), p + L),
            lambda c, p: (c, p), carry, pos)
    return carry


def _binomial_backward(plan: Binomial, reverse: bool, advance: Callable, leaf: Callable, acc, dcarry, slots):
    """Reverses the steps one at a time from T - 1, running the plan's task stack (see `Binomial`).

    Each of the T iterations first splits the top range until it is one step
    long (an inner loop whose state is only the stack and the saved carries),
    then reverses that step; the accumulators never pass through a branch, so
    XLA updates them in place.
    """
    etas = np.array([[min(_eta(s, r), plan.T + 1) for r in range(plan.sweeps + 1)] for s in range(plan.k + 1)],
                    np.int32)
    stack = np.zeros((plan.depth, 5), np.int32)
    stack[:len(plan.tasks)] = plan.tasks
    etas, stack = jnp.asarray(etas), jnp.asarray(stack)

    def split(state):
        stack, sp, slots = state
        a, n, top, s, r = (stack[sp - 1, i] for i in range(5))
        m = jnp.maximum(1, n - etas[jnp.maximum(s - 1, 0), r])
        saved = _advance_by(plan, reverse, advance, jax.tree.map(lambda buf: buf[top], slots), a, m)
        slots = jax.tree.map(lambda buf, c: buf.at[top + 1].set(c), slots, saved)
        stack = stack.at[sp - 1].set(jnp.stack([a, m, top, s, r - 1]))
        stack = stack.at[sp].set(jnp.stack([a + m, n - m, top + 1, s - 1, r]))
        return stack, sp + 1, slots

    def reverse_one(_, state):
        stack, sp, slots, acc, dcarry = state
        stack, sp, slots = jax.lax.while_loop(lambda st: st[0][st[1] - 1, 1] > 1, split, (stack, sp, slots))
        a, top = stack[sp - 1, 0], stack[sp - 1, 2]
        acc, dcarry = leaf(acc, jax.tree.map(lambda buf: buf[top], slots), _time_start(plan, reverse, a, 1), 1,
                           dcarry)
        return stack, sp - 1, slots, acc, dcarry

    state = (stack, jnp.int32(len(plan.tasks)), slots, acc, dcarry)
    _, _, _, acc, dcarry = jax.lax.fori_loop(0, plan.T, reverse_one, state)
    return acc, dcarry


def _zero_cotangent(a):
    """The cotangent of a value that is not differentiated: float0 for ints and bools."""
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def _binomial_scan(body: Callable, carry, xs, reverse: bool, unroll: int, plan: Binomial):
    """`checkpointed_scan` under a `Binomial` plan, for any ``body``: a custom VJP whose backward pass takes
    each step's VJP with `jax.vjp` (the values ``body`` closes over are made its explicit inputs)."""
    x0 = jax.tree.map(lambda a: a[0], xs)
    converted, consts = jax.closure_convert(body, carry, x0)
    return _binomial_vjp(converted, plan, reverse, unroll, carry, xs, *consts)


def _scan_piece(converted, consts, xs, reverse, unroll, carry, start, steps):
    piece = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, steps, 0), xs)
    return jax.lax.scan(lambda c, x: converted(c, x, *consts), carry, piece, reverse=reverse, unroll=unroll)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _binomial_vjp(converted, plan, reverse, unroll, carry, xs, *consts):
    return jax.lax.scan(lambda c, x: converted(c, x, *consts), carry, xs, reverse=reverse, unroll=unroll)


def _binomial_vjp_fwd(converted, plan, reverse, unroll, carry, xs, *consts):
    x0 = jax.tree.map(lambda a: a[0], xs)
    y_like = jax.eval_shape(lambda: converted(carry, x0, *consts)[1])
    ys = jax.tree.map(lambda y: jnp.zeros((plan.T,) + y.shape, y.dtype), y_like)

    def run(ys, c, start, steps):
        c, piece = _scan_piece(converted, consts, xs, reverse, unroll, c, start, steps)
        return jax.tree.map(lambda buf, y: put(buf, y, start), ys, piece), c

    ys, final, slots = _binomial_forward(plan, run, ys, carry, reverse)
    return (final, ys), (xs, consts, slots)


def _binomial_vjp_bwd(converted, plan, reverse, unroll, saved, cts):
    xs, consts, slots = saved
    dfinal, dys = cts
    diff = [jnp.issubdtype(c.dtype, jnp.inexact) for c in consts]
    xs_diff = [jnp.issubdtype(a.dtype, jnp.inexact) for a in jax.tree.leaves(xs)]

    def advance(c, start, steps):
        return _scan_piece(converted, consts, xs, reverse, unroll, c, start, steps)[0]

    def leaf(acc, c, start, steps, dcarry):
        dconsts, dxs = acc
        x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, start, 0, keepdims=False), xs)
        dy = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, start, 0, keepdims=False), dys)
        fixed = [None if d else k for d, k in zip(diff, consts)]

        def one(c, x, *vary):
            it = iter(vary)
            return converted(c, x, *[next(it) if d else f for d, f in zip(diff, fixed)])

        _, vjp = jax.vjp(one, c, x, *[k for d, k in zip(diff, consts) if d])
        dc, dx, *dk = vjp((dcarry, dy))
        dconsts = [a + b for a, b in zip(dconsts, dk)]
        dx_leaves = jax.tree.leaves(dx)
        dxs = [put(buf, g[None], start) if buf is not None else None
               for buf, g in zip(dxs, dx_leaves)]
        return (dconsts, dxs), dc

    dconsts0 = [jnp.zeros_like(k) for d, k in zip(diff, consts) if d]
    dxs0 = [jnp.zeros_like(a) if d else None for d, a in zip(xs_diff, jax.tree.leaves(xs))]
    (dconsts, dxs), dcarry = _binomial_backward(plan, reverse, advance, leaf, (dconsts0, dxs0), dfinal, slots)
    it = iter(dconsts)
    dconsts = [next(it) if d else _zero_cotangent(k) for d, k in zip(diff, consts)]
    dxs = [g if g is not None else _zero_cotangent(a) for g, a in zip(dxs, jax.tree.leaves(xs))]
    return (dcarry, jax.tree.unflatten(jax.tree.structure(xs), dxs), *dconsts)


_binomial_vjp.defvjp(_binomial_vjp_fwd, _binomial_vjp_bwd)
