"""Runners: a cell scanned over time (`scan`) or unrolled in Python (`unrolled`).

Both have the same signature and semantics; `unrolled` is the reference that
tests compare against and the baseline of the scan-vs-unroll benchmark.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.backends import _library as native
from seqjax.cells.base import Array, Cell, has_own_step
from seqjax.backends._gemm_vjp import fusable, fused_scan


class _Plan(NamedTuple):
    """Validated, time-major inputs of one run."""

    xs: Array            # [T, B, I]
    carry: Any           # initial carry, batch (B,)
    init_carry: Any      # the cell's zero carry (what resets restore)
    valid: Array | None  # [T, B] bool
    resets: Array | None  # [T, B] bool


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_bool(call, name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{call}: {name} must be a bool, got {value!r}")


def _plan(call: str, cell: Cell, params, xs, carry, lengths, resets, time_major: bool) -> _Plan:
    """Checks every argument (shapes are static, so this runs before tracing) and goes time-major."""
    if not isinstance(cell, Cell):
        raise TypeError(f"{call}: cell must be a seqjax Cell (from seqjax.rnn/lstm/gru/stack), got {type(cell).__name__}")
    _check_bool(call, "time_major", time_major)
    shape = jnp.shape(xs)
    I = cell.input_size(params)
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
        lshape = jnp.shape(lengths)
        if lshape != (B,) or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
            raise ValueError(f"{call}: lengths must be an integer array of shape (B,)=({B},), got shape "
                             f"{tuple(lshape)} dtype {jnp.result_type(lengths)}")
        if _is_concrete(lengths):
            host = np.asarray(lengths)
            lo, hi = (int(host.min()), int(host.max())) if B else (0, 0)
            if lo < 0 or hi > T:
                raise ValueError(f"{call}: lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")
        valid = jnp.arange(T)[:, None] < jnp.asarray(lengths)[None, :]

    if resets is not None:
        rshape = jnp.shape(resets)
        want_shape = (T, B) if time_major else (B, T)
        if rshape != want_shape:
            raise ValueError(f"{call}: resets must have shape {'(T, B)' if time_major else '(B, T)'}={want_shape}, "
                             f"got {tuple(rshape)}")
        resets = jnp.asarray(resets).astype(bool)
        resets = resets if time_major else resets.T
    return _Plan(xs_tm, carry, init_carry, valid, resets)


def _describe(tree) -> str:
    leaves = jax.tree.map(lambda a: f"{jnp.result_type(a)}{list(jnp.shape(a))}", tree)
    return str(leaves)


def _select(mask: Array, on_true, on_false):
    """Per-batch-row choice between two pytrees; ``mask`` [B]."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b),
                        on_true, on_false)


def _body(cell: Cell, params, init_carry, projected: bool, remat: bool):
    """The per-step function shared by `scan` and `unrolled`: ``(carry, (x_t, valid_t, reset_t)) -> (carry, y_t)``."""

    if projected:
        advance = lambda carry, px: cell.step(params, carry, px)  # noqa: E731
    elif cell.fused_apply is not None and has_own_step(cell):
        advance = cell.fused_apply(params)  # weights concatenated here, outside the loop
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


def hoist_default() -> bool:
    """Whether runners compute the input projection for all steps before the loop, by default.

    Decided by the benchmarks (bench/results/levers.md): on XLA:CPU the hoisted
    GEMM lost to projecting inside the scan body; on an H100 it won (LSTM
    standard train 3.10 -> 3.06 ms, forward 1.28 -> 1.09 ms), as it does for cuDNN.
    """
    return jax.default_backend() != "cpu"


def unroll_default() -> int:
    """`scan`'s ``unroll`` when none is given: 1 on CPU, 8 on accelerators.

    Decided by the benchmarks (bench/results/levers.md): on XLA:CPU unrolling
    made training slower; on an H100, where each loop iteration costs kernel
    launches, unroll=8 cut the LSTM train step 23.3 -> 11.3 ms (long shape)
    and 3.06 -> 1.84 ms (standard shape), for a longer compile (LSTM long
    train step: 0.5 -> 2.9 s). Pass ``unroll=1`` where compile time matters more.
    """
    return 1 if jax.default_backend() == "cpu" else 8


BACKWARD_MODES = ("auto", "fused", "autodiff")


