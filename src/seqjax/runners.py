"""Runners: a cell scanned over time (`scan`) or unrolled in Python (`unrolled`).

Both have the same signature and semantics; `unrolled` is the reference that
tests compare against and the baseline of the scan-vs-unroll benchmark.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._checkpoint import checkpointed_scan, segment_sizes
from seqjax._vma import batch_sharded_like, vary_over, varying_axes
from seqjax.backends import _associative, _newton
from seqjax.backends._table import Request, choose, platform_of, run, zero_padding
from seqjax.cells.base import Array, Cell, form_of
from seqjax.cells.validate import check_params
from seqjax.options import ScanOptions, resolve


class _Plan(NamedTuple):
    """Validated, time-major inputs of one run."""

    xs: Array            # [T, B, I]
    carry: Any           # initial carry, batch (B,)
    init_carry: Any      # the cell's zero carry (what resets restore)
    lengths: Array | None  # [B] int
    valid: Array | None  # [T, B] bool
    resets: Array | None  # [T, B] bool
    mask: Array | None = None  # [B, O] recurrent dropout mask


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_bool(call, name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{call}: {name} must be a bool, got {value!r}")


def _plan(call: str, cell: Cell, params, xs, carry, lengths, resets, time_major: bool, mask=None) -> _Plan:
    """Checks every argument (shapes are static, so this runs before tracing) and goes time-major."""
    if not isinstance(cell, Cell):
        raise TypeError(f"{call}: cell must be a seqjax Cell (from seqjax.rnn/lstm/gru/stack), got {type(cell).__name__}")
    _check_bool(call, "time_major", time_major)
    I = check_params(call, cell, params)
    shape = jnp.shape(xs)
    layout, fix = ("(T, B, I)", "pass time_major=False for (B, T, I)") if time_major else \
        ("(B, T, I)", "pass time_major=True for (T, B, I)")
    if len(shape) != 3 or shape[-1] != I:
        raise ValueError(f"{call}: xs must have shape {layout.replace('I', f'I={I}')}, got {tuple(shape)}; {fix}")
    T, B = (shape[0], shape[1]) if time_major else (shape[1], shape[0])
    xs = jnp.asarray(xs)
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise ValueError(f"{call}: xs must be a floating-point array, got dtype {xs.dtype}")
    xs_tm = xs if time_major else jnp.swapaxes(xs, 0, 1)

    init_carry = cell.initial_carry(params, (B,))
    if carry is None:
        carry = init_carry
    else:
        want = jax.tree.map(lambda a: (a.shape, a.dtype), init_carry)
        got_struct, want_struct = jax.tree.structure(carry), jax.tree.structure(init_carry)
        got = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), carry) if got_struct == want_struct else None
        if got != want:
            raise ValueError(f"{call}: carry does not match {cell.name} with batch size B={B}: expected "
                             f"{_describe(init_carry)}, got {_describe(carry)}")

    valid = None
    if lengths is not None:
        lengths = _as_lengths(call, lengths, B)
        if _is_concrete(lengths):
            host = np.asarray(lengths)
            lo, hi = (int(host.min()), int(host.max())) if B else (0, 0)
            if lo < 0 or hi > T:
                raise ValueError(f"{call}: lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")
        valid = jnp.arange(T)[:, None] < lengths[None, :]

    if resets is not None:
        rshape = jnp.shape(resets)
        want_shape = (T, B) if time_major else (B, T)
        if rshape != want_shape:
            raise ValueError(f"{call}: resets must have shape {'(T, B)' if time_major else '(B, T)'}={want_shape}, "
                             f"got {tuple(rshape)}")
        resets = jnp.asarray(resets).astype(bool)
        resets = resets if time_major else resets.T
    if mask is not None:
        mask = _as_recurrent_mask(call, cell, mask, B, init_carry)
    # on Explicit mesh axes the carry and masks are sharded as the batch of xs is
    carry, init_carry, lengths, mask = batch_sharded_like((carry, init_carry, lengths, mask), xs_tm, 1)
    if resets is not None:
        resets = batch_sharded_like(resets, xs_tm, 1, leaf_axis=1)
    if lengths is not None:
        valid = jnp.arange(T)[:, None] < lengths[None, :]
    # inside jax.shard_map the loop's carry varies over whatever mesh axes its inputs vary over
    axes = varying_axes(xs_tm, params, carry, lengths, resets, mask)
    carry, init_carry = vary_over(carry, axes), vary_over(init_carry, axes)
    return _Plan(xs_tm, carry, init_carry, lengths, valid, resets, mask)


def _as_recurrent_mask(call: str, cell: Cell, mask, B: int, init_carry) -> Array:
    """``recurrent_mask`` checked against the cell (it needs a recurrent matmul) and the batch: [B, O] in the carry's dtype."""
    form = form_of(cell)
    if form is None or form.masked_step is None:
        what = "a stacked cell (give each layer its own: seqjax.multilayer or seqjax.deep with recurrent_dropout=)" \
            if form is not None and form.layers is not None else cell.name
        raise ValueError(f"{call}: recurrent_mask needs a cell whose h_(t-1) enters a recurrent matmul (built by "
                         f"seqjax.rnn, seqjax.lstm or seqjax.gru), got {what}")
    want = (B, cell.output_size)
    if tuple(jnp.shape(mask)) != want or not jnp.issubdtype(jnp.result_type(mask), jnp.floating):
        raise ValueError(f"{call}: recurrent_mask must be a floating-point array of shape (B, O)={want}, got shape "
                         f"{tuple(jnp.shape(mask))} dtype {jnp.result_type(mask)}")
    return jnp.asarray(mask).astype(jax.tree.leaves(init_carry)[0].dtype)


