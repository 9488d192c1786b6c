"""The compiled loop behind `seqjax.fit(..., num_runs=S, steps_per_call=k)`.

One jitted call runs ``k`` training steps with `jax.lax.scan`, for one run or for ``S`` runs in
lockstep (`jax.vmap` over a leading run axis of the state), so the host sees the metrics once per
``k`` steps instead of once per step. Each run has an *active* flag (it stops when it reaches its
target or, with ``on_non_finite="stop_run"``, when it produced a non-finite loss) and the loop as a
whole has a *halted* flag (with ``on_non_finite="raise"``, the first non-finite step of any run
freezes every run at its last good state, so the error's state is that of the step before).
Frozen runs keep computing in lockstep (their updates are discarded), which costs time but keeps
one compiled program.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _finite(metrics) -> jax.Array:
    ok = jnp.isfinite(metrics["loss"])
    if "grad_norm" in metrics:
        ok = ok & jnp.isfinite(metrics["grad_norm"])
    return ok


def _reached(target, metrics) -> jax.Array:
    name, value, mode = target
    v = metrics[name]
    return v >= value if mode == "max" else v <= value


def _select(mask, new, old):
    """Per-run ``where(mask[r], new[r], old[r])`` over a state whose leaves lead with the run axis."""
    def pick(n, o):
        m = jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(n) - mask.ndim))
        return jnp.where(m, n, o)
    return jax.tree.map(pick, new, old)


def make_chunk(train_step: Callable, batch_fn: Optional[Callable], *, num_runs: Optional[int], seed: int,
               train_target, stop_run: bool, place=None):
    """Builds ``chunk(state, step0, active, halted, data) -> (state, active, halted, metrics, bad)``.

    Args:
      train_step: ``(state, batch) -> (state, metrics)`` for one run.
      batch_fn: ``key -> batch`` (traceable), or ``None`` when the batches come in ``data``.
      num_runs: ``S`` for runs in lockstep (state leaves lead with ``[S]``), ``None`` for one run.
      seed: run ``r`` draws step ``i``'s batch from ``fold_in(key(seed + r), i)`` (one run: ``r = 0``).
      train_target: ``(name, value, mode)`` checked on each step's train metrics (a run stops right
        after the step that reaches it), or ``None``.
      stop_run: a non-finite step stops only its own run (else it halts every run).
      place: with a mesh, the `seqjax._fit_support.Placement` whose batch axis the drawn batches' rows are
        constrained to (the state and stacked batches come placed), else ``None``.

    The returned function is jitted (compiled once per step function, batch function and options);
    ``step0`` is the ``[]`` int32 global index of the chunk's first
    step (0-based), ``active``/``halted`` are ``[S]`` bool (``[]`` for one run), and ``data`` is
    ``[k]`` int32 step offsets (with ``batch_fn``) or the stacked batches ``[k, (S,) ...]``. The
    metrics come back as ``[k, (S)]`` arrays and ``bad`` as ``[k, (S)]`` bool (the non-finite steps
    of runs that were still training).
    """
    return functools.partial(_chunk, train_step=train_step, batch_fn=batch_fn, num_runs=num_runs, seed=seed,
                             train_target=train_target, stop_run=stop_run, place=place)


@functools.partial(jax.jit, static_argnames=("train_step", "batch_fn", "num_runs", "seed", "train_target",
                                             "stop_run", "place"))
def _chunk(state, step0, active, halted, data, *, train_step, batch_fn, num_runs, seed, train_target, stop_run,
           place):
    # The step and batch functions are static arguments, so JAX's jit cache reuses the compiled
    # chunk when `fit` is called again with the same ones (e.g. to resume).
    lockstep = num_runs is not None
    step = jax.vmap(train_step) if lockstep else train_step
    runs = jnp.arange(num_runs) if lockstep else None

    def draw(index):
        if lockstep:
            keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed + r), index))(runs)
            return jax.vmap(batch_fn)(keys)
        return batch_fn(jax.random.fold_in(jax.random.key(seed), index))

    def body(carry, x):
        state, active, halted, step0 = carry
        batch = draw(step0 + x) if batch_fn is not None else x
        if place is not None:
            batch = place.constrain(batch)
        new, metrics = step(state, batch)
        training = active & ~halted
        bad = training & ~_finite(metrics)
        if stop_run:
            state = _select(training & ~bad, new, state)
            active = active & ~bad
        else:  # the step that went bad is applied to no run: every run stays at its state before it
            state = _select(training & ~jnp.any(bad), new, state)
            halted = halted | jnp.any(bad)
        if train_target is not None:
            active = active & ~(training & ~bad & _reached(train_target, metrics))
        return (state, active, halted, step0), (metrics, bad)

    (state, active, halted, _), (metrics, bad) = jax.lax.scan(body, (state, active, halted, step0), data)
    return state, active, halted, metrics, bad


@functools.partial(jax.jit, static_argnames="fn")
def _vmapped(state, *, fn):
    return jax.vmap(fn)(state)


def vmapped(fn: Callable) -> Callable:
    """``jit(vmap(fn))``, compiled once per ``fn`` (lockstep evaluation)."""
    return functools.partial(_vmapped, fn=fn)


def stack_batches(where: str, batches: list) -> PyTree:
    """Stacks a list of batch pytrees on a new leading axis (the chunk's step axis)."""
    try:
        return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(v) for v in a]), *batches)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: the batches of one call must have the same structure and shapes ({e})") from None


def check_run_axis(where: str, state: PyTree, num_runs: int) -> None:
    """Every leaf of ``state`` must lead with ``[num_runs]``; the message names the first that does not."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        shape = np.shape(leaf)
        if not shape or shape[0] != num_runs:
            raise ValueError(
                f"{where}: with num_runs={num_runs} every leaf of state must lead with the run axis "
                f"[{num_runs}, ...] (stack the runs' states, e.g. jax.vmap(init)(keys)); "
                f"state{jax.tree_util.keystr(path)} has shape {shape}")


def check_pytree_state(where: str, state: PyTree) -> None:
    """The compiled loop carries the state through `jax.lax.scan`: it must be a pytree of arrays."""
    from flax import nnx

    stateful = lambda x: isinstance(x, nnx.Pytree)  # nnx modules and optimizers are updated in place
    for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=stateful):
        if stateful(leaf) or not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            raise TypeError(
                f"{where}: num_runs / steps_per_call > 1 run the steps inside one jitted call, so the state "
                f"must be a pytree of arrays (e.g. a TrainState from seqjax.init_state); "
                f"state{jax.tree_util.keystr(path)} is a {type(leaf).__name__}. For a flax.nnx model, train "
                f"its nnx.split state with make_train_step, or use steps_per_call=1 with make_nnx_train_step")