def _fused_kind(call, loop, cell, params, remat, backward):
    """The `seqjax.fused` kernel this run's gradient uses, or None for plain autodiff."""
    if backward not in BACKWARD_MODES:
        raise ValueError(f"{call}: backward must be one of {list(BACKWARD_MODES)}, got {backward!r}")
    if backward == "autodiff" or loop is not _lax_loop or (remat and backward == "auto"):
        return None  # auto + remat: autodiff's checkpointed loop saves the most memory
    kind = fusable(cell, params)
    if kind is None and backward == "fused":
        raise ValueError(
            f"{call}: backward='fused' needs a fusable cell (seqjax.fused.fusable: built by seqjax.lstm with named "
            "activations (not callables) and no gate recurrence, optionally with peepholes and/or proj_size, by "
            "seqjax.gru, or by seqjax.rnn with tanh or relu, its project and step unchanged; params all "
            f"float32, float64, bfloat16 or float16), got {cell.name}; pass backward='auto' to fall "
            "back to autodiff")
    return kind


KERNELS = ("auto", "xla", "avx2", "avx512", "onednn", "cuda")


def _native_blocker(loop, xs_tm, lengths, resets, remat, backward, backend: str, takes_masks: bool = False
                    ) -> str | None:
    """Why a native kernel for ``backend`` ("cpu" or "gpu") cannot run this call, whatever the cell (None: nothing)."""
    if loop is not _lax_loop:
        return "seqjax.unrolled is the plain-JAX reference"
    if 0 in xs_tm.shape[:2]:
        return f"an empty sequence or batch (T, B) = {xs_tm.shape[:2]}"
    if jax.default_backend() != backend:
        return f"it is a {backend.upper()} kernel and the default backend is {jax.default_backend()}"
    if lengths is not None and not takes_masks:
        return "this native kernel has no per-sequence lengths"
    if resets is not None and not takes_masks:
        return "this native kernel has no per-step resets"
    if remat:
        return "remat=True (the native kernels keep their own residuals for the backward pass)"
    if backward != "auto":
        return f"backward={backward!r} (the native kernels have their own backward pass; pass backward='auto')"
    return None


def _refuse(call, kernel, blocker):
    raise ValueError(f"{call}: kernel={kernel!r} cannot run this call: {blocker}; pass kernel='auto' or 'xla'")


def _judged_kind(call, kernel, name, blocker, judge) -> str | None:
    """``judge()``'s kind, ``judge() -> (kind, why not)``, unless ``blocker`` says why not already.

    Raises where ``kernel == name`` (the kernel was asked for by name) and there is no kind.
    """
    kind, blocker = (None, blocker) if blocker is not None else judge()
    if kind is None and kernel == name:
        _refuse(call, kernel, blocker)
    return kind


def _onednn_kind(call, kernel, loop, cell, params, xs_tm, lengths, resets, remat, backward) -> str | None:
    """The `seqjax.onednn` kind this run goes through, or None; raises where ``kernel="onednn"`` cannot."""
    if kernel not in ("auto", "onednn") or (kernel == "auto" and not native.onednn_installed()):
        return None
    from seqjax.backends._onednn import AUTO_MIN_HIDDEN, kind_of
    blocker = _native_blocker(loop, xs_tm, lengths, resets, remat, backward, "cpu")
    kind = _judged_kind(call, kernel, "onednn", blocker, lambda: kind_of(cell, params))
    if kind is None:
        return None
    if kernel == "onednn":
        native.load_onednn()  # NativeUnavailable names what is missing
        return kind
    least = AUTO_MIN_HIDDEN.get(kind)
    return kind if least is not None and cell.hidden_size >= least and native.onednn_usable() else None


