#!/usr/bin/env python
"""Temporal order (Hochreiter & Schmidhuber 1997, Experiment 6a): a vanilla RNN fails on long lags where an LSTM works.

The seeds' claim (NYU DLSP20 week 6, after H&S 1997): on the temporal-order task the RNN and the
LSTM both learn the short EASY sequences, but at the harder levels "RNN fails while LSTM continues
to work". This example tests it like for like and prints one verdict line per level.

1. **Like for like** at NORMAL, MODERATE and HARD (= 6a): RNN, GRU and LSTM with the same hidden
   size (32), optimiser (Adam, gradients clipped to norm 1, batch 16), learning-rate search (the same
   grid for every cell, chosen on a validation set) and number of training sequences (32,000; H&S's
   LSTM needed 31,390). Each cell gets its own principled initialisation:

   * **RNN** (tanh): an orthogonal recurrent matrix (every singular value 1, so the linearised
     recurrence neither shrinks nor grows a signal; Saxe et al. 2014), LeCun-normal inputs, zero bias.
   * **LSTM**: chrono initialisation (Tallec & Ollivier 2018): forget-gate bias ``log(U[1, T-1])``
     and input-gate bias its negative, for ``T`` the level's padded length, so the memory's time
     constants span the task's lags and distractors are not written in by default (H&S used input-gate
     biases of -2 and -4 for the same reason).
   * **GRU**: the same chrono bias on its update gate (``h_t = (1 - z) n + z h_{t-1}``: a bias
     ``log(U[1, T-1])`` keeps ``z`` near 1, the GRU's memory), other biases zero.

   Reported per cell: test accuracy after the budget (mean ± sd and min–max over seeds), seeds that
   reach >= 99 %, training sequences to 99 % test accuracy and to H&S's stopping criterion.
2. **NYU's own settings** (H=4, batch 32, RMSprop 1e-3, PyTorch initialisation, ReLU RNN, 100 epochs of
   31 batches): EASY after 10 and 100 epochs (the seed's table), and NORMAL, MODERATE, HARD.
3. An LSTM hidden-state heatmap over a HARD sequence (the seed's Figure 32).

``--experiment 6b`` runs H&S's Experiment 6b instead (`seqjax.tasks.temporal_order_6b`: three X/Y
symbols at t1 in 10-20, t2 in 33-43, t3 in 66-76 of a length 100-110 sequence, eight classes; H&S's
LSTM met their stopping rule after 571,100 training sequences on average over 10 trials): RNN, GRU and
LSTM with the like-for-like settings above (the same learning-rate grid, chosen on a validation set),
5 seeds, the same budget of 32,000 training sequences, the sequences until H&S's rule (the last 2000 training
sequences all correct: every softmax output within 0.3 of the one-hot target; this also puts their mean
squared error below 0.09 < 0.1, H&S's second condition) and the test accuracy after the budget.

Every run trains with ``seqjax.fit``: all seeds and learning rates of one cell in lockstep
(``num_runs``), one jitted call per evaluation period (``steps_per_call``).

Usage::

    python examples/temporal_order.py --quick          # HARD verdict, 3 seeds (about 1 min on 2 CPU cores)
    python examples/temporal_order.py                  # the full study (default)
    python examples/temporal_order.py --out runs/x     # where results.json and PNGs go
    python examples/temporal_order.py --experiment 6b  # H&S Experiment 6b (3 symbols, 8 classes), 5 seeds
    python examples/temporal_order.py --experiment 6b --quick   # 6b, LSTM only, 3 seeds, one learning rate

Optimiser note: PyTorch's RMSprop divides by ``sqrt(v) + eps``; optax's ``rmsprop`` defaults to
``eps_in_sqrt=True`` (``1 / sqrt(v + eps)``), which with eps=1e-8 acts like a PyTorch eps of 1e-4.
The NYU runs therefore use ``optax.rmsprop(1e-3, decay=0.99, eps=1e-8, eps_in_sqrt=False)``.
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
from seqjax.tasks import CLASSES_6A, CLASSES_6B, LEVELS, SYMBOLS, temporal_order, temporal_order_6b
from _report import write_results  # examples/_report.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

CELLS = ("rnn", "gru", "lstm")

LIKE = dict(hidden=32, batch=16, optimizer="adam", clip_norm=1.0, budget_sequences=32_000, eval_every=100,
            lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2), rnn_activation="tanh", init="principled")
"""Like-for-like settings, the same for every cell (init: see the module docstring)."""

NYU = dict(hidden=4, batch=32, lr=1e-3, rms_decay=0.99, rms_eps=1e-8, batches_per_epoch=31, init="pytorch",
           rnn_activation="relu")
"""NYU 08-seq_classification.ipynb settings (torch defaults for what it leaves implicit)."""

QUICK_LR = {"rnn": 1e-3, "gru": 3e-2, "lstm": 1e-2}
"""``--quick`` trains one learning rate per cell: the one the full run chose at HARD."""

HS_SEQUENCES = 31_390      # H&S 1997 Table 9/10: 6a solved after 31,390 training sequences (mean of 20 trials)
HS_SEQUENCES_6B = 571_100  # ... and 6b after 571,100 (mean of 10 trials)
HS_WINDOW = 2_000          # ... when the last 2000 training sequences were all correct
HS_TOLERANCE = 0.3         # ... every output's absolute error < 0.3
TEST_SIZE = 2_560          # H&S test-set size
TEST_SEED = 9001           # NYU evaluate_model seed
VAL_SIZE = 1_024           # learning rates are chosen on this set, never on the test set
VAL_SEED = 4242
SOLVED = 0.99              # a seed "solves" a level at >= 99 % test accuracy

FULL = dict(like_levels=("NORMAL", "MODERATE", "HARD"), like_seeds=5, like_lrs=None,
            like_budget=LIKE["budget_sequences"], nyu_levels=("EASY", "NORMAL", "MODERATE", "HARD"), nyu_seeds=5,
            nyu_epochs=100, easy_checkpoints=(10, 100))
QUICK = dict(like_levels=("HARD",), like_seeds=3, like_lrs=QUICK_LR, like_budget=12_800, nyu_levels=(),
             nyu_seeds=0, nyu_epochs=0, easy_checkpoints=())
EXP_6B = "6B"
"""The level name of Experiment 6b in the like-for-like study (``seqjax.tasks.temporal_order_6b``)."""
FULL_6B = dict(FULL, like_levels=(EXP_6B,), like_budget=LIKE["budget_sequences"], nyu_levels=(), nyu_seeds=0,
               nyu_epochs=0, easy_checkpoints=())
QUICK_6B = dict(QUICK, like_levels=(EXP_6B,), like_cells=("lstm",))


# ----------------------------------------------------------------------------
# data, model, initialisation
# ----------------------------------------------------------------------------

def sample(key, size: int, level: str):
    """A batch of ``level`` (a NYU level, or ``"6B"``), front padded as NYU: TaskBatch x [size, T, 8], y [size]."""
    if level == EXP_6B:
        return temporal_order_6b(key, size)
    return temporal_order(key, size, level)


def fixed_set(level: str, size: int, seed: int):
    """A fixed evaluation set of ``level``: TaskBatch x [size, T, 8], y [size]."""
    return sample(jax.random.key(seed), size, level)


def classes(level: str) -> str:
    """The class letters of ``level``: 4 for 6a and the NYU levels, 8 for 6b."""
    return CLASSES_6B if level == EXP_6B else CLASSES_6A


def padded_length(level: str) -> int:
    return LEVELS["HARD" if level == EXP_6B else level].padded_length   # 6b: lengths 100-110, as HARD


def chrono_bias(key, hidden: int, t_max: int):
    """``log(U[1, t_max - 1])`` per unit [hidden] (Tallec & Ollivier 2018)."""
    return jnp.log(jax.random.uniform(key, (hidden,), minval=1.0, maxval=float(t_max - 1)))


def principled_init(kind: str, params, key, t_max: int):
    """Applies the like-for-like initialisation to a cell's params (see the module docstring)."""
    H = LIKE["hidden"]
    if kind == "lstm":   # gate columns (i, f, g, o)
        b_f = chrono_bias(key, H, t_max)
        return params._replace(b=params.b.at[:H].set(-b_f).at[H:2 * H].set(b_f))
    if kind == "gru":    # gate columns (r, z, n)
        return params._replace(b=jnp.zeros_like(params.b).at[H:2 * H].set(chrono_bias(key, H, t_max)))
    return params        # rnn: seqjax.rnn's defaults are orthogonal w_h, LeCun-normal w_x, zero bias


