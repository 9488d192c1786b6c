"""Optax training loop: a pure jitted step and a loop around it.

Two layers, as in Optax itself:

* **A step** is a pure function ``train_step(state, batch) -> (state, metrics)``.
  :func:`make_train_step` builds one for explicit params (a pytree) held in a
  :class:`TrainState`; :func:`make_nnx_train_step` builds one for a
  ``flax.nnx`` model and ``nnx.Optimizer`` whose state is the pair
  ``(model, optimizer)``. ``metrics`` always holds ``loss`` and ``grad_norm``
  (global L2 norm of the gradients *before* clipping) plus any auxiliary
  metrics returned by the loss function.
* **The loop** :func:`fit` is generic over that opaque state: it only feeds it
  to ``train_step`` and hands it to ``eval_fn``. It draws batches, shows a
  progress bar, evaluates periodically, stops early on a target, records a
  :class:`History` (JSON / CSV) and refuses to continue past a non-finite loss.

Non-finite steps are never applied: both step builders compute the update and
keep the old state when the loss or the gradient norm is NaN/inf (the step
counter does not advance either). :func:`fit` then raises
:class:`NonFiniteLossError`, whose ``state`` attribute is that last good state.

Example (functional):
  >>> import jax, jax.numpy as jnp, optax
  >>> def loss_fn(params, batch):
  ...     x, y = batch
  ...     return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)
  >>> params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros((1,))}
  >>> opt = optax.adam(1e-1)
  >>> step = make_train_step(loss_fn, opt, clip_norm=1.0)
  >>> def batches(key):
  ...     x = jax.random.normal(key, (32, 3))
  ...     return x, x @ jnp.array([[1.0], [-2.0], [0.5]])
  >>> state, hist = fit(step, init_state(params, opt), batches,
  ...                   num_steps=200, progress=False)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import _fit_support

__all__ = [
    "TrainState",
    "init_state",
    "make_train_step",
    "make_nnx_train_step",
    "fit",
    "History",
    "NonFiniteLossError",
]

PyTree = Any
Metrics = dict


class TrainState(NamedTuple):
    """State of a functional training run (a pytree).

    Attributes:
      step: ``[]`` int32 array, number of applied updates.
      params: pytree of arrays, the model parameters.
      opt_state: the Optax optimizer state for ``params``.
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState


