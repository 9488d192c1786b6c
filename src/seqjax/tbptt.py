"""Truncated backpropagation through time (TBPTT) over long streams.

A long sequence (a text, a signal) is trained the way seed 000 lays it out
("Batch-Ification in Language Modeling"):

1. :func:`batchify` cuts the stream into ``B`` contiguous columns, so the data
   is ``[N, B]`` with time running down each column::

       tokens a b c ... x (24 symbols), B = 4  ->   a g m s
                                                    b h n t
                                                    ...
                                                    f l r x

2. :func:`windows` walks down the columns in windows of ``T`` steps, giving
   ``x[t:t+T]`` and the next-symbol targets ``y[t+1:t+T+1]``.
3. The hidden state is carried from one window to the next, but the gradient
   is cut at the window boundary (``jax.lax.stop_gradient``, PyTorch's
   ``.detach()``), and it is reset to zeros at the start of every epoch (and
   optionally at document boundaries through the core's ``resets``).

The general schedule TBPTT(k1, k2) of Williams & Peng (1990) is supported:
the model advances ``k1`` steps per update and backpropagates through
``k2 >= k1`` steps. Window ``j`` covers stream steps ``[j*k1, j*k1 + k2)``;
its loss is taken on the last ``k1`` steps (all ``k2`` steps for the first
window after a reset, so every target is used exactly once), and the carry
handed to window ``j+1`` is the carry after the window's first ``k1`` steps.
So every loss term sees between ``k2 - k1`` and ``k2`` steps of gradient
history. ``k1 == k2 == T`` is the common scheme (each window once, all steps
in the loss).

Everything here is time-major: streams are ``[N, B, ...]`` and windows
``[T, B, ...]``, as `seqjax.scan(..., time_major=True)` takes them.

Example::

    cell = seqjax.rnn(4, activation="relu")
    def model(params, carry, xs, *, resets=None, key=None):      # xs [T, B, 1]
        carry, hs = seqjax.scan(cell, params["cell"], xs, carry=carry, resets=resets, time_major=True)
        return carry, hs @ params["w"] + params["b"]                # [T, B, 1]
    def loss_fn(logits, targets):                                   # -> per-step [T, B]
        return optax.losses.sigmoid_binary_cross_entropy(logits, targets)[..., 0]
    opt = optax.rmsprop(1e-3)
    step = seqjax.tbptt.make_step(model, loss_fn, opt, k1=20)
    state = seqjax.train.init_state(params, opt)
    state, carry, history = seqjax.tbptt.fit(step, state, Stream(x, y), initial_carry=h0, num_epochs=5)

References: R. J. Williams and J. Peng, "An efficient gradient-based algorithm
for on-line training of recurrent network trajectories", Neural Computation
1990; I. Sutskever, "Training recurrent neural networks", PhD thesis 2013, §2.8.
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax.options import ScanOptions, resolve
from seqjax.train import History, NonFiniteLossError, TrainState, _check_clip, _check_optimizer, _clip

__all__ = ["Stream", "Window", "TBPTTStep", "batchify", "windows", "make_step", "fit", "make_eval", "evaluate"]

Array = jax.Array
PyTree = Any


# ----------------------------------------------------------------------------
# data layout
# ----------------------------------------------------------------------------


def _positive_int(call: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{call}: {name} must be a positive int, got {value!r}")
    return int(value)


def batchify(tokens, batch_size: int) -> np.ndarray:
    """Cuts a stream into ``batch_size`` contiguous columns: ``[N, B]`` with ``N = len // B``.

    Column ``b`` holds ``tokens[b*N:(b+1)*N]``; the last ``len % B`` tokens are
    dropped (seed 000's "Batch-Ification", PyTorch's word_language_model
    ``batchify``, char-rnn's loader)::

        batchify(list("abcdefghijklmnopqrstuvwxyz"), 4)
        # N = 6, "yz" dropped:
        # [[a g m s]
        #  [b h n t]
        #  [c i o u]
        #  [d j p v]
        #  [e k q w]
        #  [f l r x]]

    Args:
      tokens: a 1-D sequence (list, NumPy or JAX array) of length L, any dtype;
        or an array [L, ...] whose leading axis is time (features are kept).
      batch_size: B, a positive int <= L.

    Returns:
      A NumPy array [N, B, ...] with ``N = L // B``, time-major.

    Raises:
      ValueError: ``batch_size`` is not a positive int, or leaves no data (L < B).
    """
    call = "seqjax.tbptt.batchify"
    B = _positive_int(call, "batch_size", batch_size)
    arr = np.asarray(tokens)
    if arr.ndim == 0:
        raise ValueError(f"{call}: tokens must be a sequence (1-D, or [L, ...] with time first), got a scalar")
    L = arr.shape[0]
    N = L // B
    if N == 0:
        raise ValueError(f"{call}: batch_size={B} leaves no data: a stream of {L} tokens gives {L} // {B} = 0 steps "
                         f"per column; expected batch_size <= {L} (the stream length)")
    cols = arr[:N * B].reshape(B, N, *arr.shape[1:])
    return np.ascontiguousarray(np.swapaxes(cols, 0, 1))


def _window_starts(call: str, N: int, length: int, stride: int, shift: int, drop_last: bool) -> list[tuple[int, int]]:
    """(start, length) of each window over a stream of N steps (targets need ``shift`` extra steps)."""
    avail = N - shift
    if avail < length:
        what = f"{length} + 1 = {length + 1} (inputs x[t:t+T] and targets y[t+1:t+T+1])" if shift else f"{length}"
        raise ValueError(f"{call}: windows of T={length} are longer than the stream: expected at least {what} steps "
                         f"along axis 0, got {N}; use a shorter window or a smaller batch size")
    out, t = [], 0
    while t + length <= avail:
        out.append((t, length))
        t += stride
    if not drop_last and t < avail:
        out.append((t, avail - t))
    return out


def windows(data, T: int, *, targets=None, stride: Optional[int] = None,
            drop_last: bool = False) -> Iterator[tuple[Any, Any]]:
    """Iterates over windows of ``T`` steps of a time-major stream: ``(x, y)`` pairs.

    Without ``targets`` (language modelling), ``y`` is the next step of
    ``data``: ``(data[t:t+T], data[t+1:t+T+1])`` for ``t = 0, stride, 2*stride, ...``.
    With ``targets`` (aligned labels, e.g. the echo task), ``(data[t:t+T], targets[t:t+T])``.

    Args:
      data: array [N, B, ...] (e.g. from :func:`batchify`), time first.
      T: window length, a positive int.
      targets: optional array [N, B, ...] of per-step targets.
      stride: steps between window starts; default ``T`` (non-overlapping).
        TBPTT(k1, k2) uses ``T = k2, stride = k1``.
      drop_last: drop a final window shorter than ``T`` (default: yield it).

    Yields:
      ``(x [T', B, ...], y [T', B, ...])`` slices (views) of the inputs, ``T' = T``
      except possibly for the last window.

    Raises:
      ValueError: ``T`` longer than the stream (no full window fits).

    Example:
      >>> data = batchify(np.arange(26), 4)            # [6, 4]
      >>> [x[:, 0].tolist() for x, y in windows(data, 3)]
      [[0, 1, 2], [3, 4]]
    """
    call = "seqjax.tbptt.windows"
    T = _positive_int(call, "T", T)
    stride = T if stride is None else _positive_int(call, "stride", stride)
    N = np.shape(data)[0] if np.ndim(data) else 0
    if targets is not None and np.shape(targets)[:2] != np.shape(data)[:2]:
        raise ValueError(f"{call}: targets must have the leading shape (N, B) of data {tuple(np.shape(data)[:2])}, "
                         f"got {tuple(np.shape(targets))}")
    shift = 1 if targets is None else 0
    for t, n in _window_starts(call, N, T, stride, shift, drop_last):
        if targets is None:
            yield data[t:t + n], data[t + 1:t + n + 1]
        else:
            yield data[t:t + n], targets[t:t + n]


class Stream(NamedTuple):
    """A batchified, time-major training stream.

    Attributes:
      inputs: [N, B, ...] model inputs (token ids, features).
      targets: [N, B, ...] aligned per-step targets, or ``None`` for language
        modelling (the target of step t is ``inputs[t + 1]``).
      resets: [N, B] bool, or ``None``: where true the carry is reset to zeros
        before step t (the first token of a new document in column b).
    """

    inputs: Any
    targets: Any = None
    resets: Any = None


class Window(NamedTuple):
    """One TBPTT window, the batch of a TBPTT step (time-major).

    Attributes:
      inputs: [T, B, ...].
      targets: [T, B, ...].
      resets: [T, B] bool or ``None``.
      loss_start: ``[]`` int32: steps ``< loss_start`` are run (they advance
        the state and carry gradient) but are not in the loss.
    """

    inputs: Any
    targets: Any
    resets: Any = None
    loss_start: Any = 0


def _check_stream(call: str, stream) -> Stream:
    if not isinstance(stream, Stream):
        if isinstance(stream, tuple) and 1 <= len(stream) <= 3:
            stream = Stream(*stream)
        else:
            stream = Stream(stream)
    shape = tuple(np.shape(stream.inputs))
    if len(shape) < 2:
        raise ValueError(f"{call}: stream inputs must be time-major [N, B, ...] (e.g. from batchify), got shape {shape}")
    if stream.targets is not None and tuple(np.shape(stream.targets))[:2] != shape[:2]:
        raise ValueError(f"{call}: stream targets must have leading shape (N, B)={shape[:2]}, got "
                         f"{tuple(np.shape(stream.targets))}")
    if stream.resets is not None and tuple(np.shape(stream.resets)) != shape[:2]:
        raise ValueError(f"{call}: stream resets must have shape (N, B)={shape[:2]}, got {tuple(np.shape(stream.resets))}")
    return stream


def _slice(stream: Stream, t: int, n: int) -> tuple:
    x = stream.inputs[t:t + n]
    y = stream.inputs[t + 1:t + n + 1] if stream.targets is None else stream.targets[t:t + n]
    r = None if stream.resets is None else stream.resets[t:t + n]
    return x, y, r


def _device_stream(stream: Stream) -> Stream:
    return Stream(*(None if a is None else jnp.asarray(a) for a in stream))


# ----------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------


def _split_losses(call: str, out, has_aux: bool, T: int, B: int):
    losses, aux = out if has_aux else (out, {})
    if not isinstance(aux, dict):
        raise TypeError(f"{call}: with has_aux=True loss_fn must return (losses [T, B], dict of [T, B] metrics), "
                        f"got aux of type {type(aux).__name__}")
    if jnp.shape(losses) != (T, B):
        raise ValueError(f"{call}: loss_fn must return per-step losses of shape (T, B)=({T}, {B}), got "
                         f"{tuple(jnp.shape(losses))}; do not reduce over time or batch")
    for k, v in aux.items():
        if k in ("loss", "grad_norm"):
            raise ValueError(f"{call}: aux metric name {k!r} is reserved; rename it")
        if jnp.shape(v) != (T, B):
            raise ValueError(f"{call}: aux metric {k!r} must have shape (T, B)=({T}, {B}), got {tuple(jnp.shape(v))}")
    return losses, aux


def _model_options(call: str, model: Callable, options: ScanOptions | None) -> dict:
    """The keyword arguments that hand ``options`` to ``model``: ``{}`` without options, else ``{"options": ...}``.

    Raises:
      TypeError: ``options`` is not a `seqjax.ScanOptions`, or ``model`` takes no ``options`` keyword.
      ValueError: a field of ``options`` is invalid.
    """
    if options is None:
        return {}
    options = resolve(call, options)
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: let the call tell
        return {"options": options}
    if not any(p.name == "options" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.kind == p.VAR_KEYWORD
               for p in params):
        raise TypeError(f"{call}: options was given, so model must take an options= keyword (and pass it on to "
                        f"seqjax.scan or its layers); {getattr(model, '__name__', type(model).__name__)} has none")
    return {"options": options}


def _run_model(model, params, carry, x, resets, key, k1: int, k2: int, extra: dict):
    """Runs the window; returns (carry handed to the next window, final carry, outputs [k2, B, ...])."""
    if k1 == k2:
        c, out = model(params, carry, x, resets=resets, key=key, **extra)
        return c, c, out
    ka, kb = (None, None) if key is None else jax.random.split(key)
    ra, rb = (None, None) if resets is None else (resets[:k1], resets[k1:])
    c_mid, out_a = model(params, carry, x[:k1], resets=ra, key=ka, **extra)
    c_end, out_b = model(params, c_mid, x[k1:], resets=rb, key=kb, **extra)
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), out_a, out_b)
    return c_mid, c_end, out


class TBPTTStep(NamedTuple):
    """A jitted TBPTT update with its schedule, built by :func:`make_step`.

    Call it as ``step(state, carry, window, key=None) -> (state, carry, metrics)``.
    ``state`` and ``carry`` are donated (use the returned ones).

    Attributes:
      fn: the (jitted) update ``(state, carry, window, key) -> (state, carry, metrics)``.
      k1: steps the carry advances per update.
      k2: steps of the window (of backpropagation), ``k2 >= k1``.
      epoch_fn: the same update scanned over a stack of windows in one jitted
        `lax.scan`: ``(state, carry, windows [n, ...], keys) -> (state, carry,
        metrics [n])`` (used by ``fit(..., scan_epoch=True)``).
    """

    fn: Callable
    k1: int
    k2: int
    epoch_fn: Optional[Callable] = None

    def __call__(self, state, carry, window, key=None):
        return self.fn(state, carry, window, key)


def make_step(model: Callable, loss_fn: Callable, optimizer: optax.GradientTransformation, *, k1: int,
              k2: Optional[int] = None, clip_norm: Optional[float] = None, has_aux: bool = False,
              jit: bool = True, options: ScanOptions | None = None) -> TBPTTStep:
    """Builds a TBPTT(k1, k2) update: one jitted function per window.

    One call does, for a window of ``k2`` steps starting from ``carry``::

        carry = stop_gradient(carry)                       # the gradient is cut here
        c_mid, out[:k1]  = model(params, carry, x[:k1])    # (one call when k1 == k2)
        c_end, out[k1:]  = model(params, c_mid, x[k1:])
        loss = mean over t >= window.loss_start, all b of loss_fn(out, y)[t, b]
        params <- optimizer(grad loss)                     # clipped by global norm
        return state, stop_gradient(c_mid), metrics        # c_mid: the next window's start

    Non-finite steps are not applied (the old state and carry come back), as in
    `seqjax.train.make_train_step`; ``metrics["loss"]`` reveals them.

    Args:
      model: ``model(params, carry, xs [T, B, ...], *, resets=[T, B] bool | None,
        key=PRNGKey | None) -> (carry, outputs [T, B, ...])``, time-major; ``key``
        is for dropout (``None`` at evaluation). Typically a `seqjax.scan` of a
        cell with ``time_major=True`` plus an embedding and a readout.
      loss_fn: ``loss_fn(outputs [T, B, ...], targets [T, B, ...]) -> losses [T, B]``
        (per step, not reduced) or, with ``has_aux``, ``(losses, {name: [T, B]})``
        (e.g. per-step accuracy); metrics are averaged like the loss.
      optimizer: an Optax transformation.
      k1: steps the state advances per update (the window stride).
      k2: steps backpropagated through (the window length), ``>= k1``;
        default ``k1``.
      clip_norm: optional global gradient-norm clip.
      has_aux: whether ``loss_fn`` returns aux metrics.
      jit: jit the step (with ``state`` and ``carry`` donated).
      options: a `seqjax.ScanOptions` handed to every call of ``model`` as
        ``model(..., options=options)``, for the model to pass on to
        `seqjax.scan` or its layers (e.g. ``ScanOptions(kernel="xla",
        backward="autodiff")`` for forward mode through the step). None (the
        default): ``model`` is called without it.

    Returns:
      A :class:`TBPTTStep` ``step(state: TrainState, carry, window: Window, key=None)
      -> (state, carry, {"loss", "grad_norm", **aux})``.
    """
    call = "seqjax.tbptt.make_step"
    if not callable(model) or not callable(loss_fn):
        raise TypeError(f"{call}: model and loss_fn must be callables, got {type(model).__name__} and "
                        f"{type(loss_fn).__name__}")
    _check_optimizer("tbptt.make_step", optimizer)
    _check_clip("tbptt.make_step", clip_norm)
    k1 = _positive_int(call, "k1", k1)
    k2 = k1 if k2 is None else _positive_int(call, "k2", k2)
    extra = _model_options(call, model, options)
    if k2 < k1:
        raise ValueError(f"{call}: k2 (steps backpropagated) must be >= k1 (steps advanced), got k1={k1}, k2={k2}")

    def value(params, carry, window, key):
        x, y = window.inputs, window.targets
        T, B = jnp.shape(x)[:2]
        if T != k2:
            raise ValueError(f"{call}: the window must have k2={k2} steps, got inputs of shape {tuple(jnp.shape(x))}")
        carry = jax.lax.stop_gradient(carry)
        c_next, _, out = _run_model(model, params, carry, x, window.resets, key, k1, k2, extra)
        losses, aux = _split_losses(call, loss_fn(out, y), has_aux, T, B)
        w = (jnp.arange(T) >= window.loss_start).astype(losses.dtype)[:, None]
        denom = jnp.maximum(jnp.sum(w) * B, 1.0)
        loss = jnp.sum(losses * w) / denom
        aux = {k: jnp.sum(v.astype(losses.dtype) * w) / denom for k, v in aux.items()}
        return loss, (jax.lax.stop_gradient(c_next), aux)

    grad_fn = jax.value_and_grad(value, has_aux=True)

    def step(state: TrainState, carry, window: Window, key):
        (loss, (c_next, aux)), grads = grad_fn(state.params, carry, window, key)
        grad_norm = optax.tree.norm(grads)
        grads = _clip(grads, clip_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new, c_next = jax.tree.map(lambda n, o: jnp.where(ok, n, o), (new, c_next), (state, carry))
        return new, c_next, {"loss": loss, "grad_norm": grad_norm, **aux}

    def epoch(state, carry, windows: Window, keys):
        def body(sc, inp):
            w, k = inp
            st, c, m = step(sc[0], sc[1], w, k)
            return (st, c), m
        (state, carry), metrics = jax.lax.scan(body, (state, carry), (windows, keys))
        return state, carry, metrics

    fn = jax.jit(step, donate_argnums=(0, 1)) if jit else step
    epoch_fn = jax.jit(epoch, donate_argnums=(0, 1)) if jit else epoch
    return TBPTTStep(fn, k1, k2, epoch_fn)


def _copy(tree):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def fit(step: TBPTTStep, state: TrainState, stream: Union[Stream, Callable[[int], Stream]], *,
        initial_carry: PyTree, num_epochs: int = 1, key: Optional[Array] = None,
        eval_fn: Optional[Callable[[TrainState], dict]] = None, log_every: int = 1,
        callback: Optional[Callable[[int, TrainState, dict], None]] = None, callback_every: int = 0,
        progress: bool = False, scan_epoch: bool = False, mesh: Optional[jax.sharding.Mesh] = None,
        batch_axis: Optional[str] = None, checkpoint=None, log_path=None) -> tuple[TrainState, PyTree, History]:
    """Trains with TBPTT over one stream for ``num_epochs`` epochs.

    Equivalent loop::

        for epoch in range(num_epochs):
            carry = initial_carry                            # reset at epoch start
            for j, t in enumerate(range(0, N - k2 - shift + 1, k1)):   # full windows only
                window = Window(x[t:t+k2], y[t:t+k2] (or x[t+1:t+k2+1]), resets[t:t+k2],
                                loss_start=0 if j == 0 else k2 - k1)
                state, carry, metrics = step(state, carry, window, fold_in(key, step))
            eval_fn(state)

    Args:
      step: a :class:`TBPTTStep` from :func:`make_step`.
      state: the initial `seqjax.train.TrainState` (donated: use the returned one).
      stream: a :class:`Stream` of [N, B, ...] arrays, or a callable ``epoch ->
        Stream`` (fresh data per epoch, as NYU's EchoData).
      initial_carry: the carry at every epoch start (e.g. zeros for batch B); it
        is copied, never donated.
      num_epochs: passes over the stream.
      key: PRNG key for dropout (``fold_in(key, global_step)`` per window), or None.
      eval_fn: optional ``state -> dict of scalars``, run after every epoch.
      log_every: record train metrics of every ``log_every``-th window.
      callback: optional ``callback(global_step, state, last_metrics)`` run every
        ``callback_every`` windows (e.g. to evaluate or print samples); if it
        returns True training stops (``history.stop_reason == "callback"``).
      progress: print one line per epoch.
      scan_epoch: run each epoch as ONE jitted `lax.scan` over its stacked
        windows (``step.epoch_fn``): no Python dispatch per window, which is
        what small models need; ``callback`` then acts between epochs only.
        Same results as the per-window loop.
      mesh: a `jax.sharding.Mesh` to train data-parallel on: the state is
        replicated, the stream's columns (axis 1) and the carry's batch rows
        (axis 0) are split over ``batch_axis``, and XLA averages the gradients
        across devices (`seqjax.sharding`). Same results as one device with
        the same stream, up to float32 rounding. B must be a multiple of the
        axis' size.
      batch_axis: the mesh axis the batch is split over; default the mesh's first.
      checkpoint: a `seqjax.checkpoint.Checkpoints`: every ``checkpoint.every``
        windows it saves the state (params, optimiser state, step), the carry,
        ``key``, the position in the stream (epoch and window) and the
        history; and where it already holds a checkpoint, training resumes
        from the latest one (``state`` and ``key`` give only the structure), so
        a run killed after any window and started again with the same
        arguments ends with the same bits as one that was never stopped. Not
        with ``scan_epoch``.
      log_path: where to write the history (``.json`` and ``.csv``, via
        `seqjax.train.History.save`) at the end and at every checkpoint; a
        resumed run's history holds the rows from before the checkpoint too.

    The budget is ``num_epochs`` (or a ``callback`` that counts steps), never
    the clock: the same call gives the same result on any machine load.
    ``history.wall_time`` records the wall time as information only.

    Returns:
      ``(state, carry, history)``: the final state, the final carry, and a
      `seqjax.train.History` (train rows carry ``epoch``; eval rows one per epoch).

    Raises:
      ValueError: the stream is shorter than one window.
      NonFiniteLossError: a window's loss or gradient norm was NaN/inf.
    """
    call = "seqjax.tbptt.fit"
    if not isinstance(step, TBPTTStep):
        raise TypeError(f"{call}: step must be a TBPTTStep from seqjax.tbptt.make_step, got {type(step).__name__}")
    num_epochs = _positive_int(call, "num_epochs", num_epochs)
    log_every = _positive_int(call, "log_every", log_every)
    place = _Placement(call, mesh, batch_axis)
    state = place.state(state)
    history = History()
    t0 = time.perf_counter()
    start_epoch, start_window, resumed = 0, 0, None
    if checkpoint is not None:
        if scan_epoch:
            raise ValueError(f"{call}: checkpoint= saves between windows, which scan_epoch=True runs in one call; "
                             "pass scan_epoch=False")
        if checkpoint.latest() is not None:
            arrays, meta = checkpoint.restore(_saved(state, place.carry(_copy(initial_carry)), key))
            state, resumed, key = arrays["state"], arrays["carry"], place.state(arrays.get("key"))
            start_epoch, start_window = int(meta["epoch"]), int(meta["window"])
            history.train, history.eval = list(meta["train"]), list(meta["eval"])
    gstep = int(jax.device_get(state.step))
    carry = None
    pending: list[tuple[int, int, dict]] = []

    def flush():
        if pending:
            host = jax.device_get([m for _, _, m in pending])
            for (s, e, _), m in zip(pending, host):
                row = {"step": s, "epoch": e, **{k: float(v) for k, v in m.items()}}
                history.train.append(row)
            pending.clear()
            last = history.train[-1]
            if not all(math.isfinite(last[k]) for k in ("loss", "grad_norm")):
                history.stop_reason = "non_finite"
                raise NonFiniteLossError(last["step"], state, last, history)

    stopped = None
    for epoch in range(start_epoch, num_epochs):
        s = _check_stream(call, stream(epoch) if callable(stream) else stream)
        N = np.shape(s.inputs)[0]
        shift = 1 if s.targets is None else 0
        starts = _window_starts(call, N, step.k2, step.k1, shift, drop_last=True)
        carry = place.carry(_copy(initial_carry))
        if scan_epoch:
            state, carry = _scan_epoch(step, state, carry, s, starts, key, gstep, epoch, pending, log_every, place)
            gstep += len(starts)
            flush()
            if callback is not None and callback(gstep, state, history.train[-1] if history.train else {}):
                stopped = "callback"
            starts = []
        s = place.stream(_device_stream(s))
        first = 0
        if resumed is not None:
            carry, first, resumed = resumed, start_window, None
        for j, (t, n) in enumerate(starts):
            if j < first:
                continue
            x, y, r = _slice(s, t, n)
            window = Window(x, y, r, jnp.asarray(0 if j == 0 else step.k2 - step.k1, jnp.int32))
            k = None if key is None else jax.random.fold_in(key, gstep)
            state, carry, metrics = step(state, carry, window, k)
            gstep += 1
            if gstep % log_every == 0:
                pending.append((gstep, epoch, metrics))
            if len(pending) >= 256:
                flush()
            if checkpoint is not None and checkpoint.should_save(gstep):
                flush()
                checkpoint.save(gstep, _saved(state, carry, key),
                                {"epoch": epoch, "window": j + 1, "train": history.train, "eval": history.eval})
                if log_path is not None:
                    history.save(log_path)
            if callback is not None and callback_every and gstep % callback_every == 0:
                flush()
                if callback(gstep, state, history.train[-1] if history.train else {}):
                    stopped = "callback"
                    break
        flush()
        if eval_fn is not None:
            em = {k: float(v) for k, v in jax.device_get(eval_fn(state)).items()}
            history.eval.append({"step": gstep, "epoch": epoch, **em})
        if progress:
            last = history.train[-1] if history.train else {}
            ev = history.eval[-1] if eval_fn is not None else {}
            print(f"epoch {epoch + 1}/{num_epochs}: step {gstep} loss {last.get('loss', float('nan')):.4f} "
                  + " ".join(f"{k} {v:.4f}" for k, v in ev.items() if k not in ("step", "epoch"))
                  + f" ({time.perf_counter() - t0:.1f}s)", flush=True)
        if stopped:
            break
    history.stop_reason = stopped or "num_steps"
    history.wall_time = time.perf_counter() - t0
    if log_path is not None:
        history.save(log_path)
    return state, carry, history


def _saved(state, carry, key) -> dict:
    """What a checkpoint of `fit` holds besides its metadata."""
    return {"state": state, "carry": carry, **({} if key is None else {"key": key})}


class _Placement:
    """Where `fit` puts the state, carry and stream: as they are, or data-parallel on a mesh."""

    def __init__(self, call: str, mesh, batch_axis):
        from seqjax.sharding import data_parallel
        self.call = call
        self.dp = None if mesh is None else data_parallel(mesh, batch_axis, call=call)

    def state(self, state):
        return state if self.dp is None else self.dp.replicate(state)

    def carry(self, carry):
        return carry if self.dp is None else self.dp.shard(carry, 0, call=self.call)

    def stream(self, stream: Stream, axis: int = 1) -> Stream:
        """``stream``'s arrays with their batch axis (1: [N, B, ...]; 2: stacked windows [n, T, B, ...]) split."""
        return stream if self.dp is None else Stream(*self.dp.shard(tuple(stream), axis, call=self.call))


def _scan_epoch(step: TBPTTStep, state, carry, s: Stream, starts, key, gstep: int, epoch: int, pending: list,
                log_every: int, place: _Placement):
    """One epoch as one `lax.scan` over the stacked windows; appends every window's metrics to ``pending``."""
    idx = np.asarray([t for t, _ in starts])[:, None] + np.arange(step.k2)[None, :]     # [n, k2]
    take = lambda a, shift=0: None if a is None else jnp.asarray(np.asarray(a)[idx + shift])
    xs = take(s.inputs)
    ys = take(s.inputs, 1) if s.targets is None else take(s.targets)
    ls = jnp.asarray([0] + [step.k2 - step.k1] * (len(starts) - 1), jnp.int32)
    keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(gstep, gstep + len(starts)))
    xs, ys, rs = place.stream(Stream(xs, ys, take(s.resets)), axis=2)
    state, carry, metrics = step.epoch_fn(state, carry, Window(xs, ys, rs, ls), keys)
    host = jax.device_get(metrics)
    for j in range(len(starts)):
        if (gstep + j + 1) % log_every == 0:
            pending.append((gstep + j + 1, epoch, {k: v[j] for k, v in host.items()}))
    return state, carry


# ----------------------------------------------------------------------------
# stateful evaluation
# ----------------------------------------------------------------------------


def make_eval(model: Callable, loss_fn: Callable, *, has_aux: bool = False,
              options: ScanOptions | None = None) -> Callable:
    """Builds a jitted evaluation of one window: ``(params, carry, window) -> (carry, sums)``.

    ``sums`` holds ``{"loss": sum of per-step losses, **aux sums, "count": T*B}``
    over the window (``key=None``: no dropout; no gradient). :func:`evaluate`
    chains it over a stream, carrying the state as training does. ``options``:
    as in :func:`make_step`, handed to ``model`` as ``options=``.
    """
    call = "seqjax.tbptt.make_eval"
    extra = _model_options(call, model, options)

    def run(params, carry, window):
        x, y = window.inputs, window.targets
        T, B = jnp.shape(x)[:2]
        carry, out = model(params, carry, x, resets=window.resets, key=None, **extra)
        losses, aux = _split_losses(call, loss_fn(out, y), has_aux, T, B)
        sums = {"loss": jnp.sum(losses), **{k: jnp.sum(v.astype(losses.dtype)) for k, v in aux.items()}}
        sums["count"] = jnp.asarray(T * B, losses.dtype)
        return carry, sums

    return jax.jit(run)


def evaluate(eval_window: Callable, params, stream, *, T: int, initial_carry: PyTree) -> tuple[dict, PyTree]:
    """Stateful evaluation: the carry crosses windows of ``T`` steps (from ``initial_carry``).

    Every step of the stream is scored (the last window may be shorter), so the
    result does not depend on ``T`` up to rounding: the carry is exact, only the
    gradient was ever cut.

    Args:
      eval_window: from :func:`make_eval`.
      params: model params.
      stream: a :class:`Stream` (or [N, B, ...] inputs for language modelling).
      T: evaluation window length.
      initial_carry: the carry at the start.

    Returns:
      ``(metrics, carry)``: means over all ``N' * B`` scored steps
      (``{"loss": ..., **aux, "count": N' * B}``) and the final carry.
    """
    call = "seqjax.tbptt.evaluate"
    T = _positive_int(call, "T", T)
    s = _check_stream(call, stream)
    N = np.shape(s.inputs)[0]
    shift = 1 if s.targets is None else 0
    starts = _window_starts(call, N, min(T, max(N - shift, 1)), T, shift, drop_last=False)
    s = _device_stream(s)
    carry = initial_carry
    totals = None
    for t, n in starts:
        x, y, r = _slice(s, t, n)
        carry, sums = eval_window(params, carry, Window(x, y, r))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    count = totals.pop("count")
    out = {k: v / count for k, v in totals.items()}
    out["count"] = int(count)
    return out, carry
