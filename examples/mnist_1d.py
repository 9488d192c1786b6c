#!/usr/bin/env python
"""MNIST-1D (Greydanus & Kobak 2020): six recurrent cells on data nobody here wrote, regular and time-shuffled.

(The file is named mnist_1d.py: a script named mnist1d.py would shadow the mnist1d package it imports.)

MNIST-1D is generated locally by the ``mnist1d`` package (``make_dataset(get_dataset_args())``, seed 42,
never its download path): 4,000 training and 1,000 test sequences of T = 40 steps, one channel, ten digit
classes. Its published test accuracies (the package README): logistic regression 32 %, MLP 68 %, CNN 94 %,
GRU 91 %, human about 96 %; on the time-shuffled variant (one fixed permutation of the 40 steps), GRU 57 %.

Every cell gets the same optimiser and step budget (Adam 3e-3, batch 128 drawn uniformly from the training
set, 3,000 steps, no clipping, no schedule) at about the same parameter count (about 50k; printed per cell):

* **GRU(128)**, **LSTM(110)**: `seqjax.nnx.SequenceClassifier` over one layer, read at the last step.
* **minGRU**, **minLSTM**, **LRU**, **RG-LRU** (the parallel cells): their gates and coefficients read only the current
  input, and the LRU is linear, so one layer over a one-channel signal cannot classify (a single LRU layer
  and a linear head are a linear classifier). They run in the residual block their papers use:
  ``x -> Linear(1, D) -> L x [h = h + Linear(gelu(cell(causal_conv4(LayerNorm(h)))))] -> mean over time
  -> Linear(D, 10)``; the depthwise causal convolution (kernel 4) is Mamba's and minGRU's language-model
  block's.

Reported per cell and variant: test accuracy after the budget (median and range over 3 seeds), and the
train-step time of one batch of 128 against the GRU's (``--timing``: timed in one process, interleaved,
medians, compile apart; the parallel cells with ``method="sequential"`` and ``method="associative"``).

Every run trains with ``seqjax.fit``: a cell's seeds in lockstep (``num_runs``), one jitted call per
evaluation period (``steps_per_call``).

Usage::

    python examples/mnist_1d.py --quick            # two cells, one seed, 100 steps (about a minute)
    python examples/mnist_1d.py                    # the full study (default)
    python examples/mnist_1d.py --no-timing        # training only (run at low priority)
    python examples/mnist_1d.py --timing-only      # step times only, merged into DIR/results.json
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
from _report import write_results  # examples/_report.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

CELLS = ("gru", "lstm", "min_gru", "min_lstm", "lru", "rg_lru")
PARALLEL = ("min_gru", "min_lstm", "lru", "rg_lru")
LABELS = {"gru": "GRU", "lstm": "LSTM", "min_gru": "minGRU", "min_lstm": "minLSTM", "lru": "LRU", "rg_lru": "RG-LRU"}

MODELS = {
    "gru": dict(arch="plain", hidden=128),
    "lstm": dict(arch="plain", hidden=110),
    "min_gru": dict(arch="blocks", width=96, layers=2, conv=4),
    "min_lstm": dict(arch="blocks", width=80, layers=2, conv=4),
    "lru": dict(arch="blocks", width=64, state=64, layers=2, conv=4),
    "rg_lru": dict(arch="blocks", width=80, layers=2, conv=4),
}
"""Per cell: ``plain`` = SequenceClassifier(cell(hidden)); ``blocks`` = the residual blocks of the docstring."""

TRAIN = dict(lr=3e-3, batch=128, steps=3000, eval_every=250)
TRAIN_METHOD = {kind: "associative" for kind in PARALLEL}
"""The parallel cells train with the associative scan (the faster evaluation of their train step here, see
``--timing``; the same function as the loop up to float rounding)."""
DATA_SEED = 42          # mnist1d's own default, passed explicitly
SEEDS_SEED = 1000       # model seeds are SEEDS_SEED + i; batches are drawn from fit(seed=...)
VARIANTS = ("regular", "shuffled")

PUBLISHED = {"regular": {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94, "GRU": 0.91, "human": 0.96},
             "shuffled": {"GRU": 0.57}}
"""Test accuracies from the mnist1d README (Greydanus & Kobak 2020)."""

FULL = dict(cells=CELLS, variants=VARIANTS, seeds=3, steps=TRAIN["steps"], eval_every=TRAIN["eval_every"],
            timing_rounds=7, timing_steps=5)
QUICK = dict(cells=("gru", "min_gru"), variants=("regular",), seeds=1, steps=100, eval_every=50,
             timing_rounds=2, timing_steps=1)


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

def load(variant: str) -> dict:
    """The MNIST-1D arrays, generated locally: ``x`` [4000, 40, 1] f32, ``y`` [4000] i32, ``x_test``, ``y_test``.

    ``variant="shuffled"`` is mnist1d's ``shuffle_seq=True``: the same samples with the time axis permuted
    by one fixed permutation (drawn by the package after the samples). The package seeds NumPy's global
    generator; its state is restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = DATA_SEED
    args.shuffle_seq = variant == "shuffled"
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    as_x = lambda a: jnp.asarray(a, jnp.float32)[..., None]  # noqa: E731
    return dict(x=as_x(d["x"]), y=jnp.asarray(d["y"], jnp.int32), x_test=as_x(d["x_test"]),
                y_test=jnp.asarray(d["y_test"], jnp.int32))


# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------

def make_cell(kind: str, size: int):
    return {"gru": seqjax.gru, "lstm": seqjax.lstm, "min_gru": seqjax.min_gru, "min_lstm": seqjax.min_lstm,
            "lru": seqjax.lru, "rg_lru": seqjax.rg_lru}[kind](size)


class CausalDepthwiseConv(nnx.Module):
    """``y_t = b + sum_k w_k * x_{t-k}`` per channel over ``[B, T, D]`` (zeros before t = 0), kernel ``K``.

    The same function as ``nnx.Conv(D, D, (K,), padding=[(K - 1, 0)], feature_group_count=D)`` (and its
    initialisation), written as K shifted products: XLA:CPU's grouped convolution is slow to differentiate.
    """

    def __init__(self, width: int, kernel: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel, 1, width)))   # nnx.Conv's layout [K, D/groups, D]
        self.bias = nnx.Param(jnp.zeros((width,)))

    def __call__(self, x):
        K = self.kernel.shape[0]
        padded = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
        T = x.shape[1]
        w = self.kernel[...][:, 0]                                        # [K, D]
        return self.bias[...] + sum(padded[:, K - 1 - k:K - 1 - k + T] * w[K - 1 - k] for k in range(K))


class ResidualBlocks(nnx.Module):
    """``[B, T, 1] -> logits [B, 10]``: Linear(1, D), L residual blocks, mean over time, Linear(D, 10).

    Block: ``h + Linear(gelu(cell(causal_conv(LayerNorm(h)))))``; the conv is depthwise (D groups).
    """

    def __init__(self, kind: str, *, width: int, layers: int, conv: int, state: int | None = None,
                 options: seqjax.ScanOptions | None = None, rngs: nnx.Rngs):
        self.embed = nnx.Linear(1, width, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(layers)])
        self.convs = nnx.List([CausalDepthwiseConv(width, conv, rngs=rngs) for _ in range(layers)])
        self.rnns = nnx.List([snx.Recurrent(make_cell(kind, state or width), width, options=options, rngs=rngs)
                              for _ in range(layers)])
        self.mixes = nnx.List([nnx.Linear(r.output_size, width, rngs=rngs) for r in self.rnns])
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        for norm, conv, rnn, mix in zip(self.norms, self.convs, self.rnns, self.mixes):
            h = h + mix(jax.nn.gelu(rnn(conv(norm(h)))))
        return self.head(h.mean(axis=1))


def build_model(kind: str, seed: int, method: str = "auto"):
    cfg, rngs = MODELS[kind], nnx.Rngs(seed)
    options = seqjax.ScanOptions(method=method)
    if cfg["arch"] == "plain":
        layer = snx.Recurrent(make_cell(kind, cfg["hidden"]), 1, options=options, rngs=rngs)
        return snx.SequenceClassifier(layer, 10, rngs=rngs)
    return ResidualBlocks(kind, width=cfg["width"], layers=cfg["layers"], conv=cfg["conv"],
                          state=cfg.get("state"), options=options, rngs=rngs)


def describe(kind: str) -> str:
    c = MODELS[kind]
    if c["arch"] == "plain":
        return f"{LABELS[kind]}({c['hidden']}), last step"
    inner = f"{LABELS[kind]}({c.get('state') or c['width']})"
    return f"{c['layers']} x [conv{c['conv']} + {inner} + MLP], D={c['width']}, mean"


