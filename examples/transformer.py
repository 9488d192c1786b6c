#!/usr/bin/env python
"""A Transformer against the LSTM: temporal order (HARD, NIGHTMARE) and dates -> ISO seq2seq, at equal size and budget.

Seed 000 says Transformers outperform seq2vec2seq models at translation; seed 003 derives
their pieces (scaled dot-product and multi-head attention). This example tests the claim on
seqjax's own tasks, like for like:

1. **Temporal order** (H&S 1997 Experiment 6a = HARD, T=111; and NIGHTMARE, T=501, lags up to
   ~280 steps). The LSTM is `temporal_order.py`'s like-for-like model (H=32, chrono
   initialisation, front padding, the last step's output into a linear head). The Transformer is a
   pre-LN encoder (`seqjax.transformer.encoder`: 2 blocks, D=16, 2 heads, feed-forward 48,
   sinusoidal positions) over the right-padded sequence with its padding mask, mean-pooled over
   the valid steps into a linear head: about the LSTM's parameter count. Both see the same
   sequences (the same keys; only the padding side differs), the same optimiser (Adam, gradients
   clipped to norm 1, batch 16), the same learning-rate grid at HARD (chosen per model on a
   validation set, never on the test set; NIGHTMARE reuses each model's HARD rate) and the same
   number of steps.
2. **Dates -> ISO** (`seq2seq.py`'s task and data: 14 human formats, held-out dates). The
   Transformer encoder-decoder (`seqjax.transformer.seq2seq`) against LSTM encoder-decoders
   (`seqjax.seq2seq.seq2seq` with LSTM cells) with and without additive attention, sized to about
   the Transformer's parameter count; the same Adam schedule, batch, steps and greedy decoding.
   Reported: exact-match accuracy on the held-out test dates.

Reported per model: test accuracy after the budget (mean and per seed), steps to a stated target
(99 % test accuracy for temporal order, 99 % dev exact match for dates; evaluated every
``eval_every`` steps), the parameter count, and the train-step time (one jitted step of one run,
timed in this process, models interleaved, median of rounds, compilation excluded).

Every run trains with ``seqjax.fit``; the temporal-order runs of one model (all learning rates and
seeds) in lockstep (``num_runs``).

Usage::

    python examples/transformer.py --quick          # HARD + dates, small budget (about 1 min on 2 CPU cores)
    python examples/transformer.py                  # the full study (default)
    python examples/transformer.py --cut            # a smaller subset for a busy machine (see CUT)
    python examples/transformer.py --out runs/x     # where results.json and PNGs go (default runs/transformer)
    python examples/transformer.py --phase train    # training only (results.json without timings)
    python examples/transformer.py --phase timing   # timings only, merged into an existing results.json

Timings should run alone (``flock /tmp/seqjax-bench.lock python examples/transformer.py --phase
timing``) and the training at low priority, so the committed results come from two invocations.
Budgets are steps, never seconds.
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
from flax import nnx

import seqjax
from seqjax import seq2seq as s2s
from seqjax.losses import mean_valid
from seqjax.tasks import CLASSES_6A, LEVELS, SYMBOLS, temporal_order
from _report import write_results  # examples/_report.py
from temporal_order import TEST_SEED, TEST_SIZE, VAL_SEED, VAL_SIZE, build_model, first_at, set_lr, stats
from seq2seq import SRC_VOCAB, TGT_LEN, TGT_VOCAB, encode_pairs, make_examples, split_dates

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

ORDER = dict(lstm_hidden=32, model_size=16, num_heads=2, num_layers=2, ff_size=48, batch=16, clip_norm=1.0,
             target=0.99)
"""Temporal order: model sizes and the shared optimiser settings."""

DATES = dict(model_size=32, num_heads=4, num_layers=2, ff_size=64, lstm_hidden=40, lstm_attn_hidden=32,
             embed=32, batch=64, lr=3e-3, clip=1.0, eval_every=200, target=0.99)
"""Dates: the Transformer's size; LSTM hidden sizes chosen for about its parameter count (45-47k)."""

FULL = dict(order_levels=("HARD", "NIGHTMARE"), order_seeds=3,
            order_lrs={"HARD": (1e-3, 3e-3, 1e-2), "NIGHTMARE": "HARD"},
            order_steps={"HARD": 1000, "NIGHTMARE": 600}, order_eval_every={"HARD": 100, "NIGHTMARE": 200},
            order_test_size={"HARD": TEST_SIZE, "NIGHTMARE": 1024},
            date_models=("lstm", "lstm + attention", "transformer"), dates_seeds=3, dates_steps=1000,
            dev_size=500, test_size=2000, timing_rounds=7, timing_steps=5)
