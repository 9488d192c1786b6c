#!/usr/bin/env python
"""Two-integer comparison (seed 004, Desai 2017): does the vanilla RNN fail, and why does the published code stall?

The task (``seqjax.tasks.compare_dataset``): a sequence is two integers in
1..9 (2 steps x 1 feature); the label is 1 when the first is larger, else 0
(ties give 0, so the majority class is 0 with probability 45/81 ~ 55.6%).
16 000 sequences, ordered split 8000 train / 4000 validation / 4000 test, as
the original loader (``krikos/examples/RecurrentTestLoader.py``).

The original model (``krikos/examples/recurrent.py``): LSTM(1->4) (or
VanillaRNN(1->4)) over both steps, ReLU, flatten to 8, Linear(8->2), softmax
cross-entropy; plain SGD lr 1e-3 with L2 0.01 on every parameter, random
batches of 16, 10 000 iterations, N(0, 0.01^2) LSTM and Linear weights
(``VanillaRNN`` draws N(0, 1)), zero biases, the raw integers as inputs.

The tutorial makes two claims this script tests:

1. **"The vanilla RNN doesn't work"** on this task (blamed on vanishing or
   exploding gradients), while the LSTM does. Part 1 trains both cells with
   the same fair setup and budget: Adam 1e-2 on the batch-mean cross-entropy,
   gradients clipped to norm 1, seqjax's default initialisation (LeCun-normal
   input weights, orthogonal recurrent weights, LSTM forget bias 1), inputs
   scaled by 1/9, random batches of 16, up to 10 000 iterations, early stop at
   100% validation accuracy.
2. **Run as published, the code stalls at the majority class** (~56% test
   accuracy; ``--as-published``). Part 2 trains the tutorial's settings and
   takes them apart one at a time to find why:

   * *published gradients*: the tutorial's settings with the code's loss
     gradient. Its labels have shape (N, 1), so ``dloss[indices, y] -= 1``
     broadcasts to every (row, label-in-the-batch) pair: each row's logit
     gradient becomes ``softmax - 1[class occurs in the batch]``, which for any
     batch holding both classes is ``p - (1, 1)`` for every row, the same
     whatever that row's label. The gradient is also summed over the batch,
     not averaged, and the LSTM clips its weight gradients from above at 1
     (``np.clip(dW, a_max=1)``). This script reproduces those three exactly
     (a surrogate loss whose gradient is the published one, and an optax
     transform for the clip); the published LSTM backward pass is also wrong,
     which is not reproduced, and no backward pass can matter once the logit
     gradient carries no label.
   * *tutorial settings*: the same hyperparameters with correct gradients.
   * one change at a time from those: the published gradients with the labels'
     shape fixed (summed over the batch, so 16x the step, and clipped), no L2,
     inputs scaled by 1/9, seqjax's initialisation, Adam 1e-2.

   Diagnostics recorded at every evaluation: training cross-entropy against
   the majority-class entropy (0.687 nats: the loss of predicting the class
   prior, which the head's bias alone reaches), the data-gradient norm, the
   parameter norm of the recurrent cell and of the head, and the spread (sd
   over the validation set) of the logit difference, which is 0 for a model
   that ignores its input.

Every setup trains its seeds in lockstep with ``seqjax.fit(num_runs=...)``.

Usage::

    python examples/compare.py --quick          # both parts, 2 seeds, <= 3000 iterations (~40 s on 2 CPU cores)
    python examples/compare.py                  # both parts, 10 seeds, up to 10 000 iterations (the full study)
    python examples/compare.py --as-published   # part 2 only
    python examples/compare.py --out runs/x     # where results.json and the PNGs go
"""
from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import seqjax
from seqjax.tasks import COMPARE_SPLITS, compare_dataset
from _report import write_results  # examples/_report.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