def build_model(kind: str, hidden: int, seed: int, *, init: str, level: str, activation: str):
    """``{RNN,LSTM,GRU}(8, H)`` + ``Linear(H, 4)`` on the last step, as NYU's model."""
    rngs = nnx.Rngs(seed)
    opts = dict(activation=activation) if kind == "rnn" else {}
    layer_cls = {"rnn": snx.RNN, "lstm": snx.LSTM, "gru": snx.GRU}[kind]
    layer = layer_cls(len(SYMBOLS), hidden, init="pytorch" if init == "pytorch" else "default", rngs=rngs, **opts)
    if init == "principled":
        params = layer.get_params()[0]
        layer.set_params((principled_init(kind, params, jax.random.key(seed + 7919), padded_length(level)),))
    head = {}
    if init == "pytorch":  # torch.nn.Linear: U(+-1/sqrt(fan_in)) for weight and bias
        u = seqjax.symmetric_uniform(1.0 / math.sqrt(hidden))
        head = dict(kernel_init=u, bias_init=u)
    return snx.SequenceClassifier(layer, len(classes(level)), pooling="last", rngs=rngs, **head)


def hs_correct(logits, y):
    """H&S's per-sequence criterion on softmax outputs: every |p_k - onehot_k| < 0.3."""
    p = jax.nn.softmax(logits, axis=-1)
    err = jnp.abs(p - jax.nn.one_hot(y, p.shape[-1]))
    return jnp.all(err < HS_TOLERANCE, axis=-1)


