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
   (online, as H&S), several seeds in lockstep (vmapped);
2. applies H&S's stopping rule *during* training: a model stops updating once
   the last 2000 training sequences (those of the last ``ceil(2000 / batch)``
   batches, judged on the predictions made while training on them) were all
   correct. Their second condition, mean training error < 0.01, is implied
   (every |error| < 0.04 gives a mean squared error < 0.0016) and is checked
   too on the same window;
3. reports the number of training sequences until the rule fired, and the test
   MSE and the number of wrong sequences out of 2560 test sequences at that
   point, against H&S's 74,000 sequences / 1 wrong (T = 100, mean of 10 trials);
4. plots the learning curves (training MSE against sequences seen).

Model and optimiser (tuned, not H&S's: theirs was 2 memory blocks of 2
cells, 93 weights, no forget gate, truncated gradients, online SGD lr 0.5):
``seqjax.nnx.LSTM(2, 16)`` with forget-gate bias 3 and input-gate bias -3
(H&S used input-gate biases -3 and -6: irrelevant inputs are not written into
memory by default), ``Linear(16, 1)``; MSE loss; Adam 1e-2 with global-norm
clipping at 1; batches of 32 fresh sequences. Tried on 3 seeds at T = 100:
Adam 3e-3 also solves every seed but about 1.5x slower; with the cell's
default biases learning starts later.

Usage::

    python examples/adding.py --quick          # T = 50, 2 seeds, LSTM + RNN, ~1.5 min on 2 CPU cores
    python examples/adding.py                  # T = 100, 3 seeds, the full study (default)
    python examples/adding.py --T 500          # another T (H&S: 209,000 sequences at T = 500)
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


def build_model(kind: str, seed: int, s=SETTINGS) -> snx.SequenceClassifier:
    """Recurrent layer (2 -> H) + ``Linear(H, 1)`` read at each sequence's last valid step."""
    rngs = nnx.Rngs(seed)
    H = s["hidden"]
    if kind == "lstm":
        layer = snx.LSTM(2, H, rngs=rngs, forget_bias=s["forget_bias"],
                         bias_init=input_gate_bias_init(H, s["input_gate_bias"]))
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
# train (one jit call runs `chunk` steps for all seeds, then evaluates)
# ----------------------------------------------------------------------------

def make_runner(graphdef, tx, T: int, batch: int, chunk: int):
    """``run(carry, key, test) -> (carry, train_metrics [S, chunk], test_metrics [S])``, vmapped over seeds.

    ``carry = (state, opt_state, run_len, done)``: ``run_len`` counts the
    consecutive fully-correct training batches; once it reaches
    ``ceil(2000 / batch)`` the seed is ``done`` and its updates are dropped
    (H&S stop training there).
    """
    window = math.ceil(HS_WINDOW / batch)

    def predict(state, x, lengths):
        return nnx.merge(graphdef, state)(x, lengths=lengths)[:, 0]

    def loss_fn(state, b):
        p = predict(state, b.x, b.lengths)
        return optax.losses.squared_error(p, b.y).mean(), p

    def step(carry, key):
        state, opt_state, run_len, done = carry
        b = adding_problem(key, batch, T)
        (loss, p), grads = jax.value_and_grad(loss_fn, has_aux=True)(state, b)
        updates, new_opt = tx.update(grads, opt_state, state)
        new_state = optax.apply_updates(state, updates)
        keep = lambda n, o: jnp.where(done, o, n)                            # noqa: E731
        state, opt_state = jax.tree.map(keep, new_state, state), jax.tree.map(keep, new_opt, opt_state)
        correct = jnp.sum(adding_correct(p, b.y))
        run_len = jnp.where(correct == batch, run_len + 1, 0)
        m = dict(loss=loss, correct=correct, max_abs_error=jnp.max(jnp.abs(p - b.y)), done=done)
        done = done | (run_len >= window)
        return (state, opt_state, run_len, done), m

    def run(carry, key, test):
        carry, m = jax.lax.scan(step, carry, jax.random.split(key, chunk))
        p = predict(carry[0], test.x, test.lengths)
        test_m = dict(mse=optax.losses.squared_error(p, test.y).mean(),
                      wrong=jnp.sum(~adding_correct(p, test.y)), max_abs_error=jnp.max(jnp.abs(p - test.y)))
        return carry, m, test_m

    return jax.jit(jax.vmap(run, in_axes=(0, 0, None)))


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


