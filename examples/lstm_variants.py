#!/usr/bin/env python
"""Greff et al. (2017), "LSTM: A Search Space Odyssey": the vanilla LSTM against its eight variants, trained.

Greff et al. trained the peephole ("vanilla") LSTM and eight variants, each removing or changing one
part (seed 002; ``seqjax.lstm_variant``): NIG (no input gate), NFG (no forget gate), NOG (no output
gate), NIAF (no input activation), NOAF (no output activation), NP (no peepholes), CIFG (coupled
input and forget gate, ``f = 1 - i``) and FGR (full gate recurrence). Their conclusions, tested here:

1. no variant improves clearly on the vanilla LSTM;
2. removing the forget gate (NFG) or the output activation (NOAF) hurts most;
3. CIFG and NP do not change performance significantly.

**Tasks.** (1) Temporal order (Hochreiter & Schmidhuber 1997, ``seqjax.tasks.temporal_order``) at
MODERATE (lengths 60-79, the second symbol ~35 steps after the first; HARD's plateaus make its final
accuracy bimodal at this budget, MODERATE separates variants by how fast and how well they learn),
scored by test classification error after a budget of training sequences. (2) A character language
model on the data ``examples/char_lm.py`` uses (the Python standard library's sources, its corpus and
vocabulary helpers): embedding -> one variant LSTM layer -> softmax, trained on random windows,
scored by bits per character on held-out windows.

**Protocol, the same for every variant.** The library's default initialisation (LeCun-normal input
weights, orthogonal recurrent weights, forget-gate bias 1, zero peepholes), Adam with gradients clipped
to norm 1, the same learning-rate grid (Greff used random search; a grid here), several seeds per
learning rate. The learning rate is chosen per variant on a **validation** split (mean final
validation score over seeds); the **test** split is scored only at that learning rate and reported as
mean ± sd and per seed. A run whose loss becomes non-finite stops and scores chance (temporal order:
75 % error; char LM: log2 of the vocabulary size). Every seed and learning rate of one variant trains in
lockstep in one ``seqjax.fit`` call (``num_runs``, learning rates in an ``optax.inject_hyperparams``
state, ``steps_per_call`` steps per jitted call); run ``r`` draws the same data stream for every variant.

**Criterion** (Greff's): Welch's two-sided t-test of a variant's per-seed test scores against the
vanilla LSTM's, at p < 0.05. Conclusion 1 holds if no variant is significantly better; 2 if NFG and
NOAF are both significantly worse and the two worst by mean; 3 if neither CIFG nor NP differs
significantly.

Usage::

    python examples/lstm_variants.py --quick          # all nine variants, tiny budgets (<= 1 min on 2 cores)
    python examples/lstm_variants.py                  # the full study (default)
    python examples/lstm_variants.py --out runs/x     # where results.json and PNGs go
    python examples/lstm_variants.py --tasks char_lm  # one task (the same numbers as in a run of both)
    python examples/lstm_variants.py --merge A B --out C  # one report from single-task runs in A and B
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats as scipy_stats

import seqjax
from seqjax.tasks import CLASSES_6A, LEVELS, SYMBOLS, temporal_order
from _report import write_results  # examples/_report.py
from char_lm import Vocab, loss_fn as char_loss, stdlib_corpus  # examples/char_lm.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

VARIANTS = tuple(seqjax.GREFF_VARIANTS)   # "vanilla" first
ALPHA = 0.05                               # Welch's t-test level (Greff et al.)

TEMPORAL = dict(level="MODERATE", hidden=32, batch=16, steps=800, eval_every=100, lrs=(1e-3, 3e-3, 1e-2),
                seeds=5, test_size=2_560, test_seed=9001, val_size=1_024, val_seed=4242, data_seed=10_000)
"""Temporal order: H=32 (as examples/temporal_order.py), 800 steps of 16 sequences = 12,800 sequences."""

CHAR = dict(hidden=64, embed=32, batch=32, window=64, steps=500, eval_every=125, lrs=(3e-3, 1e-2, 3e-2), seeds=3,
            train_chars=1_000_000, heldout_chars=200_000, min_count=20, eval_windows=128, eval_length=128,
            data_seed=20_000)
"""Char LM: 500 steps of 32 windows of 64 characters (1.02M training characters); the held-out
characters are split in half, validation then test, each scored on ``eval_windows`` evenly spaced windows
of ``eval_length`` + 1 characters (every prediction counts, from a zero state)."""

QUICK_TEMPORAL = dict(TEMPORAL, level="NORMAL", steps=60, eval_every=30, lrs=(3e-3,), seeds=2, test_size=256,
                      val_size=256)
QUICK_CHAR = dict(CHAR, hidden=32, embed=16, batch=16, window=32, steps=40, eval_every=20, lrs=(1e-2,), seeds=2,
                  train_chars=100_000, heldout_chars=20_000, eval_windows=16, eval_length=32)

# ----------------------------------------------------------------------------
# the two tasks: data, model, loss, evaluation
# ----------------------------------------------------------------------------


class Task:
    """What the trainer needs from a task; scores are "lower is better"."""

    name: str
    metric: str          # the test score's name, e.g. "test error %"
    chance: float        # the score of a diverged run
    cfg: dict

    def init(self, cell, key):            # -> params
        raise NotImplementedError

    def loss(self, cell, params, batch):  # -> (loss, aux dict)
        raise NotImplementedError

    def batches(self, key):               # -> batch
        raise NotImplementedError

    def evaluate(self, cell, params):     # -> {"val": score, "test": score, ...}
        raise NotImplementedError

    def sequences(self, steps):
        return steps * self.cfg["batch"]


def readout_init(key, fan_in: int, n: int):
    """Readout weights ``[fan_in, n]`` ~ N(0, 1/fan_in) and zero bias ``[n]``."""
    return jax.random.normal(key, (fan_in, n)) / math.sqrt(fan_in), jnp.zeros(n)


class TemporalOrder(Task):
    """8 one-hot symbols in, one of 4 classes (XX, XY, YX, YY) from the last step's output (front padded)."""

    name, metric, chance = "temporal_order", "test error %", 75.0

    def __init__(self, cfg):
        self.cfg = cfg
        lv = cfg["level"]
        self.test = temporal_order(jax.random.key(cfg["test_seed"]), cfg["test_size"], lv)
        self.val = temporal_order(jax.random.key(cfg["val_seed"]), cfg["val_size"], lv)
        self.description = (f"temporal order {lv} (lengths {LEVELS[lv].length[0]}-{LEVELS[lv].length[1] - 1}), "
                            f"H={cfg['hidden']}, {self.sequences(cfg['steps']):,} training sequences")

    def init(self, cell, key):
        kc, kw = jax.random.split(key)
        w, b = readout_init(kw, self.cfg["hidden"], len(CLASSES_6A))
        return {"cell": cell.init(kc, len(SYMBOLS)), "w": w, "b": b}

    @staticmethod
    def logits(cell, params, x):                       # x [B, T, 8] -> [B, 4]
        _, ys = seqjax.scan(cell, params["cell"], x)
        return ys[:, -1] @ params["w"] + params["b"]

    def loss(self, cell, params, batch):
        logits = self.logits(cell, params, batch.x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()
        return loss, dict(accuracy=jnp.mean(jnp.argmax(logits, -1) == batch.y))

    def batches(self, key):
        return temporal_order(key, self.cfg["batch"], self.cfg["level"])

    def evaluate(self, cell, params):
        out = {}
        for split, s in (("val", self.val), ("test", self.test)):
            logits = self.logits(cell, params, s.x)
            out[split] = 100.0 * jnp.mean(jnp.argmax(logits, -1) != s.y)
        return out


class CharLM(Task):
    """Next-character prediction: embedding [V, E] -> variant LSTM(H) -> softmax over V, on random windows."""

    name, metric = "char_lm", "test bits/char"

    def __init__(self, cfg):
        self.cfg = cfg
        train_text, heldout, info = stdlib_corpus(cfg["train_chars"], cfg["heldout_chars"])
        self.vocab = Vocab.build(train_text, cfg["min_count"])
        held = self.vocab.encode(heldout)
        self.train_ids = jnp.asarray(self.vocab.encode(train_text))
        half = len(held) // 2
        self.val = self.windows(held[:half])
        self.test = self.windows(held[half:])
        self.chance = math.log2(len(self.vocab))
        self.info = dict(info, train_chars=int(self.train_ids.shape[0]), validation_chars=half,
                         test_chars=len(held) - half, vocab_size=len(self.vocab),
                         split="held-out files of char_lm.stdlib_corpus, first half validation, second half test")
        self.description = (f"char LM on {self.info['train_chars']:,} characters of stdlib source, embed "
                            f"{cfg['embed']}, H={cfg['hidden']}, {cfg['steps'] * cfg['batch'] * cfg['window']:,} "
                            f"training characters")

    def windows(self, ids):
        """``eval_windows`` evenly spaced windows of ``eval_length + 1`` ids: [N, L + 1] int32."""
        n, L = self.cfg["eval_windows"], self.cfg["eval_length"]
        if len(ids) < L + 1:
            raise SystemExit(f"lstm_variants: held-out split of {len(ids)} characters is shorter than a window")
        starts = np.linspace(0, len(ids) - L - 1, n).astype(int)
        return jnp.asarray(np.stack([ids[s:s + L + 1] for s in starts]))

    def init(self, cell, key):
        ke, kc, kw = jax.random.split(key, 3)
        V, E = len(self.vocab), self.cfg["embed"]
        w, b = readout_init(kw, self.cfg["hidden"], V)
        return {"embed": jax.random.normal(ke, (V, E)) * 0.1, "cell": cell.init(kc, E), "w": w, "b": b}

    @staticmethod
    def nats(cell, params, windows):                   # windows [B, L + 1] -> mean cross-entropy (nats)
        _, ys = seqjax.scan(cell, params["cell"], params["embed"][windows[:, :-1]])
        return char_loss(ys @ params["w"] + params["b"], windows[:, 1:]).mean()

    def loss(self, cell, params, batch):
        return self.nats(cell, params, batch), {}

    def batches(self, key):
        B, L = self.cfg["batch"], self.cfg["window"]
        starts = jax.random.randint(key, (B,), 0, self.train_ids.shape[0] - L - 1)
        return jax.vmap(lambda s: jax.lax.dynamic_slice(self.train_ids, (s,), (L + 1,)))(starts)

    def evaluate(self, cell, params):
        return {split: self.nats(cell, params, w) / math.log(2) for split, w in (("val", self.val),
                                                                                 ("test", self.test))}

    def sequences(self, steps):
        return steps * self.cfg["batch"] * self.cfg["window"]   # characters


TASKS = {"temporal_order": (TemporalOrder, QUICK_TEMPORAL, TEMPORAL), "char_lm": (CharLM, QUICK_CHAR, CHAR)}
"""Task name -> (class, --quick config, full config)."""


# ----------------------------------------------------------------------------
# training: one seqjax.fit call per (task, variant), every learning rate and seed in lockstep
# ----------------------------------------------------------------------------

def optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))