# ----------------------------------------------------------------------------
# training: one seqjax.fit call per (cell, level), every seed and learning rate in lockstep
# ----------------------------------------------------------------------------

def train(kind, level, *, hidden, seeds, lrs, optimizer, batch, steps, eval_every, init, activation, label):
    """Trains ``len(lrs) * len(seeds)`` models (run ``r = i * len(seeds) + j``: lr ``i``, seed ``j``).

    Returns per-run arrays: ``train`` {loss, accuracy, hs_correct} [R, steps], ``test``/``val``
    accuracy [R, n_evals] at ``eval_sequences``, ``test_hs`` [R, n_evals], the final state, the graphdef.
    """
    runs = [(lr, s) for lr in lrs for s in seeds]
    models = [build_model(kind, hidden, s, init=init, level=level, activation=activation) for _, s in runs]
    graphdef, _ = nnx.split(models[0])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(m)[1] for m in models])
    tx = optimizer()
    states = jax.vmap(lambda p, lr: set_lr(seqjax.init_state(p, tx), lr))(params, jnp.array([lr for lr, _ in runs]))
    test, val = fixed_set(level, TEST_SIZE, TEST_SEED), fixed_set(level, VAL_SIZE, VAL_SEED)

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p)(b.x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, b.y).mean()
        return loss, dict(accuracy=jnp.mean(jnp.argmax(logits, -1) == b.y), hs_correct=jnp.sum(hs_correct(logits, b.y)))

    def eval_fn(state):
        out = {}
        for name, s in (("test", test), ("val", val)):
            logits = nnx.merge(graphdef, state.params)(s.x)
            out[f"{name}_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == s.y)
        out["test_hs_correct"] = jnp.mean(hs_correct(nnx.merge(graphdef, state.params)(test.x), test.y))
        return out

    step = seqjax.make_train_step(loss_fn, tx, has_aux=True)
    t0 = time.perf_counter()
    print(f"  {label}: {len(runs)} runs in lockstep, {steps} steps of {batch} sequences", flush=True)
    states, hists = seqjax.fit(step, states, lambda key: sample(key, batch, level), num_steps=steps,
                               eval_fn=eval_fn, eval_every=eval_every, steps_per_call=eval_every,
                               num_runs=len(runs), seed=10_000, progress=True)
    seconds = time.perf_counter() - t0
    train_m = {k: np.stack([h.series(k)[1] for h in hists]) for k in ("loss", "accuracy", "hs_correct")}
    ev = {k: np.stack([h.series(k, "eval")[1] for h in hists]) for k in ("test_accuracy", "val_accuracy",
                                                                          "test_hs_correct")}
    eval_steps = hists[0].series("test_accuracy", "eval")[0]
    return dict(runs=runs, train=train_m, test=ev["test_accuracy"], val=ev["val_accuracy"],
                test_hs=ev["test_hs_correct"], eval_sequences=eval_steps * batch, state=states,
                graphdef=graphdef, seconds=seconds, batch=batch)


def set_lr(state, lr):
    """The learning rate of one run, in its ``optax.inject_hyperparams`` state."""
    state.opt_state[-1].hyperparams["learning_rate"] = lr
    return state


def like_optimizer():
    return optax.chain(optax.clip_by_global_norm(LIKE["clip_norm"]),
                       optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))


