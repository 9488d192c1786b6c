#!/usr/bin/env python
"""Adding problem (Hochreiter & Schmidhuber 1997, Experiment 4): LSTM vs GRU vs a vanilla RNN.

The 1997 variant (``seqjax.tasks.adding_problem``): each step is a pair
(value U[-1, 1], marker); lengths are random in [T, T + T/10] (right padding +
``lengths``); one of the first 10 pairs and one of the first T/2 - 1 are
marked 1, the first and last pairs -1; the target at the end is
``0.5 + (X1 + X2) / 4``. A sequence is correct when ``|error| < 0.04``.

What this script does:

1. trains an LSTM (and, for comparison, a GRU and a tanh RNN with the same
   settings and budget) to regress the target from the output at each
   sequence's last valid step (``SequenceClassifier(..., 1)`` with
   ``pooling="last"`` and ``lengths``), on freshly generated sequences
   (online, as H&S), several seeds in lockstep (``seqjax.fit(..., num_runs=S)``);
2. applies H&S's stopping rule *during* training: a model stops updating once
   the last 2000 training sequences (those of the last ``ceil(2000 / batch)``
   batches, judged on the predictions made while training on them) were all
   correct. Their second condition, mean training error < 0.01, is implied
   (every |error| < 0.04 gives a mean squared error < 0.0016) and is checked
   too on the same window;
3. reports the number of training sequences until the rule fired, and the test
   MSE and the number of wrong sequences out of 2560 test sequences at that
   point, against H&S's 74,000 sequences / 1 wrong (T = 100, mean of 10 trials; 209,000 / 0 at T = 500,
   853,000 / 1 at T = 1000);
4. plots the learning curves (training MSE against sequences seen).

Model and optimiser (tuned, not H&S's: theirs was 2 memory blocks of 2
cells, 93 weights, no forget gate, truncated gradients, online SGD lr 0.5):
``seqjax.nnx.LSTM(2, 16)`` with forget-gate bias 3 and input-gate bias -3
(H&S used input-gate biases -3 and -6: irrelevant inputs are not written into
memory by default), ``Linear(16, 1)``; MSE loss; Adam 1e-2 with global-norm
clipping at 1; batches of 32 fresh sequences. Tried on 3 seeds at T = 100:
Adam 3e-3 also solves every seed but about 1.5x slower; with the cell's
default biases learning starts later. Beyond T = 100 the LSTM's forget-gate
bias is chrono-initialised instead (``PER_T``: a bias of 3 keeps a memory for
about 20 steps and learns nothing at T = 500), and the default budget per T is
twice H&S's mean (``PER_T``).

Usage::

    python examples/adding.py --quick          # T = 50, 2 seeds, LSTM + RNN, ~1.5 min on 2 CPU cores
    python examples/adding.py                  # T = 100, 3 seeds, the full study (default)
    python examples/adding.py --T 500          # T = 500, LSTM, 3 seeds (H&S: 209,000 sequences)
    python examples/adding.py --T 1000         # T = 1000, LSTM, 3 seeds (H&S: 853,000 sequences)
    python examples/adding.py --quick --T 500  # a smoke run at T = 500 (3,200 sequences)
    python examples/adding.py --out runs/x     # where results.json and PNGs go
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
from flax import nnx

import seqjax
import seqjax.nnx as snx
from seqjax.tasks import ADDING_TOLERANCE, adding_correct, adding_problem
from _report import write_results  # examples/_report.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

SETTINGS = dict(hidden=16, batch=32, optimizer="adam", lr=1e-2, clip_norm=1.0, forget_bias=3.0,
                input_gate_bias=-3.0, rnn_activation="tanh", eval_every_sequences=3_200)
"""Shared by all cells (the forget / input-gate biases apply to the LSTM only)."""

HS = {100: (74_000, 1), 500: (209_000, 0), 1000: (853_000, 1)}
"""H&S 1997 Table 7: T -> (training sequences until the stopping rule, wrong out of 2560 test sequences)."""
HS_WINDOW = 2_000          # the last 2000 training sequences must all be correct ...
HS_MEAN_ERROR = 0.01       # ... and the mean training error below 0.01
TEST_SIZE = 2_560
TEST_SEED = 9001
CELLS = ("lstm", "gru", "rnn")

FULL = dict(T=100, seeds=3, cells=CELLS, budget=160_000)
QUICK = dict(T=50, seeds=2, cells=("lstm", "rnn"), budget=32_000)
QUICK_AT_T = dict(seeds=2, cells=("lstm",), budget=3_200)
"""``--quick --T N``: a smoke run at that T (one evaluation; far too short to learn a long T)."""

PER_T = {
    100: dict(budget=160_000, cells=CELLS, forget_bias=3.0),
    500: dict(budget=2 * HS[500][0], cells=("lstm",), forget_bias="chrono"),
    1000: dict(budget=2 * HS[1000][0], cells=("lstm",), forget_bias="chrono"),
}
"""Full-run defaults per T (``--T``; other T: as 1000 for T > 100, as 100 otherwise, budget 160,000).

