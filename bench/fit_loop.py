#!/usr/bin/env python
"""Training-loop overhead: `seqjax.fit` with one step per host round trip vs k steps per jitted call.

The workload is the flagship's smallest model: NYU's temporal-order classifier (an LSTM with H=4,
``Linear(4, 4)`` on the last step, RMSprop, batch 32 of EASY sequences, each batch drawn on the
device from its key). For so small a model the host round trip after every step, not the math,
sets the speed. Candidates, each timed over the same number of steps and interleaved in one process:

* ``fit k=1``: one run, one step per call (the host reads the metrics after every step);
* ``fit k=31``: one run, 31 steps (one NYU epoch) per jitted `jax.lax.scan`;
* ``fit k=31, 5 runs``: five seeds in lockstep (``num_runs=5``), 31 steps per call;
* ``hand-written scan, 5 runs``: ``jit(vmap(lax.scan(step)))`` over the same five seeds, the loop the
  example had before `fit` ran several steps per call (no history, no checks): the floor for ``fit``.

Reported: median seconds per timed block and training steps per second (run-steps per second for
the lockstep rows, i.e. steps x runs). Compilation happens in the warm-up rounds, apart from the timing.

Usage: python bench/fit_loop.py [--quick] [--reps N] [--out bench/results]
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py)

import seqjax  # noqa: E402
import seqjax.nnx as snx  # noqa: E402
from seqjax.tasks import temporal_order  # noqa: E402

H, BATCH, LEVEL, RUNS = 4, 32, "EASY", 5


def setup(steps: int):
    """The candidates: name -> (zero-argument function running ``steps`` steps, run-steps it performs)."""
    models = [snx.SequenceClassifier(snx.LSTM(8, H, rngs=nnx.Rngs(s)), 4, pooling="last", rngs=nnx.Rngs(s))
              for s in range(RUNS)]
    graphdef, _ = nnx.split(models[0])
    params = [nnx.split(m)[1] for m in models]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)
    tx = optax.rmsprop(1e-3, decay=0.99, eps=1e-8, eps_in_sqrt=False)

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p)(b.x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b.y).mean()

    step = seqjax.make_train_step(loss_fn, tx)
    batches = lambda key: temporal_order(key, BATCH, LEVEL)  # noqa: E731

    def fit_with(k, runs):
        def go():
            state = (jax.vmap(lambda p: seqjax.init_state(p, tx))(stacked) if runs > 1
                     else seqjax.init_state(params[0], tx))
            out, _ = seqjax.fit(step, state, batches, num_steps=steps, steps_per_call=k,
                                num_runs=runs if runs > 1 else None, progress=False)
            return out.params
        return go

    def hand_scan():
        def one(p, o, key):
            def body(carry, k):
                p, o = carry
                loss, g = jax.value_and_grad(loss_fn)(p, batches(k))
                u, o = tx.update(g, o, p)
                return (optax.apply_updates(p, u), o), loss
            (p, o), losses = jax.lax.scan(body, (p, o), jax.random.split(key, steps))
            return p, losses
        run = jax.jit(jax.vmap(one))
        keys = jnp.stack([jax.random.key(s) for s in range(RUNS)])

        def go():
            p, losses = run(stacked, jax.vmap(tx.init)(stacked), keys)
            jax.device_get(losses)   # what the loop needs on the host (the losses) comes back too
            return p
        return go

    return {
        "fit k=1": (fit_with(1, 1), steps),
        "fit k=31": (fit_with(31, 1), steps),
        f"fit k=31, {RUNS} runs": (fit_with(31, RUNS), steps * RUNS),
        f"hand-written scan, {RUNS} runs": (hand_scan(), steps * RUNS),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps and reps (for the tests)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 7; --quick 1)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    steps = 31 if args.quick else 310        # 1 or 10 NYU epochs of 31 batches
    reps = args.reps or (1 if args.quick else 7)
    cands = setup(steps)
    bar = common.progress_bar(reps + 1, "fit_loop")
    samples = common.interleave({n: f for n, (f, _) in cands.items()}, reps=reps, warmup=1, progress=bar)
    if bar is not None:
        bar.close()
    rows = []
    for name, (_, work) in cands.items():
        s = common.summarise(samples[name])
        rows.append(dict(candidate=name, steps=steps, run_steps=work, **s,
                         run_steps_per_s=work / (s["median_ms"] / 1e3)))
    base = rows[0]["run_steps_per_s"]
    for r in rows:
        r["speedup_vs_fit_k1"] = r["run_steps_per_s"] / base
    table = common.markdown_table(
        ["candidate", "median s", "run-steps/s", "x fit k=1"],
        [[r["candidate"], f"{r['median_ms'] / 1e3:.3f}", f"{r['run_steps_per_s']:,.0f}",
          f"{r['speedup_vs_fit_k1']:.1f}"] for r in rows])

    def plot(path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = [r["candidate"] for r in rows]
        ax.barh(names, [r["run_steps_per_s"] for r in rows], color=["C0", "C1", "C2", "C7"])
        ax.invert_yaxis()
        ax.set_xlabel("training steps per second (x runs in lockstep)")
        ax.set_title(f"seqjax.fit loop overhead: LSTM H={H}, batch {BATCH}, {LEVEL} temporal order", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    common.report(args.out, "fit_loop", dict(command=" ".join(["python", "bench/fit_loop.py", *(argv or sys.argv[1:])]),
                                             model=dict(cell="lstm", hidden=H, batch=BATCH, level=LEVEL),
                                             reps=reps, rows=rows), [], plot, table)


if __name__ == "__main__":
    main()