def init_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """Creates a :class:`TrainState` at step 0.

    ``params`` is copied, so the caller's arrays stay valid after the jitted
    step donates the state buffers.

    Args:
      params: pytree of float arrays (any shapes).
      optimizer: the Optax transformation later passed to
        :func:`make_train_step` (without clipping; clipping is stateless and
        added by the step).

    Returns:
      ``TrainState(step=0, params=copy of params, opt_state=optimizer.init(params))``.

    Example:
      >>> state = init_state({"w": jnp.zeros(3)}, optax.sgd(0.1))
    """
    params = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fit` when a step produced a NaN/inf loss or gradient norm.

    Attributes:
      step: the 1-based global step number whose loss was non-finite.
      state: the last good state (the bad update was not applied; with ``num_runs``, no run
        applied that step).
      metrics: the metrics (floats) reported by the bad step.
      history: the :class:`History` recorded up to the failure (with ``num_runs``, the list of
        every run's history).
      run: with ``num_runs``, the index of the run whose step was non-finite, else ``None``.
    """

    def __init__(self, step: int, state: Any, metrics: dict, history, run: Optional[int] = None):
        self.step = step
        self.state = state
        self.metrics = metrics
        self.history = history
        self.run = run
        what = ", ".join(
            f"{k}={metrics[k]}" for k in ("loss", "grad_norm") if k in metrics
        )
        where = f"step {step}" if run is None else f"step {step} of run {run}"
        super().__init__(
            f"seqjax.train.fit: non-finite value at {where} ({what}); "
            "training stopped and the update was not applied. The last good "
            "state is in this error's `.state`. Lower the learning rate, set "
            "clip_norm, or check the batch and the loss for log(0) / overflow."
        )


def _check_optimizer(fn: str, optimizer):
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"seqjax.train.{fn}: optimizer must be an optax.GradientTransformation "
            f"(e.g. optax.adam(1e-3)), got {type(optimizer).__name__}"
        )


def _check_clip(fn: str, clip_norm):
    if clip_norm is not None and not (
        isinstance(clip_norm, (int, float)) and clip_norm > 0
    ):
        raise ValueError(
            f"seqjax.train.{fn}: clip_norm must be a positive number or None, "
            f"got {clip_norm!r}"
        )


def _split_loss(out, has_aux: bool):
    """Normalises a loss_fn output to ``(loss, aux_dict)`` with checks."""
    if has_aux:
        loss, aux = out
        if not isinstance(aux, dict):
            raise TypeError(
                "seqjax.train: with has_aux=True loss_fn must return "
                f"(loss, dict of scalar metrics), got aux of type {type(aux).__name__}"
            )
        clash = {"loss", "grad_norm"} & set(aux)
        if clash:
            raise ValueError(
                f"seqjax.train: aux metric names {sorted(clash)} are reserved; "
                "rename them"
            )
    else:
        loss, aux = out, {}
    if jnp.shape(loss) != ():
        raise ValueError(
            "seqjax.train: loss_fn must return a scalar loss, got shape "
            f"{jnp.shape(loss)}; reduce it with jnp.mean"
        )
    return loss, aux


def _clip(grads, clip_norm):
    """Applies ``optax.clip_by_global_norm`` (stateless) to ``grads``."""
    if clip_norm is None:
        return grads
    clip = optax.clip_by_global_norm(clip_norm)
    grads, _ = clip.update(grads, clip.init(grads))
    return grads


def make_train_step(
    loss_fn: Callable[[PyTree, Any], Any],
    optimizer: optax.GradientTransformation,
    *,
    clip_norm: Optional[float] = None,
    has_aux: bool = False,
    jit: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """Builds a pure, jitted ``train_step(state, batch) -> (state, metrics)``.

    One step computes ``loss, grads = value_and_grad(loss_fn)(params, batch)``,
    ``grad_norm = optax.tree.norm(grads)``, optionally clips with
    ``optax.clip_by_global_norm(clip_norm)`` (equivalent to
    ``optax.chain(clip_by_global_norm(clip_norm), optimizer)``; clipping is
    stateless so ``opt_state`` is the plain ``optimizer.init(params)``), then
    applies ``optimizer.update`` and ``optax.apply_updates``. If ``loss`` or
    ``grad_norm`` is not finite the input state is returned unchanged.

    The state argument is donated to XLA: do not reuse a state after passing
    it to the step (use the returned one).

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (``[]`` float) or, with
        ``has_aux=True``, ``(loss, aux)`` where ``aux`` is a dict of ``[]``
        metrics (e.g. ``{"accuracy": acc}``).
      optimizer: an ``optax.GradientTransformation``.
      clip_norm: optional max global gradient norm (> 0).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      jit: wrap the step in ``jax.jit`` (``False`` for debugging).

    Returns:
      ``train_step(state: TrainState, batch) -> (TrainState, metrics)`` with
      ``metrics = {"loss": [], "grad_norm": [], **aux}`` (device scalars).

    Example:
      >>> loss_fn = lambda p, b: jnp.mean((b[0] * p - b[1]) ** 2)
      >>> step = make_train_step(loss_fn, optax.sgd(0.1), clip_norm=1.0)
      >>> state, m = step(init_state(jnp.zeros(()), optax.sgd(0.1)),
      ...                 (jnp.ones(4), jnp.ones(4)))
    """
    if not callable(loss_fn):
        raise TypeError(
            f"seqjax.train.make_train_step: loss_fn must be callable "
            f"(params, batch) -> loss, got {type(loss_fn).__name__}"
        )
    _check_optimizer("make_train_step", optimizer)
    _check_clip("make_train_step", clip_norm)

    def value(params, batch):
        loss, aux = _split_loss(loss_fn(params, batch), has_aux)
        return loss, aux

    grad_fn = jax.value_and_grad(value, has_aux=True)

    def train_step(state: TrainState, batch) -> tuple[TrainState, Metrics]:
        (loss, aux), grads = grad_fn(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        grads = _clip(grads, clip_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(state.step + 1, params, opt_state)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        return new, {"loss": loss, "grad_norm": grad_norm, **aux}

    if jit:
        return jax.jit(train_step, donate_argnums=0)
    return train_step


def make_nnx_train_step(
    loss_fn: Callable[[Any, Any], Any],
    *,
    clip_norm: Optional[float] = None,
    has_aux: bool = False,
    jit: bool = True,
) -> Callable[[tuple, Any], tuple[tuple, Metrics]]:
    """Builds ``train_step((model, optimizer), batch) -> ((model, optimizer), metrics)``.

    The ``flax.nnx`` counterpart of :func:`make_train_step`. ``optimizer`` is an
    ``nnx.Optimizer(model, tx, wrt=...)``; gradients are taken with
    ``nnx.value_and_grad`` with respect to ``optimizer.wrt`` and applied with
    ``optimizer.update(model, grads)`` inside ``nnx.jit``. ``model`` and
    ``optimizer`` are updated in place and returned, so the pair can be used as
    the opaque state of :func:`fit`. Non-finite steps leave both untouched.

    Args:
      loss_fn: ``loss_fn(model, batch) -> loss`` (``[]`` float) or, with
        ``has_aux=True``, ``(loss, dict of [] metrics)``.
      clip_norm: optional max global gradient norm (> 0), applied with
        ``optax.clip_by_global_norm`` before ``optimizer.update``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      jit: wrap the step in ``nnx.jit`` (``False`` for debugging).

    Returns:
      ``train_step(state, batch) -> (state, metrics)`` with
      ``state = (model, optimizer)`` and ``metrics = {"loss", "grad_norm", **aux}``.

    Example:
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
      >>> step = make_nnx_train_step(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2))
      >>> (model, opt), m = step((model, opt), (jnp.ones((4, 3)), jnp.ones((4, 1))))
    """
    from flax import nnx

    if not callable(loss_fn):
        raise TypeError(
            f"seqjax.train.make_nnx_train_step: loss_fn must be callable "
            f"(model, batch) -> loss, got {type(loss_fn).__name__}"
        )
    _check_clip("make_nnx_train_step", clip_norm)

    def value(model, batch):
        return _split_loss(loss_fn(model, batch), has_aux)

    def _apply(model, optimizer, grads):
        optimizer.update(model, grads)

    def _skip(model, optimizer, grads):
        pass

    def step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(
            value, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True
        )
        (loss, aux), grads = grad_fn(model, batch)
        grad_norm = optax.tree.norm(grads)
        grads = _clip(grads, clip_norm)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        nnx.cond(ok, _apply, _skip, model, optimizer, grads)
        return {"loss": loss, "grad_norm": grad_norm, **aux}

    jitted = nnx.jit(step) if jit else step

    def train_step(state, batch):
        try:
            model, optimizer = state
        except (TypeError, ValueError):
            raise TypeError(
                "seqjax.train.make_nnx_train_step: state must be the pair "
                f"(model, nnx.Optimizer), got {type(state).__name__}"
            ) from None
        if not isinstance(optimizer, nnx.Optimizer):
            raise TypeError(
                "seqjax.train.make_nnx_train_step: state[1] must be an "
                f"nnx.Optimizer(model, tx, wrt=nnx.Param), got "
                f"{type(optimizer).__name__}"
            )
        metrics = jitted(model, optimizer, batch)
        return (model, optimizer), metrics

    return train_step


# --------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------


@dataclasses.dataclass
class History:
    """Metrics recorded by :func:`fit`.

    Attributes:
      train: one dict per step, ``{"step": int, "loss": float, "grad_norm":
        float, ...aux}``.
      eval: one dict per evaluation, ``{"step": int, ...eval metrics}``.
      stop_reason: ``"num_steps"``, ``"target"``, ``"data_exhausted"`` or
        ``"non_finite"``.
      wall_time: seconds spent in the loop (not part of equality).
    """

    train: list = dataclasses.field(default_factory=list)
    eval: list = dataclasses.field(default_factory=list)
    stop_reason: Optional[str] = None
    wall_time: float = dataclasses.field(default=0.0, compare=False)

    def series(self, name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(steps [N] int, values [N] float)`` of one metric, for plotting."""
        rows = [r for r in getattr(self, split) if name in r]
        return (np.array([r["step"] for r in rows], dtype=np.int64),
                np.array([r[name] for r in rows], dtype=np.float64))

    def last(self, name: str, split: str = "train") -> Optional[float]:
        """The most recent value of ``name`` in ``split``, or ``None``."""
        for r in reversed(getattr(self, split)):
            if name in r:
                return r[name]
        return None

    def to_dict(self) -> dict:
        return {"train": self.train, "eval": self.eval,
                "stop_reason": self.stop_reason, "wall_time": self.wall_time}

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Writes the history as JSON (non-finite floats as ``NaN``/``Infinity``)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def to_csv(self, path: Union[str, os.PathLike]) -> None:
        """Writes one row per step: ``step``, train metrics, ``eval_<name>`` columns.

        Eval columns are empty on steps without an evaluation.
        """
        train_keys, eval_keys = [], []
        for r in self.train:
            train_keys += [k for k in r if k != "step" and k not in train_keys]
        for r in self.eval:
            eval_keys += [k for k in r if k != "step" and k not in eval_keys]
        rows: dict[int, dict] = {}
        for r in self.train:
            rows.setdefault(r["step"], {}).update(
                {k: v for k, v in r.items() if k != "step"})
        for r in self.eval:
            rows.setdefault(r["step"], {}).update(
                {f"eval_{k}": v for k, v in r.items() if k != "step"})
        header = ["step"] + train_keys + [f"eval_{k}" for k in eval_keys]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for s in sorted(rows):
                w.writerow([s] + [rows[s].get(k, "") for k in header[1:]])

    def save(self, log_path: Union[str, os.PathLike]) -> tuple[str, str]:
        """Writes ``<log_path>.json`` and ``<log_path>.csv``; returns both paths."""
        stem = os.fspath(log_path)
        root, ext = os.path.splitext(stem)
        if ext in (".json", ".csv"):
            stem = root
        d = os.path.dirname(stem)
        if d:
            os.makedirs(d, exist_ok=True)
        self.to_json(stem + ".json")
        self.to_csv(stem + ".csv")
        return stem + ".json", stem + ".csv"


# --------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------


def _to_floats(where: str, metrics) -> dict:
    if not isinstance(metrics, dict):
        raise TypeError(
            f"seqjax.train.fit: {where} must return a dict of scalar metrics, "
            f"got {type(metrics).__name__}"
        )
    out = {}
    host = jax.device_get(metrics)
    order = [k for k in ("loss", "grad_norm") if k in host]
    order += [k for k in metrics if k not in order]
    for k in order:
        v = host[k]
        a = np.asarray(v)
        if a.size != 1:
            raise ValueError(
                f"seqjax.train.fit: {where} metric {k!r} must be a scalar, got "
                f"shape {a.shape}"
            )
        out[k] = float(a.reshape(()))
    return out


def _state_step(state) -> int:
    """Global step of a TrainState or an (model, nnx.Optimizer) pair, else 0."""
    step = getattr(state, "step", None)
    if step is None and isinstance(state, tuple) and len(state) == 2:
        step = getattr(state[1], "step", None)
    if step is None:
        return 0
    if hasattr(step, "get_value"):  # nnx.Variable
        step = step.get_value()
    try:
        return int(np.asarray(jax.device_get(step)))
    except Exception:
        return 0


def _parse_target(target):
    if target is None:
        return None
    if not (isinstance(target, (tuple, list)) and len(target) in (2, 3)
            and isinstance(target[0], str)):
        raise ValueError(
            "seqjax.train.fit: target must be (metric_name, value) or "
            f"(metric_name, value, 'max'|'min'), got {target!r}"
        )
    name, value = target[0], float(target[1])
    if len(target) == 3:
        mode = target[2]
    else:
        mode = "min" if any(s in name for s in ("loss", "error", "mse")) else "max"
    if mode not in ("max", "min"):
        raise ValueError(
            f"seqjax.train.fit: target mode must be 'max' or 'min', got {mode!r}")
    return name, value, mode


def _reached(target, metrics) -> bool:
    name, value, mode = target
    if name not in metrics:
        return False
    v = metrics[name]
    return v >= value if mode == "max" else v <= value


def fit(
    train_step: Callable[[Any, Any], tuple[Any, Metrics]],
    state: Any,
    batches: Union[Iterable, Iterator, Callable[[jax.Array], Any]],
    *,
    num_steps: int,
    eval_fn: Optional[Callable[[Any], dict]] = None,
    eval_every: Optional[int] = None,
    target: Optional[tuple] = None,
    progress: bool = True,
    log_path: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
    num_runs: Optional[int] = None,
    steps_per_call: int = 1,
    on_non_finite: str = "raise",
    mesh: Optional[jax.sharding.Mesh] = None,
    batch_axis: Optional[str] = None,
    checkpoint=None,
) -> tuple[Any, Union[History, list]]:
    """Runs ``train_step`` for up to ``num_steps`` steps with evaluation and logging.

    Equivalent loop::

        for i in range(num_steps):
            batch = batches(fold_in(key(seed), step)) if callable else next(it)
            state, metrics = train_step(state, batch)   # stop on NaN/inf
            if eval_fn and (i + 1) % eval_every == 0: evals = eval_fn(state)
            if target reached: break

    ``state`` is opaque to ``fit``: a :class:`TrainState` for
    :func:`make_train_step`, a ``(model, nnx.Optimizer)`` pair for
    :func:`make_nnx_train_step`, or anything a custom step accepts. Steps are
    numbered globally, continuing from ``state.step`` / ``optimizer.step``.

    **Several runs in lockstep** (``num_runs=S``): ``state`` holds ``S`` runs
    stacked on a leading axis (e.g. ``jax.vmap(init)(keys)``, or learning rates
    in an ``optax.inject_hyperparams`` state) and one vmapped step trains them
    all. Run ``r`` draws its data as a single run with ``seed=seed + r`` would
    (callable ``batches``), or takes row ``r`` of each batch (an iterator of
    batches stacked ``[S, ...]``). Each run has its own :class:`History`, its
    own evaluation (``eval_fn`` is vmapped) and stops on its own when it reaches
    ``target``; a stopped run keeps its state while the others go on.

    **Several steps per call** (``steps_per_call=k``): one jitted
    `jax.lax.scan` runs ``k`` steps and the host reads the metrics once per
    call, which removes the per-step host round trip that dominates small
    models. The result equals ``steps_per_call=1`` (same batches, same
    updates); a non-finite step still stops training at that step, and an
    error still names it. ``eval_every`` must be a multiple of ``k``.

    With ``num_runs`` or ``steps_per_call > 1`` the steps run inside one jitted
    call, so ``state`` must be a pytree of arrays (not an NNX pair), callable
    ``batches`` and ``eval_fn`` (with ``num_runs``) must be traceable by JAX,
    and ``train_step`` must be a pure step such as :func:`make_train_step`'s.

    **Data-parallel** (``mesh=``): the state is replicated on every device of
    the `jax.sharding.Mesh` (an NNX pair in place), every batch's rows (axis
    0; with ``num_runs``, axis 1) are split over ``batch_axis``, and XLA
    averages the gradients across devices; the step itself is unchanged
    (`seqjax.sharding`). The result equals one device with the same global
    batch, up to float32 rounding. Under ``jax.distributed.initialize`` the
    mesh spans every process's devices; each process then passes the same
    global batches (the same ``seed``, or the same data) and only process 0
    writes ``log_path``.

    **Resume** (``checkpoint=``): every ``checkpoint.every`` steps the state
    (params, optimiser state, step), the data position (callable batches: the
    step, which with ``seed`` is their PRNG state; an iterator: how many
    batches it gave) and the history are saved with Orbax; where the
    checkpoint directory already holds one, ``fit`` resumes from the latest
    (``state`` then gives only the structure and placement, and an iterator's
    consumed batches are skipped), so a run killed after any saved step and
    started again with the same arguments ends with the same bits as one that
    never stopped, and its history holds the rows from before the stop.
    ``num_steps`` counts from where the first call started.

    Args:
      train_step: ``(state, batch) -> (state, metrics)``; ``metrics`` is a
        dict of scalars including ``"loss"``.
      state: the initial state (with ``num_runs``, leaves ``[S, ...]``).
      batches: an iterable/iterator of batches, or a callable ``key -> batch``
        called with ``jax.random.fold_in(jax.random.key(seed), step)`` so the
        data stream is a deterministic function of ``seed`` and the step.
      num_steps: number of steps to run (> 0).
      eval_fn: optional ``state -> dict of scalar metrics`` (e.g.
        ``{"accuracy": ...}``), run every ``eval_every`` steps and at the end.
      eval_every: evaluation period in steps; default ``max(1, num_steps // 10)``
        rounded up to a multiple of ``steps_per_call``.
      target: optional ``(name, value)`` or ``(name, value, "max"|"min")``:
        stop when the metric reaches ``value`` (``"min"`` is the default for
        names containing loss/error/mse, ``"max"`` otherwise). Checked on eval
        metrics when ``eval_fn`` is given, else on train metrics each step.
      progress: show a tqdm bar with live loss / accuracy.
      log_path: optional path stem; the history is written to
        ``<log_path>.json`` and ``<log_path>.csv`` at each evaluation and at
        the end (also when stopping on an error); with ``num_runs``, run ``r``'s
        to ``<log_path>.run<r>.json`` / ``.csv``.
      seed: seed for callable ``batches``.
      num_runs: train this many runs in lockstep (``None``: one run).
      steps_per_call: steps per jitted call (>= 1).
      on_non_finite: ``"raise"`` (default): a non-finite loss or gradient norm
        stops training and raises :class:`NonFiniteLossError` (with
        ``num_runs``, no run applies that step); ``"stop_run"``: that run stops
        with ``stop_reason="non_finite"`` and the others go on.
      mesh: a `jax.sharding.Mesh` to train data-parallel on (``None``: as the
        state and batches are placed). The batch rows must be a multiple of
        the size of ``batch_axis``.
      batch_axis: the mesh axis (or tuple of axes) the batch rows are split
        over; default the mesh's first.
      checkpoint: a `seqjax.checkpoint.Checkpoints` to save to and resume
        from; ``checkpoint.every`` must be a multiple of ``steps_per_call``.

    Returns:
      ``(state, history)``: the final state and a :class:`History` (with
      ``num_runs``, a list of ``S`` histories).

    Raises:
      NonFiniteLossError: a step produced a NaN/inf loss or grad norm; the
        error carries ``.step`` (and ``.run``) and the last good ``.state``.

    Example:
      >>> loss_fn = lambda p, key: jnp.mean((p - jax.random.normal(key, (8,)) - 3) ** 2)
      >>> opt = optax.adam(0.1)
      >>> state, hist = fit(make_train_step(loss_fn, opt),
      ...                   init_state(jnp.zeros(()), opt), lambda key: key,
      ...                   num_steps=300, eval_fn=lambda s: {"mean": s.params},
      ...                   eval_every=10, target=("mean", 2.9), progress=False)
      >>> hist.stop_reason
      'target'
      >>> steps, losses = hist.series("loss")

      Three learning rates in lockstep, 50 steps per call:

      >>> opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> def start(lr):
      ...     s = init_state(jnp.zeros(()), opt)
      ...     s.opt_state.hyperparams["learning_rate"] = lr
      ...     return s
      >>> states = jax.vmap(start)(jnp.array([0.01, 0.1, 0.3]))
      >>> states, hists = fit(make_train_step(loss_fn, opt), states, lambda key: key,
      ...                     num_steps=200, num_runs=3, steps_per_call=50, progress=False)
      >>> states.params.shape, [h.stop_reason for h in hists]
      ((3,), ['num_steps', 'num_steps', 'num_steps'])
    """
    if not callable(train_step):
        raise TypeError(
            f"seqjax.train.fit: train_step must be callable (state, batch) -> "
            f"(state, metrics), got {type(train_step).__name__}")
    if not (isinstance(num_steps, (int, np.integer)) and num_steps > 0):
        raise ValueError(
            f"seqjax.train.fit: num_steps must be a positive int, got {num_steps!r}")
    if not (isinstance(steps_per_call, (int, np.integer)) and not isinstance(steps_per_call, bool)
            and steps_per_call > 0):
        raise ValueError(
            f"seqjax.train.fit: steps_per_call must be a positive int, got {steps_per_call!r}")
    if num_runs is not None and not (isinstance(num_runs, (int, np.integer))
                                     and not isinstance(num_runs, bool) and num_runs > 0):
        raise ValueError(
            f"seqjax.train.fit: num_runs must be a positive int or None, got {num_runs!r}")
    if on_non_finite not in ("raise", "stop_run"):
        raise ValueError(
            f"seqjax.train.fit: on_non_finite must be 'raise' or 'stop_run', got {on_non_finite!r}")
    k = int(steps_per_call)
    if eval_every is None:
        eval_every = max(1, int(num_steps) // 10)
        eval_every = -(-eval_every // k) * k
    if not (isinstance(eval_every, (int, np.integer)) and eval_every > 0):
        raise ValueError(
            f"seqjax.train.fit: eval_every must be a positive int, got {eval_every!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("seqjax.train.fit: eval_fn must be callable state -> dict")
    if eval_fn is not None and eval_every % k:
        raise ValueError(
            f"seqjax.train.fit: eval_every ({eval_every}) must be a multiple of steps_per_call ({k}): "
            "evaluations happen between jitted calls")
    tgt = _parse_target(target)

    if callable(batches) and not hasattr(batches, "__next__"):
        draws_keys = True
    else:
        draws_keys = False
        try:
            batches = iter(batches)
        except TypeError:
            raise TypeError(
                "seqjax.train.fit: batches must be an iterable of batches or a "
                f"callable key -> batch, got {type(batches).__name__}") from None

    place = None if mesh is None else _fit_support.Placement(mesh, batch_axis, num_runs)
    resume = None if checkpoint is None else _fit_support.Resume(checkpoint, seed=seed, steps_per_call=k,
                                                                 draws_keys=draws_keys)
    loop = _CompiledLoop if (num_runs is not None or k > 1) else _StepLoop
    return loop(train_step, batches, draws_keys, num_steps=int(num_steps), eval_fn=eval_fn,
                eval_every=int(eval_every), target=tgt, progress=progress, log_path=log_path,
                seed=seed, num_runs=num_runs, k=k, stop_run=on_non_finite == "stop_run",
                place=place, resume=resume).run(state)


class _Loop:
    """What both loops share: the histories, the progress bar, logging and evaluation records."""

    def __init__(self, train_step, batches, draws_keys, *, num_steps, eval_fn, eval_every, target,
                 progress, log_path, seed, num_runs, k, stop_run, place, resume):
        self.train_step, self.batches, self.draws_keys = train_step, batches, draws_keys
        self.place, self.resume = place, resume
        self.num_steps, self.eval_fn, self.eval_every, self.target = num_steps, eval_fn, eval_every, target
        self.progress, self.log_path, self.seed = progress, log_path, seed
        self.num_runs, self.k, self.stop_run = num_runs, k, stop_run
        self.runs = num_runs or 1
        self.histories = [History() for _ in range(self.runs)]
        self.t0 = time.perf_counter()
        self.bar = None

    def result(self, state):
        return state, (self.histories if self.num_runs is not None else self.histories[0])

    def save(self):
        elapsed = time.perf_counter() - self.t0
        for h in self.histories:
            h.wall_time = elapsed
        if self.log_path is None or not _fit_support.writes_files():
            return
        if self.num_runs is None:
            self.histories[0].save(self.log_path)
            return
        stem, ext = os.path.splitext(os.fspath(self.log_path))
        stem = stem if ext in (".json", ".csv") else os.fspath(self.log_path)
        for r, h in enumerate(self.histories):
            h.save(f"{stem}.run{r}")

    def open_bar(self):
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.num_steps, desc="train", dynamic_ncols=True)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()

    def postfix(self, train_m):
        if self.bar is None or not train_m:
            return
        pf = {"loss": f"{train_m['loss']:.4g}"}
        if "accuracy" in train_m:
            pf["acc"] = f"{train_m['accuracy']:.3f}"
        evals = [h.eval[-1] for h in self.histories if h.eval]
        if evals:
            for key in evals[-1]:
                if key != "step":
                    vals = [e[key] for e in evals if key in e]
                    pf[f"eval_{key}"] = f"{np.mean(vals):.4g}"
        self.bar.set_postfix(pf, refresh=False)

    def non_finite(self, step, state, m, run=None):
        for h in self.histories:
            h.stop_reason = h.stop_reason or "non_finite"
        history = self.histories if self.num_runs is not None else self.histories[0]
        return NonFiniteLossError(step, state, m, history, run)


def _check_loss(m):
    if "loss" not in m:
        raise ValueError(
            "seqjax.train.fit: train_step metrics must include 'loss', "
            f"got keys {sorted(m)}")


def _finite_metrics(m) -> bool:
    return all(math.isfinite(m[k]) for k in ("loss", "grad_norm") if k in m)


class _StepLoop(_Loop):
    """One run, one step per host round trip: any state and any Python step or batch function."""

    def run(self, state):
        history = self.histories[0]
        if self.draws_keys:
            base_key = jax.random.key(self.seed)
            next_batch = lambda step: self.batches(jax.random.fold_in(base_key, step))
        else:
            next_batch = lambda step: next(self.batches)
        if self.place is not None:
            state = self.place.state(state)
        start, first, last_eval_step = _state_step(state), 0, None
        saved = None if self.resume is None else self.resume.restore(state, self.histories)
        if saved is not None:
            state, start, first = saved["state"], saved["start"], saved["done"]
            if not self.draws_keys:
                _fit_support.skip(self.batches, saved["consumed"])
            last_eval_step = history.eval[-1]["step"] if history.eval else None

        def evaluate(step):
            m = _to_floats("eval_fn", self.eval_fn(state))
            history.eval.append({"step": step, **m})
            self.save()
            return m

        self.open_bar()
        try:
            if history.stop_reason is not None:  # the checkpoint is of the step that ended the run
                return self.result(state)
            if self.bar is not None:
                self.bar.update(first)
            for i in range(first, self.num_steps):
                step = start + i + 1
                try:
                    batch = next_batch(step - 1)
                except StopIteration:
                    history.stop_reason = "data_exhausted"
                    break
                if self.place is not None:
                    batch = self.place.batch(batch)
                new_state, metrics = self.train_step(state, batch)
                m = _to_floats("train_step", metrics)
                _check_loss(m)
                if not _finite_metrics(m):
                    state = new_state
                    if self.stop_run:
                        history.stop_reason = "non_finite"
                        break
                    raise self.non_finite(step, state, m)
                state = new_state
                history.train.append({"step": step, **m})
                if self.bar is not None:
                    self.bar.update(1)
                done = False
                if self.eval_fn is not None and (i + 1) % self.eval_every == 0:
                    em = evaluate(step)
                    last_eval_step = step
                    done = self.target is not None and _reached(self.target, em)
                elif self.eval_fn is None and self.target is not None:
                    done = _reached(self.target, m)
                self.postfix(m)
                if done:
                    history.stop_reason = "target"
                if self.resume is not None and self.resume.due(step):
                    self.resume.save(step, state, start=start, done=i + 1, consumed=i + 1, histories=self.histories,
                                     active=[not done], halted=False)
                    self.save()
                if done:
                    break
            else:
                history.stop_reason = "num_steps"
            if (self.eval_fn is not None and history.train
                    and last_eval_step != history.train[-1]["step"]):
                evaluate(history.train[-1]["step"])
        finally:
            self.close_bar()
            self.save()
        return self.result(state)


class _CompiledLoop(_Loop):
    """``k`` steps per jitted call, for one run or ``S`` runs in lockstep (see `seqjax._chunked`)."""

    where = "seqjax.train.fit"

    def run(self, state):
        from seqjax import _chunked

        _chunked.check_pytree_state(self.where, state)
        lockstep = self.num_runs is not None
        if lockstep:
            _chunked.check_run_axis(self.where, state, self.num_runs)
        if self.place is not None:
            state = self.place.state(state)
            if self.draws_keys:
                self.place.check(jax.eval_shape(self.batches, jax.random.key(self.seed)), per_run=True)
        train_target = self.target if self.eval_fn is None else None
        chunk = _chunked.make_chunk(self.train_step, self.batches if self.draws_keys else None,
                                    num_runs=self.num_runs, seed=self.seed, train_target=train_target,
                                    stop_run=self.stop_run, place=self.place)
        evaluate_all = self.eval_fn
        if self.eval_fn is not None and lockstep:
            evaluate_all = _chunked.vmapped(self.eval_fn)
        S = self.runs
        steps = np.asarray(jax.device_get(getattr(state, "step", 0))).reshape(-1)
        start = int(steps.max()) if steps.size else 0
        active = np.ones(S, bool)
        halted = False
        last_train = [None] * S
        last_eval = [None] * S
        done = consumed = 0
        saved = None if self.resume is None else self.resume.restore(state, self.histories)
        if saved is not None:
            state, start, done, consumed = saved["state"], saved["start"], saved["done"], saved["consumed"]
            active[:], halted = saved["active"], saved["halted"]
            if not self.draws_keys:
                _fit_support.skip(self.batches, consumed)
            for r, h in enumerate(self.histories):
                last_train[r] = h.train[-1]["step"] if h.train else None
                last_eval[r] = h.eval[-1]["step"] if h.eval else None

        def as_runs(x):
            return jnp.asarray(x) if lockstep else jnp.asarray(x[0])

        def evaluate(step, runs):
            out = evaluate_all(state)
            if not isinstance(out, dict):
                raise TypeError(
                    "seqjax.train.fit: eval_fn must return a dict of scalar metrics, "
                    f"got {type(out).__name__}")
            host = jax.device_get(out)
            for r in runs:
                m = _to_floats("eval_fn", {key: (v[r] if lockstep else v) for key, v in host.items()})
                self.histories[r].eval.append({"step": step, **m})
                last_eval[r] = step
                if self.target is not None and _reached(self.target, m):
                    active[r] = False
                    self.histories[r].stop_reason = "target"
            self.save()

        self.open_bar()
        try:
            if self.bar is not None:
                self.bar.update(done)
            while done < self.num_steps and active.any():
                n = min(self.k, self.num_steps - done)
                step0 = start + done
                if self.draws_keys:
                    data = jnp.arange(n, dtype=jnp.int32)
                else:
                    pulled = []
                    for _ in range(n):
                        try:
                            pulled.append(next(self.batches))
                        except StopIteration:
                            break
                    if not pulled:
                        for r in np.nonzero(active)[0]:
                            self.histories[r].stop_reason = "data_exhausted"
                        active[:] = False
                        break
                    n = len(pulled)
                    consumed += n
                    data = _chunked.stack_batches(self.where, pulled)
                    if self.place is not None:
                        data = self.place.batch(data, stacked=True)
                trained = np.nonzero(active)[0]
                state, active_d, halted_d, metrics, bad = chunk(
                    state, jnp.int32(step0), as_runs(active), jnp.asarray(halted), data)
                metrics, bad = jax.device_get((metrics, bad))
                if not isinstance(metrics, dict):
                    raise TypeError("seqjax.train.fit: train_step must return (state, dict of scalar metrics), "
                                    f"got metrics of type {type(metrics).__name__}")
                bad = np.asarray(bad).reshape(n, S)
                rows = self._rows(metrics, n)
                error = None
                for i in range(n):
                    step = step0 + i + 1
                    live = [r for r in trained if active[r]]
                    if not self.stop_run:
                        first_bad = [r for r in live if bad[i, r]]
                        if first_bad:
                            error = (step, rows[i][first_bad[0]], first_bad[0])
                            break
                    for r in live:
                        m = rows[i][r]
                        if bad[i, r]:
                            active[r] = False
                            self.histories[r].stop_reason = "non_finite"
                            continue
                        self.histories[r].train.append({"step": step, **m})
                        last_train[r] = step
                        if train_target is not None and _reached(train_target, m):
                            active[r] = False
                            self.histories[r].stop_reason = "target"
                if error is not None:
                    step, m, r = error
                    raise self.non_finite(step, state, m, r if lockstep else None)
                done += n
                if self.bar is not None:
                    self.bar.update(n)
                    live = [rows[n - 1][r] for r in trained if self.histories[r].train
                            and self.histories[r].train[-1]["step"] == step0 + n]
                    if live:
                        self.postfix({key: float(np.mean([m[key] for m in live])) for key in live[0]})
                if self.eval_fn is not None and done % self.eval_every == 0:
                    evaluate(step0 + n, [r for r in trained if active[r]])
                if self.resume is not None and self.resume.due(step0 + n):
                    self.resume.save(step0 + n, state, start=start, done=done, consumed=consumed,
                                     histories=self.histories, active=active, halted=halted)
                    self.save()
            for r in range(S):
                if self.histories[r].stop_reason is None:
                    self.histories[r].stop_reason = "num_steps"
            if self.eval_fn is not None:
                final = [r for r in range(S) if last_train[r] is not None and last_eval[r] != last_train[r]
                         and self.histories[r].stop_reason != "non_finite"]
                if final:
                    out = jax.device_get(evaluate_all(state))
                    for r in final:
                        m = _to_floats("eval_fn", {key: (v[r] if lockstep else v) for key, v in out.items()})
                        self.histories[r].eval.append({"step": last_train[r], **m})
        finally:
            self.close_bar()
            self.save()
        return self.result(state)

    def _rows(self, metrics, n):
        """Host metrics ``{name: [n, (S)]}`` as ``rows[i][r] = {name: float}`` (loss, grad_norm first)."""
        order = [key for key in ("loss", "grad_norm") if key in metrics]
        order += [key for key in metrics if key not in order]
        S = self.runs
        arrays = {}
        for key in order:
            a = np.asarray(metrics[key], dtype=np.float64)
            if a.size != n * S:
                raise ValueError(
                    f"seqjax.train.fit: train_step metric {key!r} must be a scalar, got shape "
                    f"{a.shape[1:] if self.num_runs is None else a.shape[2:]}")
            arrays[key] = a.reshape(n, S)
        _check_loss(arrays)
        return [[{key: float(arrays[key][i, r]) for key in order} for r in range(S)] for i in range(n)]