def set_lr(state, lr):
    """The learning rate of one run, in its ``optax.inject_hyperparams`` state."""
    state.opt_state[-1].hyperparams["learning_rate"] = lr
    return state


def train_variant(task: Task, variant: str):
    """Trains ``len(lrs) * seeds`` runs (run ``r = i * seeds + j``: learning rate ``i``, seed ``j``).

    Returns ``val`` and ``test`` scores [R, n_evals] (a diverged run's later evaluations are ``chance``),
    ``diverged`` [R] bool, ``eval_steps`` [n_evals], ``seconds`` and ``n_params``.
    """
    cfg = task.cfg
    lrs, S = cfg["lrs"], cfg["seeds"]
    cell = seqjax.lstm_variant(variant, cfg["hidden"])
    tx = optimizer()
    runs = [(lr, j) for lr in lrs for j in range(S)]
    params = jax.vmap(lambda k: task.init(cell, k))(jnp.stack([jax.random.key(j) for _, j in runs]))
    states = jax.vmap(lambda p, lr: set_lr(seqjax.init_state(p, tx), lr))(params, jnp.array([lr for lr, _ in runs]))
    step = seqjax.make_train_step(lambda p, b: task.loss(cell, p, b), tx, has_aux=True)
    t0 = time.perf_counter()
    states, hists = seqjax.fit(step, states, task.batches, num_steps=cfg["steps"],
                               eval_fn=lambda s: task.evaluate(cell, s.params), eval_every=cfg["eval_every"],
                               steps_per_call=cfg["eval_every"], num_runs=len(runs), seed=cfg["data_seed"],
                               progress=True, on_non_finite="stop_run")
    seconds = time.perf_counter() - t0
    eval_steps = np.arange(cfg["eval_every"], cfg["steps"] + 1, cfg["eval_every"])
    out = {k: np.full((len(runs), len(eval_steps)), task.chance) for k in ("val", "test")}
    for r, h in enumerate(hists):
        for e in h.eval:
            i = int(np.searchsorted(eval_steps, e["step"]))
            if i < len(eval_steps) and eval_steps[i] == e["step"]:
                out["val"][r, i], out["test"][r, i] = e["val"], e["test"]
    diverged = np.array([h.stop_reason == "non_finite" for h in hists])
    n_params = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(params["cell"]))
    return dict(runs=runs, val=out["val"], test=out["test"], diverged=diverged, eval_steps=eval_steps,
                seconds=seconds, n_params=n_params)