"""The full study. NIGHTMARE reuses each model's learning rate chosen at HARD (a per-level search did not fit
the machine's budget) and tests on 1024 sequences."""
CUT = dict(order_levels=("HARD", "NIGHTMARE"), order_seeds=2,
           order_lrs={"HARD": {"lstm": (1e-2,), "transformer": (3e-3,)}, "NIGHTMARE": "HARD"},
           order_steps={"HARD": 400, "NIGHTMARE": 150}, order_eval_every={"HARD": 100, "NIGHTMARE": 50},
           order_test_size={"HARD": 1024, "NIGHTMARE": 512},
           date_models=("lstm", "transformer"), dates_seeds=2, dates_steps=400, dev_size=256, test_size=1000,
           timing_rounds=7, timing_steps=5, dates_eval_every=100)
"""``--cut``: the subset of the full study that fit a 2-core machine shared with other jobs (about 40 minutes at
a load average near 20): two seeds, fewer steps, no learning-rate search (the LSTM gets the rate
`temporal_order.py`'s search chose at HARD, 1e-2; the Transformer 3e-3, not searched), and no
"lstm + attention" dates model."""
QUICK = dict(order_levels=("HARD",), order_seeds=2, order_lrs={"HARD": (3e-3,)}, order_steps={"HARD": 200},
             order_eval_every={"HARD": 100}, order_test_size={"HARD": 512},
             date_models=("lstm", "transformer"), dates_seeds=1, dates_steps=60, dev_size=64, test_size=128,
             timing_rounds=2, timing_steps=1,
             quick_dates=dict(model_size=16, num_heads=2, num_layers=1, ff_size=32, lstm_hidden=16,
                              lstm_attn_hidden=16, embed=16, eval_every=60))

ORDER_MODELS = ("lstm", "transformer")


def n_params(tree) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# temporal order: models
# ----------------------------------------------------------------------------

def transformer_classifier(seed: int, *, num_classes=len(CLASSES_6A)):
    """``(encoder, params)``: the pre-LN encoder, mean pooling over valid steps and a linear head."""
    enc = seqjax.transformer.encoder(ORDER["num_layers"], ORDER["model_size"], ORDER["num_heads"], ORDER["ff_size"])
    ke, kh = jax.random.split(jax.random.key(seed))
    head = (jax.nn.initializers.lecun_normal()(kh, (ORDER["model_size"], num_classes)), jnp.zeros((num_classes,)))
    return enc, {"encoder": enc.init(ke, len(SYMBOLS)), "head": head}


def order_model(kind: str, level: str, seed: int):
    """``(params, logits_fn(params, TaskBatch) -> [B, 4], padding)`` for one run."""
    if kind == "lstm":
        model = build_model("lstm", ORDER["lstm_hidden"], seed, init="principled", level=level, activation="tanh")
        graphdef, params = nnx.split(model)
        return params, (lambda p, b: nnx.merge(graphdef, p)(b.x)), "front"
    enc, params = transformer_classifier(seed)

    def logits(p, b):
        ys = enc.apply(p["encoder"], b.x, lengths=b.lengths)
        w, c = p["head"]
        return mean_valid(ys, b.lengths) @ w + c

    return params, logits, "right"


def order_optimizer():
    return optax.chain(optax.clip_by_global_norm(ORDER["clip_norm"]),
                       optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))


def order_loss(logits_fn):
    def loss_fn(p, b):
        lg = logits_fn(p, b)
        loss = optax.softmax_cross_entropy_with_integer_labels(lg, b.y).mean()
        return loss, dict(accuracy=jnp.mean(jnp.argmax(lg, -1) == b.y))
    return loss_fn


