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
      state: the last good state (the bad update was not applied).
      metrics: the metrics (floats) reported by the bad step.
      history: the :class:`History` recorded up to the failure.
    """

    def __init__(self, step: int, state: Any, metrics: dict, history: "History"):
        self.step = step
        self.state = state
        self.metrics = metrics
        self.history = history
        what = ", ".join(
            f"{k}={metrics[k]}" for k in ("loss", "grad_norm") if k in metrics
        )
        super().__init__(
            f"seqjax.train.fit: non-finite value at step {step} ({what}); "
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
) -> tuple[Any, History]:
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

    Args:
      train_step: ``(state, batch) -> (state, metrics)``; ``metrics`` is a
        dict of scalars including ``"loss"``.
      state: the initial state.
      batches: an iterable/iterator of batches, or a callable ``key -> batch``
        called with ``jax.random.fold_in(jax.random.key(seed), step)`` so the
        data stream is a deterministic function of ``seed`` and the step.
      num_steps: number of steps to run (> 0).
      eval_fn: optional ``state -> dict of scalar metrics`` (e.g.
        ``{"accuracy": ...}``), run every ``eval_every`` steps and at the end.
      eval_every: evaluation period in steps; default ``max(1, num_steps // 10)``.
      target: optional ``(name, value)`` or ``(name, value, "max"|"min")``:
        stop when the metric reaches ``value`` (``"min"`` is the default for
        names containing loss/error/mse, ``"max"`` otherwise). Checked on eval
        metrics when ``eval_fn`` is given, else on train metrics each step.
      progress: show a tqdm bar with live loss / accuracy.
      log_path: optional path stem; the history is written to
        ``<log_path>.json`` and ``<log_path>.csv`` at each evaluation and at
        the end (also when stopping on an error).
      seed: seed for callable ``batches``.

    Returns:
      ``(state, history)``: the final state and a :class:`History`.

    Raises:
      NonFiniteLossError: a step produced a NaN/inf loss or grad norm; the
        error carries ``.step`` and the last good ``.state``.

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
    """
    if not callable(train_step):
        raise TypeError(
            f"seqjax.train.fit: train_step must be callable (state, batch) -> "
            f"(state, metrics), got {type(train_step).__name__}")
    if not (isinstance(num_steps, (int, np.integer)) and num_steps > 0):
        raise ValueError(
            f"seqjax.train.fit: num_steps must be a positive int, got {num_steps!r}")
    if eval_every is None:
        eval_every = max(1, int(num_steps) // 10)
    if not (isinstance(eval_every, (int, np.integer)) and eval_every > 0):
        raise ValueError(
            f"seqjax.train.fit: eval_every must be a positive int, got {eval_every!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("seqjax.train.fit: eval_fn must be callable state -> dict")
    tgt = _parse_target(target)

    if callable(batches) and not hasattr(batches, "__next__"):
        base_key = jax.random.key(seed)
        def next_batch(step):
            return batches(jax.random.fold_in(base_key, step))
    else:
        try:
            it = iter(batches)
        except TypeError:
            raise TypeError(
                "seqjax.train.fit: batches must be an iterable of batches or a "
                f"callable key -> batch, got {type(batches).__name__}") from None
        def next_batch(step):
            return next(it)

    history = History()
    start = _state_step(state)
    t0 = time.perf_counter()

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(num_steps), desc="train", dynamic_ncols=True)

    def save():
        history.wall_time = time.perf_counter() - t0
        if log_path is not None:
            history.save(log_path)

    def postfix(train_m):
        if bar is None:
            return
        pf = {"loss": f"{train_m['loss']:.4g}"}
        if "accuracy" in train_m:
            pf["acc"] = f"{train_m['accuracy']:.3f}"
        if history.eval:
            for k, v in history.eval[-1].items():
                if k != "step":
                    pf[f"eval_{k}"] = f"{v:.4g}"
        bar.set_postfix(pf, refresh=False)

    def evaluate(step):
        m = _to_floats("eval_fn", eval_fn(state))
        history.eval.append({"step": step, **m})
        save()
        return m

    try:
        last_eval_step = None
        for i in range(int(num_steps)):
            step = start + i + 1
            try:
                batch = next_batch(step - 1)
            except StopIteration:
                history.stop_reason = "data_exhausted"
                break
            state, metrics = train_step(state, batch)
            m = _to_floats("train_step", metrics)
            if "loss" not in m:
                raise ValueError(
                    "seqjax.train.fit: train_step metrics must include 'loss', "
                    f"got keys {sorted(m)}")
            if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm") if k in m):
                history.stop_reason = "non_finite"
                raise NonFiniteLossError(step, state, m, history)
            history.train.append({"step": step, **m})
            if bar is not None:
                bar.update(1)
            done = False
            if eval_fn is not None and (i + 1) % eval_every == 0:
                em = evaluate(step)
                last_eval_step = step
                done = tgt is not None and _reached(tgt, em)
            elif eval_fn is None and tgt is not None:
                done = _reached(tgt, m)
            postfix(m)
            if done:
                history.stop_reason = "target"
                break
        else:
            history.stop_reason = "num_steps"
        if (eval_fn is not None and history.train
                and last_eval_step != history.train[-1]["step"]):
            evaluate(history.train[-1]["step"])
    finally:
        if bar is not None:
            bar.close()
        save()
    return state, history
