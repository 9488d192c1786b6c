"""Scan-based vs Python-unrolled BPTT: trace, compile and run time, and memory, against T.

Runners compared for each cell and sequence length T (B=32, I=32, H=128, float32):
  * ``scan u=k``: `seqjax.scan` with ``unroll=k``, differentiated by autodiff
    (``backward="autodiff"``, so every scan row uses the same kind of backward pass)
  * ``scan remat``: the same with ``remat=True`` (rematerialise each step in the backward pass)
  * ``scan default``: `seqjax.scan` with its defaults (``kernel="auto"``: on x86 CPUs the whole-recurrence
    kernels of `seqjax.backends._x86`, elsewhere the loop with the whole-sequence-GEMM custom VJP)
  * ``unrolled``: `seqjax.unrolled`, a Python loop traced into one straight-line program.
    Once compiling it takes longer than the budget (120 s) for a T, longer T are
    skipped and the results say so.

Each is timed for the forward pass and a train step (`value_and_grad` of
mean(ys²) w.r.t. params and input); trace, lower and compile are timed
separately; memory is XLA's compiled memory analysis (temp bytes) and process RSS.

    python bench/scan_vs_unroll.py            # budget-friendly subset (LSTM; T<=400; unroll 1,4,16; unrolled T<=100)
    python bench/scan_vs_unroll.py --full     # the whole grid (LSTM, GRU, RNN; T up to 1000; unroll 1..16)
    python bench/scan_vs_unroll.py --quick    # smoke test

Writes <out>/scan_vs_unroll.json and scan_vs_unroll.png (log scales).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import seqjax  # noqa: E402

B, I, H = 32, 32, 128
COMPILE_BUDGET_S = 120.0


def make_cell(name):
    return {"lstm": lambda: seqjax.lstm(H, forget_bias=0.0), "gru": lambda: seqjax.gru(H),
            "rnn": lambda: seqjax.rnn(H)}[name]()


def runners(unrolls, remat=True, unrolled=True):
    out = {f"scan u={k}": (seqjax.scan, dict(unroll=k, backward="autodiff")) for k in unrolls}
    out["scan default"] = (seqjax.scan, {})
    if remat:
        out["scan remat"] = (seqjax.scan, dict(remat=True, backward="autodiff"))
    if unrolled:
        out["unrolled"] = (seqjax.unrolled, {})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="the whole grid (slow: hours for the unrolled runner)")
    ap.add_argument("--quick", action="store_true", help="smoke test")
    ap.add_argument("--cells", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="scan_vs_unroll")
    ap.add_argument("--unrolled-max-T", type=int, default=None,
                    help="run the Python-unrolled runner only up to this T (its compile time grows like T^1.85)")
    args = ap.parse_args(argv)
    if args.full:
        cells, Ts, unrolls, unrolled_max_T = ["lstm", "gru", "rnn"], [25, 50, 100, 200, 400, 1000], [1, 2, 4, 8, 16], None
    elif args.quick:
        cells, Ts, unrolls, unrolled_max_T = ["lstm"], [5, 10], [1, 4], 10
    else:
        cells, Ts, unrolls, unrolled_max_T = ["lstm"], [25, 100, 400], [1, 4, 16], 100
    if args.cells:
        cells = common.parse_list(args.cells, ["lstm", "gru", "rnn"], "cells")
    if args.unrolled_max_T is not None:
        unrolled_max_T = args.unrolled_max_T
    reps = args.reps or (3 if args.quick else 7)
    from tqdm import tqdm

    rows, notes = [], []
    t_start = time.time()
    total = len(cells) * len(Ts)
    progress = tqdm(total=total, desc="scan_vs_unroll", file=sys.stderr)
    for cell_name in cells:
        cell = make_cell(cell_name)
        params = cell.init(jax.random.key(0), I)
        over_budget = {}  # mode -> T at which compiling the unrolled runner passed the budget
        for T in Ts:
            progress.set_postfix_str(f"{cell_name} T={T}")
            x = jax.random.normal(jax.random.key(1), (B, T, I))
            fns, meta = {}, {}
            for rname, (runner, kw) in runners(unrolls).items():
                if rname == "unrolled" and unrolled_max_T is not None and T > unrolled_max_T:
                    continue
                for mode in ("fwd", "train"):
                    if rname == "scan remat" and mode == "fwd":
                        continue  # the same forward loop as scan u=1
                    if rname == "unrolled" and mode in over_budget:
                        continue

                    def fwd(p, x, runner=runner, kw=kw):
                        return runner(cell, p, x, **kw)[1]

                    f = fwd if mode == "fwd" else jax.value_and_grad(
                        lambda p, x, fwd=fwd: jnp.mean(jnp.square(fwd(p, x))), argnums=(0, 1))
                    c = common.compile_timed(f, params, x)
                    total_compile = c["trace_s"] + c["lower_s"] + c["compile_s"]
                    if rname == "unrolled" and total_compile > COMPILE_BUDGET_S:
                        over_budget[mode] = T
                        notes.append(f"{cell_name} unrolled {mode}: compiling took {total_compile:.0f} s at T={T} "
                                     f"(> {COMPILE_BUDGET_S:.0f} s budget); longer T skipped")
                    compiled = c["compiled"]
                    fns[(rname, mode)] = lambda compiled=compiled, x=x: compiled(params, x)
                    meta[(rname, mode)] = {k: v for k, v in c.items() if k != "compiled"}
            samples = common.interleave({f"{a}|{b}": f for (a, b), f in fns.items()}, reps=reps, warmup=1)
            for (rname, mode) in fns:
                s = common.summarise(samples[f"{rname}|{mode}"])
                rows.append(dict(cell=cell_name, T=T, B=B, I=I, H=H, runner=rname, mode=mode, **s,
                                 **meta[(rname, mode)], **common.rss_bytes()))
            if unrolled_max_T is not None and T > unrolled_max_T:
                notes.append(f"{cell_name} unrolled: T={T} not run in the default subset (use --full)") \
                    if T == min(t for t in Ts if t > unrolled_max_T) else None
            progress.update(1)
    progress.close()
    common.write_json(os.path.join(args.out, f"{args.name}.json"),
                      dict(rows=rows, notes=notes, reps=reps, compile_budget_s=COMPILE_BUDGET_S,
                           grid=dict(cells=cells, T=Ts, unroll=unrolls, unrolled_max_T=unrolled_max_T),
                           wall_s=time.time() - t_start))
    plot(rows, os.path.join(args.out, f"{args.name}.png"))
    for n in notes:
        print("note:", n)
    print(table(rows))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    metrics = [("compile s", lambda r: r["trace_s"] + r["lower_s"] + r["compile_s"]),
               ("run ms (median)", lambda r: r["median_ms"]),
               ("XLA temp MiB", lambda r: r["memory"].get("temp_bytes", 0) / 2**20)]
    fig, axes = plt.subplots(len(cells) * 2, 3, figsize=(14, 3.2 * 2 * len(cells)), squeeze=False)
    for ci, cell in enumerate(cells):
        for mi, mode in enumerate(("fwd", "train")):
            for k, (label, fn) in enumerate(metrics):
                ax = axes[ci * 2 + mi][k]
                for rname in dict.fromkeys(r["runner"] for r in rows):
                    sel = sorted([r for r in rows if r["cell"] == cell and r["mode"] == mode and r["runner"] == rname],
                                 key=lambda r: r["T"])
                    if sel:
                        ax.plot([r["T"] for r in sel], [max(fn(r), 1e-3) for r in sel], "o-", label=rname)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("T")
                ax.set_title(f"{cell} {mode}: {label}", fontsize=9)
                if k == 0:
                    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(rows):
    body = [[r["cell"], r["mode"], r["T"], r["runner"], r["median_ms"], r["trace_s"] + r["lower_s"] + r["compile_s"],
             r["memory"].get("temp_bytes", 0) / 2**20] for r in rows]
    return common.markdown_table(["cell", "mode", "T", "runner", "run ms", "compile s", "XLA temp MiB"], body)


if __name__ == "__main__":
    main()
