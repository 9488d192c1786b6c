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

Two forms, one per kind of path:

* `checkpointed_scan`: `jax.lax.scan` as nested scans whose inner segments are
  `jax.checkpoint`-ed, for XLA's loop differentiated by autodiff.
* `forward_segments` / `backward_segments`: the schedule as plain loops over
  ``(start, steps)`` ranges, for the custom VJPs (`seqjax.backends._gemm_vjp`,
  `seqjax.backends._kernel_vjp`), which run each segment with their own
  forward and backward code.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["backward_segments", "checkpointed_scan", "describe", "forward_segments", "put", "segment_sizes", "take"]


def segment_sizes(checkpoint, T: int) -> tuple[int, ...]:
    """The static schedule of a (validated) policy for T steps: segment lengths per level, outermost first.

    ``"all"`` -> ``()``; ``"sqrt"`` -> ``(ceil(sqrt(T)),)``; ``("budget", k)``
    -> ``(n * S, S)`` with ``n = k // 2`` and ``S = ceil(T / n**2)``: at most n
    outer and n inner segment-start carries are kept at once (``<= k``), and
    the innermost segments hold S steps of residuals. Sequences of fewer than
    two steps keep everything.
    """
    if checkpoint == "all" or T < 2:
        return ()
    if checkpoint == "sqrt":
        return (math.isqrt(T - 1) + 1,)
    n = max(1, checkpoint[1] // 2)
    inner = -(-T // (n * n))
    return (n * inner,) if inner == 1 else (n * inner, inner)


def describe(checkpoint, T: int) -> str:
    """One line for `seqjax.backends.explain`: what the policy keeps for T steps."""
    sizes = segment_sizes(checkpoint, T)
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