def train_order(kind, level, *, seeds, lrs, steps, eval_every, test_size):
    """All ``len(lrs) * len(seeds)`` runs of one model at one level in lockstep (run ``i * S + j``: lr i, seed j)."""
    runs = [(lr, s) for lr in lrs for s in seeds]
    built = [order_model(kind, level, s) for _, s in runs]
    logits_fn, padding = built[0][1], built[0][2]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[b[0] for b in built])
    tx = order_optimizer()
    states = jax.vmap(lambda p, lr: set_lr(seqjax.init_state(p, tx), lr))(params, jnp.array([lr for lr, _ in runs]))
    sets = {"test": temporal_order(jax.random.key(TEST_SEED), test_size, level, padding=padding)}
    if len(lrs) > 1:   # the learning rate is chosen on a validation set
        sets["val"] = temporal_order(jax.random.key(VAL_SEED), VAL_SIZE, level, padding=padding)

    def eval_fn(state):
        return {f"{name}_accuracy": jnp.mean(jnp.argmax(logits_fn(state.params, s), -1) == s.y)
                for name, s in sets.items()}

    step = seqjax.make_train_step(order_loss(logits_fn), tx, has_aux=True)
    every = eval_every
    print(f"  {level} {kind}: {len(runs)} runs in lockstep, {steps} steps of {ORDER['batch']} "
          f"({n_params(built[0][0])} parameters)", flush=True)
    t0 = time.perf_counter()
    _, hists = seqjax.fit(step, states, lambda key: temporal_order(key, ORDER["batch"], level, padding=padding),
                          num_steps=steps, eval_fn=eval_fn, eval_every=every, steps_per_call=every,
                          num_runs=len(runs), seed=10_000, progress=True)
    seconds = time.perf_counter() - t0
    ev = {k: np.stack([h.series(f"{k}_accuracy", "eval")[1] for h in hists]) for k in sets}
    return dict(runs=runs, test=ev["test"], val=ev.get("val"), test_size=test_size,
                eval_steps=np.asarray(hists[0].series("test_accuracy", "eval")[0]),
                loss=np.stack([h.series("loss")[1] for h in hists]), seconds=seconds,
                n_params=n_params(built[0][0]))


def summarise_order(r, seeds):
    """Picks the learning rate by mean final validation accuracy (ties: mean over evaluations), summarises it."""
    S = len(seeds)
    lrs = list(dict.fromkeys(lr for lr, _ in r["runs"]))
    val = r["val"] if r["val"] is not None else np.zeros_like(r["test"])   # one learning rate: nothing to choose
    by_lr = {lr: dict(val_final=float(val[i * S:(i + 1) * S, -1].mean()), val_mean=float(val[i * S:(i + 1) * S].mean()),
                      test_final=stats(r["test"][i * S:(i + 1) * S, -1])) for i, lr in enumerate(lrs)}
    best = max(lrs, key=lambda lr: (round(by_lr[lr]["val_final"], 4), by_lr[lr]["val_mean"]))
    i = lrs.index(best)
    test = r["test"][i * S:(i + 1) * S]
    return dict(lr=best, by_lr={f"{lr:g}": v for lr, v in by_lr.items()}, test_final=stats(test[:, -1]),
                steps_to_target=[first_at(test[j], r["eval_steps"], ORDER["target"]) for j in range(S)],
                seeds_at_target=int(sum(a >= ORDER["target"] for a in test[:, -1])), seeds=S,
                test_curve=test.tolist(), eval_steps=r["eval_steps"].tolist(),
                loss_curve=r["loss"][i * S:(i + 1) * S].mean(0).tolist(), n_params=r["n_params"],
                test_size=r["test_size"], lr_grid=[float(a) for a in lrs],
                train_seconds=round(r["seconds"], 1))


# ----------------------------------------------------------------------------
# dates: models and training
# ----------------------------------------------------------------------------

def date_model(kind: str, d: dict):
    V_src, V_tgt = len(SRC_VOCAB), len(TGT_VOCAB)
    if kind == "transformer":
        return seqjax.transformer.seq2seq(V_src, V_tgt, model_size=d["model_size"], num_heads=d["num_heads"],
                                          num_layers=d["num_layers"], ff_size=d["ff_size"])
    attention = "additive" if kind == "lstm + attention" else None
    hidden = d["lstm_attn_hidden"] if attention else d["lstm_hidden"]
    return s2s.seq2seq(V_src, V_tgt, embed_size=d["embed"], hidden_size=hidden, attention=attention,
                       encoder_cell="lstm", decoder_cell="lstm")


def date_optimizer(d, steps):
    return optax.adam(optax.cosine_decay_schedule(d["lr"], steps, alpha=0.05))


