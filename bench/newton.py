"""``method="newton"`` (quasi-DEER) against the sequential loop for GRU and LSTM, against T.

For `seqjax.gru(H)` and `seqjax.lstm(H)` (B=4, I=16, float32, the cells' default initialisation,
inputs N(0, 1)), three evaluations of the same run, forward and train step (`value_and_grad` of
mean(ys²) w.r.t. params and input):

* ``kernel=auto``: the sequential loop on the default path (on x86 seqjax's AVX kernels);
* ``kernel=xla``: the sequential loop on XLA (`lax.scan` with seqjax's custom VJP), the same
  backend the Newton iterations run on;
* ``method=newton``: quasi-Newton iterations over the whole sequence, each a
  `jax.lax.associative_scan` (default `seqjax.NewtonOptions`), sequential adjoint in the backward pass.

It also records, per cell, H and T, the iterations to convergence and whether the damped
fallback ran (`seqjax.backends._newton.iterate` on the same inputs). Trace/lower/compile are timed
apart from the runs; all candidates of one T run interleaved in one process, medians reported.

    python bench/newton.py            # H in (32, 128), T = 64 ... 16,384, H*T <= 2^19 (about 25 minutes on 2 cores)
    python bench/newton.py --quick    # smoke test

Writes <out>/newton_<platform>.json and .png and prints the table.
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
from seqjax.backends import _newton  # noqa: E402

B, I = 4, 16
CELLS = {"gru": seqjax.gru, "lstm": seqjax.lstm}
METHODS = {"kernel=auto": {}, "kernel=xla": dict(kernel="xla"), "newton": dict(method="newton")}
T_FULL = [64, 512, 4096, 16384]
H_FULL = [32, 128]
#: the default grid skips H * T above this (H=128 stops at T=4096: one LSTM(128) Newton forward pass at T=16,384
#: takes about 45 s on the 2 shared cores)
MAX_HT = 32 * 16384


def reps_for(T: int, quick: bool) -> int:
    return 3 if quick else (9 if T <= 512 else 3)


def iterations(cell, params, x) -> dict:
    """The Newton iterations of a forward run of ``x`` [B, T, I] (default options)."""
    unit = _newton.unitwise_of(cell)
    c0 = cell.initial_carry(params, (x.shape[0],))

    def stats(p, x):
        px = cell.project(p, jnp.swapaxes(x, 0, 1))
        return _newton.iterate(unit, seqjax.NewtonOptions(), 1, p, px, c0, c0, None, None)[2]

    s = jax.jit(stats)(params, x)
    return dict(iterations=int(s.iterations), converged=bool(s.converged), damped=bool(s.damped),
                residual=float(s.residual))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke test")
    ap.add_argument("--cells", default=None, help=f"comma list of {list(CELLS)}")
    ap.add_argument("--H", default=None, help="comma list of hidden sizes")
    ap.add_argument("--T", default=None, help="comma list of sequence lengths")
    ap.add_argument("--max-HT", type=int, default=MAX_HT, help="skip hidden size x length above this")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    cells = common.parse_list(args.cells, list(CELLS), "cells")
    Hs = [int(h) for h in args.H.split(",")] if args.H else ([8] if args.quick else H_FULL)
    Ts = [int(t) for t in args.T.split(",")] if args.T else ([4, 32] if args.quick else T_FULL)
    platform = jax.default_backend()
    name = args.name or f"newton_{platform}"
    from tqdm import tqdm

    made = {(c, h): CELLS[c](h) for c in cells for h in Hs}
    params = {k: cell.init(jax.random.key(0), I) for k, cell in made.items()}
    rows, its, t_start = [], [], time.time()
    progress = tqdm(total=len(Ts), desc="newton", file=sys.stderr)
    for T in Ts:
        progress.set_postfix_str(f"T={T}")
        x = jax.random.normal(jax.random.key(1), (B, T, I))
        fns, meta = {}, {}
        for (cell_name, H), cell in made.items():
            if H * T > args.max_HT:
                continue
            p = params[cell_name, H]
            its.append(dict(cell=cell_name, H=H, T=T, **iterations(cell, p, x)))
            for method, kw in METHODS.items():
                def fwd(p, x, cell=cell, kw=kw):
                    return seqjax.scan(cell, p, x, **kw)[1]

                for mode, f in (("fwd", fwd), ("train", jax.value_and_grad(common.mean_square_loss(fwd),
                                                                           argnums=(0, 1)))):
                    c = common.compile_timed(f, p, x)
                    compiled = c["compiled"]
                    key = f"{cell_name}|{H}|{method}|{mode}"
                    fns[key] = lambda compiled=compiled, p=p, x=x: compiled(p, x)
                    meta[key] = dict(cell=cell_name, H=H, method=method, mode=mode, T=T, B=B, I=I,
                                     **{k: v for k, v in c.items() if k != "compiled"})
        samples = common.interleave(fns, reps=reps_for(T, args.quick), warmup=1)
        for key in fns:
            rows.append(dict(**meta[key], **common.summarise(samples[key])))
        progress.update(1)
    progress.close()
    add_ratios(rows)
    common.write_json(os.path.join(args.out, f"{name}.json"),
                      dict(rows=rows, iterations=its, grid=dict(cells=cells, H=Hs, T=Ts, B=B, I=I, max_HT=args.max_HT),
                           command=" ".join([os.path.basename(sys.executable), *sys.argv]),
                           wall_s=time.time() - t_start))
    plot(rows, its, os.path.join(args.out, f"{name}.png"))
    print(table(rows, its))


def add_ratios(rows):
    """Each row's ``vs_auto`` and ``vs_xla``: its median over the sequential loop's on the default path and on XLA."""
    by = {(r["cell"], r["H"], r["method"], r["mode"], r["T"]): r["median_ms"] for r in rows}
    for r in rows:
        k = (r["cell"], r["H"])
        r["vs_auto"] = r["median_ms"] / by[(*k, "kernel=auto", r["mode"], r["T"])]
        r["vs_xla"] = r["median_ms"] / by[(*k, "kernel=xla", r["mode"], r["T"])]


def table(rows, its):
    it = {(i["cell"], i["H"], i["T"]): i for i in its}
    body = []
    for r in rows:
        if r["method"] != "newton":
            continue
        i = it[(r["cell"], r["H"], r["T"])]
        body.append([r["cell"], r["H"], r["mode"], r["T"], i["iterations"], "yes" if i["damped"] else "no",
                     r["median_ms"], r["vs_xla"], r["vs_auto"], r["trace_s"] + r["lower_s"] + r["compile_s"]])
    return common.markdown_table(["cell", "H", "mode", "T", "iterations", "damped", "newton ms",
                                  "newton / xla loop", "newton / auto loop", "compile s"], body)


def plot(rows, its, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), squeeze=False)
    styles = {"kernel=auto": ":", "kernel=xla": "--", "newton": "-"}
    models = list(dict.fromkeys((r["cell"], r["H"]) for r in rows))
    colour = {m: f"C{k}" for k, m in enumerate(models)}        # one colour per model, one line style per method
    for k, mode in enumerate(("fwd", "train")):
        ax = axes[0][k]
        for cell, H, method in dict.fromkeys((r["cell"], r["H"], r["method"]) for r in rows):
            sel = sorted([r for r in rows if (r["cell"], r["H"], r["method"], r["mode"]) == (cell, H, method, mode)],
                         key=lambda r: r["T"])
            ax.plot([r["T"] for r in sel], [r["median_ms"] for r in sel], styles[method], color=colour[cell, H],
                    marker="o", ms=3, label=f"{cell}({H}) {method}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("median ms")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'train step'} (B={B}, I={I})", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[0][2]
    for cell, H in dict.fromkeys((i["cell"], i["H"]) for i in its):
        sel = sorted([i for i in its if (i["cell"], i["H"]) == (cell, H)], key=lambda i: i["T"])
        ax.plot([i["T"] for i in sel], [i["iterations"] for i in sel], color=colour[cell, H], marker="o", ms=3,
                label=f"{cell}({H})")
    ax.set_xscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("Newton iterations to tol=1e-5")
    ax.set_title("iterations to convergence", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