def summarise(r, lrs, S) -> dict:
    """Chooses the learning rate by mean final validation score (ties: mean over evaluations); test at that lr."""
    by_lr = {}
    for i, lr in enumerate(lrs):
        rows = slice(i * S, (i + 1) * S)
        by_lr[lr] = dict(val_final=float(r["val"][rows, -1].mean()), val_mean=float(r["val"][rows].mean()),
                         test_final=float(r["test"][rows, -1].mean()), diverged=int(r["diverged"][rows].sum()))
    best = min(lrs, key=lambda lr: (round(by_lr[lr]["val_final"], 4), by_lr[lr]["val_mean"]))
    i = lrs.index(best)
    test = r["test"][i * S:(i + 1) * S]
    return dict(lr=best, test=describe(test[:, -1]), val=describe(r["val"][i * S:(i + 1) * S, -1]),
                diverged=int(r["diverged"][i * S:(i + 1) * S].sum()),
                by_lr={f"{lr:g}": v for lr, v in by_lr.items()}, test_curve=test.tolist(),
                eval_steps=r["eval_steps"].tolist(), n_params=r["n_params"], seconds=r["seconds"])


def describe(values) -> dict:
    v = np.asarray(values, dtype=float)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0, min=float(v.min()),
                max=float(v.max()), per_seed=[float(a) for a in v])