def count_params(model) -> int:
    return int(sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param))))


def loss_and_metrics(graphdef):
    def loss_fn(params, batch):
        x, y = batch
        logits = nnx.merge(graphdef, params)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, dict(accuracy=jnp.mean(jnp.argmax(logits, -1) == y))
    return loss_fn


def sampler(data, batch: int):
    """``key -> (x [batch, 40, 1], y [batch])``: a batch drawn uniformly (with replacement) from the training set."""
    def batches(key):
        i = jax.random.randint(key, (batch,), 0, data["x"].shape[0])
        return data["x"][i], data["y"][i]
    return batches


# ----------------------------------------------------------------------------
# training: one seqjax.fit call per (cell, variant), all seeds in lockstep
# ----------------------------------------------------------------------------

def train(kind: str, variant: str, data: dict, cfg: dict, log_dir: str | None = None) -> dict:
    seeds = [SEEDS_SEED + i for i in range(cfg["seeds"])]
    models = [build_model(kind, s, TRAIN_METHOD.get(kind, "auto")) for s in seeds]
    graphdef, _ = nnx.split(models[0])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(m)[1] for m in models])
    tx = optax.adam(TRAIN["lr"])
    states = jax.vmap(lambda p: seqjax.init_state(p, tx))(params)
    loss_fn = loss_and_metrics(graphdef)

    def eval_fn(state):
        logits = nnx.merge(graphdef, state.params)(data["x_test"])
        return {"test_accuracy": jnp.mean(jnp.argmax(logits, -1) == data["y_test"])}

    step = seqjax.make_train_step(loss_fn, tx, has_aux=True)
    print(f"  {LABELS[kind]} ({describe(kind)}, {count_params(models[0]):,} params), {variant}: "
          f"{len(seeds)} seeds in lockstep, {cfg['steps']} steps of {TRAIN['batch']}", flush=True)
    t0 = time.perf_counter()
    _, hists = seqjax.fit(step, states, sampler(data, TRAIN["batch"]), num_steps=cfg["steps"], eval_fn=eval_fn,
                          eval_every=cfg["eval_every"], steps_per_call=cfg["eval_every"], num_runs=len(seeds),
                          seed=7, progress=True,
                          log_path=None if log_dir is None else os.path.join(log_dir, f"{kind}_{variant}"))
    seconds = time.perf_counter() - t0
    at, _ = hists[0].series("test_accuracy", "eval")
    curves = np.stack([h.series("test_accuracy", "eval")[1] for h in hists])          # [S, n_evals]
    train_acc = np.stack([h.series("accuracy")[1] for h in hists])                    # [S, steps]
    final = curves[:, -1]
    return dict(test_accuracy=summary(final), test_curve=curves.tolist(), eval_steps=at.tolist(),
                train_accuracy_last_250=summary(train_acc[:, -250:].mean(1)), seeds=seeds,
                params=count_params(models[0]), model=describe(kind), seconds=seconds)


def summary(values) -> dict:
    v = np.asarray(values, dtype=float)
    return dict(median=float(np.median(v)), min=float(v.min()), max=float(v.max()), per_seed=v.tolist())


# ----------------------------------------------------------------------------
# train-step timing
# ----------------------------------------------------------------------------

def timed_variants(cells) -> list[tuple[str, str]]:
    out = []
    for kind in cells:
        out += [(kind, "sequential"), (kind, "associative")] if kind in PARALLEL else [(kind, "sequential")]
    return out