def nyu_optimizer():
    return optax.chain(optax.inject_hyperparams(optax.rmsprop)(learning_rate=NYU["lr"], decay=NYU["rms_decay"],
                                                              eps=NYU["rms_eps"], eps_in_sqrt=False))


# ----------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------

def stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return dict(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()),
                per_seed=[float(a) for a in v])


def sequences_to_hs_criterion(hs_counts: np.ndarray, batch: int):
    """Training sequences seen when the last >= 2000 training sequences were all H&S-correct (None if never)."""
    window = math.ceil(HS_WINDOW / batch)
    run = 0
    for i, c in enumerate(hs_counts):
        run = run + 1 if c == batch else 0
        if run >= window:
            return (i + 1) * batch
    return None


def first_at(values: np.ndarray, at: np.ndarray, threshold: float):
    hit = np.nonzero(values >= threshold)[0]
    return int(at[hit[0]]) if hit.size else None


def summarise_cell(r, seeds) -> dict:
    """Picks the learning rate by mean final validation accuracy (ties: mean over evaluations), summarises it."""
    S = len(seeds)
    lrs = sorted({lr for lr, _ in r["runs"]}, key=[lr for lr, _ in r["runs"]].index)
    by_lr = {}
    for i, lr in enumerate(lrs):
        rows = slice(i * S, (i + 1) * S)
        by_lr[lr] = dict(val_final=float(r["val"][rows, -1].mean()), val_mean=float(r["val"][rows].mean()),
                         test_final=stats(r["test"][rows, -1]))
    best = max(lrs, key=lambda lr: (round(by_lr[lr]["val_final"], 4), by_lr[lr]["val_mean"]))
    i = lrs.index(best)
    rows = range(i * S, (i + 1) * S)
    test = r["test"][i * S:(i + 1) * S]
    to99 = [first_at(test[j], r["eval_sequences"], SOLVED) for j in range(S)]
    hs = [sequences_to_hs_criterion(r["train"]["hs_correct"][k], r["batch"]) for k in rows]
    return dict(lr=best, by_lr={f"{lr:g}": v for lr, v in by_lr.items()}, test_final=stats(test[:, -1]),
                seeds_solved=int(sum(a >= SOLVED for a in test[:, -1])), seeds=S,
                sequences_to_99pct=to99, sequences_to_hs_criterion=hs,
                test_curve=test.tolist(), eval_sequences=r["eval_sequences"].tolist(),
                train_accuracy_last_epoch=stats(r["train"]["accuracy"][list(rows), -31:].mean(1)),
                seconds=r["seconds"])


def verdict(level: str, cells: dict) -> str:
    parts = [f"{k.upper()} {100 * c['test_final']['mean']:.1f} % ({c['seeds_solved']}/{c['seeds']})"
             for k, c in cells.items()]
    solved = [k.upper() for k, c in cells.items() if c["seeds_solved"] == c["seeds"]]
    failed = [k.upper() for k, c in cells.items() if c["seeds_solved"] == 0]
    tail = []
    if solved:
        tail.append(f"{'/'.join(solved)} solve{'s' if len(solved) == 1 else ''} it on every seed")
    if failed:
        tail.append(f"{'/'.join(failed)} on no seed")
    return f"{level}: " + ", ".join(parts) + (" — " + "; ".join(tail) if tail else "")


def median_or_none(values):
    v = [x for x in values if x is not None]
    return (int(np.median(v)), len(v)) if v else (None, 0)


# ----------------------------------------------------------------------------
# studies
# ----------------------------------------------------------------------------

def like_study(cfg):
    res, runs_kept = {}, {}
    seeds = list(range(cfg["like_seeds"]))
    steps = cfg["like_budget"] // LIKE["batch"]
    steps -= steps % LIKE["eval_every"]
    for level in cfg["like_levels"]:
        res[level] = {}
        for kind in cfg.get("like_cells", CELLS):
            lrs = (cfg["like_lrs"][kind],) if cfg["like_lrs"] else LIKE["lrs"]
            r = train(kind, level, hidden=LIKE["hidden"], seeds=seeds, lrs=lrs, optimizer=like_optimizer,
                      batch=LIKE["batch"], steps=steps, eval_every=LIKE["eval_every"], init=LIKE["init"],
                      activation=LIKE["rnn_activation"], label=f"{level} {kind.upper()} (like for like)")
            res[level][kind] = summarise_cell(r, seeds)
            if level == "HARD" and kind == "lstm":
                runs_kept["lstm_hard"] = (r, res[level][kind]["lr"], len(seeds))
        print("  " + verdict(level, res[level]), flush=True)
    return res, runs_kept


