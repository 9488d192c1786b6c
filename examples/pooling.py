#!/usr/bin/env python
"""Last relevant output vs mean pooling (seed 001: "basically they are the same") on variable-length sequences.

Seed 001's sequence-classification case study reads a padded batch with
``sequence_length`` and classifies either the **last relevant output** (each
sequence's output at its own last valid step) or the **average pooling** of
the outputs over its valid steps, and says the two are "basically the same".
This example tests that claim with seqjax's classifier head,
``seqjax.nnx.SequenceClassifier(rnn, C, pooling="last" | "mean")``, which calls
``seqjax.losses.last_valid`` / ``mean_valid`` on the recurrent layer's outputs
(the layer is given ``lengths``, so padded steps never reach the pooling).

Task: temporal order (H&S 1997 Experiment 6a, ``seqjax.tasks.temporal_order``)
with **right padding** and ``lengths``, at two levels whose lengths vary:

* ``NORMAL``: NYU's level, length 30-40, X/Y at t1 in 2-5 and t2 in 20-27;
* ``WIDE``: a custom ``TemporalOrderLevel``, length 10-50 (a 5x range), X/Y
  at t1 in 2-4 and t2 in 6-8, so the class is fixed early and followed by
  0 to 40 distractors before ``E``: the last output must carry it across up to
  41 steps, while a mean over the valid steps sees it from t2 on.

Model: ``{RNN (tanh), GRU, LSTM}(8 -> 32)`` + pooling + ``Linear(32 -> 4)``,
seqjax's default initialisation (LeCun-normal inputs, orthogonal recurrence,
LSTM forget bias 1). Training, identical for every cell and pooling: Adam with
gradients clipped to norm 1, batch 16, 32 000 training sequences, the same
learning-rate grid for every (cell, pooling), the rate chosen on a validation
set (1024 sequences), test accuracy on 2560 held-out sequences. All seeds and
rates of one (level, cell, pooling) train in lockstep in one ``seqjax.fit``
(``num_runs``).

Reported per cell and pooling: test accuracy mean ± sd over seeds and per
seed, seeds >= 99 %, training sequences to 99 % test accuracy, and the final
test accuracy by sequence length (four equal-width length bins), with a
verdict per (level, cell): "basically the same" holds when the two poolings'
mean test accuracies differ by at most 1 point or by less than twice the
standard error of the difference over seeds.

Usage::

    python examples/pooling.py --quick          # NORMAL, 2 seeds, one rate per cell (<= 60 s on 2 CPU cores)
    python examples/pooling.py                  # the full study (default)
    python examples/pooling.py --out runs/x     # where results.json and PNGs go
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
from seqjax.tasks import CLASSES_6A, LEVELS, SYMBOLS, TemporalOrderLevel, temporal_order
from _report import write_results  # examples/_report.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

CELLS = ("rnn", "gru", "lstm")
POOLINGS = ("last", "mean")

TASK_LEVELS = {"NORMAL": LEVELS["NORMAL"],
               "WIDE": TemporalOrderLevel(length=(10, 50), t1=(2, 4), t2=(6, 8))}
"""The temporal-order levels trained (inclusive ranges; padded length = max length + 1)."""

SETTINGS = dict(hidden=32, batch=16, optimizer="adam", clip_norm=1.0, budget_sequences=32_000, eval_every=100,
                lrs=(1e-3, 3e-3, 1e-2, 3e-2), rnn_activation="tanh", init="seqjax default", padding="right")
"""The same for every cell and pooling."""

QUICK_LR = {"rnn": 1e-3, "gru": 1e-2, "lstm": 1e-2}
"""``--quick`` trains one learning rate per cell."""

TEST_SIZE, TEST_SEED = 2_560, 9001
VAL_SIZE, VAL_SEED = 1_024, 4242
SOLVED = 0.99
LENGTH_BINS = 4

FULL = dict(levels=("NORMAL", "WIDE"), seeds=5, lrs=None, budget=SETTINGS["budget_sequences"])
QUICK = dict(levels=("NORMAL",), seeds=2, lrs=QUICK_LR, budget=6_400)


# ----------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------

def fixed_set(level: str, size: int, seed: int):
    """A fixed right-padded evaluation set: TaskBatch x [size, T, 8] float32, y [size] int32, lengths [size]."""
    return temporal_order(jax.random.key(seed), size, TASK_LEVELS[level], padding="right")


def length_bins(level: str):
    """``LENGTH_BINS`` equal-width, inclusive ``(lo, hi)`` length ranges covering the level's lengths."""
    lo, hi = TASK_LEVELS[level].length
    edges = np.linspace(lo, hi + 1, LENGTH_BINS + 1)
    return [(int(math.ceil(a)), int(math.ceil(b)) - 1) for a, b in zip(edges[:-1], edges[1:])]


