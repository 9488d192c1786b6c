"""The ordered table of the implementations of `seqjax.scan`, and the choice among them.

Each entry says, for one validated run (a `Request`), whether it can run it
(``None``) or why not, and runs it. ``kernel="auto"`` takes the first entry
that can; a named kernel takes its own entry or raises with its reason.
`explain` shows the whole choice to a person. Adding a backend is one entry
here plus its own module.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells.base import Array, Cell
from seqjax.options import ScanOptions
from seqjax.backends import _library

__all__ = ["Backend", "Choice", "Request", "TABLE", "choose", "platform_of", "zero_padding"]


class Request(NamedTuple):
    """One validated run of a (non-stacked) cell over a sequence, as the backends see it."""

    caller: str               # the function the user called, for messages
    cell: Cell
    params: Any
    xs: Array                 # [B, T, I] or [T, B, I], the caller's layout
    xs_tm: Array              # [T, B, I]
    carry: Any                # the initial carry, batch (B,)
    init_carry: Any           # the cell's zero carry (what resets restore)
    lengths: Array | None     # [B] int
    valid: Array | None       # [T, B] bool
    resets: Array | None      # [B, T] or [T, B] bool, the caller's layout
    resets_tm: Array | None   # [T, B] bool
    reverse: bool
    time_major: bool
    options: ScanOptions      # hoist and unroll resolved for the platform
    platform: str             # "cpu", "gpu" or "tpu": where the run is placed
    reference: bool           # seqjax.unrolled: the plain-JAX Python loop
    recurrent_mask: Array | None = None  # [B, O] recurrent dropout mask (scan's recurrent_mask)


def zero_padding(xs_tm: Array, valid: Array | None) -> Array:
    """``xs_tm`` [T, B, I] with the steps outside each sequence's length (``valid`` [T, B] false) set to 0.

    A padded step's result is discarded by a select, whose backward gives that
    step a zero cotangent; but the step's own backward multiplies that zero by
    its local derivatives, so NaN/Inf (or garbage) in the padding would reach the
    weight gradients as ``0 * NaN``. Zeroed inputs keep the padding out of every
    result, as the native kernels do; their gradient is exactly 0.
    """
    if valid is None:
        return xs_tm
    return jnp.where(valid[:, :, None], xs_tm, jnp.zeros((), xs_tm.dtype))


class Backend(NamedTuple):
    """One implementation of `seqjax.scan`'s semantics.

    Attributes:
      name: what `explain` calls it.
      kernel: the ``kernel=`` value that asks for it by name.
      blocker: ``(request) -> None`` if it computes this run, else why not (a
        named kernel raises this reason).
      policy: ``(request) -> None`` if ``kernel="auto"`` takes it for this run,
        else why not (measured: where it beat the entries after it).
      unavailable: ``() -> None`` if its native library loads here, else the
        reason and the fix.
      run: ``(request) -> (final_carry, ys)``, ys in the caller's layout.
      warns: whether ``kernel="auto"`` warns (once per process) when this backend
        would have run a call but its library is unavailable.
    """

    name: str
    kernel: str
    blocker: Callable[[Request], str | None]
    policy: Callable[[Request], str | None]
    unavailable: Callable[[], str | None]
    run: Callable[[Request], tuple]
    warns: bool = False


class Choice(NamedTuple):
    """The backend a run takes and every other backend's reason."""

    backend: Backend
    reasons: tuple  # ((name, why not), ...) in table order, for the entries before and after the chosen one


def platform_of(*trees) -> str:
    """Where a run is placed: the platform of its committed input arrays, else of
    ``jax.default_device``, else ``jax.default_backend()`` ("cpu", "gpu" or "tpu")."""
    for leaf in jax.tree.leaves(trees):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.committed:
            return _family(next(iter(leaf.devices())).platform)
    device = jax.config.jax_default_device
    if device is not None:
        return _family(device if isinstance(device, str) else device.platform)
    return _family(jax.default_backend())