def time_steps(cells, data: dict, rounds: int, steps: int) -> dict:
    """Median milliseconds of one train step (batch 128, one run) per (cell, method), interleaved over rounds.

    Each round times ``steps`` consecutive steps of every variant, the variants' order rotated per round;
    compilation (the first call) is timed apart.
    """
    batch = sampler(data, TRAIN["batch"])(jax.random.key(0))
    entries = {}
    for kind, method in timed_variants(cells):
        model = build_model(kind, SEEDS_SEED, method)
        graphdef, params = nnx.split(model)
        tx = optax.adam(TRAIN["lr"])
        step = seqjax.make_train_step(loss_and_metrics(graphdef), tx, has_aux=True)
        state = seqjax.init_state(params, tx)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        entries[(kind, method)] = dict(step=step, state=state, compile_s=time.perf_counter() - t0, ms=[])
    keys = list(entries)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            e = entries[key]
            t0 = time.perf_counter()
            for _ in range(steps):
                e["state"], m = e["step"](e["state"], batch)
            jax.block_until_ready(m["loss"])
            e["ms"].append(1000 * (time.perf_counter() - t0) / steps)
    gru = float(np.median(entries[("gru", "sequential")]["ms"])) if ("gru", "sequential") in entries else None
    out = {}
    for (kind, method), e in entries.items():
        med = float(np.median(e["ms"]))
        out.setdefault(kind, {})[method] = dict(median_ms=med, per_round_ms=e["ms"], compile_s=e["compile_s"],
                                                vs_gru=med / gru if gru else None)
    return dict(results=out, rounds=rounds, steps_per_round=steps, batch=TRAIN["batch"], T=40,
                machine=dict(cpu_count=os.cpu_count(), backend=jax.default_backend(),
                             load_average=list(os.getloadavg())))