def _as_lengths(call: str, lengths, B: int) -> Array:
    """``lengths`` as a [B] integer array: any integer array-like (a list, a NumPy or JAX array, a tracer)."""
    if not isinstance(lengths, (jax.Array, np.ndarray)):
        try:
            lengths = np.asarray(lengths)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{call}: lengths must be an integer array-like of shape (B,)=({B},), got "
                             f"{type(lengths).__name__}: {e}") from None
    lshape, dtype = jnp.shape(lengths), lengths.dtype
    if lshape != (B,) or not (jnp.issubdtype(dtype, jnp.integer) or (lengths.size == 0 and dtype == np.float64)):
        raise ValueError(f"{call}: lengths must be an integer array of shape (B,)=({B},), got shape "
                         f"{tuple(lshape)} dtype {dtype}")
    return jnp.asarray(lengths).astype(jnp.int32) if jnp.issubdtype(dtype, jnp.integer) else jnp.zeros((0,), jnp.int32)


def _describe(tree) -> str:
    leaves = jax.tree.map(lambda a: f"{jnp.result_type(a)}{list(jnp.shape(a))}", tree)
    return str(leaves)


def _select(mask: Array, on_true, on_false):
    """Per-batch-row choice between two pytrees; ``mask`` [B]."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b),
                        on_true, on_false)


def _body(cell: Cell, params, init_carry, projected: bool, remat: bool, mask=None):
    """The per-step function shared by `scan` and `unrolled`: ``(carry, (x_t, valid_t, reset_t)) -> (carry, y_t)``.

    ``mask`` [B, O]: the recurrent dropout mask, the same at every step (see ``recurrent_mask`` of `scan`).
    """

    if mask is not None:
        masked = form_of(cell).masked_step
        if projected:
            advance = lambda carry, px: masked(params, carry, px, mask)  # noqa: E731
        else:
            advance = lambda carry, x: masked(params, carry, cell.project(params, x), mask)  # noqa: E731
    elif projected:
        advance = lambda carry, px: cell.step(params, carry, px)  # noqa: E731
    elif (form := form_of(cell)) is not None and form.joint_apply is not None:
        advance = form.joint_apply(params)  # weights concatenated here, outside the loop
    else:
        advance = lambda carry, x: cell.apply(params, carry, x)  # noqa: E731

    def body(carry, inputs):
        x, valid, reset = inputs
        start = carry
        if reset is not None:
            start = _select(reset, init_carry, carry)
        new, y = advance(start, x)
        if valid is not None:
            new = _select(valid, new, carry)
            y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))
        return new, y

    return jax.checkpoint(body) if remat else body


def _hoist_default(platform: str) -> bool:
    """Whether runners compute the input projection for all steps before the loop, by default, on ``platform``.

    Decided by the benchmarks (docs/design/performance.md): on XLA:CPU the hoisted
    GEMM lost to projecting inside the scan body; on an H100 it won (LSTM
    standard train 3.10 -> 3.06 ms, forward 1.28 -> 1.09 ms), as it does for cuDNN.
    """
    return platform != "cpu"


def _unroll_default(platform: str) -> int:
    """`scan`'s ``unroll`` when none is given: 1 on CPU, 8 on accelerators.

    Decided by the benchmarks (docs/design/performance.md): on XLA:CPU unrolling
    made training slower; on an H100, where each loop iteration costs kernel
    launches, unroll=8 cut the LSTM train step 23.3 -> 11.3 ms (long shape)
    and 3.06 -> 1.84 ms (standard shape), for a longer compile (LSTM long
    train step: 0.5 -> 2.9 s). Pass ``unroll=1`` where compile time matters more.
    """
    return 1 if platform == "cpu" else 8


def _request(call, reference, cell, params, xs, carry, lengths, resets, reverse, time_major, options,
             platform=None, mask=None):
    """``(request, plan)``: the validated run as `seqjax.backends` sees it (platform defaults resolved).

    ``platform``: where the run is placed; default `seqjax.backends._table.platform_of` its inputs.
    ``mask``: the ``recurrent_mask`` of `scan`, or None.
    """
    plan = _plan(call, cell, params, xs, carry, lengths, resets, time_major, mask)
    _check_bool(call, "reverse", reverse)
    platform = platform_of(xs, params, carry) if platform is None else platform
    options = options._replace(
        unroll=_unroll_default(platform) if options.unroll is None else int(options.unroll),
        hoist=_hoist_default(platform) if options.hoist is None else bool(options.hoist))
    layout_resets = None if resets is None else (plan.resets if time_major else plan.resets.T)
    return Request(call, cell, params, xs, plan.xs, plan.carry, plan.init_carry, plan.lengths, plan.valid,
                   layout_resets, plan.resets, bool(reverse), bool(time_major), options, platform, reference,
                   plan.mask), plan


def _run(call, reference, cell, params, xs, carry, lengths, resets, reverse, time_major, options, mask=None):
    form = form_of(cell)
    if mask is not None and form is not None and form.layers is not None:
        _plan(call, cell, params, xs, carry, lengths, resets, time_major, mask)  # raises: one mask, several layers
    if form is not None and form.layers is not None:  # a stacked cell runs layer by layer over the whole sequence
        plan = _plan(call, cell, params, xs, carry, lengths, resets, time_major)
        ys, carries = plan.xs, []
        for sub, p, c in zip(form.layers, params, plan.carry):
            c, ys = _run(call, reference, sub, p, ys, c, plan.lengths, plan.resets, reverse, True, options)
            carries.append(c)
        return tuple(carries), (ys if time_major else jnp.swapaxes(ys, 0, 1))
    if options.method in ("associative", "newton") or (options.method == "auto" and form is not None
                                                         and form.linear is not None):
        if options.method == "newton" and mask is not None:
            raise ValueError(f"{call}: method='newton' does not take recurrent_mask (variational recurrent "
                             "dropout); use method='sequential' (or 'auto') while training with it")
        request, _ = _request(call, reference, cell, params, xs, carry, lengths, resets, reverse, time_major, options,
                              mask=mask)
        method = _associative.method_of(request)[0]
        if method != "sequential":
            return (_associative if method == "associative" else _newton).run(request)

    def on(platform, params, xs, carry, lengths, resets, mask):
        request, _ = _request(call, reference, cell, params, xs, carry, lengths, resets, reverse, time_major,
                              options, platform, mask)
        return request, choose(request).backend

    request, backend = on(None, params, xs, carry, lengths, resets, mask)
    places = placements()
    if reference or options.kernel != "auto" or len(places) == 1 or _placed(xs, params, carry):
        return run(request, backend)
    # several platforms in this process and no placement known while tracing: each platform lowers its own choice
    chosen = {p: on(p, params, xs, carry, lengths, resets, mask) for p in places}
    if len({(b.name, r.options) for r, b in chosen.values()}) == 1:
        return run(request, backend)

    def branch(platform):
        return lambda *args: run(*on(platform, *args))
    per_platform = {name: branch(p) for p in places for name in _LOWERING_NAMES[p]}
    default = per_platform.pop(_LOWERING_NAMES[places[-1]][0])
    return jax.lax.platform_dependent(params, xs, carry, lengths, resets, mask, default=default, **per_platform)


#: seqjax's platform families -> the names `jax.lax.platform_dependent` lowers them under
_LOWERING_NAMES = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "tpu": ("tpu",)}


def placements() -> tuple[str, ...]:
    """The platform families a computation of this process may be placed on: the CPU, and the default backend's."""
    default = platform_of()
    return ("cpu",) if default == "cpu" else ("cpu", default)