# ----------------------------------------------------------------------------
# Greff's conclusions: Welch's t-test against vanilla
# ----------------------------------------------------------------------------

def welch(a, b) -> float:
    """Two-sided Welch t-test p-value of mean(a) != mean(b); 1.0 when both samples are constant and equal."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.var() == 0 and b.var() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare(variants: dict) -> dict:
    """Per variant: the difference of mean test scores to vanilla (positive = worse), Welch p, and a verdict."""
    base = variants["vanilla"]["test"]["per_seed"]
    out = {}
    for name, v in variants.items():
        if name == "vanilla":
            continue
        p = welch(v["test"]["per_seed"], base)
        diff = v["test"]["mean"] - variants["vanilla"]["test"]["mean"]
        out[name] = dict(difference=diff, p_value=p,
                         verdict="worse" if p < ALPHA and diff > 0 else "better" if p < ALPHA and diff < 0 else
                         "no significant difference")
    return out


def conclusions(variants: dict, vs: dict) -> dict:
    """Greff et al.'s three conclusions for one task: holds (bool) and why (the stated criterion)."""
    better = [n for n, c in vs.items() if c["verdict"] == "better"]
    worse = [n for n, c in vs.items() if c["verdict"] == "worse"]
    ranked = sorted(vs, key=lambda n: variants[n]["test"]["mean"], reverse=True)   # worst first
    same = [n for n in ("CIFG", "NP") if vs[n]["verdict"] == "no significant difference"]
    fmt = lambda n: f"{n} {vs[n]['difference']:+.3g} (p={vs[n]['p_value']:.2g})"   # noqa: E731
    return {
        "no_variant_beats_vanilla": dict(
            holds=not better,
            detail=("no variant is significantly better" if not better else
                    "significantly better: " + ", ".join(fmt(n) for n in better))),
        "nfg_and_noaf_hurt_most": dict(
            holds=set(ranked[:2]) == {"NFG", "NOAF"} and {"NFG", "NOAF"} <= set(worse),
            detail=(f"worst two by mean: {ranked[0]}, {ranked[1]}; " + "; ".join(fmt(n) for n in ("NFG", "NOAF"))
                    + "; significantly worse: " + (", ".join(worse) or "none"))),
        "cifg_and_np_as_good_as_vanilla": dict(
            holds=len(same) == 2, detail="; ".join(f"{fmt(n)}: {vs[n]['verdict']}" for n in ("CIFG", "NP"))),
    }