ORIGINAL = dict(model="{LSTM,VanillaRNN}(1->4) -> ReLU -> flatten(8) -> Linear(8->2)", optimizer="sgd", lr=1e-3,
                l2=0.01, batch=16, iterations=10_000, init="LSTM, Linear: N(0, 0.01^2); VanillaRNN: N(0, 1); biases 0",
                inputs="raw integers 1..9", reported_test_accuracy_as_published=0.56,
                source="ShubhangDesai/krikos @1d980e6 examples/recurrent.py, krikos/nn/{layer,loss,network}.py")
"""The published code's settings (tasks.md §4); its ~56% is the majority class."""

FAIR = dict(optimizer="adam", lr=1e-2, clip_norm=1.0, l2=0.0, scale=1.0 / 9.0, init="seqjax", grads="correct")
"""Part 1, the same for both cells: Adam 1e-2 on the batch-mean cross-entropy, clipped to norm 1, seqjax's
default initialisation (LeCun-normal inputs, orthogonal recurrence, LSTM forget bias 1), inputs scaled to (0, 1]."""

PUBLISHED = dict(optimizer="sgd", lr=1e-3, clip_norm=None, l2=0.01, scale=1.0, init="published", grads="correct")
"""The tutorial's hyperparameters (correct, batch-mean gradients unless ``grads`` says otherwise)."""

COMMON = dict(hidden=4, batch=16, max_iterations=10_000, eval_every=250, target_valid_accuracy=1.0, data_seed=4)

SETUPS = {
    # part 1: the fair comparison
    "lstm_fair": dict(part="fair", cell="lstm", label="LSTM, fair setup (Adam)", **FAIR),
    "rnn_fair": dict(part="fair", cell="rnn", label="vanilla RNN, fair setup (Adam)", **FAIR),
    # part 2: the tutorial's settings and what each of them does
    "lstm_published_grads": dict(part="published", cell="lstm", label="LSTM, published gradients",
                                 **{**PUBLISHED, "grads": "published"}),
    "rnn_published_grads": dict(part="published", cell="rnn", label="RNN, published gradients",
                                **{**PUBLISHED, "grads": "published"}),
    "lstm_tutorial": dict(part="published", cell="lstm", label="LSTM, tutorial settings", **PUBLISHED),
    "rnn_tutorial": dict(part="published", cell="rnn", label="RNN, tutorial settings (N(0,1) init)", **PUBLISHED),
    "lstm_labels_fixed": dict(part="published", cell="lstm", label="  + published gradients, labels fixed",
                              **{**PUBLISHED, "grads": "labels_fixed"}),
    "lstm_no_l2": dict(part="published", cell="lstm", label="  + no L2", **{**PUBLISHED, "l2": 0.0}),
    "lstm_scaled": dict(part="published", cell="lstm", label="  + inputs / 9", **{**PUBLISHED, "scale": 1.0 / 9.0}),
    "lstm_seqjax_init": dict(part="published", cell="lstm", label="  + seqjax init",
                             **{**PUBLISHED, "init": "seqjax"}),
    "lstm_adam": dict(part="published", cell="lstm", label="  + Adam 1e-2", **{**PUBLISHED, "optimizer": "adam",
                                                                             "lr": 1e-2}),
}
"""Every trained setup. ``grads``: ``correct`` (batch mean), ``published`` (the code's label-broadcast gradient,
summed over the batch, LSTM gradients clipped from above at 1) or ``labels_fixed`` (the published gradient with
the labels' shape fixed: the batch-summed cross-entropy, LSTM gradients clipped from above at 1)."""

FULL = dict(seeds=10, max_iterations=COMMON["max_iterations"], setups=tuple(SETUPS))
QUICK = dict(seeds=2, max_iterations=3_000, setups=("lstm_fair", "rnn_fair", "lstm_published_grads", "lstm_tutorial",
                                                    "lstm_labels_fixed", "lstm_adam"))

MAJORITY_ENTROPY = -(45 / 81 * math.log(45 / 81) + 36 / 81 * math.log(36 / 81))
"""Cross-entropy (nats) of predicting the class prior 45/81 : 36/81, the loss a model ignoring its input reaches."""


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

