"""The persistent CUDA kernels' launch plans against XLA's loop and cuDNN, one process, interleaved.

For each cell and shape: `seqjax.backends._cuda.cuda_scan` with the automatic plan and with
requested cluster sizes / matmul thread targets, ``seqjax.scan(kernel="xla")``
(XLA's loop at its GPU defaults) and PyTorch's cuDNN ``nn.LSTM``/``GRU``/``RNN``,
forward and train step (value_and_grad of mean(ys**2) w.r.t. params and input),
median ms over interleaved rounds; compile time separately. GPU only.

    python bench/cuda_sweep.py --out bench/results/gpu --name cuda_sweep_gpu
    python bench/cuda_sweep.py --plot-only bench/results/gpu/cuda_sweep_gpu.json   # redraw the PNG
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import seqjax  # noqa: E402
from seqjax.backends import _cuda as cuda  # noqa: E402

SHAPES = common.SHAPES
CELLS = {"lstm": lambda H: seqjax.lstm(H, forget_bias=0.0), "gru": lambda H: seqjax.gru(H),
         "rnn": lambda H: seqjax.rnn(H)}
KINDS = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}


def _candidates(cell_name, B, T, I, H, configs):
    cell = CELLS[cell_name](H)
    kind = KINDS[cell_name]
    runs = {"xla loop": lambda p, x: seqjax.scan(cell, p, x, kernel="xla")[1]}
    plans = {}
    for cs, threads in configs:
        try:
            chosen = cuda.plan(kind, B, H, cs, threads)
        except ValueError as e:
            print(f"  skip cluster={cs} threads={threads}: {e}")
            continue
        name = f"cuda cluster={chosen['cluster']}" + (" (automatic plan)" if (cs, threads) == (0, 0) else "") + \
            (f" threads~{threads}" if threads else "")
        plans[name] = chosen
        runs[name] = (lambda c, t: lambda p, x: cuda.cuda_scan(
            kind, p, jnp.swapaxes(x, 0, 1), cell.initial_carry(p, (x.shape[0],)), cluster=c, threads=t)[1]
            .swapaxes(0, 1))(cs, threads)
    return cell, runs, plans


def _torch_fns(cell_name, B, T, I, H):
    import torch
    mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell_name](I, H, batch_first=True).cuda()
    x = torch.randn(B, T, I, device="cuda", requires_grad=True)

    def fwd():
        with torch.no_grad():
            mod(x)
        torch.cuda.synchronize()
        return None

    def train():
        mod.zero_grad(set_to_none=True)
        x.grad = None
        loss = (mod(x)[0] ** 2).mean()
        loss.backward()
        torch.cuda.synchronize()
        return None
    return fwd, train


def plot(rows, path):
    """Median ms relative to cuDNN per cell/shape, forward and train step, one bar per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [dict(r, impl=r["impl"].split(" fwd/bwd")[0]) for r in rows]  # older runs named the thread counts
    groups = sorted({(r["cell"], r["shape"]) for r in rows})
    impls = sorted({r["impl"] for r in rows}, key=lambda n: (not n.startswith("pytorch"), n.startswith("cuda"), n))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    for ax, mode in zip(axes, ("fwd", "train")):
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            vals = [next((r.get("ratio_to_cudnn", float("nan")) for r in rows if (r["cell"], r["shape"]) == g
                          and r["impl"] == impl and r["mode"] == mode), float("nan")) for g in groups]
            ax.bar([i + k * width for i in range(len(groups))], vals, width, label=impl)
        ax.axhline(1.2, color="k", ls="--", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{c}\n{s}" for c, s in groups])
        ax.set_yscale("log")
        ax.set_title(f"{mode}: median time / cuDNN's (dashed: 1.2)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="lstm,gru,rnn")
    ap.add_argument("--shapes", default="long,standard,small")
    ap.add_argument("--configs", default="0:0,16:0,8:0,4:0,0:128,0:512",
                    help="comma list of cluster:threads requests (0 = automatic)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="cuda_sweep")
    ap.add_argument("--plot-only", default=None, help="redraw the PNG of this JSON and exit")
    args = ap.parse_args()
    if args.plot_only:
        import json
        plot(json.load(open(args.plot_only))["rows"], args.plot_only.replace(".json", ".png"))
        return
    if jax.default_backend() != "gpu":
        sys.exit("bench/cuda_sweep.py needs a GPU (the default backend is " + jax.default_backend() + ")")
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    rows = []
    for cell_name in args.cells.split(","):
        for shape in args.shapes.split(","):
            B, T, I, H = SHAPES[shape]
            print(f"== {cell_name} {shape} B={B} T={T} I={I} H={H}")
            cell, runs, plans = _candidates(cell_name, B, T, I, H, configs)
            params = cell.init(jax.random.key(0), I)
            x = jax.random.normal(jax.random.key(1), (B, T, I))
            fns, compile_s = {}, {}
            for name, run in runs.items():
                for mode, f in (("fwd", run), ("train", jax.value_and_grad(common.mean_square_loss(run), argnums=(0, 1)))):
                    timed = common.compile_timed(f, params, x)
                    compiled = timed.pop("compiled")
                    compile_s[(name, mode)] = timed
                    fns[(name, mode)] = (lambda c: lambda: c(params, x))(compiled)
            try:
                tf, tt = _torch_fns(cell_name, B, T, I, H)
                fns[("pytorch (cuDNN)", "fwd")], fns[("pytorch (cuDNN)", "train")] = tf, tt
            except Exception as e:  # noqa: BLE001 - optional peer
                print("  no PyTorch:", e)
            # check the kernels against XLA's loop before timing them
            ref = {m: fns[("xla loop", m)]() for m in ("fwd", "train")}
            for (name, mode), f in fns.items():
                if name.startswith("cuda"):
                    got = f()
                    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                              zip(jax.tree.leaves(got), jax.tree.leaves(ref[mode])))
                    print(f"  {name} {mode}: max |diff| vs xla loop = {err:.2e}")
            samples = common.interleave({f"{n}|{m}": f for (n, m), f in fns.items()}, args.reps,
                                        progress=tqdm(total=args.reps, desc=f"{cell_name} {shape}", leave=False))
            for key, s in samples.items():
                name, mode = key.split("|")
                row = dict(cell=cell_name, shape=shape, B=B, T=T, I=I, H=H, impl=name, mode=mode,
                           **common.summarise(s), **compile_s.get((name, mode), {}))
                if name in plans:
                    row["plan"] = plans[name]
                rows.append(row)
            cudnn = {m: next((r["median_ms"] for r in rows if r["cell"] == cell_name and r["shape"] == shape
                              and r["impl"] == "pytorch (cuDNN)" and r["mode"] == m), None) for m in ("fwd", "train")}
            for r in rows:
                if r["cell"] == cell_name and r["shape"] == shape and cudnn[r["mode"]]:
                    r["ratio_to_cudnn"] = r["median_ms"] / cudnn[r["mode"]]
            for r in sorted((r for r in rows if r["cell"] == cell_name and r["shape"] == shape),
                            key=lambda r: (r["mode"], r["median_ms"])):
                print(f"  {r['mode']:5s} {r['median_ms']:8.3f} ms  x{r.get('ratio_to_cudnn', float('nan')):.2f} cuDNN"
                      f"  {r['impl']}")
    common.write_json(os.path.join(args.out, args.name + ".json"), dict(rows=rows, reps=args.reps,
                                                                         configs=args.configs))
    plot(rows, os.path.join(args.out, args.name + ".png"))


if __name__ == "__main__":
    main()