CONCLUSION_TEXT = {"no_variant_beats_vanilla": "no variant beats vanilla",
                   "nfg_and_noaf_hurt_most": "NFG and NOAF hurt most",
                   "cifg_and_np_as_good_as_vanilla": "CIFG and NP as good as vanilla"}


# ----------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


VERDICT_COLOR = {"worse": "tab:red", "better": "tab:green", "no significant difference": "tab:gray", None: "tab:blue"}


def plot_distributions(results: dict, path: str):
    """Greff et al.'s Fig. 3: per-variant test-score box plots over seeds, vanilla first, coloured by Welch verdict."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(6.0 * len(results), 4.8), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (tname, res) in zip(axes[0], results.items()):
        names = list(res["variants"])
        data = [res["variants"][n]["test"]["per_seed"] for n in names]
        colors = [VERDICT_COLOR[res["vs_vanilla"].get(n, {}).get("verdict")] for n in names]
        box = ax.boxplot(data, positions=range(len(names)), widths=0.55, patch_artist=True, showfliers=False)
        for patch, c in zip(box["boxes"], colors):
            patch.set(facecolor=c, alpha=0.35, edgecolor=c)
        for k, (d, c) in enumerate(zip(data, colors)):
            ax.scatter(k + rng.uniform(-0.12, 0.12, len(d)), d, s=14, color=c, zorder=3)
        ax.axhline(np.median(data[0]), ls="--", lw=1, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_ylabel(f"{res['metric']} (lower is better)")
        ax.set_title(res["description"], fontsize=8)
    handles = [plt.Line2D([], [], marker="s", ls="", color=c, label=lab) for lab, c in
               (("vanilla", "tab:blue"), ("worse (Welch p<0.05)", "tab:red"), ("better", "tab:green"),
                ("no significant difference", "tab:gray"))]
    fig.legend(handles=handles, loc="upper center", ncol=4 if len(results) > 1 else 2, fontsize=8)
    fig.suptitle("LSTM variants vs vanilla: test score per seed\nat each variant's validation-chosen learning rate",
                 fontsize=10, y=0.9)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trained_units(res: dict) -> tuple[str, int]:
    """What a task's budget counts and how many per step: sequences (temporal order) or characters (char LM)."""
    cfg = res["config"]
    return ("training characters", cfg["batch"] * cfg["window"]) if "window" in cfg else ("training sequences",
                                                                                          cfg["batch"])


