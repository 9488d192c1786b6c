"""Every fast path of `seqjax.scan` behind one seam, and `explain`, which shows the choice.

`seqjax.scan` validates a call, asks one ordered table which implementation
runs it, and runs it. The implementations, in the order ``kernel="auto"``
tries them:

==================  =========================================================
``cuda``            seqjax's persistent CUDA kernels (Hopper GPUs; opt-in)
``avx512``          seqjax's x86 kernels built for AVX-512F
``avx2``            the same kernels built for AVX2 and FMA
``onednn``          oneDNN's RNN primitives (where installed and faster)
``xla+custom_vjp``  XLA's loop with seqjax's custom VJP (whole-sequence GEMMs)
``xla``             XLA's loop differentiated by autodiff: the reference
==================  =========================================================

All compute `seqjax.unrolled`'s semantics (lengths, resets, reverse, NaN and
Inf propagation); tests compare each with the reference. `explain` returns the
path a call takes and every other backend's reason::

    >>> cell = seqjax.lstm(16)
    >>> params = cell.init(jax.random.key(0), input_size=4)
    >>> xs, lengths = jnp.ones((2, 5, 4)), jnp.array([5, 3])
    >>> print(seqjax.backends.explain(cell, params, xs, lengths=lengths, kernel="xla"))
    runs on: xla+custom_vjp (placed on ...)
      not cuda: kernel='xla'
      ...
      not xla: could run it too; xla+custom_vjp comes first
"""
from __future__ import annotations

from typing import NamedTuple

from seqjax.backends._library import NativeUnavailable
from seqjax.backends._table import TABLE

__all__ = ["Explanation", "NativeUnavailable", "explain", "names"]


class Explanation(NamedTuple):
    """Which implementation a `seqjax.scan` call takes, and why each other one does not.

    Attributes:
      backend: the name of the implementation that runs the call (for a
        stacked cell: of its first layer; see ``layers``).
      reasons: ``((name, why not), ...)`` for every other implementation, in table order.
      platform: where the call is placed ("cpu", "gpu", "tpu").
      layers: for a stacked cell, one `Explanation` per layer; else ().
      checkpoint: what reverse mode keeps on that path (the ``checkpoint``
        policy and its schedule for this T), one line.
      method: "sequential" (a loop over T, run by ``backend``),
        "associative" (`jax.lax.associative_scan` on XLA) or "newton"
        (quasi-Newton iterations of associative scans on XLA); ``reasons`` is
        empty for the last two.
      method_reason: why that method (see ``method=`` of `seqjax.scan`).
    """

    backend: str
    reasons: tuple
    platform: str
    layers: tuple = ()
    checkpoint: str = ""
    method: str = "sequential"
    method_reason: str = ""

    def __str__(self) -> str:
        if self.layers:
            return "\n".join(f"layer {k}: " + str(e).replace("\n", "\n  ") for k, e in enumerate(self.layers))
        lines = [f"runs on: {self.backend} (placed on {self.platform})",
                 f"  method: {self.method} ({self.method_reason})"]
        if self.checkpoint:
            lines.append(f"  {self.checkpoint}")
        lines += [f"  not {name}: {why}" for name, why in self.reasons]
        return "\n".join(lines)


def names() -> tuple[str, ...]:
    """The implementations' names, in the order ``kernel="auto"`` tries them."""
    return tuple(b.name for b in TABLE)


def explain(cell, params, xs, *, carry=None, lengths=None, resets=None, reverse=False, time_major=False,
            options=None, unroll=None, remat=None, hoist=None, backward=None, kernel=None,
            checkpoint=None, method=None, recurrent_mask=None) -> Explanation:
    """The implementation ``seqjax.scan(cell, params, xs, ...)`` with these arguments takes, and every other one's reason.

    Takes exactly `seqjax.scan`'s arguments and validates them the same way;
    runs nothing. ``print`` the result for a person.

    Raises:
      ValueError: what ``seqjax.scan`` raises before running for invalid
        arguments or a named kernel that cannot run the call.
      TypeError: likewise, for a cell or params of the wrong type.

    Example:
      >>> cell = seqjax.lstm(16)
      >>> params = cell.init(jax.random.key(0), input_size=4)
      >>> e = seqjax.backends.explain(cell, params, jnp.ones((2, 5, 4)), kernel="xla")
      >>> e.backend
      'xla+custom_vjp'
    """
    from seqjax import runners
    from seqjax._checkpoint import describe
    from seqjax.backends._associative import method_of
    from seqjax.backends._table import choose
    from seqjax.cells.base import form_of
    from seqjax.options import resolve

    call = "seqjax.backends.explain"
    opts = resolve(call, options, unroll=unroll, remat=remat, hoist=hoist, backward=backward, kernel=kernel,
                   checkpoint=checkpoint, method=method)
    form = form_of(cell)
    if recurrent_mask is not None:
        runners._plan(call, cell, params, xs, carry, lengths, resets, time_major, recurrent_mask)  # checks it
    if form is not None and form.layers is not None:
        import jax.numpy as jnp
        plan = runners._plan(call, cell, params, xs, carry, lengths, resets, time_major)
        layers, ys = [], plan.xs
        for sub, p, c in zip(form.layers, params, plan.carry):
            layers.append(explain(sub, p, ys, carry=c, lengths=plan.lengths, resets=plan.resets, reverse=reverse,
                                  time_major=True, options=opts))
            ys = jnp.zeros(ys.shape[:2] + (sub.output_size,), ys.dtype)
        return Explanation(layers[0].backend, layers[0].reasons, layers[0].platform, tuple(layers),
                           layers[0].checkpoint, layers[0].method, layers[0].method_reason)
    request, _ = runners._request(call, False, cell, params, xs, carry, lengths, resets, reverse, time_major, opts,
                                  mask=recurrent_mask)
    method, why = method_of(request)
    if method in ("associative", "newton"):
        return Explanation("xla", (), request.platform, (), describe(opts.checkpoint, request.xs_tm.shape[0]),
                           method, why)
    choice = choose(request, explain=True)
    return Explanation(choice.backend.name, choice.reasons, request.platform, (),
                       describe(opts.checkpoint, request.xs_tm.shape[0]), method, why)
