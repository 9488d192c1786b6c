#!/usr/bin/env python
"""Signal echoing with truncated BPTT (NYU DLSP20 week 6, ``09-echo_data.ipynb``), and what TBPTT can learn.

The input is a stream of random bits; the target is the same stream delayed by
``echo`` steps. The stream is cut into windows of ``T`` steps: the hidden state
is carried from window to window, the gradient is cut at every window boundary
(`seqjax.tbptt`).

1. **NYU's setting**: batch 5, echo 3, series 20 000, windows of 20, ``nn.RNN(1, 4,
   relu)`` + ``Linear(4, 1)``, BCE with logits, RMSprop 1e-3 (PyTorch's alpha
   0.99, eps 1e-8 outside the sqrt), 5 epochs of fresh data, PyTorch's
   initialisation; the state is zeroed at each epoch start and carried through
   the test loop too. The notebook reports "about 100%".
2. **The study**: test accuracy vs echo delay (3, 10, 20, 40, 80) for RNN, LSTM
   and GRU cells and several window lengths. A target at delay ``d`` depends on
   an input ``d`` steps back. Within a window of ``T`` steps, a target at
   position ``p`` has a gradient path to its input only if ``p >= d``; so a
   fraction ``max(0, 1 - d/T)`` of the targets teaches the delay, and for
   ``d >= T`` *no* gradient ever connects a target to the input it echoes:
   the state is carried, but nothing teaches the network to keep the bit.
   Only memory that the recurrent dynamics keep by accident (as in an
   echo-state network) can still be decoded by the trained readout, so
   accuracy stays near chance: measured 52-66% at d = T and d = 2T (T = 10,
   gated cells), chance (<= 50.5%) for every d >= 40 > T. With hidden 32 and
   5 epochs, capacity and training also limit long delays inside the window
   (d = 20 reaches 73-78% for LSTM/GRU, the RNN stays at chance beyond d = 10).

Usage::

    python examples/echo.py --quick          # <= 2 min on 2 CPU cores
    python examples/echo.py                  # NYU setting + the full study
    python examples/echo.py --out runs/echo  # where results.json and the PNGs go
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
from seqjax import tbptt
from seqjax.train import init_state
from _report import write_results  # examples/_report.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

NYU = dict(batch=5, echo=3, series=20_000, window=20, hidden=4, cell="rnn", activation="relu", lr=1e-3,
           rms_decay=0.99, rms_eps=1e-8, epochs=5, init="pytorch", seed=1, data_seed=3, test_seed=4)
"""NYU 09-echo_data.ipynb (torch seed 1, numpy seed 3; the test set is a separate EchoData)."""

STUDY = dict(batch=8, series=20_000, hidden=32, lr=3e-3, clip_norm=1.0, epochs=5, cells=("rnn", "lstm", "gru"),
             delays=(3, 10, 20, 40, 80), windows=(10, 25, 100), seed=0)
"""The study: Adam 3e-3, gradient clipping 1, hidden 32 (an RNN with relu, as NYU's)."""

QUICK_NYU = dict(NYU, epochs=2)
QUICK_STUDY = dict(STUDY, series=5_000, epochs=3, delays=(3, 10, 40), windows=(20,), hidden=16)


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

def echo_data(rng: np.random.Generator, batch: int, series: int, echo: int) -> tbptt.Stream:
    """NYU's EchoData as a time-major stream: x [N, B, 1] bits, y [N, B, 1] = x delayed by ``echo`` (zeros first)."""
    x = rng.binomial(1, 0.5, size=(batch, series)).astype(np.float32)
    y = np.zeros_like(x)
    y[:, echo:] = x[:, :-echo]
    return tbptt.Stream(x.T[..., None], y.T[..., None])


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------

def make_cell(kind: str, hidden: int, init: str, activation: str = "relu"):
    opts = {}
    if init == "pytorch":  # torch.nn.RNN/LSTM/GRU: every weight and bias U(+-1/sqrt(H))
        u = seqjax.symmetric_uniform(1.0 / math.sqrt(hidden))
        opts = dict(kernel_init=u, recurrent_init=u, bias_init=u)
    if kind == "rnn":
        return seqjax.rnn(hidden, activation=activation, **opts)
    if kind == "lstm":
        return seqjax.lstm(hidden, **({"forget_bias": 1.0} | opts))
    return seqjax.gru(hidden, **opts)


def init_params(cell, hidden: int, key, init: str):
    kc, kw, kb = jax.random.split(key, 3)
    if init == "pytorch":  # torch.nn.Linear(H, 1)
        s = 1.0 / math.sqrt(hidden)
        w, b = jax.random.uniform(kw, (hidden, 1), minval=-s, maxval=s), jax.random.uniform(kb, (1,), minval=-s,
                                                                                            maxval=s)
    else:
        w, b = jax.random.normal(kw, (hidden, 1)) / math.sqrt(hidden), jnp.zeros(1)
    return {"cell": cell.init(kc, 1), "w": w, "b": b}


def make_model(cell):
    def model(params, carry, xs, *, resets=None, key=None):       # xs [T, B, 1] -> logits [T, B, 1]
        carry, hs = seqjax.scan(cell, params["cell"], xs, carry=carry, resets=resets, time_major=True)
        return carry, hs @ params["w"] + params["b"]
    return model


def loss_fn(logits, targets):
    """Per-step BCE with logits and accuracy (sigmoid > 0.5) == target, both [T, B]."""
    bce = optax.losses.sigmoid_binary_cross_entropy(logits, targets)[..., 0]
    acc = ((logits[..., 0] > 0) == (targets[..., 0] > 0.5)).astype(jnp.float32)
    return bce, {"accuracy": acc}


def run(cfg: dict, *, kind: str, echo: int, window: int, optimizer, init: str, cache: dict, test_stream=None):
    """Trains one model with TBPTT; returns (test metrics, history)."""
    hidden, B = cfg["hidden"], cfg["batch"]
    ck = (kind, hidden, window, init, cfg.get("activation", "relu"))
    if ck not in cache:   # one compiled step per (cell, window): the delays reuse it
        cell = make_cell(kind, hidden, init, cfg.get("activation", "relu"))
        model = make_model(cell)
        cache[ck] = (cell, tbptt.make_step(model, loss_fn, optimizer, k1=window, has_aux=True),
                     tbptt.make_eval(model, loss_fn, has_aux=True))
    cell, step, ev = cache[ck]
    params = init_params(cell, hidden, jax.random.key(cfg["seed"]), init)
    rng = np.random.default_rng(cfg.get("data_seed", cfg["seed"] + 100))
    h0 = cell.initial_carry(params["cell"], (B,))
    if test_stream is None:
        test_stream = echo_data(np.random.default_rng(cfg.get("test_seed", 12345)), B, cfg["series"], echo)

    def data(epoch):   # asking for a new epoch regenerates the series (EchoData, chunk 0)
        return echo_data(rng, B, cfg["series"], echo)

    state, _, hist = tbptt.fit(step, init_state(params, optimizer), data, initial_carry=h0,
                               num_epochs=cfg["epochs"], scan_epoch=True,
                               eval_fn=lambda st: tbptt.evaluate(ev, st.params, test_stream, T=window,
                                                                 initial_carry=h0)[0])
    return hist.eval[-1], hist


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

def plot(study: dict, cfg: dict, out: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wins = list(cfg["windows"])
    fig, axes = plt.subplots(1, len(wins), figsize=(4.2 * len(wins), 3.6), sharey=True, squeeze=False)
    for ax, T in zip(axes[0], wins):
        for kind, marker in zip(cfg["cells"], "osD"):
            acc = [study[kind][str(T)][str(d)]["accuracy"] for d in cfg["delays"]]
            ax.plot(cfg["delays"], acc, marker=marker, label=kind.upper())
        ax.axvline(T, color="grey", ls="--", lw=1)
        ax.text(T, 0.52, " d = T", color="grey", fontsize=8)
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(cfg["delays"])
        ax.set_xticklabels([str(d) for d in cfg["delays"]])
        ax.set_title(f"window T = {T}")
        ax.set_xlabel("echo delay d (steps)")
        ax.set_ylim(0.45, 1.02)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend()
    fig.suptitle(f"Echo with TBPTT (H={cfg['hidden']}, {cfg['epochs']} epochs): the state is carried, "
                 "the gradient is cut at the window")
    fig.tight_layout()
    path = os.path.join(out, "echo_accuracy_vs_delay.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"accuracy_vs_delay": os.path.basename(path)}


def plot_nyu(hist, out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, acc = hist.series("accuracy")
    k = 50
    smooth = np.convolve(acc, np.ones(k) / k, mode="valid") if len(acc) > k else acc
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(steps[len(steps) - len(smooth):], smooth, label="train (50-window mean)")
    ev_steps, ev_acc = hist.series("accuracy", "eval")
    ax.plot(ev_steps, ev_acc, "o-", label="test (per epoch)")
    ax.set_xlabel("window (update)")
    ax.set_ylabel("accuracy")
    ax.set_title("NYU echo setting: RNN(4, relu), echo 3, T = 20")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "echo_nyu_learning_curve.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a reduced run (<= 2 min on 2 CPU cores)")
    ap.add_argument("--out", default="runs/echo", help="output directory for results.json and PNGs")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    nyu_cfg, study_cfg = (QUICK_NYU, QUICK_STUDY) if args.quick else (NYU, STUDY)
    t_start = time.perf_counter()

    # 1. NYU's setting
    t0 = time.perf_counter()
    nyu_opt = optax.rmsprop(nyu_cfg["lr"], decay=nyu_cfg["rms_decay"], eps=nyu_cfg["rms_eps"], eps_in_sqrt=False)
    nyu_test, nyu_hist = run(nyu_cfg, kind="rnn", echo=nyu_cfg["echo"], window=nyu_cfg["window"], optimizer=nyu_opt,
                             init="pytorch", cache={})
    nyu_seconds = time.perf_counter() - t0
    print(f"NYU setting (RNN 4 relu, echo 3, T=20, RMSprop 1e-3, {nyu_cfg['epochs']} epochs): test accuracy "
          f"{nyu_test['accuracy']:.4f}, per-epoch test accuracy "
          f"{[round(r['accuracy'], 4) for r in nyu_hist.eval]} ({nyu_seconds:.1f}s)", flush=True)

    # 2. the study
    opt = optax.chain(optax.clip_by_global_norm(study_cfg["clip_norm"]), optax.adam(study_cfg["lr"]))
    study: dict = {}
    cache: dict = {}
    rows = []
    for kind in study_cfg["cells"]:
        for T in study_cfg["windows"]:
            for d in study_cfg["delays"]:
                t0 = time.perf_counter()
                test, hist = run(study_cfg, kind=kind, echo=d, window=T, optimizer=opt, init="default", cache=cache)
                sec = time.perf_counter() - t0
                frac = max(0.0, 1.0 - d / T)
                entry = {"accuracy": test["accuracy"], "loss": test["loss"], "seconds": sec,
                         "supervised_fraction": frac, "epoch_accuracy": [r["accuracy"] for r in hist.eval]}
                study.setdefault(kind, {}).setdefault(str(T), {})[str(d)] = entry
                rows.append({"cell": kind, "window": T, "delay": d, "accuracy": test["accuracy"],
                             "grad_fraction": frac})
                print(f"  {kind:4s} T={T:3d} delay={d:3d}: test accuracy {test['accuracy']:.4f} "
                      f"(targets with a gradient path: {frac:.0%}; {sec:.1f}s)", flush=True)

    # table
    print("\nEcho with TBPTT: test accuracy (rows: cell, window T; columns: echo delay)")
    head = "cell  T    " + "".join(f"d={d:<7d}" for d in study_cfg["delays"])
    print(head)
    for kind in study_cfg["cells"]:
        for T in study_cfg["windows"]:
            print(f"{kind:5s} {T:<4d} " + "".join(f"{study[kind][str(T)][str(d)]['accuracy']:<9.3f}"
                                                   for d in study_cfg["delays"]))
    plots = plot(study, study_cfg, args.out)
    plots["nyu_learning_curve"] = plot_nyu(nyu_hist, args.out)
    res = {
        "mode": "quick" if args.quick else "full",
        "nyu": {"settings": nyu_cfg, "test_accuracy": nyu_test["accuracy"], "test_loss": nyu_test["loss"],
                "epoch_test_accuracy": [r["accuracy"] for r in nyu_hist.eval],
                "final_train_accuracy_last100": float(np.mean(nyu_hist.series("accuracy")[1][-100:])),
                "seconds": nyu_seconds, "reference": "NYU transcript: about 100%"},
        "study": {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in study_cfg.items()},
                  "results": study, "table": rows},
        "plots": plots,
        "seconds": time.perf_counter() - t_start,
    }
    return write_results(args.out, res, list(plots.values()), t_start)


if __name__ == "__main__":
    main()