def _line_panels(results: dict, path: str, line, xlabel, ylabel, log_x=False):
    """One panel per task, one line per variant (vanilla black and thick): ``line(res, name, variant) -> (x, y, label)``."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(6.0 * len(results), 4.2), squeeze=False)
    for ax, (tname, res) in zip(axes[0], results.items()):
        for k, (n, v) in enumerate(res["variants"].items()):
            x, y, label = line(res, n, v)
            ax.plot(x, y, "o-" if log_x else "-", lw=2.5 if n == "vanilla" else 1.2,
                    color="k" if n == "vanilla" else f"C{k}", label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel(res))
        ax.set_ylabel(ylabel(res))
        ax.set_title(res["description"], fontsize=8)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: dict, path: str):
    """Mean test score over seeds against training sequences (characters for the LM), one line per variant."""
    _line_panels(results, path,
                 lambda res, n, v: ([trained_units(res)[1] * s for s in v["eval_steps"]],
                                    np.mean(v["test_curve"], axis=0), f"{n} (lr {v['lr']:g})"),
                 lambda res: trained_units(res)[0],
                 lambda res: f"{res['metric']}, mean over seeds")


def plot_learning_rates(results: dict, path: str):
    """Mean final validation score against learning rate, per variant (Greff's hyper-parameter analysis)."""
    _line_panels(results, path,
                 lambda res, n, v: ([float(a) for a in v["by_lr"]], [b["val_final"] for b in v["by_lr"].values()], n),
                 lambda res: "Adam learning rate",
                 lambda res: res["metric"].replace("test", "validation") + ", mean over seeds", log_x=True)


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

def print_table(res):
    print(f"\n{res['description']}: {res['metric']} at the validation-chosen lr, mean ± sd over "
          f"{res['config']['seeds']} seeds; Welch vs vanilla")
    print(f"{'variant':<8} {'params':>7} {'lr':>7} {'mean ± sd':>16}  {'vs vanilla':>10} {'p':>7}  {'verdict':<26} "
          f"per seed")
    for n, v in res["variants"].items():
        c = res["vs_vanilla"].get(n)
        cmp = (f"{c['difference']:>+10.3f} {c['p_value']:>7.3f}  {c['verdict']:<26}" if c else
               f"{'':>10} {'':>7}  {'(reference)':<26}")
        div = f" ({v['diverged']} diverged)" if v["diverged"] else ""
        print(f"{n:<8} {v['n_params']:>7,} {v['lr']:>7g} {v['test']['mean']:>8.3f} ± {v['test']['std']:<6.3f}"
              f"  {cmp} " + " ".join(f"{a:.3f}" for a in v["test"]["per_seed"]) + div)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="all nine variants with tiny budgets (<= 1 min on 2 cores)")
    g.add_argument("--full", action="store_true", help="the full study (default)")
    p.add_argument("--out", default="runs/lstm_variants", help="output directory (results.json, *.png)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)} (default: "
                   "both; each task's numbers do not depend on the other's)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="no training: one report in --out from the "
                   "results.json of runs of single tasks")
    args = p.parse_args(argv)
    if args.merge:
        os.makedirs(args.out, exist_ok=True)
        return merge(args.merge, args.out, time.perf_counter())
    names = [t for t in args.tasks.split(",") if t]
    if not names or any(t not in TASKS for t in names):
        p.error(f"--tasks must be a comma-separated subset of {','.join(TASKS)}, got {args.tasks!r}")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"seqjax LSTM variants (Greff et al. 2017), {'quick' if args.quick else 'full'}, jax {jax.__version__} on "
          f"{jax.default_backend()}", flush=True)

    tasks = {t: TASKS[t][0](TASKS[t][1 if args.quick else 2]) for t in names}
    results = {}
    for tname, task in tasks.items():
        cfg = task.cfg
        print(f"\n{task.description}: {len(VARIANTS)} variants x {len(cfg['lrs'])} learning rates "
              f"{list(cfg['lrs'])} x {cfg['seeds']} seeds", flush=True)
        variants = {}
        for variant in VARIANTS:
            print(f"  {variant}", flush=True)
            variants[variant] = summarise(train_variant(task, variant), list(cfg["lrs"]), cfg["seeds"])
        vs = compare(variants)
        results[tname] = dict(description=task.description, metric=task.metric, chance=task.chance,
                              config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                              variants=variants, vs_vanilla=vs, conclusions=conclusions(variants, vs))
        if isinstance(task, CharLM):
            results[tname]["corpus"] = task.info
        with open(os.path.join(args.out, "trained.json"), "w") as f:   # the numbers, before tables and plots
            json.dump(results, f)

    os.remove(os.path.join(args.out, "trained.json"))
    return report(results, args.out, "quick" if args.quick else "full", names, t0)