def build_model(kind: str, pooling: str, seed: int):
    """``{RNN,GRU,LSTM}(8, H)`` + ``pooling`` over the valid steps + ``Linear(H, 4)``."""
    rngs = nnx.Rngs(seed)
    opts = dict(activation=SETTINGS["rnn_activation"]) if kind == "rnn" else {}
    layer = {"rnn": snx.RNN, "gru": snx.GRU, "lstm": snx.LSTM}[kind](len(SYMBOLS), SETTINGS["hidden"], rngs=rngs,
                                                                     **opts)
    return snx.SequenceClassifier(layer, len(CLASSES_6A), pooling=pooling, rngs=rngs)


def make_optimizer():
    return optax.chain(optax.clip_by_global_norm(SETTINGS["clip_norm"]),
                       optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))


def set_lr(state, lr):
    """The learning rate of one run, in its ``optax.inject_hyperparams`` state."""
    state.opt_state[-1].hyperparams["learning_rate"] = lr
    return state


# ----------------------------------------------------------------------------
# training: one seqjax.fit per (level, cell, pooling), every seed and rate in lockstep
# ----------------------------------------------------------------------------

def train(level, kind, pooling, *, seeds, lrs, steps):
    """Trains ``len(lrs) * seeds`` models (run ``r = i * seeds + j``: rate ``i``, seed ``j``).

    Returns ``runs`` [(lr, seed)], ``test``/``val`` accuracy [R, n_evals], ``bins`` final test accuracy by
    length bin [R, LENGTH_BINS], ``eval_sequences`` [n_evals], ``seconds``.
    """
    runs = [(lr, s) for lr in lrs for s in range(seeds)]
    models = [build_model(kind, pooling, s) for _, s in runs]
    graphdef, _ = nnx.split(models[0])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(m)[1] for m in models])
    tx = make_optimizer()
    states = jax.vmap(lambda p, lr: set_lr(seqjax.init_state(p, tx), lr))(params, jnp.array([lr for lr, _ in runs]))
    test, val = fixed_set(level, TEST_SIZE, TEST_SEED), fixed_set(level, VAL_SIZE, VAL_SEED)
    lv, batch = TASK_LEVELS[level], SETTINGS["batch"]
    bins = length_bins(level)

    def logits_of(p, s):
        return nnx.merge(graphdef, p)(s.x, lengths=s.lengths)

    def loss_fn(p, b):
        logits = logits_of(p, b)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, b.y).mean()
        return loss, dict(accuracy=jnp.mean(jnp.argmax(logits, -1) == b.y))

    def eval_fn(state):
        correct = jnp.argmax(logits_of(state.params, test), -1) == test.y
        out = dict(test_accuracy=jnp.mean(correct),
                   val_accuracy=jnp.mean(jnp.argmax(logits_of(state.params, val), -1) == val.y))
        for i, (a, b) in enumerate(bins):
            m = (test.lengths >= a) & (test.lengths <= b)
            out[f"test_accuracy_bin{i}"] = jnp.sum(correct & m) / jnp.maximum(jnp.sum(m), 1)
        return out

    step = seqjax.make_train_step(loss_fn, tx, has_aux=True)
    every = SETTINGS["eval_every"]
    print(f"  {level} {kind.upper()} pooling={pooling}: {len(runs)} runs in lockstep, {steps} steps of {batch}",
          flush=True)
    t0 = time.perf_counter()
    states, hists = seqjax.fit(step, states, lambda key: temporal_order(key, batch, lv, padding="right"),
                               num_steps=steps, eval_fn=eval_fn, eval_every=every, steps_per_call=every,
                               num_runs=len(runs), seed=10_000, progress=True)
    seconds = time.perf_counter() - t0
    ev = lambda k: np.stack([h.series(k, "eval")[1] for h in hists])   # noqa: E731  [R, n_evals]
    return dict(runs=runs, test=ev("test_accuracy"), val=ev("val_accuracy"),
                bins=np.stack([ev(f"test_accuracy_bin{i}")[:, -1] for i in range(len(bins))], axis=1),
                bin_ranges=bins, eval_sequences=hists[0].series("test_accuracy", "eval")[0] * batch,
                seconds=seconds)