| T    | budget (sequences per seed) | cells          | LSTM forget-gate bias |
|------|-----------------------------|----------------|-----------------------|
| 100  | 160,000 (H&S: 74,000)       | LSTM, GRU, RNN | 3                     |
| 500  | 418,000 (2 x H&S's 209,000) | LSTM           | chrono                |
| 1000 | 1,706,000 (2 x H&S's 853,000) | LSTM         | chrono                |

A seed stops when it meets H&S's rule, so a run costs the slowest seed's sequences, not the budget.
Beyond T = 100 only the LSTM (what H&S ran): the GRU and the RNN learn nothing in 160,000 sequences at
T = 100 already and would use the whole budget. A forget-gate bias of 3 (sigmoid 0.95: a memory time
constant of about 20 steps) learns nothing at T = 500 in 224,000 sequences; the chrono bias
``log(U[1, T + T/10 - 1])`` per unit (`chrono_forget_bias`) spans the task's lags from the start.
"""


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

def test_set(T: int, size: int = TEST_SIZE, seed: int = TEST_SEED):
    """A fixed right-padded test set: x [size, T + T//10, 2], y [size], lengths [size]."""
    return adding_problem(jax.random.key(seed), size, T)


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------

def input_gate_bias_init(hidden: int, value: float):
    """LSTM ``bias_init``: the input-gate block (first H of the (i, f, g, o) columns) at ``value``, the rest 0."""
    def init(key, shape, dtype=jnp.float32):
        return jnp.zeros(shape, dtype).at[:hidden].set(value)
    return init


def chrono_forget_bias(key, hidden: int, t_max: int):
    """``log(U[1, t_max - 1])`` per unit [hidden] (chrono initialisation, Tallec & Ollivier 2018)."""
    return jnp.log(jax.random.uniform(key, (hidden,), minval=1.0, maxval=float(t_max - 1)))


def build_model(kind: str, seed: int, s=SETTINGS, T: int = 100) -> snx.SequenceClassifier:
    """Recurrent layer (2 -> H) + ``Linear(H, 1)`` read at each sequence's last valid step.

    ``s["forget_bias"]``: a number, or ``"chrono"`` for `chrono_forget_bias` over the longest sequence
    (``T + T // 10``).
    """
    rngs = nnx.Rngs(seed)
    H = s["hidden"]
    if kind == "lstm":
        chrono = s["forget_bias"] == "chrono"
        layer = snx.LSTM(2, H, rngs=rngs, forget_bias=0.0 if chrono else s["forget_bias"],
                         bias_init=input_gate_bias_init(H, s["input_gate_bias"]))
        if chrono:   # gate columns (i, f, g, o)
            params = layer.get_params()[0]
            b_f = chrono_forget_bias(jax.random.key(seed + 7919), H, T + T // 10)
            layer.set_params((params._replace(b=params.b.at[H:2 * H].set(b_f)),))
    elif kind == "gru":
        layer = snx.GRU(2, H, rngs=rngs)
    else:
        layer = snx.RNN(2, H, rngs=rngs, activation=s["rnn_activation"])
    return snx.SequenceClassifier(layer, 1, pooling="last", rngs=rngs)


def make_optimizer(s=SETTINGS):
    tx = {"adam": optax.adam, "sgd": optax.sgd}[s["optimizer"]](s["lr"])
    return optax.chain(optax.clip_by_global_norm(s["clip_norm"]), tx) if s.get("clip_norm") else tx


def count_params(state) -> int:
    return int(sum(np.prod(a.shape[1:]) for a in jax.tree.leaves(state)))   # leading axis = seeds


# ----------------------------------------------------------------------------
# train: seqjax.fit, every seed in lockstep, one jitted call per evaluation period
# ----------------------------------------------------------------------------

def make_step(graphdef, tx, batch: int):
    """``step((state, run_len, done), batch) -> (carry, metrics)``: a `seqjax.make_train_step` step plus H&S's rule.

    ``run_len`` counts the consecutive fully-correct training batches (judged on the predictions the
    step trained on); once it reaches ``ceil(2000 / batch)`` the run is ``done`` and its later updates are
    dropped: H&S stop training there. `seqjax.fit` then stops the run at its next evaluation
    (``target=("solved", 1)``), so its state is the one at the moment the rule fired.
    """
    window = math.ceil(HS_WINDOW / batch)

    def loss_fn(params, b):
        p = predict(graphdef, params, b.x, b.lengths)
        return optax.losses.squared_error(p, b.y).mean(), dict(
            correct=jnp.sum(adding_correct(p, b.y)), max_abs_error=jnp.max(jnp.abs(p - b.y)))

    train_step = seqjax.make_train_step(loss_fn, tx, has_aux=True)

    def step(carry, b):
        state, run_len, done = carry
        new, m = train_step(state, b)
        state = jax.tree.map(lambda n, o: jnp.where(done, o, n), new, state)
        run_len = jnp.where(m["correct"] == batch, run_len + 1, 0)
        return (state, run_len, done | (run_len >= window)), {**m, "done": done.astype(jnp.float32)}

    return step


def predict(graphdef, params, x, lengths):
    return nnx.merge(graphdef, params)(x, lengths=lengths)[:, 0]


def sequences_to_criterion(correct: np.ndarray, loss: np.ndarray, batch: int):
    """Training sequences seen when H&S's rule first held (None if never).

    ``correct[i]`` / ``loss[i]``: correct count and MSE of training batch i (predictions made
    before that batch's update). The rule: the last ``ceil(2000 / batch)`` batches all correct and
    their mean squared error < 0.01.
    """
    window = math.ceil(HS_WINDOW / batch)
    run = 0
    for i, c in enumerate(correct):
        run = run + 1 if c == batch else 0
        if run >= window and float(np.mean(loss[i + 1 - window:i + 1])) < HS_MEAN_ERROR:
            return (i + 1) * batch
    return None


def train(kind, *, T, seeds, budget, s=SETTINGS, log_dir=None):
    """Trains ``len(seeds)`` models in lockstep; each stops once it met the rule, all stop at ``budget`` sequences.

    ``log_dir``: `seqjax.fit` writes each seed's history there at every evaluation (``<kind>_T<T>.run<r>.json``).

    Returns per-seed lists (runs stop at different steps): ``train`` {loss, correct, max_abs_error}
    per step, ``test`` {mse, wrong, max_abs_error} per evaluation at ``eval_sequences``.
    """
    batch = s["batch"]
    models = [build_model(kind, sd, s, T) for sd in seeds]
    graphdef, _ = nnx.split(models[0])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(m)[1] for m in models])
    tx = make_optimizer(s)
    S = len(seeds)
    carry = (jax.vmap(lambda p: seqjax.init_state(p, tx))(params), jnp.zeros((S,), jnp.int32), jnp.zeros((S,), bool))
    test = test_set(T)

    def eval_fn(c):
        p = predict(graphdef, c[0].params, test.x, test.lengths)
        return dict(mse=optax.losses.squared_error(p, test.y).mean(), wrong=jnp.sum(~adding_correct(p, test.y)),
                    max_abs_error=jnp.max(jnp.abs(p - test.y)), solved=c[2].astype(jnp.float32))

    chunk = max(1, s["eval_every_sequences"] // batch)
    steps = -(-budget // (chunk * batch)) * chunk
    t0 = time.perf_counter()
    print(f"  {kind.upper()} T={T}: {S} seeds in lockstep, up to {steps} steps of {batch} sequences", flush=True)
    _, hists = seqjax.fit(make_step(graphdef, tx, batch), carry, lambda key: adding_problem(key, batch, T),
                          num_steps=steps, eval_fn=eval_fn, eval_every=chunk, steps_per_call=chunk, num_runs=S,
                          target=("solved", 1.0, "max"), seed=10_000,
                          log_path=os.path.join(log_dir, f"{kind}_T{T}") if log_dir else None)
    train_m = {k: [h.series(k)[1] for h in hists] for k in ("loss", "correct", "max_abs_error")}
    test_m = {k: [h.series(k, "eval")[1] for h in hists] for k in ("mse", "wrong", "max_abs_error")}
    return dict(kind=kind, seeds=list(seeds), train=train_m, test=test_m,
                eval_sequences=[h.series("mse", "eval")[0] * batch for h in hists],
                n_params=count_params(params), seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------

def stats(values) -> dict | None:
    v = np.asarray([a for a in values if a is not None], dtype=float)
    if v.size == 0:
        return None
    return dict(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()),
                n=int(v.size), per_seed=[None if a is None else float(a) for a in values])


def summarise(r, batch):
    """Per-seed sequences to the rule, and the test metrics of the final (stopped) models."""
    tr, te = r["train"], r["test"]
    seqs = [sequences_to_criterion(c, l, batch) for c, l in zip(tr["correct"], tr["loss"])]
    last = lambda name: [float(a[-1]) for a in te[name]]                                   # noqa: E731
    return dict(sequences_to_criterion=seqs, solved=int(sum(x is not None for x in seqs)),
                sequences_to_criterion_stats=stats(seqs),
                test_mse=stats(last("mse")), test_wrong=stats(last("wrong")),
                test_max_abs_error=stats(last("max_abs_error")),
                trained_sequences=[int(len(a) * batch) for a in tr["loss"]],
                eval_sequences=[a.tolist() for a in r["eval_sequences"]],
                test_mse_curve=[a.tolist() for a in te["mse"]], test_wrong_curve=[a.tolist() for a in te["wrong"]],
                n_params=r["n_params"], seconds=r["seconds"])


# ----------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------

def moving_mse(loss: np.ndarray, batch: int, window_seqs: int = 2_000):
    """Mean of one run's per-batch MSE [N] over windows of ~``window_seqs`` sequences: (x [n], y [n])."""
    k = max(1, window_seqs // batch)
    n = loss.shape[0] // k
    y = loss[:n * k].reshape(n, k).mean(-1)
    return (np.arange(n) + 1) * k * batch, y


def plot_curves(runs, summaries, T, path, s=SETTINGS):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n, (kind, r) in enumerate(runs.items()):
        color = f"C{n}"
        for j, loss in enumerate(r["train"]["loss"]):
            x, y = moving_mse(loss, s["batch"])
            axes[0].plot(x, y, color=color, lw=1, label=f"{kind.upper()} H={s['hidden']}" if j == 0 else None)
        for q in summaries[kind]["sequences_to_criterion"]:
            if q is not None:
                axes[0].axvline(q, color=color, lw=0.8, ls=":")
        for j, (xe, te) in enumerate(zip(r["eval_sequences"], r["test"]["mse"])):
            axes[1].plot(xe, te, color=color, marker=".", lw=1, label=kind.upper() if j == 0 else None)
    for ax in axes:
        if T in HS:
            ax.axvline(HS[T][0], ls="--", color="gray", label=f"H&S 1997: {HS[T][0]:,} sequences")
        ax.axhline(HS_MEAN_ERROR, ls=":", color="k", label="mean error 0.01")
        ax.axhline(ADDING_TOLERANCE ** 2, ls="-.", color="k", lw=0.8, label="0.04² (one sequence at tolerance)")
        ax.set_yscale("log")
        ax.set_xlabel("training sequences")
    axes[0].set_ylabel("training MSE (mean per 2000 sequences)")
    axes[0].set_title(f"Adding problem T={T}: training MSE, one line per seed (dotted: H&S rule met)",
                      fontsize=9)
    axes[1].set_ylabel(f"test MSE ({TEST_SIZE} sequences)")
    axes[1].set_title("test MSE (a seed stops training once it met the rule)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

def fmt_seqs(st):
    if st is None:
        return "never"
    return f"{st['mean']:9,.0f} ± {st['std']:7,.0f} ({st['n']} seeds)"


def print_table(T, summaries, seeds):
    hs = HS.get(T)
    print(f"\nAdding problem T={T} (lengths {T}..{T + T // 10}), test set {TEST_SIZE} sequences; "
          f"mean ± std over seeds")
    print(f"{'model':<22} {'weights':>7} {'solved':>7}  {'sequences to H&S rule':<32} {'test MSE':<22} "
          f"{'wrong /2560':<16}")
    if hs:
        print(f"{'H&S 1997 LSTM':<22} {93:>7} {'10/10':>7}  {hs[0]:>9,d} (mean of 10 trials)      "
              f"{'-':<22} {hs[1]:<16}")
    for kind, sm in summaries.items():
        mse, wr = sm["test_mse"], sm["test_wrong"]
        print(f"{kind.upper() + ' (seqjax)':<22} {sm['n_params']:>7} {sm['solved']:>4}/{seeds:<2}  "
              f"{fmt_seqs(sm['sequences_to_criterion_stats']):<32} "
              f"{mse['mean']:.2e} ± {mse['std']:.1e}    {wr['mean']:6.1f} ± {wr['std']:5.1f}")
        print(f"{'':<22} per seed: sequences {sm['sequences_to_criterion']}, wrong "
              f"{[int(w) for w in wr['per_seed']]}, test MSE {[f'{v:.2e}' for v in mse['per_seed']]}")


def resolve_config(*, quick=False, T=None, seeds=None, budget=None, cells=None, forget_bias=None):
    """The run's ``(config, settings)`` from the command line's values (None: the default).

    Full runs take their budget, cells and LSTM forget-gate bias from ``PER_T``; ``--quick`` is ``QUICK``
    (T = 50), or ``QUICK_AT_T`` with an explicit T. Explicit values win.
    """
    if quick:
        cfg = dict(QUICK) if T is None else dict(QUICK_AT_T, T=T)
        fb = SETTINGS["forget_bias"] if T is None else _defaults_at(T)["forget_bias"]
    else:
        T = FULL["T"] if T is None else T
        d = _defaults_at(T)
        cfg, fb = dict(FULL, T=T, budget=d["budget"], cells=d["cells"]), d["forget_bias"]
    for k, v in (("seeds", seeds), ("budget", budget)):
        if v is not None:
            cfg[k] = v
    if cells:
        cfg["cells"] = tuple(c.strip() for c in cells.split(","))
    if forget_bias is not None:
        fb = forget_bias if forget_bias == "chrono" else float(forget_bias)
    return cfg, {**SETTINGS, "forget_bias": fb}


def _defaults_at(T: int) -> dict:
    if T in PER_T:
        return PER_T[T]
    return dict(PER_T[1000] if T > 100 else PER_T[100], budget=PER_T[100]["budget"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short version (T=50, 2 seeds; ~1-2 min on 2 CPU cores)")
    g.add_argument("--full", action="store_true", help="the full study (default: T=100, 3 seeds)")
    p.add_argument("--T", type=int, default=None, help="minimal sequence length T (lengths T..T+T/10)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    p.add_argument("--budget", type=int, default=None, help="max training sequences per model")
    p.add_argument("--cells", default=None, help="comma-separated subset of lstm,gru,rnn")
    p.add_argument("--forget-bias", default=None, help="LSTM forget-gate bias: a number or 'chrono'")
    p.add_argument("--log-dir", default=None, help="write each seed's training history here at every evaluation")
    p.add_argument("--out", default="runs/adding", help="output directory (results.json, *.png)")
    args = p.parse_args(argv)
    if args.cells:
        bad = {c.strip() for c in args.cells.split(",")} - set(CELLS)
        if bad:
            p.error(f"--cells: unknown {sorted(bad)}; choose from {list(CELLS)}")
    if args.forget_bias not in (None, "chrono"):
        try:
            float(args.forget_bias)
        except ValueError:
            p.error(f"--forget-bias: expected a number or 'chrono', got {args.forget_bias!r}")
    cfg, settings = resolve_config(quick=args.quick, T=args.T, seeds=args.seeds, budget=args.budget,
                                   cells=args.cells, forget_bias=args.forget_bias)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    T = cfg["T"]
    print(f"seqjax adding problem ({'quick' if args.quick else 'full'}), jax {jax.__version__} on "
          f"{jax.default_backend()}; config {cfg}; settings {settings}")

    seeds = list(range(cfg["seeds"]))
    runs, summaries = {}, {}
    for kind in cfg["cells"]:
        runs[kind] = train(kind, T=T, seeds=seeds, budget=cfg["budget"], s=settings, log_dir=args.log_dir)
        summaries[kind] = summarise(runs[kind], settings["batch"])

    print_table(T, summaries, len(seeds))
    if T in HS:
        lstm = summaries.get("lstm")
        if lstm and lstm["sequences_to_criterion_stats"]:
            print(f"\nLSTM: {lstm['solved']}/{len(seeds)} seeds met H&S's rule after "
                  f"{lstm['sequences_to_criterion_stats']['mean']:,.0f} sequences on average vs H&S 1997: "
                  f"{HS[T][0]:,}; wrong on the test set: {lstm['test_wrong']['mean']:.1f} vs {HS[T][1]}")

    plots = dict(learning_curves="adding_learning_curves.png")
    plot_curves(runs, summaries, T, os.path.join(args.out, plots["learning_curves"]), settings)
    results = dict(mode="quick" if args.quick else "full", config={**cfg, "cells": list(cfg["cells"])},
                   settings=settings, T=T, lengths=[T, T + T // 10], test_size=TEST_SIZE,
                   tolerance=ADDING_TOLERANCE,
                   hs_criterion=f"training stops when the last {HS_WINDOW} training sequences were all within "
                                f"{ADDING_TOLERANCE} of the target and their mean squared error < {HS_MEAN_ERROR}",
                   hs_reference=dict(sequences=HS[T][0], wrong=HS[T][1], weights=93, trials=10) if T in HS else None,
                   results=summaries, plots=plots)
    return write_results(args.out, results, list(plots.values()), t0)


if __name__ == "__main__":
    main()