def report(results: dict, out: str, mode: str, names: list, t0: float, **extra) -> dict:
    """Prints the tables and Greff's conclusions, draws the plots, writes ``out/results.json``."""
    verdicts = []
    for res in results.values():
        print_table(res)
    print(f"\nGreff et al.'s conclusions (Welch's two-sided t-test on per-seed test scores, p < {ALPHA}):")
    for tname, res in results.items():
        for key, c in res["conclusions"].items():
            line = f"{tname}: {CONCLUSION_TEXT[key]}: {'HOLDS' if c['holds'] else 'does NOT hold'} ({c['detail']})"
            verdicts.append(line)
            print("  " + line)

    plots = {"distributions": "variant_distributions.png", "curves": "learning_curves.png",
             "learning_rates": "learning_rates.png"}
    plot_distributions(results, os.path.join(out, plots["distributions"]))
    plot_curves(results, os.path.join(out, plots["curves"]))
    plot_learning_rates(results, os.path.join(out, plots["learning_rates"]))
    res = dict(mode=mode, variants=list(VARIANTS), alpha=ALPHA, tasks_run=names,
               criterion=("Welch's two-sided t-test of per-seed test scores against vanilla at p < 0.05; "
                          "'hurt most' = significantly worse and the two worst means; learning rate chosen per "
                          "variant on the validation split"),
               optimizer="Adam (optax.adam via inject_hyperparams), gradients clipped to global norm 1",
               init="seqjax.lstm defaults: LeCun-normal w_x, orthogonal w_h, forget bias 1, zero peepholes",
               tasks=results, verdicts=verdicts, plots=plots, **extra)
    return write_results(out, res, list(plots.values()), t0)


def merge(dirs: list, out: str, t0: float) -> dict:
    """One report from runs of single tasks (``--tasks``): their ``results.json`` tasks side by side."""
    parts = []
    for d in dirs:
        with open(os.path.join(d, "results.json")) as f:
            parts.append(json.load(f))
    modes = {r["mode"] for r in parts}
    if len(modes) != 1:
        raise SystemExit(f"lstm_variants --merge: the runs mix modes {sorted(modes)}")
    tasks = {}
    for r in parts:
        tasks.update(r["tasks"])
    names = [t for t in TASKS if t in tasks]
    return report({t: tasks[t] for t in names}, out, modes.pop(), names, t0, merged_from=[
        dict(dir=os.path.relpath(d, out), tasks=r["tasks_run"], wall_seconds=r["wall_seconds"]) for d, r in
        zip(dirs, parts)])

if __name__ == "__main__":
    main()