def nyu_study(cfg):
    res = {}
    seeds = list(range(cfg["nyu_seeds"]))
    nb, E = NYU["batches_per_epoch"], cfg["nyu_epochs"]
    for level in cfg["nyu_levels"]:
        res[level] = {}
        for kind in CELLS:
            r = train(kind, level, hidden=NYU["hidden"], seeds=seeds, lrs=(NYU["lr"],), optimizer=nyu_optimizer,
                      batch=NYU["batch"], steps=E * nb, eval_every=nb, init=NYU["init"],
                      activation=NYU["rnn_activation"], label=f"{level} {kind.upper()} (NYU settings)")
            epoch_acc = r["train"]["accuracy"].reshape(len(seeds), E, nb).mean(-1)   # NYU: correct/(31*32)
            entry = dict(epoch_train_accuracy=epoch_acc.tolist(), epoch_test_accuracy=r["test"].tolist(),
                         test_final=stats(r["test"][:, -1]), seeds=len(seeds),
                         seeds_solved=int(sum(a >= SOLVED for a in r["test"][:, -1])),
                         epochs_to_100pct_train=[first_at(a, np.arange(1, E + 1), 1.0) for a in epoch_acc],
                         sequences_to_hs_criterion=[sequences_to_hs_criterion(h, NYU["batch"])
                                                    for h in r["train"]["hs_correct"]], seconds=r["seconds"])
            for e in cfg["easy_checkpoints"] if level == "EASY" else ():
                entry[f"test_accuracy_epoch{e}"] = stats(r["test"][:, e - 1])
                entry[f"train_accuracy_epoch{e}"] = stats(epoch_acc[:, e - 1])
            res[level][kind] = entry
        print("  " + verdict(f"{level} (NYU settings)", res[level]), flush=True)
    return res