def _family(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def _never(_request=None) -> None:
    return None


# ----------------------------------------------------------------------------- blockers shared by the native kernels

def _native_blocker(request: Request, platform: str, takes_masks: bool, checkpoints: bool = False) -> str | None:
    """Why a native kernel for ``platform`` cannot run ``request``, whatever the cell (None: nothing).

    ``checkpoints``: whether its custom VJP runs ``checkpoint`` policies other than "all".
    """
    if request.reference:
        return "seqjax.unrolled is the plain-JAX reference"
    if 0 in request.xs_tm.shape[:2]:
        return f"an empty sequence or batch (T, B) = {request.xs_tm.shape[:2]}"
    if request.platform != platform:
        return f"it is a {platform.upper()} kernel and the run is placed on {request.platform.upper()}"
    if request.recurrent_mask is not None:
        return ("a recurrent_mask (recurrent dropout): the native kernels' recurrent GEMM takes no per-row mask, and "
                "folding it into W_h would share one mask across the batch")
    if request.lengths is not None and not takes_masks:
        return "this native kernel has no per-sequence lengths"
    if request.resets is not None and not takes_masks:
        return "this native kernel has no per-step resets"
    if request.options.remat:
        return "remat=True (the native kernels keep their own residuals for the backward pass)"
    if request.options.checkpoint != "all" and not checkpoints:
        return (f"checkpoint={request.options.checkpoint!r} (these kernels keep every step's residuals; seqjax's "
                "x86 kernels and XLA's loop checkpoint)")
    if request.options.backward != "auto":
        return (f"backward={request.options.backward!r} (the native kernels have their own backward pass; "
                "pass backward='auto')")
    return None


def _in_layout(request: Request, carry, ys_tm):
    return carry, (ys_tm if request.time_major else jnp.swapaxes(ys_tm, 0, 1))


# ----------------------------------------------------------------------------- seqjax's x86 kernels

def _x86_blocker(isa: str):
    def blocker(request: Request) -> str | None:
        from seqjax.backends import _x86
        why = _native_blocker(request, "cpu", takes_masks=True, checkpoints=True)
        if why:
            return why
        kind, why = _x86.kind_of(request.cell, request.params)
        return why or _x86.shape_blocker(request.cell.hidden_size, isa)
    return blocker


def _x86_policy(request: Request) -> str | None:
    from seqjax.backends import _x86
    return None if _x86.AUTO else "kernel='auto' does not take them (seqjax.backends._x86.AUTO is off)"


def _x86_run(isa: str):
    def run(request: Request):
        from seqjax._checkpoint import segment_sizes
        from seqjax.backends._x86 import avx2_scan, kind_of
        kind = kind_of(request.cell, request.params)[0]
        # the kernels read xs and write ys in the caller's layout
        return avx2_scan(kind, request.params, jnp.asarray(request.xs), request.carry, request.reverse, isa=isa,
                         time_major=request.time_major, lengths=request.lengths, resets=request.resets,
                         checkpoint=segment_sizes(request.options.checkpoint, request.xs_tm.shape[0]))
    return run


# ----------------------------------------------------------------------------- oneDNN

def _onednn_blocker(request: Request) -> str | None:
    from seqjax.backends._onednn import kind_of
    return _native_blocker(request, "cpu", takes_masks=False) or kind_of(request.cell, request.params)[1]


def _onednn_policy(request: Request) -> str | None:
    from seqjax.backends._onednn import AUTO_MIN_HIDDEN, kind_of
    kind = kind_of(request.cell, request.params)[0]
    least = AUTO_MIN_HIDDEN.get(kind)
    if least is None:
        return f"kernel='auto' never takes oneDNN's {kind} (it lost to XLA's loop; seqjax.backends._onednn)"
    if request.cell.hidden_size < least:
        return f"kernel='auto' takes oneDNN's {kind} from H={least} (it lost to XLA's loop below), got H={request.cell.hidden_size}"
    return None


def _onednn_run(request: Request):
    from seqjax.backends._onednn import kind_of, onednn_scan
    carry, ys = onednn_scan(kind_of(request.cell, request.params)[0], request.params, request.xs_tm,
                            request.carry, request.reverse)
    return _in_layout(request, carry, ys)


# ----------------------------------------------------------------------------- CUDA

def _cuda_blocker(request: Request) -> str | None:
    from seqjax.backends import _cuda
    return _native_blocker(request, "gpu", takes_masks=False) or _cuda.kind_of(request.cell, request.params)[1]


def _cuda_policy(request: Request) -> str | None:
    from seqjax.backends import _cuda
    if not _cuda.AUTO:
        return "kernel='auto' does not take them yet (seqjax.backends._cuda.AUTO is off)"
    T, B = request.xs_tm.shape[:2]
    kind = _cuda.kind_of(request.cell, request.params)[0]
    return None if _cuda.auto_eligible(kind, T, B, request.cell.hidden_size) else \
        f"kernel='auto' takes them only where they won (seqjax.backends._cuda.auto_eligible), not (T, B, H)={(T, B, request.cell.hidden_size)}"


def _cuda_run(request: Request):
    from seqjax.backends._cuda import cuda_scan, kind_of
    carry, ys = cuda_scan(kind_of(request.cell, request.params)[0], request.params, request.xs_tm, request.carry,
                          request.reverse)
    return _in_layout(request, carry, ys)


# ----------------------------------------------------------------------------- XLA: the custom VJP, the reference loop

def _vjp_blocker(request: Request) -> str | None:
    from seqjax.backends._gemm_vjp import fusable
    backward = request.options.backward
    if request.reference:
        return "seqjax.unrolled is the plain-JAX reference"
    if backward == "autodiff":
        return "backward='autodiff'"
    if request.recurrent_mask is not None:
        return "a recurrent_mask (recurrent dropout): its backward pass has no mask"
    if request.options.remat and backward == "auto":
        return "remat=True with backward='auto' (autodiff's checkpointed loop saves the most memory)"
    if fusable(request.cell, request.params) is None:
        return ("it covers cells built by seqjax.lstm with named activations (not callables) and no gate "
                "recurrence, optionally with peepholes and/or proj_size, by seqjax.gru, or by seqjax.rnn with tanh "
                "or relu, their project and step unchanged, params all float32, float64, bfloat16 or float16; "
                f"got {request.cell.name}")
    return None


def _vjp_run(request: Request):
    from seqjax._checkpoint import segment_sizes
    from seqjax.backends._gemm_vjp import fusable, fused_scan
    o = request.options
    carry, ys = fused_scan(fusable(request.cell, request.params), request.params,
                           zero_padding(request.xs_tm, request.valid), request.carry,
                           request.valid, request.resets_tm, request.reverse, o.hoist, o.remat, o.unroll,
                           segment_sizes(o.checkpoint, request.xs_tm.shape[0]))
    return _in_layout(request, carry, ys)


def _reference_run(request: Request):
    from seqjax.runners import reference_loop
    carry, ys = reference_loop(request)
    return _in_layout(request, carry, ys)


#: The implementations in the order ``kernel="auto"`` tries them.
TABLE = (
    Backend("cuda", "cuda", _cuda_blocker, _cuda_policy, lambda: _library.unavailable("cuda"), _cuda_run),
    Backend("avx512", "avx512", _x86_blocker("avx512"), _x86_policy, lambda: _library.unavailable("avx512"),
            _x86_run("avx512")),
    Backend("avx2", "avx2", _x86_blocker("avx2"), _x86_policy, lambda: _library.unavailable("avx2"), _x86_run("avx2"),
            warns=True),
    Backend("onednn", "onednn", _onednn_blocker, _onednn_policy, lambda: _library.unavailable("onednn"), _onednn_run),
    Backend("xla+custom_vjp", "xla", _vjp_blocker, _never, _never, _vjp_run),
    Backend("xla", "xla", _never, _never, _never, _reference_run),
)

_warned: set = set()


def choose(request: Request, explain: bool = False) -> Choice:
    """The backend that runs ``request`` and the reasons of the entries before it (with ``explain``, of all).

    Raises:
      ValueError: a kernel named by ``kernel=`` (or ``backward="fused"``) cannot run this call.
      NativeUnavailable: a named kernel's native library cannot be loaded here.
    """
    kernel, backward = request.options.kernel, request.options.backward
    reasons, chosen, unavailable = [], None, []
    for backend in TABLE:
        if chosen is not None:
            if not explain:
                break
            why = backend.blocker(request) or backend.policy(request) or backend.unavailable()
            why = f"could run it too; {chosen.name} comes first" if why is None else why
        elif kernel != "auto" and backend.kernel != kernel:
            why = f"kernel={kernel!r}"
        else:
            demanded = kernel == backend.kernel != "xla" or (backend.name == "xla+custom_vjp" and backward == "fused")
            why = backend.blocker(request)
            if why is not None and demanded:
                if backend.kernel == "xla":
                    raise ValueError(f"{request.caller}: backward='fused' needs a fusable cell: {why}; pass "
                                     "backward='auto' to fall back to autodiff")
                raise ValueError(f"{request.caller}: kernel={kernel!r} cannot run this call: {why}; pass "
                                 "kernel='auto' or 'xla'")
            if why is None and kernel == "auto":
                why = backend.policy(request)
            if why is None:
                missing = backend.unavailable()
                if missing is not None:
                    if demanded:
                        raise _library.NativeUnavailable(f"{request.caller}: kernel={kernel!r}: {missing}")
                    if backend.warns:
                        unavailable.append((backend, missing))
                    why = f"not available here: {missing}"
            if why is None:
                chosen = backend
                continue
        reasons.append((backend.name, why))
    if chosen.kernel == "xla" and request.platform == "cpu":
        for backend, missing in unavailable:
            if backend.name not in _warned:
                _warned.add(backend.name)
                warnings.warn(f"{request.caller}: seqjax's {backend.name} kernels would run this call but are not "
                              f"available, so XLA's loop runs it instead (slower): {missing}. "
                              "seqjax.backends.explain(...) shows every backend's reason.", RuntimeWarning,
                              stacklevel=4)
    return Choice(chosen, tuple(reasons))


FORWARD_MODE_FIX = "pass kernel='xla', backward='autodiff' (or options=seqjax.ScanOptions(kernel='xla', backward='autodiff'))"


def _binomial(request: Request) -> bool:
    checkpoint = request.options.checkpoint
    return isinstance(checkpoint, tuple) and checkpoint[0] == "binomial"


def _forward_mode_error(request: Request, backend: Backend) -> TypeError:
    if backend.name == "xla":
        return TypeError(f"{request.caller}: forward-mode differentiation (jax.jvp, jax.jacfwd, jax.hessian, "
                         f"jax.linearize) cannot go through checkpoint={request.options.checkpoint!r}, which is "
                         "differentiable in reverse mode only (a jax.custom_vjp); pass checkpoint='all', 'sqrt' or "
                         "('budget', k)")
    return TypeError(f"{request.caller}: forward-mode differentiation (jax.jvp, jax.jacfwd, jax.hessian, "
                     f"jax.linearize) cannot go through the {backend.name} path, which is differentiable in reverse "
                     f"mode only (a jax.custom_vjp); {FORWARD_MODE_FIX}")


def _under_linearize(*inputs) -> bool:
    """Whether ``inputs`` (pytrees) carry a tangent of `jax.linearize`, the innermost differentiation here.

    `jax.linearize` and `jax.vjp`/`jax.grad` trace a `jax.custom_vjp` the same way;
    only `jax.linearize` later evaluates the tangent map, where JAX raises its
    generic custom_vjp message. The traces between this call and that
    differentiation (`jax.vmap`, ...) are walked through their ``parent_trace``;
    inputs that none of them traces carry no tangent (then JAX needs no forward
    mode). Inside a `jax.jit` the enclosing differentiation may not be visible.
    """
    from jax._src import core
    from jax._src.interpreters import ad

    trace, chain = getattr(getattr(core, "trace_ctx", None), "trace", None), []
    while trace is not None:
        chain.append(trace)
        if isinstance(trace, ad.LinearizeTrace):
            if trace.is_vjp:
                return False
            return any(isinstance(leaf, core.Tracer) and any(leaf._trace is t for t in chain)
                       for leaf in jax.tree.leaves(inputs))
        if isinstance(trace, ad.JVPTrace):
            return False  # jax.jvp: its error comes from the call itself (below)
        trace = getattr(trace, "parent_trace", None)
    return False


def run(request: Request, backend: Backend):
    """``backend.run(request)``; forward-mode differentiation through a reverse-mode-only path gets a seqjax error."""
    reverse_only = backend.name != "xla" or _binomial(request)
    if reverse_only and _under_linearize(request.params, request.xs, request.carry):
        raise _forward_mode_error(request, backend)
    try:
        return backend.run(request)
    except TypeError as e:
        if "custom_vjp" not in str(e) or not reverse_only:
            raise
        raise _forward_mode_error(request, backend) from e