def load_data(seed: int = COMMON["data_seed"]):
    """The fixed 8000/4000/4000 ordered split: each part x [n, 2, 1] float32, y [n] int32."""
    return compare_dataset(jax.random.key(seed), COMPARE_SPLITS)


def majority_baseline(y_train, y_test):
    """Accuracy of always predicting the training set's majority class."""
    majority = int(np.bincount(np.asarray(y_train), minlength=2).argmax())
    return majority, float(np.mean(np.asarray(y_test) == majority))


# ----------------------------------------------------------------------------
# model (functional: params are a plain pytree)
# ----------------------------------------------------------------------------

def make_cell(kind: str, init: str, hidden: int = COMMON["hidden"]):
    """``seqjax.lstm`` / ``seqjax.rnn`` (tanh) with seqjax's default or the published initialisation."""
    if init == "published":
        std = 0.01 if kind == "lstm" else 1.0          # krikos LSTM: randn * 0.01; VanillaRNN: randn
        w = jax.nn.initializers.normal(std)
        opts = dict(kernel_init=w, recurrent_init=w)
        return seqjax.lstm(hidden, forget_bias=0.0, **opts) if kind == "lstm" else seqjax.rnn(hidden, **opts)
    return seqjax.lstm(hidden, forget_bias=1.0) if kind == "lstm" else seqjax.rnn(hidden)


def init_params(key, cell, init: str, hidden=COMMON["hidden"], steps=2, classes=2):
    """``{"cell": cell params, "head": {"w": [2H, 2], "b": [2]}}``."""
    k_cell, k_head = jax.random.split(key)
    if init == "published":                              # krikos Linear: randn * 0.01, zero bias
        w = 0.01 * jax.random.normal(k_head, (steps * hidden, classes))
    else:
        w = jax.nn.initializers.lecun_normal()(k_head, (steps * hidden, classes))
    return dict(cell=cell.init(k_cell, input_size=1), head=dict(w=w, b=jnp.zeros((classes,))))


def forward(cell, params, x, scale):
    """x [B, 2, 1] -> logits [B, 2]: the cell over both steps, ReLU, flatten to 2*H, linear head."""
    _, ys = seqjax.scan(cell, params["cell"], x * scale)          # ys [B, 2, H]
    feats = jax.nn.relu(ys).reshape(ys.shape[0], -1)              # [B, 2H] = [B, 8]
    return feats @ params["head"]["w"] + params["head"]["b"]


def published_surrogate(logits, y):
    """A loss whose gradient is the published code's: ``d/dlogits[i] = softmax(logits[i]) - present``.

    ``present[c] = 1`` if class ``c`` occurs anywhere in the batch (krikos's ``dloss[indices, y] -= 1`` with
    labels of shape (N, 1)), summed over the batch rather than averaged.

    Args:
      logits: [B, 2] float32.  y: [B] int32.

    Returns:
      [] float32 (its value means nothing; only its gradient is the published one).
    """
    present = jax.lax.stop_gradient(jnp.max(jax.nn.one_hot(y, logits.shape[-1]), axis=0))   # [C]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - logits @ present)


def make_loss(cell, setup):
    """``loss_fn(params, (x, y)) -> (loss to differentiate, {"ce": batch-mean cross-entropy, "accuracy"})``."""
    scale, grads = setup["scale"], setup["grads"]

    def loss_fn(params, batch):
        x, y = batch
        logits = forward(cell, params, x, scale)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        loss = {"correct": ce.mean(), "labels_fixed": ce.sum(), "published": published_surrogate(logits, y)}[grads]
        return loss, dict(ce=ce.mean(), accuracy=jnp.mean(jnp.argmax(logits, -1) == y))

    return loss_fn