def train_dates(kind, d, cfg, data, seed):
    model = date_model(kind, d)
    params = model.init(jax.random.key(seed))
    steps = cfg["dates_steps"]
    opt = date_optimizer(d, steps)
    step = seqjax.make_train_step(model.loss, opt, clip_norm=d["clip"], has_aux=True)
    dev, sample = data["dev"], data["sample"](seed)

    def eval_fn(state):
        g = model.greedy(state.params, dev.source, max_length=TGT_LEN)
        return {"dev_exact": float(s2s.exact_match(g.tokens, g.lengths, dev.target, dev.target_lengths).mean())}

    t0 = time.perf_counter()
    state, hist = seqjax.fit(step, seqjax.init_state(params, opt), (sample() for _ in iter(int, 1)),
                             num_steps=steps, eval_fn=eval_fn, eval_every=d["eval_every"], progress=True)
    secs = time.perf_counter() - t0
    test = data["test"]
    g = model.greedy(state.params, test.source, max_length=TGT_LEN)
    ok = s2s.exact_match(g.tokens, g.lengths, test.target, test.target_lengths)
    at, dev_curve = hist.series("dev_exact", "eval")
    print(f"    {kind:<17} seed {seed}: test exact {ok.mean():.4f}  dev {dev_curve[-1]:.4f}  ({secs:.0f}s)", flush=True)
    return dict(test_exact=float(ok.mean()), dev_curve=[float(a) for a in dev_curve], eval_steps=[int(a) for a in at],
                steps_to_target=first_at(np.asarray(dev_curve), np.asarray(at), d["target"]),
                loss_curve=[float(a) for a in hist.series("loss")[1]], seconds=secs, n_params=n_params(params))


def date_data(cfg):
    train_dates, dev_dates, test_dates = split_dates()
    dev = encode_pairs(make_examples(dev_dates, np.random.default_rng(2), cfg["dev_size"]))
    test = encode_pairs(make_examples(test_dates, np.random.default_rng(3), cfg["test_size"]))
    batch = cfg["dates"]["batch"]

    def sample(seed):
        rng = np.random.default_rng(100 + seed)
        return lambda: encode_pairs(make_examples(train_dates, rng, batch))

    return dict(dev=dev, test=test, sample=sample)


def summarise_dates(runs, d):
    ok = [r["test_exact"] for r in runs]
    return dict(test_exact=stats(ok), steps_to_target=[r["steps_to_target"] for r in runs],
                seeds_at_target=int(sum(r["dev_curve"][-1] >= d["target"] for r in runs)), seeds=len(runs),
                n_params=runs[0]["n_params"], eval_steps=runs[0]["eval_steps"],
                dev_curve=[r["dev_curve"] for r in runs],
                loss_curve=np.mean([r["loss_curve"] for r in runs], 0).tolist(),
                train_seconds=round(sum(r["seconds"] for r in runs), 1))


# ----------------------------------------------------------------------------
# train-step timing: one run, one jitted step, models interleaved
# ----------------------------------------------------------------------------

def order_step(kind, level):
    params, logits_fn, padding = order_model(kind, level, 0)
    tx = order_optimizer()
    step = seqjax.make_train_step(order_loss(logits_fn), tx, has_aux=True)
    batch = temporal_order(jax.random.key(1), ORDER["batch"], level, padding=padding)
    return step, seqjax.init_state(params, tx), batch


def date_step(kind, d, data):
    model = date_model(kind, d)
    opt = date_optimizer(d, 1000)
    step = seqjax.make_train_step(model.loss, opt, clip_norm=d["clip"], has_aux=True)
    return step, seqjax.init_state(model.init(jax.random.key(0)), opt), data["sample"](0)()


