"""Sequential loop vs parallel prefix scan for the linear-recurrence cells, against T; with the classic kernels.

For each of `seqjax.min_gru`, `seqjax.min_gru(log_space=True)`, `seqjax.min_lstm` and `seqjax.lru`
(B=4, I=16, H=32, float32), `seqjax.scan` with ``method="sequential"`` (the `lax.scan` loop) and
``method="associative"`` (`jax.lax.associative_scan`), forward and train step (`value_and_grad` of
mean(ys²) w.r.t. params and input), for T from 64 to 65,536. For reference, `seqjax.gru(16)` and
`seqjax.lstm(16)` with ``kernel="auto"`` (on x86 seqjax's AVX kernels), at about the same parameter
count (the JSON records every cell's count). Trace/lower/compile are timed apart from the runs; all
candidates of one T run interleaved in one process (`common.interleave`), medians reported.

    python bench/parallel_scan.py            # the whole grid (a few minutes on 2 cores)
    python bench/parallel_scan.py --quick    # smoke test (T <= 64)

Writes <out>/parallel_scan_<platform>.json and .png (log-log time vs T), and prints the table
and, per cell and mode, the crossover: the smallest measured T from which the associative scan is
faster at every longer measured T (what ``method="auto"``'s `AUTO_MIN_T` is set from).
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

B, I, H = 4, 16, 32
LINEAR = {
    "min_gru": lambda: seqjax.min_gru(H),
    "min_gru_log": lambda: seqjax.min_gru(H, log_space=True),
    "min_lstm": lambda: seqjax.min_lstm(H),
    "lru": lambda: seqjax.lru(H),
}
CLASSIC = {"gru16": lambda: seqjax.gru(16), "lstm16": lambda: seqjax.lstm(16)}
T_FULL = [64, 256, 1024, 4096, 16384, 65536]
T_QUICK = [4, 64]


def candidates(cells):
    """(cell name, method) pairs: both methods for the linear cells, the default path for the classic ones."""
    out = []
    for name in cells:
        out += [(name, "sequential"), (name, "associative")] if name in LINEAR else [(name, "kernel=auto")]
    return out


def param_count(params) -> int:
    return int(sum(a.size for a in jax.tree.leaves(params)))


def reps_for(T: int, quick: bool) -> int:
    return 3 if quick else (7 if T <= 4096 else 3)


def crossovers(rows) -> list[dict]:
    """Per linear cell and mode: the smallest T from which associative beats sequential at every longer T."""
    out = []
    for cell in dict.fromkeys(r["cell"] for r in rows if r["cell"] in LINEAR):
        for mode in ("fwd", "train"):
            by = {(r["method"], r["T"]): r["median_ms"] for r in rows if r["cell"] == cell and r["mode"] == mode}
            Ts = sorted({T for _, T in by})
            wins = [by[("associative", T)] < by[("sequential", T)] for T in Ts]
            first = next((T for k, T in enumerate(Ts) if all(wins[k:])), None)
            out.append(dict(cell=cell, mode=mode, crossover_T=first,
                            speedup_at_max_T=by[("sequential", Ts[-1])] / by[("associative", Ts[-1])]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke test")
    ap.add_argument("--cells", default=None, help=f"comma list of {list(LINEAR) + list(CLASSIC)}")
    ap.add_argument("--T", default=None, help="comma list of sequence lengths")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    cells = common.parse_list(args.cells, list(LINEAR) + list(CLASSIC), "cells")
    if args.quick and args.cells is None:
        cells = ["min_gru", "lru", "gru16"]
    Ts = [int(t) for t in args.T.split(",")] if args.T else (T_QUICK if args.quick else T_FULL)
    platform = jax.default_backend()
    name = args.name or f"parallel_scan_{platform}"
    from tqdm import tqdm

    made = {c: (LINEAR | CLASSIC)[c]() for c in cells}
    params = {c: made[c].init(jax.random.key(0), I) for c in cells}
    rows, t_start = [], time.time()
    progress = tqdm(total=len(Ts), desc="parallel_scan", file=sys.stderr)
    for T in Ts:
        progress.set_postfix_str(f"T={T}")
        x = jax.random.normal(jax.random.key(1), (B, T, I))
        fns, meta = {}, {}
        for cell_name, method in candidates(cells):
            cell, p = made[cell_name], params[cell_name]
            kw = {} if method == "kernel=auto" else dict(method=method)

            def fwd(p, x, cell=cell, kw=kw):
                return seqjax.scan(cell, p, x, **kw)[1]

            for mode, f in (("fwd", fwd), ("train", jax.value_and_grad(common.mean_square_loss(fwd), argnums=(0, 1)))):
                c = common.compile_timed(f, p, x)
                compiled = c["compiled"]
                key = f"{cell_name}|{method}|{mode}"
                fns[key] = lambda compiled=compiled, p=p, x=x: compiled(p, x)
                meta[key] = dict(cell=cell_name, method=method, mode=mode, T=T, B=B, I=I, H=made[cell_name].hidden_size,
                                 params=param_count(p), **{k: v for k, v in c.items() if k != "compiled"})
        samples = common.interleave(fns, reps=reps_for(T, args.quick), warmup=1)
        for key in fns:
            rows.append(dict(**meta[key], **common.summarise(samples[key]), **common.rss_bytes()))
        progress.update(1)
    progress.close()
    cross = crossovers(rows)
    common.write_json(os.path.join(args.out, f"{name}.json"),
                      dict(rows=rows, crossovers=cross, grid=dict(cells=cells, T=Ts, B=B, I=I, H=H),
                           command=" ".join([os.path.basename(sys.executable), *sys.argv]), wall_s=time.time() - t_start))
    plot(rows, os.path.join(args.out, f"{name}.png"))
    print(table(rows))
    print(common.markdown_table(["cell", "mode", "crossover T", "speed-up at the longest T"],
                                [[c["cell"], c["mode"], c["crossover_T"], c["speedup_at_max_T"]] for c in cross]))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), squeeze=False)
    for k, mode in enumerate(("fwd", "train")):
        ax = axes[0][k]
        for cell, method in dict.fromkeys((r["cell"], r["method"]) for r in rows):
            sel = sorted([r for r in rows if r["cell"] == cell and r["method"] == method and r["mode"] == mode],
                         key=lambda r: r["T"])
            style = "--" if method == "sequential" else ("-" if method == "associative" else ":")
            ax.plot([r["T"] for r in sel], [r["median_ms"] for r in sel], style, marker="o", ms=3,
                    label=f"{cell} {method} ({sel[0]['params']} params)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("median ms")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'train step'} (B={B}, I={I})", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(rows):
    body = [[r["cell"], r["method"], r["mode"], r["T"], r["median_ms"],
             r["trace_s"] + r["lower_s"] + r["compile_s"]] for r in rows]
    return common.markdown_table(["cell", "method", "mode", "T", "run ms", "compile s"], body)


if __name__ == "__main__":
    main()