# ----------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------

def stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return dict(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()),
                per_seed=[float(a) for a in v])


def first_at(values, at, threshold):
    hit = np.nonzero(np.asarray(values) >= threshold)[0]
    return int(at[hit[0]]) if hit.size else None


def summarise(r, seeds) -> dict:
    """Picks the rate by mean final validation accuracy (ties: mean over evaluations) and summarises it."""
    lrs = sorted({lr for lr, _ in r["runs"]}, key=[lr for lr, _ in r["runs"]].index)
    by_lr = {}
    for i, lr in enumerate(lrs):
        rows = slice(i * seeds, (i + 1) * seeds)
        by_lr[lr] = dict(val_final=float(r["val"][rows, -1].mean()), val_mean=float(r["val"][rows].mean()),
                         test_final=stats(r["test"][rows, -1]))
    best = max(lrs, key=lambda lr: (round(by_lr[lr]["val_final"], 4), by_lr[lr]["val_mean"]))
    i = lrs.index(best)
    test = r["test"][i * seeds:(i + 1) * seeds]
    to99 = [first_at(test[j], r["eval_sequences"], SOLVED) for j in range(seeds)]
    bins = r["bins"][i * seeds:(i + 1) * seeds]
    return dict(lr=best, by_lr={f"{lr:g}": v for lr, v in by_lr.items()}, test_final=stats(test[:, -1]),
                seeds_solved=int(np.sum(test[:, -1] >= SOLVED)), seeds=seeds, sequences_to_99pct=to99,
                test_by_length={f"{a}-{b}": stats(bins[:, k]) for k, (a, b) in enumerate(r["bin_ranges"])},
                test_curve=test.tolist(), eval_sequences=np.asarray(r["eval_sequences"]).tolist(),
                seconds=r["seconds"])


def same_verdict(last: dict, mean: dict) -> dict:
    """Whether the two poolings' final test accuracies are "basically the same" (see the module docstring)."""
    a, b = np.asarray(last["test_final"]["per_seed"]), np.asarray(mean["test_final"]["per_seed"])
    diff = float(b.mean() - a.mean())
    se = float(math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))) if len(a) > 1 else 0.0
    same = abs(diff) <= 0.01 or abs(diff) < 2 * se
    return dict(same=bool(same), mean_minus_last=diff, se=se)


