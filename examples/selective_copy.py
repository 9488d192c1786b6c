#!/usr/bin/env python
"""Selective copying (Gu & Dao 2023; Feng et al. 2024): does depth let minGRU copy tokens it must select by content?

Feng et al. ("Were RNNs All We Needed?", arXiv 2410.01201, Table 2) report on Mamba's selective copying
task (16 data tokens among 4,096 steps, vocabulary 16): minGRU 99.5 ± 0.2 % with 3 layers and 37.0 % with
1 layer (minLSTM 96.0 ± 2.8 % with 3 layers). One minGRU layer's gates read only the current token, so it
cannot tell which earlier token to keep where; stacked layers can.

This example trains minGRU with 1 and 3 layers on the task from `seqjax.tasks.selective_copy` (fresh
batches every step, explicit keys) and reports the token accuracy at the marker steps on a fixed test set
(median and range over seeds). The model: one-hot tokens -> Linear(A, D) -> L x [h = h + Linear(gelu(
minGRU(LayerNorm(h))))] -> Linear(D, A) at the last M steps; trained with the associative scan
(``method="associative"``), Adam, cross-entropy on the M copied tokens.

The default run is shorter than the paper's (it runs on two CPU cores): ``num_noise`` = 64 blank steps
instead of 4,080 (T = 96), 16 tokens, vocabulary 16; the step budget is in ``FULL``.

Usage::

    python examples/selective_copy.py --quick      # 1 and 3 layers, 1 seed, a short budget (under a minute)
    python examples/selective_copy.py              # the default study
    python examples/selective_copy.py --out DIR    # where results.json and PNGs go
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import seqjax
import seqjax.nnx as snx
from seqjax.tasks import copy_accuracy, selective_copy
from _report import write_results  # examples/_report.py

TASK = dict(num_noise=64, num_tokens=16, vocab_size=16)
MODEL = dict(width=64, method="associative")
TRAIN = dict(lr=1e-3, batch=64)
PAPER = {"Feng et al. 2024, minGRU, 3 layers": 0.995, "Feng et al. 2024, minGRU, 1 layer": 0.370,
         "Feng et al. 2024, minLSTM, 3 layers": 0.960}
TEST_SIZE, TEST_SEED = 2048, 9001

FULL = dict(layers=(1, 3), seeds=3, steps=3000, eval_every=250, task=TASK)
QUICK = dict(layers=(1, 3), seeds=1, steps=200, eval_every=100, task=dict(TASK, num_noise=16, num_tokens=8))


class CopyModel(nnx.Module):
    """``x`` [B, T, A] one-hot -> logits [B, M, A] at the last ``M`` steps."""

    def __init__(self, vocab: int, width: int, layers: int, copies: int, method: str, rngs: nnx.Rngs):
        options = seqjax.ScanOptions(method=method)
        self.copies = copies
        self.embed = nnx.Linear(vocab, width, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(layers)])
        self.rnns = nnx.List([snx.Recurrent(seqjax.min_gru(width), width, options=options, rngs=rngs)
                              for _ in range(layers)])
        self.mixes = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        for norm, rnn, mix in zip(self.norms, self.rnns, self.mixes):
            h = h + mix(jax.nn.gelu(rnn(norm(h))))
        return self.head(h[:, -self.copies:])


def count_params(model) -> int:
    return int(sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param))))


def train(layers: int, cfg: dict, log_dir: str | None = None) -> dict:
    task = cfg["task"]
    seeds = list(range(cfg["seeds"]))
    make = lambda s: CopyModel(task["vocab_size"], MODEL["width"], layers, task["num_tokens"],  # noqa: E731
                               MODEL["method"], nnx.Rngs(s))
    models = [make(s) for s in seeds]
    graphdef, _ = nnx.split(models[0])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(m)[1] for m in models])
    tx = optax.adam(TRAIN["lr"])
    states = jax.vmap(lambda p: seqjax.init_state(p, tx))(params)
    test = selective_copy(jax.random.key(TEST_SEED), TEST_SIZE, **task)

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p)(b.x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, b.y).mean()
        return loss, dict(accuracy=copy_accuracy(logits, b.y))

    def eval_fn(state):
        return {"test_accuracy": copy_accuracy(nnx.merge(graphdef, state.params)(test.x), test.y)}

    step = seqjax.make_train_step(loss_fn, tx, has_aux=True)
    print(f"  minGRU x {layers} ({count_params(models[0]):,} params): {len(seeds)} seeds in lockstep, "
          f"{cfg['steps']} steps of {TRAIN['batch']}", flush=True)
    t0 = time.perf_counter()
    _, hists = seqjax.fit(step, states, lambda key: selective_copy(key, TRAIN["batch"], **task),
                          num_steps=cfg["steps"], eval_fn=eval_fn, eval_every=cfg["eval_every"],
                          steps_per_call=cfg["eval_every"], num_runs=len(seeds), seed=100, progress=True,
                          log_path=None if log_dir is None else os.path.join(log_dir, f"layers{layers}"))
    at, _ = hists[0].series("test_accuracy", "eval")
    curves = np.stack([h.series("test_accuracy", "eval")[1] for h in hists])
    final = curves[:, -1]
    return dict(test_accuracy=dict(median=float(np.median(final)), min=float(final.min()), max=float(final.max()),
                                   per_seed=final.tolist()),
                test_curve=curves.tolist(), eval_steps=at.tolist(), params=count_params(models[0]),
                seconds=time.perf_counter() - t0)


def plot(results: dict, cfg: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for layers, r in results.items():
        a, x = np.asarray(r["test_curve"]), np.asarray(r["eval_steps"])
        line, = ax.plot(x, np.median(a, 0), lw=2, label=f"minGRU x {layers} ({r['params'] / 1e3:.0f}k params)")
        ax.fill_between(x, a.min(0), a.max(0), color=line.get_color(), alpha=0.2)
    for name, acc in PAPER.items():
        if "minGRU" in name:
            ax.axhline(acc, ls=":", color="gray", lw=1)
            ax.text(x[0], acc, f" {name}: {100 * acc:.1f} % (T=4112)", fontsize=7, va="bottom", color="gray")
    T = cfg["task"]["num_noise"] + 2 * cfg["task"]["num_tokens"]
    ax.axhline(1 / (cfg["task"]["vocab_size"] - 2), ls="--", color="gray", lw=1, label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"training step (batch {TRAIN['batch']})")
    ax.set_ylabel(f"token accuracy ({TEST_SIZE} test sequences)")
    ax.set_title(f"Selective copying, T={T}, {cfg['task']['num_tokens']} tokens: median over seeds, "
                 "band = min..max", fontsize=9)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a short sequence and budget, one seed (under a minute)")
    g.add_argument("--full", action="store_true", help="the default study")
    p.add_argument("--out", default="runs/selective_copy", help="output directory (results.json, *.png)")
    p.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    p.add_argument("--steps", type=int, default=None, help="override the step budget")
    p.add_argument("--layers", default=None, help="comma-separated layer counts (default 1,3); their results are "
                   "added to those already in DIR/results.json")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.steps is not None:
        cfg["steps"] = args.steps
    if args.layers:
        cfg["layers"] = tuple(int(n) for n in args.layers.split(","))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    task = cfg["task"]
    T = task["num_noise"] + 2 * task["num_tokens"]
    print(f"seqjax selective copying ({'quick' if args.quick else 'full'}), T={T}, {task['num_tokens']} tokens, "
          f"vocabulary {task['vocab_size']}; jax {jax.__version__} on {jax.default_backend()}")
    results = {layers: train(layers, cfg, os.path.join(args.out, "history")) for layers in cfg["layers"]}
    path = os.path.join(args.out, "results.json")
    lock = open(os.path.join(args.out, ".results.lock"), "w")   # runs into one DIR merge their results
    fcntl.flock(lock, fcntl.LOCK_EX)
    if args.layers and os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("mode") == ("quick" if args.quick else "full"):
            results = {**{int(k): v for k, v in previous["results"].items()}, **results}
    results = dict(sorted(results.items()))

    print(f"\nSelective copying, T={T}: token accuracy % at the marker steps (median [min, max] over seeds)")
    print(f"{'model':<14} {'params':>7}  {'test accuracy':<22}")
    for layers, r in results.items():
        s = r["test_accuracy"]
        print(f"{'minGRU x ' + str(layers):<14} {r['params']:>7,}  "
              f"{100 * s['median']:5.1f} [{100 * s['min']:5.1f}, {100 * s['max']:5.1f}]")
    print("published (T=4112): " + ", ".join(f"{k} {100 * a:.1f} %" for k, a in PAPER.items()))

    plots = {"test_accuracy": "test_accuracy.png"}
    plot(results, cfg, os.path.join(args.out, plots["test_accuracy"]))
    out = dict(mode="quick" if args.quick else "full", config=dict(cfg, layers=list(results)), T=T, model=MODEL, train=TRAIN, paper=PAPER,
               test_size=TEST_SIZE, results={str(k): v for k, v in results.items()}, plots=plots)
    try:
        return write_results(args.out, out, list(plots.values()), t0)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


if __name__ == "__main__":
    main()