def upper_clip(limit: float, where: str = "cell") -> optax.GradientTransformation:
    """``min(g, limit)`` on ``params[where]``'s gradients only (krikos's ``np.clip(dW, a_max=1)`` in LSTM.backward)."""
    def update(updates, state, params=None):
        return {**updates, where: jax.tree.map(lambda g: jnp.minimum(g, limit), updates[where])}, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(setup) -> optax.GradientTransformation:
    """SGD or Adam; L2 ``l2 * sum(p^2)`` added as its gradient ``2 * l2 * p`` (krikos's L2.backward)."""
    parts = []
    if setup["grads"] in ("published", "labels_fixed") and setup["cell"] == "lstm":
        parts.append(upper_clip(1.0))
    if setup["l2"]:
        parts.append(optax.add_decayed_weights(2.0 * setup["l2"]))
    parts.append({"adam": optax.adam, "sgd": optax.sgd}[setup["optimizer"]](setup["lr"]))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------
# train: one seqjax.fit call per setup, all seeds in lockstep
# ----------------------------------------------------------------------------

def train_setup(name, data, *, seeds, max_iterations, scale_override=None):
    """Trains ``seeds`` models of one setup in lockstep; returns a summary dict (see ``summarise``)."""
    setup = dict(SETUPS[name])
    if scale_override is not None and setup["part"] == "fair":
        setup["scale"] = scale_override
    cell = make_cell(setup["cell"], setup["init"])
    tx = make_optimizer(setup)
    step = seqjax.make_train_step(make_loss(cell, setup), tx, clip_norm=setup["clip_norm"], has_aux=True)
    params = jax.vmap(lambda k: init_params(k, cell, setup["init"]))(jax.vmap(jax.random.key)(jnp.arange(seeds)))
    states = jax.vmap(lambda p: seqjax.init_state(p, tx))(params)
    tr_x, tr_y = data.train.x, data.train.y
    n = tr_x.shape[0]

    def batches(key):                                    # random batches of 16, as the original
        idx = jax.random.randint(key, (COMMON["batch"],), 0, n)
        return tr_x[idx], tr_y[idx]

    def eval_fn(state):
        p = state.params
        logits = forward(cell, p, data.valid.x, setup["scale"])
        diff = logits[:, 1] - logits[:, 0]
        pred = jnp.argmax(logits, -1)
        train_pred = jnp.argmax(forward(cell, p, tr_x, setup["scale"]), -1)
        return dict(valid_accuracy=jnp.mean(pred == data.valid.y), train_accuracy=jnp.mean(train_pred == tr_y),
                    valid_ce=optax.softmax_cross_entropy_with_integer_labels(logits, data.valid.y).mean(),
                    predicted_majority=jnp.mean(pred == 0), logit_spread=jnp.std(diff),
                    cell_norm=optax.tree.norm(p["cell"]), head_norm=optax.tree.norm(p["head"]["w"]),
                    head_bias_diff=p["head"]["b"][1] - p["head"]["b"][0])

    every = COMMON["eval_every"]
    t0 = time.perf_counter()
    states, hists = seqjax.fit(step, states, batches, num_steps=max_iterations, eval_fn=eval_fn, eval_every=every,
                               steps_per_call=every, target=("valid_accuracy", COMMON["target_valid_accuracy"]),
                               num_runs=seeds, seed=1000, progress=False)
    seconds = time.perf_counter() - t0
    test_acc = jax.vmap(lambda p: jnp.mean(jnp.argmax(forward(cell, p, data.test.x, setup["scale"]), -1)
                                           == data.test.y))(states.params)
    return summarise(name, setup, hists, np.asarray(test_acc), seconds)


def stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return dict(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()),
                per_seed=[float(a) for a in v])


CURVE_WINDOW, CURVE_EVERY = 50, 100
"""Per-step curves are stored as moving averages over CURVE_WINDOW steps, one point every CURVE_EVERY steps."""