def _placed(*trees) -> bool:
    """Whether a committed input array already fixes where the run goes."""
    return any(isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and a.committed
               for a in jax.tree.leaves(trees))


def reference_loop(request: Request):
    """The plain-JAX loop (`lax.scan`, or a Python loop for `unrolled`): ``(final_carry, ys [T, B, O])``."""
    o = request.options
    xs_tm = zero_padding(request.xs_tm, request.valid)
    inputs = request.cell.project(request.params, xs_tm) if o.hoist else xs_tm
    body = _body(request.cell, request.params, request.init_carry, o.hoist, o.remat, request.recurrent_mask)
    xs = (inputs, request.valid, request.resets_tm)
    if request.reference:
        return _python_loop(body, request.carry, xs, request.reverse, o.unroll)
    sizes = segment_sizes(o.checkpoint, request.xs_tm.shape[0])
    return checkpointed_scan(body, request.carry, xs, request.reverse, o.unroll, sizes)


def _python_loop(body, carry, xs, reverse, unroll):
    del unroll
    T = xs[0].shape[0]
    ys = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        carry, ys[t] = body(carry, jax.tree.map(lambda a: a[t], xs))
    return carry, jnp.stack(ys)


def scan(cell: Cell, params, xs: Array, *, carry=None, lengths: Array | None = None, resets: Array | None = None,
         reverse: bool = False, time_major: bool = False, options: ScanOptions | None = None,
         unroll: int | None = None, remat: bool | None = None, hoist: bool | None = None, backward: str | None = None,
         kernel: str | None = None, checkpoint=None, method: str | None = None, recurrent_mask: Array | None = None):
    """Runs ``cell`` over a sequence with `jax.lax.scan`: ``(final_carry, ys)``.

    Equivalent Python loop (batch-major, no options)::

        carry = cell.initial_carry(params, (B,)) if carry is None else carry
        for t in range(T):                       # reversed(range(T)) if reverse
            carry, ys[:, t] = cell.apply(params, carry, xs[:, t])
        return carry, ys

    Semantics:
      * ``lengths``: sequence b has ``lengths[b]`` valid steps, the rest is
        padding. Outputs past a length are exactly zero, the final carry is the
        carry after the last valid step (the initial carry for length 0), and
        ``reverse`` processes only the valid prefix, from ``lengths[b] - 1`` down to 0.
        Concrete lengths outside [0, T] raise a ValueError. Traced lengths (under
        `jax.jit`) cannot be checked: a negative length acts as 0 and one above
        T as T, on every backend.
      * ``resets``: where ``resets[b, t]`` is true the carry is set back to the
        cell's zero carry before step t is processed (packed episodes).
      * ``reverse``: process time backwards; ``ys[:, t]`` stays aligned with ``xs[:, t]``.
      * A stacked cell (`seqjax.stack`) runs layer by layer.
      * ``recurrent_mask`` [B, O]: h_{t-1} is multiplied by it where it enters
        the recurrent matmul, the same mask at every step (variational
        recurrent dropout, Gal & Ghahramani 2016; a GRU's ``z * h_{t-1}``
        term keeps the unmasked state). `seqjax.multilayer` and `seqjax.deep`
        draw it from ``recurrent_dropout=``. A masked run always takes XLA's
        loop differentiated by autodiff: the native kernels and the custom VJP
        have no per-row mask (folding the mask into W_h would share it across
        the batch), as `seqjax.backends.explain` shows; a named native kernel raises.

    Execution (never the result, up to float rounding) is set by ``options``, a
    `seqjax.ScanOptions`, or by its fields as keywords (a keyword given wins over
    ``options``): ``kernel`` picks the implementation, ``backward`` how reverse
    mode differentiates it, ``hoist``, ``unroll`` and ``remat`` tune XLA's loop,
    ``checkpoint`` sets what reverse mode keeps (every path but oneDNN and
    CUDA): ``"all"`` (default), ``"sqrt"`` (the carry every ceil(sqrt(T))
    steps; each segment is recomputed in the backward pass: memory ~ sqrt(T)
    for one more forward pass), ``("budget", k)`` (at most k carries, two
    levels of segments) or ``("binomial", k)`` (at most k carries, the
    binomial "revolve" schedule: the fewest recomputations k carries allow;
    see `seqjax.ScanOptions`).
    By default (``kernel="auto"``) the run takes the first implementation in
    `seqjax.backends`' table that applies: on an x86-64 CPU seqjax's own
    AVX-512/AVX2 kernels (LSTM and Greff et al.'s variants but FGR, GRU with
    ``reset_after=True``, tanh/relu RNN; float32, H a multiple of 16/8), oneDNN
    where it is installed and won the benchmarks, else XLA's loop with seqjax's
    custom VJP (weight gradients as single GEMMs over all T*B rows), else XLA's
    loop differentiated by autodiff. ``seqjax.backends.explain(cell, params, xs,
    ...)`` prints which one a call takes and why each other one does not.
    ``method`` decides how a cell with a linear recurrence (`seqjax.min_gru`,
    `seqjax.min_lstm`, `seqjax.lru`) is evaluated: ``"associative"`` runs
    `jax.lax.associative_scan` over all T steps at once (same semantics, lengths,
    resets and reverse included; float32 accumulation for 16-bit params),
    ``"sequential"`` the loop, ``"auto"`` (default) the associative scan from the
    measured crossover length on the run's platform. ``method="newton"`` evaluates
    a `seqjax.gru`, `seqjax.lstm` or `seqjax.rnn` in parallel over time by
    quasi-Newton iterations, each an associative scan, finishing with the loop
    when they do not converge (settings: `seqjax.NewtonOptions`; "auto" never
    picks it: on the CPU it lost at every measured length).
    The native kernels and the custom VJP are reverse mode only: `jax.jvp`,
    `jax.jacfwd` and `jax.linearize` through them raise a TypeError that says to
    pass ``kernel="xla", backward="autodiff"`` (`jax.jvp` of a `jax.jit`-ted
    function raises JAX's own custom_vjp message: the jit hides the
    transformation from seqjax); the native kernels are differentiable
    once (grad of grad and `jax.hessian` raise a TypeError that says to pass
    ``kernel="xla"``, whose custom VJP is differentiable again). On a host with
    an accelerator, a call whose placement is not fixed by its inputs or
    `jax.default_device` is decided per platform when it is lowered
    (`jax.lax.platform_dependent`): a computation lowered for the CPU gets the CPU path.

    Sharding (`jax.sharding`): batch rows are independent, so a batch sharded
    over a mesh runs per shard on every path, the native kernels included
    (`seqjax.backends._ffi`): under `jax.jit` with Auto axes the outputs and
    the final carry keep the batch's sharding and the compiled program gathers
    no batch; with Explicit axes (`jax.make_mesh`'s default) and inside
    `jax.shard_map` (``check_vma=True``), forward and gradients work. Weights
    are expected replicated; a sharding of the weights, the hidden or the time
    axis is gathered before the kernels run (same results, no per-shard
    speed-up). `seqjax.sharding` places state and batches for data-parallel
    training.

    Truncated BPTT: feed ``jax.lax.stop_gradient(final_carry)`` back as ``carry``.

    Args:
      cell: a `Cell`.
      params: the cell's params (the structure and shapes ``cell.init`` makes).
      xs: [B, T, I] (or [T, B, I] with ``time_major``), floating point.
      carry: initial carry for batch (B,); default the cell's zero carry.
      lengths: [B] integers (any integer array-like), in [0, T]; None = all sequences have length T.
      resets: [B, T] bool (or [T, B] with ``time_major``).
      reverse, time_major: bools.
      options: a `seqjax.ScanOptions` (default ``ScanOptions()``).
      unroll, remat, hoist, backward, kernel, checkpoint, method: override the fields of ``options``.
      recurrent_mask: [B, O] float, or None (no mask); only for cells built by
        `seqjax.rnn`, `seqjax.lstm` (O = proj_size or H) or `seqjax.gru`.

    Returns:
      ``(final_carry, ys)`` with ys [B, T, O] (or [T, B, O]) in the params' dtype.

    Example:
      >>> cell = seqjax.lstm(64)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> carry, ys = seqjax.scan(cell, params, jnp.ones((4, 20, 8)), lengths=jnp.array([20, 5, 0, 13]))
    """
    options = resolve("seqjax.scan", options, unroll=unroll, remat=remat, hoist=hoist, backward=backward,
                      kernel=kernel, checkpoint=checkpoint, method=method)
    return _run("seqjax.scan", False, cell, params, xs, carry, lengths, resets, reverse, time_major, options,
                recurrent_mask)