def _avx2_kind(call, kernel, loop, cell, params, xs_tm, lengths, resets, remat, backward) -> tuple | None:
    """``(kind, isa)`` of the `seqjax.avx2` kernels this run goes through, or None; raises where
    ``kernel="avx2"`` or ``"avx512"`` cannot."""
    if kernel not in ("auto", "avx2", "avx512"):
        return None
    from seqjax.backends import _x86 as avx2
    if kernel == "auto" and (not avx2.AUTO or jax.default_backend() != "cpu" or not native.avx2_installed()):
        return None
    isa = avx2.auto_isa(cell.hidden_size) if kernel == "auto" else kernel

    def judge():
        kind, why = avx2.kind_of(cell, params)
        why = why or avx2.shape_blocker(cell.hidden_size, isa)
        return (None, why) if why else (kind, None)
    blocker = _native_blocker(loop, xs_tm, lengths, resets, remat, backward, "cpu", takes_masks=True)
    kind = _judged_kind(call, kernel, kernel if kernel != "auto" else "avx2", blocker, judge)
    if kind is None:
        return None
    if kernel != "auto":
        native.load_avx2(isa)  # NativeUnavailable names what is missing
        return kind, isa
    if isa == "avx512" and not native.avx2_usable("avx512"):
        isa = "avx2"
    return (kind, isa) if native.avx2_usable(isa) else None


def _cuda_kind(call, kernel, loop, cell, params, xs_tm, lengths, resets, remat, backward) -> str | None:
    """The `seqjax.cuda` kind this run goes through, or None; raises where ``kernel="cuda"`` cannot."""
    if kernel not in ("auto", "cuda"):
        return None
    if kernel == "auto" and (jax.default_backend() != "gpu" or not native.cuda_installed()):
        return None
    from seqjax.backends import _cuda as cuda
    if kernel == "auto" and not cuda.AUTO:
        return None
    blocker = _native_blocker(loop, xs_tm, lengths, resets, remat, backward, "gpu")
    kind = _judged_kind(call, kernel, "cuda", blocker, lambda: cuda.kind_of(cell, params))
    if kind is None:
        return None
    T, B = xs_tm.shape[:2]
    if kernel == "auto":
        return kind if native.cuda_usable() and cuda.auto_eligible(kind, T, B, cell.hidden_size) else None
    try:
        cuda.plan(kind, B, cell.hidden_size)  # NativeUnavailable names what is missing
    except ValueError as e:
        _refuse(call, kernel, str(e))
    return kind


def _run(call, loop, cell, params, xs, carry, lengths, resets, reverse, time_major, unroll, remat, hoist,
         backward="autodiff", kernel="xla"):
    plan = _plan(call, cell, params, xs, carry, lengths, resets, time_major)
    _check_bool(call, "reverse", reverse)
    _check_bool(call, "remat", remat)
    if unroll is None:
        unroll = unroll_default()
    if isinstance(unroll, bool) or not isinstance(unroll, (int, np.integer)) or unroll < 1:
        raise ValueError(f"{call}: unroll must be a positive int or None, got {unroll!r}")
    if hoist is None:
        hoist = hoist_default()
    _check_bool(call, "hoist", hoist)

    if cell.layers is not None:  # a stacked cell runs layer by layer over the whole sequence
        ys, carries = plan.xs, []
        for sub, p, c in zip(cell.layers, params, plan.carry):
            c, ys = _run(call, loop, sub, p, ys, c, lengths, None if plan.resets is None else plan.resets,
                         reverse, True, unroll, remat, hoist, backward, kernel)
            carries.append(c)
        return tuple(carries), (ys if time_major else jnp.swapaxes(ys, 0, 1))

    if kernel not in KERNELS:
        raise ValueError(f"{call}: kernel must be one of {list(KERNELS)}, got {kernel!r}")
    cuda_kind = _cuda_kind(call, kernel, loop, cell, params, plan.xs, lengths, resets, remat, backward)
    if cuda_kind is not None:
        from seqjax.backends._cuda import cuda_scan
        carry, ys = cuda_scan(cuda_kind, params, plan.xs, plan.carry, reverse)
        return carry, (ys if time_major else jnp.swapaxes(ys, 0, 1))
    avx2_kind = _avx2_kind(call, kernel, loop, cell, params, plan.xs, lengths, resets, remat, backward)
    if avx2_kind is not None:
        from seqjax.backends._x86 import avx2_scan
        # the kernels read xs and write ys in the caller's layout
        return avx2_scan(avx2_kind[0], params, jnp.asarray(xs), plan.carry, reverse, isa=avx2_kind[1],
                         time_major=time_major, lengths=lengths, resets=resets)
    onednn_kind = _onednn_kind(call, kernel, loop, cell, params, plan.xs, lengths, resets, remat, backward)
    if onednn_kind is not None:
        from seqjax.backends._onednn import onednn_scan
        carry, ys = onednn_scan(onednn_kind, params, plan.xs, plan.carry, reverse)
        return carry, (ys if time_major else jnp.swapaxes(ys, 0, 1))
    kind = _fused_kind(call, loop, cell, params, remat, backward)
    if kind is not None:
        carry, ys = fused_scan(kind, params, plan.xs, plan.carry, plan.valid, plan.resets, reverse, hoist, remat,
                               unroll)
        return carry, (ys if time_major else jnp.swapaxes(ys, 0, 1))
    inputs = cell.project(params, plan.xs) if hoist else plan.xs
    body = _body(cell, params, plan.init_carry, hoist, remat)
    carry, ys = loop(body, plan.carry, (inputs, plan.valid, plan.resets), reverse, unroll)
    return carry, (ys if time_major else jnp.swapaxes(ys, 0, 1))