def smoothed(v) -> list:
    """Moving average of a per-step series over CURVE_WINDOW steps, kept every CURVE_EVERY steps (6 digits).

    Point ``i`` averages steps ``i * CURVE_EVERY + 1 .. i * CURVE_EVERY + CURVE_WINDOW``.
    """
    v = np.asarray(v, dtype=float)
    k = min(CURVE_WINDOW, len(v))
    return [float(f"{a:.6g}") for a in np.convolve(v, np.ones(k) / k, mode="valid")[::CURVE_EVERY]]


def curve_steps(curve) -> np.ndarray:
    """The last step each point of a `smoothed` curve averages."""
    return np.arange(len(curve)) * CURVE_EVERY + CURVE_WINDOW


def spread_growth(steps, spread) -> dict:
    """Exponential growth of the logit spread over the second half of the evaluations.

    Fits ``log spread = a + rate * step``; ``iterations_to_1`` extrapolates when the spread would reach 1 (the
    scale at which the output depends on the input enough to classify), ``None`` when it is not growing.
    """
    steps, spread = np.asarray(steps, float), np.asarray(spread, float)
    half = slice(len(steps) // 2, None)
    if len(steps[half]) < 2 or np.any(spread[half] <= 0):
        return dict(rate_per_1000=None, iterations_to_1=None)
    rate = float(np.polyfit(steps[half], np.log(spread[half]), 1)[0])
    to_1 = float(steps[-1] + np.log(1.0 / spread[-1]) / rate) if rate > 0 and spread[-1] < 1 else None
    return dict(rate_per_1000=1000 * rate, iterations_to_1=to_1)


def summarise(name, setup, hists, test_acc, seconds) -> dict:
    """Per-seed finals, learning curves and diagnostics of one setup."""
    runs = []
    for seed, (h, acc) in enumerate(zip(hists, test_acc)):
        tr_steps, ce = h.series("ce")
        _, gn = h.series("grad_norm")
        ev = {k: [float(f"{v:.6g}") for v in h.series(k, "eval")[1]] for k in ("valid_accuracy", "train_accuracy", "valid_ce",
                                                           "predicted_majority", "logit_spread", "cell_norm",
                                                           "head_norm", "head_bias_diff")}
        last = max(1, len(ce) // 10)
        runs.append(dict(seed=seed, test_accuracy=float(acc), iterations=int(tr_steps[-1]), stop_reason=h.stop_reason,
                         final_train_ce=float(np.mean(ce[-last:])), eval_steps=h.series("valid_accuracy", "eval")[0]
                         .tolist(), eval=ev, train_ce_ma50=smoothed(ce),
                         grad_norm_ma50=smoothed(gn),
                         spread_growth=spread_growth(h.series("logit_spread", "eval")[0], ev["logit_spread"])))
    return dict(setup=name, label=setup["label"], part=setup["part"], cell=setup["cell"], settings=setup,
                test_accuracy=stats(test_acc), seeds_at_99pct=int(np.sum(test_acc >= 0.99)),
                iterations=[r["iterations"] for r in runs], stop_reasons=[r["stop_reason"] for r in runs],
                final_train_ce=stats([r["final_train_ce"] for r in runs]),
                predicted_majority=stats([r["eval"]["predicted_majority"][-1] for r in runs]),
                logit_spread=stats([r["eval"]["logit_spread"][-1] for r in runs]),
                seconds=seconds, runs=runs)


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

STALL_MARGIN = 0.01
"""A seed has stalled when its validation cross-entropy is within this many nats of the majority-class entropy
(or above it): it has learned nothing beyond the class prior."""


def stalled_seeds(s) -> list:
    """Per seed: whether the final validation cross-entropy is >= the majority-class entropy - STALL_MARGIN."""
    return [r["eval"]["valid_ce"][-1] >= MAJORITY_ENTROPY - STALL_MARGIN for r in s["runs"]]


def verdicts(res, baseline) -> dict:
    out = {}
    if "lstm_fair" in res and "rnn_fair" in res:
        lstm, rnn = res["lstm_fair"], res["rnn_fair"]
        n = len(rnn["test_accuracy"]["per_seed"])
        holds = rnn["seeds_at_99pct"] < lstm["seeds_at_99pct"] or rnn["test_accuracy"]["mean"] < 0.9
        out["vanilla_rnn_does_not_work"] = (
            f"{'holds' if holds else 'does not hold'}: with the same fair setup and budget the vanilla RNN reaches "
            f"{100 * rnn['test_accuracy']['mean']:.2f} % test accuracy ({rnn['seeds_at_99pct']}/{n} seeds >= 99 %, "
            f"median {int(np.median(rnn['iterations']))} iterations), the LSTM "
            f"{100 * lstm['test_accuracy']['mean']:.2f} % ({lstm['seeds_at_99pct']}/{n}, median "
            f"{int(np.median(lstm['iterations']))} iterations)")
    for name in ("lstm_published_grads", "rnn_published_grads"):
        if name not in res:
            continue
        s = res[name]
        st = stalled_seeds(s)
        ce = [r["eval"]["valid_ce"][-1] for r in s["runs"]]
        ties = sum(r["eval"]["logit_spread"][-1] == 0.0 for r in s["runs"])
        acc = s["test_accuracy"]
        out[f"{name}_stall"] = (
            f"{'stalls' if all(st) else 'does not stall'} on {sum(st)}/{len(st)} seeds: {s['cell'].upper()} with the "
            f"published gradients ends at validation cross-entropy {min(ce):.4f}-{max(ce):.4f} (ln 2 = "
            f"{math.log(2):.4f}: a uniform output, not even the class prior), logit spread "
            f"{s['logit_spread']['mean']:.1g}; {ties} seed(s) end with the two logits exactly equal, where argmax "
            f"picks class 0 and scores the majority's {100 * baseline:.2f} %; the others' "
            f"{100 * acc['min']:.1f}-{100 * acc['max']:.1f} % is the sign of a logit difference of that size")
    if "lstm_tutorial" in res:
        s = res["lstm_tutorial"]
        st = stalled_seeds(s)
        to1 = [r["spread_growth"]["iterations_to_1"] for r in s["runs"]]
        rates = [r["spread_growth"]["rate_per_1000"] for r in s["runs"]]
        grown = [t for t in to1 if t is not None]
        grow = (f"; the logit spread grows by e^{np.median([r for r in rates if r is not None]):.2f} per 1000 "
                f"iterations and would reach 1 after about {int(np.median(grown)):,} iterations (median of "
                f"{len(grown)} seeds)" if grown else "")
        at_majority = sum(abs(a - baseline) < 0.5 / COMPARE_SPLITS[2] for a in s["test_accuracy"]["per_seed"])
        n = len(st)
        out["lstm_tutorial_settings"] = (
            f"{'stalls' if at_majority == n else 'learns'}: with the tutorial's hyperparameters and correct gradients "
            f"{at_majority}/{n} seeds end at exactly the majority class's {100 * baseline:.2f} % test accuracy after "
            f"{int(np.median(s['iterations'])):,} iterations and {sum(st)}/{n} within {STALL_MARGIN} nats of the "
            f"majority-class entropy {MAJORITY_ENTROPY:.4f} (training cross-entropy {s['final_train_ce']['mean']:.4f}; "
            f"the head's bias has learned the class prior), logit spread {s['logit_spread']['mean']:.2g}{grow}")
    for name in (n for n in res if res[n]["part"] == "published"):
        out.setdefault("stalled_seeds", {})[name] = int(sum(stalled_seeds(res[name])))
    return out


def print_table(res, baseline, majority):
    print("\nTwo-integer comparison: test accuracy % on 4000 sequences")
    print(f"{'setup':<42} {'seeds':>5}  {'mean ± sd':>14}  {'[min, max]':>16}  {'>=99%':>5}  {'iters':>6}  "
          f"{'train CE':>8}  {'->0 %':>5}  {'stalled':>7}")
    print(f"{'majority class (always ' + str(majority) + ')':<42} {'-':>5}  {100 * baseline:14.2f}  "
          f"{'':>16}  {'':>5}  {'':>6}  {MAJORITY_ENTROPY:8.4f}  {100:5.0f}")
    print(f"{'published code, run as published (§4)':<42} {2:>5}  {'~56':>14}")
    part = None
    for s in res.values():
        if s["part"] != part:
            part = s["part"]
            print({"fair": "-- part 1: fair setup --", "published": "-- part 2: the tutorial's settings --"}[part])
        t = s["test_accuracy"]
        n = len(t["per_seed"])
        print(f"{s['label']:<42} {n:>5}  {100 * t['mean']:7.2f} ± {100 * t['std']:4.2f}  "
              f"[{100 * t['min']:6.2f}, {100 * t['max']:6.2f}]  {s['seeds_at_99pct']:>2}/{n:<2}  "
              f"{int(np.median(s['iterations'])):>6}  {s['final_train_ce']['mean']:8.4f}  "
              f"{100 * s['predicted_majority']['mean']:5.1f}  {sum(stalled_seeds(s)):>3}/{n:<3}")
    print("(iters: median iterations run, stopping at 100 % validation accuracy; train CE: batch cross-entropy over "
          "the last tenth; ->0 %: validation sequences predicted as class 0;\n stalled: seeds whose validation "
          f"cross-entropy ends within {STALL_MARGIN} nats of the majority-class entropy or above it)")
    for s in res.values():
        print(f"  {s['setup']}: per seed " + ", ".join(f"{100 * a:.2f}%" for a in s["test_accuracy"]["per_seed"]))


def _mean_curve(runs, key, sub=None):
    """Mean over seeds of a per-run curve, padding stopped runs with their last value."""
    curves = [r[key] if sub is None else r[key][sub] for r in runs]
    n = max(len(c) for c in curves)
    return np.mean([np.pad(np.asarray(c, float), (0, n - len(c)), mode="edge") for c in curves], axis=0)


def plot_fair(res, baseline, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(lstm="C0", rnn="C3")
    for s in (v for v in res.values() if v["part"] == "fair"):
        for i, r in enumerate(s["runs"]):
            lab = s["label"] if i == 0 else None
            axes[0].plot(r["eval_steps"], r["eval"]["valid_accuracy"], marker=".", color=colors[s["cell"]],
                         alpha=0.6, label=lab)
            axes[1].plot(curve_steps(r["train_ce_ma50"]), r["train_ce_ma50"], color=colors[s["cell"]],
                         alpha=0.6, label=lab)
    axes[0].axhline(baseline, ls="--", color="gray", label=f"majority class ({100 * baseline:.1f}%)")
    axes[0].set_xlabel("iteration (batch of 16)")
    axes[0].set_ylabel("validation accuracy (4000)")
    axes[0].set_title("Fair setup: {LSTM, RNN}(1->4) + Linear(8->2), Adam, one line per seed", fontsize=9)
    axes[0].legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("training cross-entropy (moving average of 50)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_published(res, baseline, path):
    """Why the tutorial's settings stall: accuracy, loss vs the majority entropy, gradient and weight norms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    rows = [s for s in res.values() if s["part"] == "published"]
    for i, s in enumerate(rows):
        c, ls = f"C{i % 10}", "-" if s["cell"] == "lstm" else "--"
        steps = max((r["eval_steps"] for r in s["runs"]), key=len)
        lab = s["label"].strip()
        axes[0, 0].plot(steps, _mean_curve(s["runs"], "eval", "valid_accuracy"), color=c, ls=ls, label=lab)
        ce = _mean_curve(s["runs"], "train_ce_ma50")
        axes[0, 1].plot(curve_steps(ce), ce, color=c, ls=ls, label=lab)
        gn = _mean_curve(s["runs"], "grad_norm_ma50")
        axes[1, 0].plot(curve_steps(gn), gn, color=c, ls=ls, label=lab)
        axes[1, 1].plot(steps, _mean_curve(s["runs"], "eval", "logit_spread"), color=c, ls=ls, label=lab)
    axes[0, 0].axhline(baseline, ls=":", color="k", label=f"majority class ({100 * baseline:.1f}%)")
    axes[0, 0].set_ylabel("validation accuracy (mean over seeds)")
    axes[0, 1].axhline(MAJORITY_ENTROPY, ls=":", color="k", label=f"majority-class entropy {MAJORITY_ENTROPY:.3f}")
    axes[0, 1].axhline(math.log(2), ls="-.", color="gray", label=f"ln 2 = {math.log(2):.3f} (uniform output)")
    axes[0, 1].set_ylabel("training cross-entropy (moving average of 50)")
    axes[1, 0].set_yscale("log")
    axes[1, 0].set_ylabel("norm of the loss gradient (moving average of 50)")
    axes[1, 1].set_yscale("log")
    axes[1, 1].set_ylabel("sd of logit(1) - logit(0) over the validation set")
    for ax in axes.flat:
        ax.set_xlabel("iteration (batch of 16)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    h2, l2 = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles + h2[-2:], labels + l2[-2:], loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("The tutorial's settings (SGD 1e-3, L2 0.01, N(0, 0.01²) init, raw inputs), then one change at a "
                 "time; dashed: RNN", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short version (2 seeds, <= 3000 iterations)")
    g.add_argument("--full", action="store_true", help="the full study (default)")
    p.add_argument("--as-published", action="store_true", help="only part 2: the tutorial's settings, taken apart")
    p.add_argument("--out", default="runs/compare", help="output directory (results.json, *.png)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    p.add_argument("--no-scale", action="store_true", help="part 1 feeds the raw integers 1..9 (as the original)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.as_published:
        cfg["setups"] = tuple(k for k in cfg["setups"] if SETUPS[k]["part"] == "published")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"seqjax two-integer comparison ({'quick' if args.quick else 'full'}), jax {jax.__version__} on "
          f"{jax.default_backend()}; {cfg['seeds']} seeds, up to {cfg['max_iterations']} iterations per setup")

    data = load_data()
    majority, baseline = majority_baseline(data.train.y, data.test.y)
    print(f"data: train/valid/test = {data.train.x.shape[0]}/{data.valid.x.shape[0]}/{data.test.x.shape[0]}; "
          f"majority class {majority}: test accuracy {100 * baseline:.2f}%")

    res = {}
    for name in cfg["setups"]:
        res[name] = train_setup(name, data, seeds=cfg["seeds"], max_iterations=cfg["max_iterations"],
                                scale_override=1.0 if args.no_scale else None)
        s = res[name]
        print(f"  {s['label']:<42} test {100 * s['test_accuracy']['mean']:6.2f}%  ({s['seconds']:.1f}s)", flush=True)

    print_table(res, baseline, majority)
    verdict = verdicts(res, baseline)
    print()
    for k, v in verdict.items():
        print(f"{k}: {v}")
    print(f"(a seed stalls when its validation cross-entropy ends within {STALL_MARGIN} nats of the majority-class "
          f"entropy or above it)")

    plots = {}
    if any(s["part"] == "fair" for s in res.values()):
        plots["learning_curves"] = "compare_learning_curves.png"
        plot_fair(res, baseline, os.path.join(args.out, plots["learning_curves"]))
    if any(s["part"] == "published" for s in res.values()):
        plots["as_published"] = "compare_as_published.png"
        plot_published(res, baseline, os.path.join(args.out, plots["as_published"]))
    results = dict(mode="quick" if args.quick else "full", config=cfg, common=COMMON, original_settings=ORIGINAL,
                   splits=list(COMPARE_SPLITS), majority_class=majority, majority_baseline_test_accuracy=baseline,
                   majority_entropy=MAJORITY_ENTROPY, verdicts=verdict, results=res, plots=plots)
    return write_results(args.out, results, list(plots.values()), t0)


if __name__ == "__main__":
    main()