def verdict_line(level, kind, v, last, mean) -> str:
    better = "mean" if v["mean_minus_last"] > 0 else "last"
    med = lambda xs: (f"{int(np.median([x for x in xs if x is not None])):,}"   # noqa: E731
                      if any(x is not None for x in xs) else "never")
    head = ("basically the same" if v["same"] else f"NOT the same ({better} pooling better)")
    return (f"{level} {kind.upper()}: {head}: last {100 * last['test_final']['mean']:.1f} ± "
            f"{100 * last['test_final']['std']:.1f} % ({last['seeds_solved']}/{last['seeds']} >= 99 %), mean "
            f"{100 * mean['test_final']['mean']:.1f} ± {100 * mean['test_final']['std']:.1f} % "
            f"({mean['seeds_solved']}/{mean['seeds']}); difference {100 * v['mean_minus_last']:+.1f} points "
            f"(2 SE {200 * v['se']:.1f}); median sequences to 99 %: last {med(last['sequences_to_99pct'])}, mean "
            f"{med(mean['sequences_to_99pct'])}")


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

def pct(s):
    return f"{100 * s['mean']:5.1f} ± {100 * s['std']:4.1f} [{100 * s['min']:5.1f}, {100 * s['max']:5.1f}]"


def print_table(res):
    print("\nLast relevant output vs mean pooling: test accuracy % (mean ± sd [min, max] over seeds; "
          "rate chosen on a validation set)")
    print(f"{'level':<7} {'cell':<5} {'pooling':<7} {'lr':>6}  {'test accuracy':<29} {'>=99%':>6}  "
          f"{'seqs to 99% (median)':<21} per seed")
    for level, cells in res.items():
        for kind, pools in cells.items():
            for pooling, c in pools.items():
                hits = [x for x in c["sequences_to_99pct"] if x is not None]
                to99 = f"{int(np.median(hits)):,} ({len(hits)}/{c['seeds']})" if hits else f"never (0/{c['seeds']})"
                per = ", ".join(f"{100 * a:.1f}" for a in c["test_final"]["per_seed"])
                print(f"{level:<7} {kind.upper():<5} {pooling:<7} {c['lr']:>6g}  {pct(c['test_final']):<29} "
                      f"{c['seeds_solved']:>2}/{c['seeds']:<3}  {to99:<21} {per}")
    print("\nFinal test accuracy % by sequence length (mean over seeds):")
    for level, cells in res.items():
        ranges = list(next(iter(next(iter(cells.values())).values()))["test_by_length"])
        print(f"{level:<7} {'cell':<5} {'pooling':<7} " + " ".join(f"{'L ' + r:>9}" for r in ranges))
        for kind, pools in cells.items():
            for pooling, c in pools.items():
                print(f"{'':<7} {kind.upper():<5} {pooling:<7} " +
                      " ".join(f"{100 * c['test_by_length'][r]['mean']:9.1f}" for r in ranges))