def train(kind, *, T, seeds, budget, s=SETTINGS, verbose=True):
    """Trains ``len(seeds)`` models in lockstep until every seed met the rule or ``budget`` sequences."""
    batch = s["batch"]
    models = [build_model(kind, sd, s) for sd in seeds]
    graphdef, _ = nnx.split(models[0])
    state = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(m)[1] for m in models])
    tx = make_optimizer(s)
    S = len(seeds)
    carry = (state, jax.vmap(tx.init)(state), jnp.zeros((S,), jnp.int32), jnp.zeros((S,), bool))
    chunk = max(1, s["eval_every_sequences"] // batch)
    run = make_runner(graphdef, tx, T, batch, chunk)
    test = test_set(T)
    keys = [jax.random.key(10_000 + sd) for sd in seeds]
    steps_m, evals, eval_seq = [], [], []
    t0 = time.perf_counter()
    n_chunks = math.ceil(budget / (chunk * batch))
    for c in range(n_chunks):
        ks = jnp.stack([jax.random.fold_in(k, c) for k in keys])
        carry, m, ev = run(carry, ks, test)
        steps_m.append(jax.device_get(m))
        evals.append(jax.device_get(ev))
        eval_seq.append((c + 1) * chunk * batch)
        done = np.asarray(carry[3])
        if verbose and ((c + 1) % max(1, n_chunks // 8) == 0 or done.all()):
            print(f"  [{kind} T={T}] {eval_seq[-1]:>7,d} seqs  train mse "
                  f"{' '.join(f'{v:.4f}' for v in m['loss'][:, -10:].mean(1))}  test mse "
                  f"{' '.join(f'{v:.4f}' for v in ev['mse'])}  wrong {ev['wrong'].tolist()}  "
                  f"solved {done.tolist()}  ({time.perf_counter() - t0:.1f}s)", flush=True)
        if done.all():
            break
    cat = {k: np.concatenate([m[k] for m in steps_m], axis=1) for k in steps_m[0]}
    ev = {k: np.stack([e[k] for e in evals], axis=1) for k in evals[0]}
    return dict(kind=kind, seeds=list(seeds), train=cat, test=ev, eval_sequences=np.array(eval_seq),
                n_params=count_params(state), seconds=time.perf_counter() - t0)


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
    final_mse = te["mse"][:, -1]
    final_wrong = te["wrong"][:, -1]
    return dict(sequences_to_criterion=seqs, solved=int(sum(x is not None for x in seqs)),
                sequences_to_criterion_stats=stats(seqs),
                test_mse=stats(final_mse), test_wrong=stats(final_wrong),
                test_max_abs_error=stats(te["max_abs_error"][:, -1]),
                trained_sequences=int(r["train"]["loss"].shape[1] * batch),
                eval_sequences=r["eval_sequences"].tolist(), test_mse_curve=te["mse"].tolist(),
                test_wrong_curve=te["wrong"].tolist(), n_params=r["n_params"], seconds=r["seconds"])


# ----------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------

def moving_mse(loss: np.ndarray, batch: int, window_seqs: int = 2_000):
    """Mean of the per-batch MSE over windows of ~``window_seqs`` sequences: (x [N], y [S, N])."""
    k = max(1, window_seqs // batch)
    n = loss.shape[1] // k
    y = loss[:, :n * k].reshape(loss.shape[0], n, k).mean(-1)
    return (np.arange(n) + 1) * k * batch, y


def plot_curves(runs, summaries, T, path, s=SETTINGS):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, r in runs.items():
        x, y = moving_mse(r["train"]["loss"], s["batch"])
        line, = axes[0].plot(x, y.mean(0), label=f"{kind.upper()} H={s['hidden']}")
        axes[0].fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
        for q in summaries[kind]["sequences_to_criterion"]:
            if q is not None:
                axes[0].axvline(q, color=line.get_color(), lw=0.8, ls=":")
        te = np.asarray(r["test"]["mse"])
        xe = r["eval_sequences"]
        line, = axes[1].plot(xe, te.mean(0), marker=".", label=kind.upper())
        axes[1].fill_between(xe, te.min(0), te.max(0), color=line.get_color(), alpha=0.2)
    for ax in axes:
        if T in HS:
            ax.axvline(HS[T][0], ls="--", color="gray", label=f"H&S 1997: {HS[T][0]:,} sequences")
        ax.axhline(HS_MEAN_ERROR, ls=":", color="k", label="mean error 0.01")
        ax.axhline(ADDING_TOLERANCE ** 2, ls="-.", color="k", lw=0.8, label="0.04² (one sequence at tolerance)")
        ax.set_yscale("log")
        ax.set_xlabel("training sequences")
    axes[0].set_ylabel("training MSE (mean per 2000 sequences)")
    axes[0].set_title(f"Adding problem T={T}: training MSE (mean, band = min..max over seeds;"
                      f" dotted: H&S rule met)", fontsize=9)
    axes[1].set_ylabel(f"test MSE ({TEST_SIZE} sequences)")
    axes[1].set_title("test MSE (frozen once a seed met the rule)", fontsize=9)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short version (T=50, 2 seeds; ~1-2 min on 2 CPU cores)")
    g.add_argument("--full", action="store_true", help="the full study (default: T=100, 3 seeds)")
    p.add_argument("--T", type=int, default=None, help="minimal sequence length T (lengths T..T+T/10)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    p.add_argument("--budget", type=int, default=None, help="max training sequences per model")
    p.add_argument("--cells", default=None, help="comma-separated subset of lstm,gru,rnn")
    p.add_argument("--out", default="runs/adding", help="output directory (results.json, *.png)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for k in ("T", "seeds", "budget"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.cells:
        cfg["cells"] = tuple(c.strip() for c in args.cells.split(","))
        bad = set(cfg["cells"]) - set(CELLS)
        if bad:
            p.error(f"--cells: unknown {sorted(bad)}; choose from {list(CELLS)}")
    if args.T is not None and args.budget is None and not args.quick:
        cfg["budget"] = max(cfg["budget"], 2 * HS.get(cfg["T"], (cfg["budget"],))[0])
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    T = cfg["T"]
    print(f"seqjax adding problem ({'quick' if args.quick else 'full'}), jax {jax.__version__} on "
          f"{jax.default_backend()}; config {cfg}; settings {SETTINGS}")

    seeds = list(range(cfg["seeds"]))
    runs, summaries = {}, {}
    for kind in cfg["cells"]:
        runs[kind] = train(kind, T=T, seeds=seeds, budget=cfg["budget"])
        summaries[kind] = summarise(runs[kind], SETTINGS["batch"])

    print_table(T, summaries, len(seeds))
    if T in HS:
        lstm = summaries.get("lstm")
        if lstm and lstm["sequences_to_criterion_stats"]:
            print(f"\nLSTM: {lstm['solved']}/{len(seeds)} seeds met H&S's rule after "
                  f"{lstm['sequences_to_criterion_stats']['mean']:,.0f} sequences on average vs H&S 1997: "
                  f"{HS[T][0]:,}; wrong on the test set: {lstm['test_wrong']['mean']:.1f} vs {HS[T][1]}")

    plots = dict(learning_curves="adding_learning_curves.png")
    plot_curves(runs, summaries, T, os.path.join(args.out, plots["learning_curves"]))
    results = dict(mode="quick" if args.quick else "full", config={**cfg, "cells": list(cfg["cells"])},
                   settings=SETTINGS, T=T, lengths=[T, T + T // 10], test_size=TEST_SIZE,
                   tolerance=ADDING_TOLERANCE,
                   hs_criterion=f"training stops when the last {HS_WINDOW} training sequences were all within "
                                f"{ADDING_TOLERANCE} of the target and their mean squared error < {HS_MEAN_ERROR}",
                   hs_reference=dict(sequences=HS[T][0], wrong=HS[T][1], weights=93, trials=10) if T in HS else None,
                   results=summaries, plots=plots)
    return write_results(args.out, results, list(plots.values()), t0)


if __name__ == "__main__":
    main()