# ----------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_like(like, path):
    plt = _plt()
    levels = list(like)
    fig, axes = plt.subplots(1, len(levels), figsize=(5.2 * len(levels), 4.2), squeeze=False)
    for ax, level in zip(axes[0], levels):
        for kind, c in like[level].items():
            a, x = np.asarray(c["test_curve"]), np.asarray(c["eval_sequences"])
            line, = ax.plot(x, a.mean(0), lw=2, label=f"{kind.upper()} (Adam {c['lr']:g})")
            ax.fill_between(x, a.min(0), a.max(0), color=line.get_color(), alpha=0.2)
        hs = HS_SEQUENCES_6B if level == EXP_6B else HS_SEQUENCES     # the 6a line on every 6a level, as before
        if hs <= 4 * x[-1]:
            ax.axvline(hs, ls="--", color="gray", lw=1, label=f"H&S 1997 LSTM: {hs:,}")
        ax.axhline(1 / len(classes(level)), ls=":", color="gray", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training sequences")
        ax.set_ylabel(f"test accuracy ({TEST_SIZE} sequences)")
        far = f" (H&S 1997 LSTM: {hs:,})" if hs > 4 * x[-1] else ""
        ax.set_title(f"{level}: H=32, same optimiser and budget{far}", fontsize=10)
        ax.legend(fontsize=8, loc="center right")
    fig.suptitle("Temporal order, like for like: mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_nyu(nyu, path):
    plt = _plt()
    levels = list(nyu)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.8), squeeze=False)
    for ax, level in zip(axes[0], levels):
        for kind, e in nyu[level].items():
            a = np.asarray(e["epoch_test_accuracy"])
            ep = np.arange(1, a.shape[1] + 1)
            line, = ax.plot(ep, a.mean(0), label=kind.upper())
            ax.fill_between(ep, a.min(0), a.max(0), color=line.get_color(), alpha=0.2)
        ax.axhline(0.25, ls=":", color="gray", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch (31 batches of 32)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{level}, NYU settings (H=4, RMSprop 1e-3)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hidden_states(model: snx.SequenceClassifier, x):
    """Per-step LSTM carries over one sequence, with the cell in a user-written lax.scan (carry first)."""
    cell, params = model.rnn.cell, model.rnn.get_params()[0]

    def body(carry, x_t):
        carry, _ = cell.apply(params, carry, x_t)
        return carry, carry

    _, carries = jax.lax.scan(body, cell.initial_carry(params, ()), x)
    return np.asarray(carries.h), np.asarray(jnp.tanh(carries.c))


def plot_heatmap(model, batch, path, index=0):
    plt = _plt()
    x = batch.x[index]
    h, tc = hidden_states(model, x)
    L = int(batch.lengths[index])
    T = x.shape[0]
    start = T - L                                           # front padding
    sym = "".join(SYMBOLS[i] if r.sum() > 0 else " " for i, r in zip(np.argmax(np.asarray(x), -1), np.asarray(x)))
    t1, t2 = (int(p) for p in batch.positions[index])
    pred = CLASSES_6A[int(jnp.argmax(model(x[None])[0]))]
    fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
    for ax, data, name in ((axes[0], h, "h_t"), (axes[1], tc, "tanh(c_t)")):
        im = ax.imshow(data[start:].T, aspect="auto", cmap="bwr", vmin=-1, vmax=1,
                       extent=(start - 0.5, T - 0.5, data.shape[1] - 0.5, -0.5))
        for t in (t1, t2):
            ax.axvline(t, color="k", lw=1)
            ax.text(t, -0.7, sym[t], ha="center", va="bottom", fontsize=10, fontweight="bold")
        ax.set_ylabel(f"{name}\nunit")
        fig.colorbar(im, ax=ax, pad=0.01)
    axes[1].set_xlabel(f"time step (true class {CLASSES_6A[int(batch.y[index])]}, predicted {pred})")
    axes[0].set_title(f"LSTM hidden state over a HARD sequence; lines at t1 ({sym[t1]}) and t2 ({sym[t2]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

def pct(s):
    return f"{100 * s['mean']:5.1f} ± {100 * s['std']:4.1f} [{100 * s['min']:5.1f}, {100 * s['max']:5.1f}]"


def seqs(values):
    med, n = median_or_none(values)
    return f"{med:,} ({n}/{len(values)})" if med is not None else f"never (0/{len(values)})"


def print_like_table(like):
    print("\nTemporal order, like for like (H=32, Adam + clip 1, batch 16, lr chosen on a validation set): "
          "test accuracy % (mean ± sd [min, max] over seeds)")
    print(f"{'level':<9} {'cell':<5} {'lr':>6}  {'test accuracy':<29} {'>=99%':>6}  {'seqs to 99% (median)':<22} "
          f"{'seqs to H&S criterion':<22}")
    for level, cells in like.items():
        for kind, c in cells.items():
            print(f"{level:<9} {kind.upper():<5} {c['lr']:>6g}  {pct(c['test_final']):<29} "
                  f"{c['seeds_solved']:>2}/{c['seeds']:<3}  {seqs(c['sequences_to_99pct']):<22} "
                  f"{seqs(c['sequences_to_hs_criterion']):<22}")


def against_hs_6b(cells: dict) -> list[str]:
    """One line per cell: seeds that met H&S's rule and their mean sequences, against H&S's 571,100 (mean of 10)."""
    lines = []
    for kind, c in cells.items():
        hit = [q for q in c["sequences_to_hs_criterion"] if q is not None]
        mean = f"after {np.mean(hit):,.0f} ± {np.std(hit):,.0f} sequences on average" if hit else "never"
        lines.append(f"6B {kind.upper()}: {len(hit)}/{c['seeds']} seeds met H&S's rule, {mean} "
                     f"(H&S 1997 LSTM: {HS_SEQUENCES_6B:,}, mean of 10 trials)")
    return lines


def print_nyu_table(nyu, epochs):
    print(f"\nTemporal order, NYU settings (H=4, RMSprop 1e-3, batch 32, {epochs} epochs): test accuracy %")
    print(f"{'level':<9} {'cell':<5} {'after 10 epochs':<29} {'after ' + str(epochs) + ' epochs':<29} {'>=99%':>6}")
    for level, cells in nyu.items():
        for kind, e in cells.items():
            at10 = np.asarray(e["epoch_test_accuracy"])[:, min(9, len(e["epoch_test_accuracy"][0]) - 1)]
            print(f"{level:<9} {kind.upper():<5} {pct(stats(at10)):<29} {pct(e['test_final']):<29} "
                  f"{e['seeds_solved']:>2}/{e['seeds']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="HARD verdict with 3 seeds (about 1 min on 2 CPU cores)")
    g.add_argument("--full", action="store_true", help="the full study (default)")
    p.add_argument("--experiment", choices=("6a", "6b"), default="6a",
                   help="6a (default): the NYU levels up to HARD = 6a; 6b: H&S's three-symbol, eight-class task")
    p.add_argument("--out", default=None,
                   help="output directory (results.json, *.png; default runs/temporal_order[_6b])")
    p.add_argument("--seeds", type=int, default=None, help="override the number of seeds of every study")
    p.add_argument("--cells", default=None, help="comma-separated subset of rnn,gru,lstm for the like-for-like study")
    p.add_argument("--lr", type=float, default=None,
                   help="train the like-for-like study at this one learning rate instead of searching the grid")
    args = p.parse_args(argv)
    cells = tuple(c.strip() for c in args.cells.split(",")) if args.cells else None
    if cells and set(cells) - set(CELLS):
        p.error(f"--cells: unknown {sorted(set(cells) - set(CELLS))}; choose from {list(CELLS)}")
    six_b = args.experiment == "6b"
    cfg = dict((QUICK_6B if args.quick else FULL_6B) if six_b else (QUICK if args.quick else FULL))
    args.out = args.out or ("runs/temporal_order_6b" if six_b else "runs/temporal_order")
    if cells:
        cfg["like_cells"] = cells
    if args.lr is not None:
        cfg["like_lrs"] = {k: args.lr for k in CELLS}
    if args.seeds is not None:
        cfg["like_seeds"] = args.seeds
        cfg["nyu_seeds"] = args.seeds if cfg["nyu_seeds"] else 0
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"seqjax temporal order, experiment {args.experiment} ({'quick' if args.quick else 'full'}), "
          f"jax {jax.__version__} on {jax.default_backend()}")

    print("\nLike for like:", {k: v for k, v in LIKE.items()}, flush=True)
    like, kept = like_study(cfg)
    nyu = {}
    if cfg["nyu_levels"]:
        print("\nNYU settings:", NYU, flush=True)
        nyu = nyu_study(cfg)

    print_like_table(like)
    if nyu:
        print_nyu_table(nyu, cfg["nyu_epochs"])
    print("\nVerdict (test accuracy after the budget, seeds >= 99 %):")
    verdicts = [verdict(level, cells) for level, cells in like.items()]
    verdicts += [verdict(f"{level} (NYU settings)", cells) for level, cells in nyu.items()]
    for line in verdicts:
        print("  " + line)
    if EXP_6B in like:
        for line in against_hs_6b(like[EXP_6B]):
            print("  " + line)

    plots = {"like": os.path.join(args.out, "like_for_like.png")}
    plot_like(like, plots["like"])
    if nyu:
        plots["nyu"] = os.path.join(args.out, "nyu_settings.png")
        plot_nyu(nyu, plots["nyu"])
    if "lstm_hard" in kept:
        r, lr, S = kept["lstm_hard"]
        i = sorted({a for a, _ in r["runs"]}, key=[a for a, _ in r["runs"]].index).index(lr)
        model = nnx.merge(r["graphdef"], jax.tree.map(lambda a: a[i * S], r["state"].params))
        plots["hidden_state"] = os.path.join(args.out, "lstm_hidden_state.png")
        plot_heatmap(model, fixed_set("HARD", 8, TEST_SEED), plots["hidden_state"])

    results = dict(mode="quick" if args.quick else "full", experiment=args.experiment, config=cfg,
                   like_settings=LIKE, nyu_settings=NYU,
                   optimizer_note="optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False) == torch RMSprop "
                                  "(alpha=0.99, eps=1e-8 added after the square root)",
                   hs_criterion=f"a sequence is correct if every softmax output is within {HS_TOLERANCE} of the "
                                f"one-hot target; solved when the last {HS_WINDOW} training sequences are correct",
                   hs_reference_sequences=HS_SEQUENCES_6B if six_b else HS_SEQUENCES, test_size=TEST_SIZE,
                   like=like, nyu=nyu, verdicts=verdicts,
                   plots={k: os.path.basename(v) for k, v in plots.items()})
    return write_results(args.out, results, list(results["plots"].values()), t0)


if __name__ == "__main__":
    main()