def plot_curves(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels = list(res)
    fig, axes = plt.subplots(len(levels), len(CELLS), figsize=(4.6 * len(CELLS), 3.8 * len(levels)), squeeze=False)
    for row, level in zip(axes, levels):
        for ax, kind in zip(row, CELLS):
            for pooling, color in zip(POOLINGS, ("C0", "C1")):
                c = res[level][kind][pooling]
                a, x = np.asarray(c["test_curve"]), np.asarray(c["eval_sequences"])
                for j, curve in enumerate(a):
                    ax.plot(x, curve, color=color, alpha=0.35, lw=0.8)
                ax.plot(x, a.mean(0), color=color, lw=2, label=f"{pooling} (Adam {c['lr']:g})")
            ax.axhline(0.25, ls=":", color="gray", lw=1)
            ax.set_ylim(0, 1.02)
            lo, hi = TASK_LEVELS[level].length
            ax.set_title(f"{level} (L {lo}-{hi}), {kind.upper()}", fontsize=10)
            ax.set_xlabel("training sequences")
            ax.set_ylabel("test accuracy")
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Temporal order, right padding + lengths: last relevant output vs mean pooling "
                 "(thin: seeds, thick: mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final(res, path):
    """Per-seed final test accuracy, last vs mean, for every (level, cell)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [(level, kind) for level in res for kind in CELLS]
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 4))
    for g, (level, kind) in enumerate(groups):
        for k, (pooling, color) in enumerate(zip(POOLINGS, ("C0", "C1"))):
            c = res[level][kind][pooling]
            v = np.asarray(c["test_final"]["per_seed"])
            x = g + (k - 0.5) * 0.35
            ax.scatter(np.full(len(v), x) + np.linspace(-0.05, 0.05, len(v)), v, color=color, s=18,
                       label=pooling if g == 0 else None)
            ax.errorbar(x, v.mean(), yerr=v.std(), color="k", capsize=3, fmt="_")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{lv}\n{k.upper()}" for lv, k in groups], fontsize=8)
    ax.axhline(0.25, ls=":", color="gray", lw=1)
    ax.set_ylabel("final test accuracy (per seed; bar = mean ± sd)")
    ax.legend(fontsize=8)
    ax.set_title("Last relevant output vs mean pooling, equal budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="NORMAL, 2 seeds, one rate per cell")
    g.add_argument("--full", action="store_true", help="the full study (default)")
    p.add_argument("--out", default="runs/pooling", help="output directory (results.json, *.png)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    p.add_argument("--levels", default=None, help="comma-separated levels to train (default: the mode's)")
    p.add_argument("--lrs", default=None, help="comma-separated learning-rate grid for every cell")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.levels:
        cfg["levels"] = tuple(s.strip().upper() for s in args.levels.split(","))
        bad = [lv for lv in cfg["levels"] if lv not in TASK_LEVELS]
        if bad:
            p.error(f"--levels: unknown {bad}; choose from {list(TASK_LEVELS)}")
    if args.lrs:
        grid = tuple(float(v) for v in args.lrs.split(","))
        cfg["lrs"] = {kind: grid for kind in CELLS}
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"seqjax pooling study ({'quick' if args.quick else 'full'}), jax {jax.__version__} on "
          f"{jax.default_backend()}; settings {SETTINGS}; this run: levels {list(cfg['levels'])}, "
          f"{cfg['seeds']} seeds, rates {cfg['lrs'] or SETTINGS['lrs']}")
    steps = cfg["budget"] // SETTINGS["batch"]
    steps -= steps % SETTINGS["eval_every"]

    res, verdicts = {}, {}
    for level in cfg["levels"]:
        res[level] = {}
        for kind in CELLS:
            lrs = tuple(np.atleast_1d(cfg["lrs"][kind]).tolist()) if cfg["lrs"] else SETTINGS["lrs"]
            res[level][kind] = {pooling: summarise(train(level, kind, pooling, seeds=cfg["seeds"], lrs=lrs,
                                                         steps=steps), cfg["seeds"]) for pooling in POOLINGS}
            v = same_verdict(res[level][kind]["last"], res[level][kind]["mean"])
            verdicts[f"{level} {kind}"] = dict(v, line=verdict_line(level, kind, v, res[level][kind]["last"],
                                                                    res[level][kind]["mean"]))
            print("  " + verdicts[f"{level} {kind}"]["line"], flush=True)

    print_table(res)
    print("\nVerdict (seed 001: last relevant output and mean pooling are \"basically the same\"):")
    for v in verdicts.values():
        print("  " + v["line"])

    plots = dict(curves="pooling_curves.png", final="pooling_final.png")
    plot_curves(res, os.path.join(args.out, plots["curves"]))
    plot_final(res, os.path.join(args.out, plots["final"]))
    results = dict(mode="quick" if args.quick else "full", config=cfg, settings=SETTINGS,
                   levels={k: dict(length=v.length, t1=v.t1, t2=v.t2, padded_length=v.padded_length)
                           for k, v in TASK_LEVELS.items() if k in cfg["levels"]},
                   test_size=TEST_SIZE, val_size=VAL_SIZE, steps=steps, results=res, verdicts=verdicts, plots=plots)
    return write_results(args.out, results, list(plots.values()), t0)


if __name__ == "__main__":
    main()