def time_steps(cases: dict, rounds: int, steps: int) -> dict:
    """Median seconds per train step of each case, interleaved round-robin; compilation timed apart."""
    out, states = {}, {}
    for name, (step, state, batch) in cases.items():
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        out[name] = dict(compile_and_first_step_s=time.perf_counter() - t0, per_round=[])
        states[name] = state
    for _ in range(rounds):
        for name, (step, _, batch) in cases.items():
            state = states[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = step(state, batch)
            jax.block_until_ready(m["loss"])
            out[name]["per_round"].append((time.perf_counter() - t0) / steps)
            states[name] = state
    for v in out.values():
        v["median_ms"] = 1e3 * float(np.median(v["per_round"]))
    return out


def timing_phase(cfg, data):
    timing = {}
    for level in cfg["order_levels"]:
        t = time_steps({k: order_step(k, level) for k in ORDER_MODELS}, cfg["timing_rounds"], cfg["timing_steps"])
        timing[level] = t
        print(f"  {level}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in t.items()), flush=True)
    t = time_steps({k: date_step(k, cfg["dates"], data) for k in cfg["date_models"]}, cfg["timing_rounds"],
                   cfg["timing_steps"])
    timing["dates"] = t
    print("  dates: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in t.items()), flush=True)
    return timing


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(results, out):
    plt = _plt()
    panels = [(lv, results["order"][lv], "eval_steps", "test_curve", "test accuracy") for lv in results["order"]]
    panels.append(("dates", results["dates"], "eval_steps", "dev_curve", "dev exact match (greedy)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, models, xk, yk, ylabel) in zip(axes[0], panels):
        for name, m in models.items():
            a, x = np.asarray(m[yk]), np.asarray(m[xk])
            lr = f", lr {m['lr']:g}" if "lr" in m else ""
            line, = ax.plot(x, a.mean(0), lw=2, label=f"{name} ({m['n_params']:,} params{lr})")
            ax.fill_between(x, a.min(0), a.max(0), color=line.get_color(), alpha=0.2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(task if task == "dates" else f"temporal order {task} (T={LEVELS[task].padded_length})",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Transformer vs LSTM at equal size and steps: mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)
    return "curves.png"


def plot_timing(timing, out):
    plt = _plt()
    tasks = list(timing)
    names = list(dict.fromkeys(n for t in tasks for n in timing[t]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + i * width for j, t in enumerate(tasks) if n in timing[t]]
        ys = [timing[t][n]["median_ms"] for t in tasks if n in timing[t]]
        ax.bar(xs, ys, width, label=n)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks)
    ax.set_yscale("log")
    ax.set_ylabel("train-step time, ms (median, one run)")
    ax.set_title(f"jitted train step on {jax.default_backend()}, compile excluded", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "step_time.png"), dpi=110)
    plt.close(fig)
    return "step_time.png"


def fmt_steps(values):
    hit = [v for v in values if v is not None]
    return (f"{int(np.median(hit))} ({len(hit)}/{len(values)})" if hit else f"never (0/{len(values)})")


def table(results):
    rows, timing = [], results.get("timing", {})
    for level, models in results["order"].items():
        for name, m in models.items():
            rows.append(dict(task=f"order {level}", model=name, params=m["n_params"], lr=m["lr"],
                             accuracy=m["test_final"], steps_to_target=m["steps_to_target"],
                             step_ms=timing.get(level, {}).get(name, {}).get("median_ms")))
    for name, m in results["dates"].items():
        rows.append(dict(task="dates", model=name, params=m["n_params"], lr=results["config"]["dates"]["lr"],
                         accuracy=m["test_exact"], steps_to_target=m["steps_to_target"],
                         step_ms=timing.get("dates", {}).get(name, {}).get("median_ms")))
    return rows


def print_table(rows, results):
    c = results["config"]
    print(f"\nTransformer vs LSTM: test accuracy (exact match for dates) after the same steps; target "
          f"{ORDER['target']:.0%} test accuracy (order) / {c['dates']['target']:.0%} dev exact match (dates)")
    head = (f"{'task':<16} {'model':<17} {'params':>7} {'lr':>6}  {'accuracy mean [per seed]':<36} "
            f"{'steps to target (median)':<25} {'step ms':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = f"{r['accuracy']['mean']:.4f} [" + " ".join(f"{a:.3f}" for a in r["accuracy"]["per_seed"]) + "]"
        ms = f"{r['step_ms']:8.2f}" if r["step_ms"] is not None else f"{'-':>8}"
        print(f"{r['task']:<16} {r['model']:<17} {r['params']:>7,} {r['lr']:>6g}  {acc:<36} "
              f"{fmt_steps(r['steps_to_target']):<25} {ms}")


def verdicts(results):
    out = []
    for task, models in [(f"order {lv}", m) for lv, m in results["order"].items()] + [("dates", results["dates"])]:
        key = "test_final" if task.startswith("order") else "test_exact"
        tr = models["transformer"][key]
        best_name = max((n for n in models if n != "transformer"), key=lambda n: models[n][key]["mean"])
        ls = models[best_name][key]
        if tr["min"] > ls["max"]:
            word = "beats"
        elif tr["max"] < ls["min"]:
            word = "loses to"
        else:
            word = "overlaps with"
        out.append(f"{task}: Transformer {tr['mean']:.4f} {word} {best_name} {ls['mean']:.4f} "
                   f"(per-seed ranges [{tr['min']:.3f}, {tr['max']:.3f}] vs [{ls['min']:.3f}, {ls['max']:.3f}])")
    return out


def report(results, out, t0):
    rows = table(results)
    results["table"] = rows
    print_table(rows, results)
    results["verdicts"] = verdicts(results)
    print("\nVerdict (best LSTM variant per task):")
    for line in results["verdicts"]:
        print("  " + line)
    plots = {"curves": plot_curves(results, out)}
    if results.get("timing"):
        plots["step_time"] = plot_timing(results["timing"], out)
    results["plots"] = plots
    return write_results(out, results, list(plots.values()), t0)


def save_partial(results, path):
    """The results so far (``"complete": false``), so an interrupted run leaves a record of what finished."""
    with open(path, "w") as f:
        json.dump(dict(results, complete=False), f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="HARD and dates with a small budget (about 1 min)")
    g.add_argument("--cut", action="store_true", help="the subset of the study that fits a loaded 2-core machine")
    p.add_argument("--out", default="runs/transformer", help="output directory (results.json, *.png)")
    p.add_argument("--phase", choices=("all", "train", "timing"), default="all",
                   help="train, time the train steps, or both (timing merges into an existing results.json)")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "cut" if args.cut else "full"
    cfg = dict({"quick": QUICK, "cut": CUT, "full": FULL}[mode])
    cfg["dates"] = dict(DATES, **cfg.pop("quick_dates", {}))
    if "dates_eval_every" in cfg:
        cfg["dates"]["eval_every"] = cfg.pop("dates_eval_every")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"seqjax Transformer vs LSTM ({mode}, phase {args.phase}), "
          f"jax {jax.__version__} on {jax.default_backend()}", flush=True)
    data = date_data(cfg)
    path = os.path.join(args.out, "results.json")

    if args.phase == "timing":
        if not os.path.exists(path):
            raise SystemExit(f"examples/transformer.py: --phase timing needs {path} from a training run")
        with open(path) as f:
            results = json.load(f)
        for k in ("jax_version", "backend", "wall_seconds"):
            results.pop(k, None)
        if results["mode"] != mode or not results.get("complete", True):
            raise SystemExit(f"examples/transformer.py: {path} is a {results['mode']} run "
                             f"(complete: {results.get('complete', True)}); time the train steps of a finished run of "
                             f"the same mode (--quick/--cut)")
        cfg = results["config"]
    else:
        results = dict(mode=mode, config=cfg, order_settings=ORDER, order={}, dates={})
        seeds = list(range(cfg["order_seeds"]))
        print("\nTemporal order:", ORDER, flush=True)
        for task in list(cfg["order_levels"][:1]) + ["dates"] + list(cfg["order_levels"][1:]):   # the long level last
            if task == "dates":
                print("\nDates -> ISO:", cfg["dates"], flush=True)
                for kind in cfg["date_models"]:
                    runs = [train_dates(kind, cfg["dates"], cfg, data, s) for s in range(cfg["dates_seeds"])]
                    results["dates"][kind] = summarise_dates(runs, cfg["dates"])
                    save_partial(results, path)
                continue
            level = task
            results["order"][level] = {}
            for kind in ORDER_MODELS:
                lrs = cfg["order_lrs"][level]
                if isinstance(lrs, str):            # reuse the learning rate chosen at that level
                    lrs = (results["order"][lrs][kind]["lr"],)
                elif isinstance(lrs, dict):         # one grid per model
                    lrs = lrs[kind]
                r = train_order(kind, level, seeds=seeds, lrs=lrs, steps=cfg["order_steps"][level],
                                eval_every=cfg["order_eval_every"][level], test_size=cfg["order_test_size"][level])
                results["order"][level][kind] = summarise_order(r, seeds)
                save_partial(results, path)
        results["train_seconds"] = round(time.perf_counter() - t0, 1)

    if args.phase in ("all", "timing"):
        print(f"\nTrain-step timing ({cfg['timing_rounds']} interleaved rounds of {cfg['timing_steps']} steps, "
              f"one run each, compile excluded):", flush=True)
        results["timing"] = timing_phase(cfg, data)
        results["timing_command"] = ("flock /tmp/seqjax-bench.lock python examples/transformer.py --phase timing"
                                     if args.phase == "timing" else "in the training run")
    results.pop("complete", None)
    return report(results, args.out, t0)


if __name__ == "__main__":
    main()