def scan_for(call: str, cell: Cell, params, xs: Array, *, carry=None, lengths=None, resets=None, reverse=False,
             time_major=False, options: ScanOptions, recurrent_mask=None):
    """`scan` on behalf of ``call`` (a layer's apply, a model's loss), whose name the errors carry."""
    return _run(call, False, cell, params, xs, carry, lengths, resets, reverse, time_major, options, recurrent_mask)


def unrolled(cell: Cell, params, xs: Array, *, carry=None, lengths: Array | None = None,
             resets: Array | None = None, reverse: bool = False, time_major: bool = False,
             options: ScanOptions | None = None, unroll: int | None = None, remat: bool | None = None,
             hoist: bool | None = None, backward: str | None = None, kernel: str | None = None, checkpoint=None,
             method: str | None = None, recurrent_mask: Array | None = None):
    """`scan` as a Python loop over time: same arguments, same results.

    The reference implementation for tests and the baseline of the
    scan-vs-unroll benchmark. Under `jax.jit` the loop is unrolled into one
    straight-line program, so compile time grows with T. ``unroll``,
    ``backward``, ``kernel``, ``checkpoint`` and ``method`` are accepted (validated) and
    ignored: the reference is always plain JAX, stepped, differentiated by autodiff.
    """
    options = resolve("seqjax.unrolled", options, unroll=unroll, remat=remat, hoist=hoist, backward=backward,
                      kernel=kernel, checkpoint=checkpoint, method=method)._replace(kernel="xla", backward="autodiff",
                                                                                   method="sequential")
    return _run("seqjax.unrolled", True, cell, params, xs, carry, lengths, resets, reverse, time_major, options,
                recurrent_mask)