# ----------------------------------------------------------------------------
# plots and table
# ----------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(study: dict, path: str):
    plt = _plt()
    variants = list(study)
    fig, axes = plt.subplots(1, len(variants), figsize=(5.6 * len(variants), 4.2), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for kind, r in study[variant].items():
            a, x = np.asarray(r["test_curve"]), np.asarray(r["eval_steps"])
            line, = ax.plot(x, np.median(a, 0), lw=2, label=f"{LABELS[kind]} ({r['params'] / 1e3:.0f}k)")
            ax.fill_between(x, a.min(0), a.max(0), color=line.get_color(), alpha=0.2)
        for name, acc in PUBLISHED[variant].items():
            ax.axhline(acc, ls=":", color="gray", lw=1)
            ax.text(x[0], acc, f" published {name} {100 * acc:.0f} %", fontsize=7, va="bottom", color="gray")
        ax.set_ylim(0, 1.0)
        ax.set_xlabel("training step (batch 128)")
        ax.set_ylabel("test accuracy (1,000 sequences)")
        ax.set_title(f"MNIST-1D, {variant}: median over seeds, band = min..max", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timing(timing: dict, path: str):
    plt = _plt()
    names, values, colors = [], [], []
    for kind, methods in timing["results"].items():
        for method, t in methods.items():
            names.append(LABELS[kind] + ("" if kind not in PARALLEL else f"\n{method}"))
            values.append(t["median_ms"])
            colors.append("C0" if kind not in PARALLEL else ("C1" if method == "sequential" else "C2"))
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.8))
    ax.bar(range(len(names)), values, color=colors)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("train step, ms (median)")
    ax.set_title(f"MNIST-1D train step (batch {timing['batch']}, T=40) on {timing['machine']['backend'].upper()}, "
                 f"{timing['machine']['cpu_count']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pct(s) -> str:
    return f"{100 * s['median']:5.1f} [{100 * s['min']:5.1f}, {100 * s['max']:5.1f}]"


def print_table(study: dict, timing: dict | None):
    print("\nMNIST-1D test accuracy % after the budget (median [min, max] over seeds); train step ms (median)")
    variants = list(study)
    head = f"{'model':<9} {'params':>7}  " + "".join(f"{v:<22}" for v in variants)
    head += f"{'step ms':>9} {'assoc ms':>9} {'vs GRU':>7}" if timing else ""
    print(head)
    cells = [k for k in CELLS if any(k in c for c in study.values())]
    for kind in cells:
        params = next(c[kind]["params"] for c in study.values() if kind in c)
        row = f"{LABELS[kind]:<9} {params:>7,}  "
        row += "".join(f"{pct(study[v][kind]['test_accuracy']) if kind in study[v] else '-':<22}" for v in variants)
        if timing and kind in timing["results"]:
            t = timing["results"][kind]
            seq, assoc = t["sequential"], t.get("associative")
            best = min([seq] + ([assoc] if assoc else []), key=lambda a: a["median_ms"])
            row += f"{seq['median_ms']:>9.2f} {assoc['median_ms'] if assoc else float('nan'):>9.2f} " \
                   f"{best['vs_gru']:>6.2f}x"
        print(row)
    for v in variants:
        print(f"published ({v}): " + ", ".join(f"{k} {100 * a:.0f} %" for k, a in PUBLISHED[v].items()))


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="GRU and minGRU, one seed, 100 steps (about a minute)")
    g.add_argument("--full", action="store_true", help="the full study (default)")
    p.add_argument("--out", default="runs/mnist1d", help="output directory (results.json, *.png)")
    p.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    p.add_argument("--steps", type=int, default=None, help="override the step budget (a multiple of eval_every)")
    p.add_argument("--variants", default=None, help="comma-separated subset of regular,shuffled")
    p.add_argument("--cells", default=None, help=f"comma-separated subset of {','.join(CELLS)}; their results "
                   "are added to those already in DIR/results.json")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--no-timing", action="store_true", help="skip the train-step timing")
    t.add_argument("--timing-only", action="store_true",
                   help="only time the train steps; merge them into DIR/results.json if it exists")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.steps is not None:
        if args.steps < 1 or args.steps % cfg["eval_every"]:
            p.error(f"--steps must be a positive multiple of {cfg['eval_every']}, got {args.steps}")
        cfg["steps"] = args.steps
    for name, allowed in (("variants", VARIANTS), ("cells", CELLS)):
        if getattr(args, name):
            chosen = tuple(getattr(args, name).split(","))
            if not set(chosen) <= set(allowed):
                p.error(f"--{name} must be a subset of {','.join(allowed)}, got {getattr(args, name)}")
            cfg[name] = chosen
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"seqjax MNIST-1D ({'quick' if args.quick else 'full'}), jax {jax.__version__} on {jax.default_backend()}")

    path = os.path.join(args.out, "results.json")
    results = dict(mode="quick" if args.quick else "full", config=cfg, train=TRAIN, data_seed=DATA_SEED,
                   models={k: dict(MODELS[k], description=describe(k)) for k in cfg["cells"]},
                   published=PUBLISHED, study={}, plots={})
    if not args.timing_only:
        for variant in cfg["variants"]:
            data = load(variant)
            print(f"\n{variant}: x {tuple(data['x'].shape)}, x_test {tuple(data['x_test'].shape)}", flush=True)
            study = results["study"].setdefault(variant, {})
            for kind in cfg["cells"]:
                study[kind] = train(kind, variant, data, cfg, os.path.join(args.out, "history"))
            results["study"][variant] = {k: study[k] for k in CELLS if k in study}
        results["plots"]["test_accuracy"] = "test_accuracy.png"
    if not args.no_timing:
        print(f"\ntiming the train steps ({cfg['timing_rounds']} interleaved rounds of {cfg['timing_steps']} steps)",
              flush=True)
        results["timing"] = time_steps(cfg["cells"], load("regular"), cfg["timing_rounds"], cfg["timing_steps"])
        results["plots"]["train_step_time"] = "train_step_time.png"
        plot_timing(results["timing"], os.path.join(args.out, "train_step_time.png"))
    lock = open(os.path.join(args.out, ".results.lock"), "w")   # runs into one DIR merge their results
    fcntl.flock(lock, fcntl.LOCK_EX)
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
    if args.cells and not args.timing_only and previous.get("mode") == results["mode"]:
        for variant, cells in previous.get("study", {}).items():   # keep DIR's results of the other cells
            merged = dict(cells, **results["study"].get(variant, {}))
            results["study"][variant] = {k: merged[k] for k in CELLS if k in merged}
        results["models"] = {k: v for k, v in dict(previous.get("models", {}), **results["models"]).items()}
        results["study"] = {v: results["study"][v] for v in VARIANTS if v in results["study"]}
        results["config"] = dict(results["config"], variants=list(results["study"]),
                                 cells=[k for k in CELLS if any(k in c for c in results["study"].values())])
    if args.timing_only and previous:                    # DIR's latest results with these step times
        results = dict(previous, timing=results["timing"], plots=dict(previous.get("plots", {}), **results["plots"]))
    if args.no_timing:                                   # keep the step times of a --timing-only run into DIR
        if "timing" in previous:
            results["timing"] = previous["timing"]
            results["plots"]["train_step_time"] = previous["plots"]["train_step_time"]
    if results["study"]:
        print_table(results["study"], results.get("timing"))
    if results["study"]:
        plot_curves(results["study"], os.path.join(args.out, "test_accuracy.png"))
    results.pop("wall_seconds", None)
    try:
        return write_results(args.out, results, list(results["plots"].values()), t0)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


if __name__ == "__main__":
    main()