def _lax_loop(body, carry, xs, reverse, unroll):
    return jax.lax.scan(body, carry, xs, reverse=reverse, unroll=unroll)


def _python_loop(body, carry, xs, reverse, unroll):
    del unroll
    T = xs[0].shape[0]
    ys = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        carry, ys[t] = body(carry, jax.tree.map(lambda a: a[t], xs))
    return carry, jnp.stack(ys)


def scan(cell: Cell, params, xs: Array, *, carry=None, lengths: Array | None = None, resets: Array | None = None,
         reverse: bool = False, time_major: bool = False, unroll: int | None = None, remat: bool = False,
         hoist: bool | None = None, backward: str = "auto", kernel: str = "auto"):
    """Runs ``cell`` over a sequence with `jax.lax.scan`: ``(final_carry, ys)``.

    Equivalent Python loop (batch-major, no options)::

        carry = cell.initial_carry(params, (B,)) if carry is None else carry
        for t in range(T):                       # reversed(range(T)) if reverse
            carry, ys[:, t] = cell.apply(params, carry, xs[:, t])
        return carry, ys

    Semantics of the options:
      * ``lengths``: sequence b has ``lengths[b]`` valid steps, the rest is
        padding. Outputs past a length are exactly zero, the final carry is the
        carry after the last valid step (the initial carry for length 0), and
        ``reverse`` processes only the valid prefix, from ``lengths[b] - 1`` down to 0.
      * ``resets``: where ``resets[b, t]`` is true the carry is set back to the
        cell's zero carry before step t is processed (packed episodes).
      * ``reverse``: process time backwards; ``ys[:, t]`` stays aligned with ``xs[:, t]``.
      * ``unroll``: `lax.scan` unroll factor (``None``: the backend's measured
        default, `unroll_default`: 1 on CPU, 8 on GPU). ``remat``: rematerialise each step in
        the backward pass (memory for compute).
      * ``hoist``: compute the input projection of all steps as one GEMM before
        the loop (``None``: the backend's measured default, `hoist_default`).
      * ``backward``: how reverse mode differentiates the loop. ``"auto"`` (default)
        uses `seqjax.fused`'s custom VJP where it applies (LSTM variants with
        named activations, also with peepholes and/or ``proj_size``,
        not FGR; GRU in both forms; Elman RNN; params all float32, float64,
        bfloat16 or float16; ``remat=False``): the backward loop carries
        the state gradients only and the weight gradients and ``dxs`` become
        single GEMMs over all T*B rows (8-50 % faster training on CPU,
        bench/results/levers.md). Elsewhere it is plain autodiff. ``"fused"``
        demands the custom VJP (ValueError where it does not apply); with
        ``remat=True`` it saves only each step's start carry and recomputes the
        gates in its backward loop (less memory than the plain custom VJP, more
        than autodiff's remat, which ``"auto"`` picks);
        ``"autodiff"`` differentiates the `lax.scan` directly. The custom VJP
        has no forward mode: for `jax.jvp`, `jax.jacfwd` or `jax.hessian` through
        a fusable cell pass ``backward="autodiff"``.
      * ``kernel``: ``"xla"`` runs the loop above, compiled by XLA. ``"avx2"``
        runs the whole recurrence, forward and backward, as one call into
        seqjax's own CPU kernels (`seqjax.avx2`: x86-64 with AVX2 and FMA, built
        when seqjax is installed): the standard LSTM, with or without
        peepholes (Greff et al.'s "vanilla"), and Greff et al.'s variants of it
        but FGR, the GRU with
        ``reset_after=True`` and the tanh/relu RNN, float32, hidden size a
        multiple of 8, with or without ``lengths`` and ``resets``, no ``remat``,
        ``backward="auto"``, reverse-mode gradients only (ValueError
        otherwise). ``"avx512"`` runs the same kernels built for AVX-512F
        (same results, hidden size a multiple of 16). ``"auto"`` (default)
        takes them on the CPU wherever they apply (`seqjax.avx2.AUTO`), the
        AVX-512 build where the CPU has it (`seqjax.avx2.auto_isa`). ``"onednn"``
        runs the whole recurrence, forward and backward, as one of oneDNN's
        fused RNN primitives on the CPU (`seqjax.onednn`; the kernel of
        PyTorch's CPU ``nn.LSTM``; needs ``pip install -e '.[onednn]' -C seqjax.onednn=true``): the
        standard LSTM (also with peepholes and/or ``proj_size``), both GRUs and
        the tanh/relu RNN, float32, no ``lengths``, ``resets`` or ``remat``,
        ``backward="auto"``, reverse-mode gradients only (ValueError
        otherwise). For the cells AVX2 does not take, ``"auto"`` takes oneDNN
        where it applies, is installed and won the benchmarks
        (`seqjax.onednn.AUTO_MIN_HIDDEN`), XLA elsewhere. ``"cuda"`` runs the
        whole recurrence as one persistent kernel on a Hopper GPU (`seqjax.cuda`:
        the standard LSTM, the GRU with ``reset_after=True``, the tanh/relu RNN,
        float32, the same restrictions as oneDNN, batches up to about 1024 * 16 / H);
        built when seqjax is installed where nvcc is found. ``"auto"`` does not take
        it yet (`seqjax.cuda.AUTO`).
        ``unroll`` and ``hoist`` do not apply to the AVX2/AVX-512, oneDNN or CUDA kernels.
      * A stacked cell (`seqjax.stack`) runs layer by layer.

    Truncated BPTT: feed ``jax.lax.stop_gradient(final_carry)`` back as ``carry``.

    Args:
      cell: a `Cell`.
      params: the cell's params.
      xs: [B, T, I] (or [T, B, I] with ``time_major``), floating point.
      carry: initial carry for batch (B,); default the cell's zero carry.
      lengths: [B] int, in [0, T]; None = all sequences have length T.
      resets: [B, T] bool (or [T, B] with ``time_major``).
      reverse, time_major, remat: bools. unroll: positive int.
      backward: "auto", "fused" or "autodiff".
      kernel: "auto", "xla", "avx2", "avx512", "onednn" or "cuda".

    Returns:
      ``(final_carry, ys)`` with ys [B, T, O] (or [T, B, O]) in the params' dtype.

    Example:
      >>> cell = seqjax.lstm(64)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> carry, ys = seqjax.scan(cell, params, jnp.ones((4, 20, 8)), lengths=jnp.array([20, 5, 0, 13]))
    """
    return _run("seqjax.scan", _lax_loop, cell, params, xs, carry, lengths, resets, reverse, time_major, unroll,
                remat, hoist, backward, kernel)


def unrolled(cell: Cell, params, xs: Array, *, carry=None, lengths: Array | None = None,
             resets: Array | None = None, reverse: bool = False, time_major: bool = False, unroll: int | None = None,
             remat: bool = False, hoist: bool | None = None, backward: str = "auto", kernel: str = "auto"):
    """`scan` as a Python loop over time: same arguments, same results.

    The reference implementation for tests and the baseline of the
    scan-vs-unroll benchmark. Under `jax.jit` the loop is unrolled into one
    straight-line program, so compile time grows with T. ``unroll`` is accepted
    for signature compatibility and ignored; so are ``backward`` and ``kernel``
    (validated), since the reference is always plain JAX differentiated by autodiff.
    """
    if backward not in BACKWARD_MODES:
        raise ValueError(f"seqjax.unrolled: backward must be one of {list(BACKWARD_MODES)}, got {backward!r}")
    if kernel not in KERNELS:
        raise ValueError(f"seqjax.unrolled: kernel must be one of {list(KERNELS)}, got {kernel!r}")
    return _run("seqjax.unrolled", _python_loop, cell, params, xs, carry, lengths, resets, reverse, time_major,
                unroll, remat, hoist)
