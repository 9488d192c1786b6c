"""Data-parallel train step on emulated CPU devices: the batch sharded over the devices against replicated.

With ``--devices N`` (default 2) emulated CPU devices
(``--xla_force_host_platform_device_count``), for each cell (LSTM, GRU,
Elman RNN) at the standard shape it times one train step (`value_and_grad`
of mean(outputs²) with respect to the params, then an SGD update) of
``seqjax.scan`` with ``kernel="auto"`` (seqjax's CPU kernels where they
apply), with the params replicated and the batch

* ``sharded``: split over the devices (``NamedSharding(mesh, P("b"))``):
  each device runs the kernels on B/N rows and one all-reduce sums the
  weight gradients;
* ``replicated``: a full copy on every device (``P()``): each device computes
  the whole batch, the same step as before the kernels partitioned;
* ``one device``: the plain single-device step, for scale.

The emulated devices share the machine's cores (2 here), so ``sharded /
replicated`` measures the work each device does, not a speed-up from more
hardware. Medians of interleaved rounds, compile time apart; the JSON also
holds the sharded step's kernel custom-calls from the compiled HLO (their
per-shard shapes) and whether it has an all-gather.

    python bench/sharded.py                 # the three cells, standard shape, 2 devices
    python bench/sharded.py --quick         # a tiny shape, the LSTM, 3 reps (smoke test)

Writes <out>/sharded.json, <out>/sharded.png and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


def _devices_from_argv(argv) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--devices", type=int, default=2)
    return ap.parse_known_args(argv)[0].devices


# the device count must be set before JAX starts its CPU backend
_DEVICES = _devices_from_argv(sys.argv[1:])
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={_DEVICES}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import seqjax  # noqa: E402

CELLS = ("lstm", "gru", "rnn")
CANDIDATES = ("sharded", "replicated", "one device")
LR = 1e-3


def make_cell(name: str, H: int):
    return {"lstm": lambda: seqjax.lstm(H), "gru": lambda: seqjax.gru(H), "rnn": lambda: seqjax.rnn(H)}[name]()


def train_step(cell):
    """``(params, x) -> (loss, params)``: value_and_grad of mean(ys²), then SGD."""
    loss = common.mean_square_loss(lambda p, x: seqjax.scan(cell, p, x)[1])

    def step(params, x):
        value, grads = jax.value_and_grad(loss)(params, x)
        return value, jax.tree.map(lambda p, g: p - LR * g, params, grads)
    return step


def kernel_calls(hlo: str) -> list[str]:
    """The compiled HLO's seqjax kernel custom-calls: the result shapes and the target of each."""
    return [f"{m.group(1)} {m.group(2)}" for m in re.finditer(
        r"= (\(.*?\)|f32\[[0-9,]*\]\S*) custom-call\(.*?custom_call_target=\"(seqjax_\w+)\"", hlo)]


def bench_config(cell_name, shape_name, shape, reps, progress=None):
    B, T, I, H = shape
    cell = make_cell(cell_name, H)
    params = cell.init(jax.random.key(0), input_size=I)
    x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    mesh = jax.make_mesh((_DEVICES,), ("b",), axis_types=(AxisType.Auto,))
    placed = {
        "sharded": (jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(x, NamedSharding(mesh, P("b")))),
        "replicated": (jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(x, NamedSharding(mesh, P()))),
        "one device": jax.device_put((params, x), jax.devices()[0]),
    }
    step = train_step(cell)
    cands = common.Candidates()
    for name in CANDIDATES:
        cands.add_compiled(name, "train", step, *placed[name])
    hlo = jax.jit(step).lower(*placed["sharded"]).compile().as_text()
    losses = {name: float(jax.jit(step)(*placed[name])[0]) for name in CANDIDATES}
    rows = []
    for name, mode, record in cands.time(reps, progress):
        rows.append(dict(cell=cell_name, shape=shape_name, B=B, T=T, I=I, H=H, library=name, mode=mode,
                         devices=_DEVICES, loss=losses[name], **record))
    ref = next(r["median_ms"] for r in rows if r["library"] == "replicated")
    for r in rows:
        r["ratio_to_replicated"] = r["median_ms"] / ref
    rows[0].update(backend=seqjax.backends.explain(cell, params, x).backend, hlo_kernel_calls=kernel_calls(hlo),
                   hlo_all_gather="all-gather" in hlo, hlo_all_reduces=hlo.count(" all-reduce("))
    return rows


def table(rows) -> str:
    body = [[r["cell"], r["shape"], r["library"], r["median_ms"], r["ratio_to_replicated"], r["compile_s"]]
            for r in rows]
    return common.markdown_table(["cell", "shape", "batch", "train ms", "/ replicated", "compile s"], body)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = list(dict.fromkeys((r["cell"], r["shape"]) for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(configs), 3.6))
    width = 0.8 / len(CANDIDATES)
    for k, name in enumerate(CANDIDATES):
        ms = [next(r["median_ms"] for r in rows if (r["cell"], r["shape"]) == c and r["library"] == name)
              for c in configs]
        ax.bar([i + k * width for i in range(len(configs))], ms, width, label=name)
    ax.set_xticks([i + width for i in range(len(configs))], [f"{c} {s}" for c, s in configs])
    ax.set_ylabel("train step, median ms")
    ax.set_title(f"train step on {rows[0]['devices']} emulated CPU devices: batch sharded vs replicated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = common.grid_parser(__doc__.split("\n")[0], "sharded", default_reps=15)
    ap.add_argument("--devices", type=int, default=2, help="emulated CPU devices (default 2)")
    args = ap.parse_args(argv)
    cells, shapes, reps = common.grid_from_args(args, CELLS)
    if not args.quick and args.shapes is None:
        shapes = {"standard": common.SHAPES["standard"]}
    t0 = time.time()
    rows = common.run_grid(cells, shapes, reps, "sharded", lambda cell, sname, shape, progress: bench_config(
        cell, sname, shape, reps, progress))
    common.report(args.out, args.name, dict(rows=rows, reps=reps, devices=_DEVICES,
                                            command=" ".join([sys.executable, *sys.argv]), wall_s=time.time() - t0),
                  [], lambda path: plot(rows, path), table(rows))
    return rows


if __name__ == "__main__":
    main()
