"""Stacks of bidirectional layers: seqjax against XLA's loop, Flax and PyTorch.

Most recurrent models stack bidirectional layers (`seqjax.multilayer(cell, L,
bidirectional=True)`, PyTorch's ``nn.LSTM(num_layers=L, bidirectional=True)``).
For each cell (LSTM, GRU, Elman RNN) and shape (B, T, I, H) it times the forward
pass and a train step (`value_and_grad` of mean(outputs²) with respect to all
parameters and the input) of L layers (default 2; layer 2 reads 2H features):

* ``seqjax``: ``seqjax.multilayer(cell, L, bidirectional=True)``, the default
  (``kernel="auto"``: seqjax's CPU kernels, a call per direction and layer);
* ``seqjax kernel=xla``: XLA's loop;
* ``flax.linen nn.Bidirectional``: L layers of ``nn.Bidirectional(nn.RNN(cell),
  nn.RNN(cell))`` (``OptimizedLSTMCell``, ``GRUCell``, ``SimpleCell``);
* ``pytorch``: ``nn.LSTM/GRU/RNN(num_layers=L, bidirectional=True)`` (oneDNN's
  fused kernels), in a child process as in `peers.py`.

Every candidate is interleaved in one process; medians, ratios to PyTorch.

    python bench/bidirectional.py              # all cells, the three shapes, 2 layers
    python bench/bidirectional.py --quick      # a tiny shape, few reps (smoke test)

Writes <out>/bidirectional.json, <out>/bidirectional.png and prints markdown tables.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import peers  # noqa: E402

import seqjax  # noqa: E402

CELLS = peers.CELLS
REFERENCE = "pytorch"


def _cell(cell_name, H):
    return {"lstm": lambda: seqjax.lstm(H, forget_bias=0.0), "gru": lambda: seqjax.gru(H),
            "rnn": lambda: seqjax.rnn(H)}[cell_name]()


def _flax(cell_name, H, layers, key, x):
    import flax.linen as nn
    cls = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}[cell_name]

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(layers):
                x = nn.Bidirectional(nn.RNN(cls(features=H)), nn.RNN(cls(features=H)))(x)
            return x
    model = Stack()
    return model.apply, model.init(key, x)


def jax_candidates(cell_name, B, T, I, H, layers):
    """name -> (run(params, x) -> ys, params)."""
    key = jax.random.key(0)
    cell = _cell(cell_name, H)
    layer = seqjax.multilayer(cell, layers, bidirectional=True)
    params = layer.init(key, I)
    xla = seqjax.multilayer(cell, layers, bidirectional=True, kernel="xla")
    cands = {
        "seqjax": ((lambda p, x: layer.apply(p, x)[1]), params),
        "seqjax kernel=xla": ((lambda p, x: xla.apply(p, x)[1]), params),
    }
    try:
        cands["flax.linen nn.Bidirectional"] = _flax(cell_name, H, layers, key, jnp.zeros((B, T, I)))
    except ImportError:
        pass
    return cands


def torch_fns(cell_name, B, T, I, H, layers, threads):
    """PyTorch's fwd/train (runs in `common.ProcessTimer`'s child)."""
    import torch
    torch.set_num_threads(threads)
    m = peers.torch_rnn(cell_name, I, H, num_layers=layers, bidirectional=True)
    fwd, train = peers.torch_fwd_train(m, lambda inp: m(inp)[0], torch.randn(B, T, I))
    return {f"{REFERENCE}|fwd": fwd, f"{REFERENCE}|train": train}


def bench_config(cell_name, shape_name, shape, layers, reps, torch_ok, progress=None):
    B, T, I, H = shape
    x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    cands = common.Candidates()
    for name, (run, params) in jax_candidates(cell_name, B, T, I, H, layers).items():
        cands.add_compiled(name, "fwd", run, params, x)
        cands.add_compiled(name, "train", jax.value_and_grad(common.mean_square_loss(run), argnums=(0, 1)), params, x)
    timer = None
    if torch_ok:
        timer = common.ProcessTimer(torch_fns, cell_name, B, T, I, H, layers, os.cpu_count())
        for mode in ("fwd", "train"):
            cands.add(REFERENCE, mode, timer.fn(f"{REFERENCE}|{mode}"))
    # the matmul floor of the L layers (layer k > 0 reads 2H features), both directions
    floor = sum(2 * common.floor_flops(cell_name, B, T, I if k == 0 else 2 * H, H) for k in range(layers))
    rows = []
    for name, mode, record in cands.time(reps, progress, child=timer):
        rows.append(dict(cell=cell_name, shape=shape_name, B=B, T=T, I=I, H=H, layers=layers, library=name,
                         mode=mode, **record))
        rows[-1]["gflops"] = floor * (3.0 if mode == "train" else 1.0) / (record["median_ms"] * 1e-3) / 1e9
    common.add_ratios(rows, REFERENCE, "ratio_to_pytorch")
    return rows


def tables(rows) -> str:
    return common.ratio_tables(rows, CELLS, "ratio_to_pytorch", "pytorch",
                               lambda head: f"{head['layers']} bidirectional layers")


def main(argv=None):
    ap = common.grid_parser(__doc__.split("\n")[0], "bidirectional", default_reps=11)
    ap.add_argument("--layers", type=int, default=2, help="bidirectional layers stacked (default 2)")
    args = ap.parse_args(argv)
    if args.layers < 1:
        raise SystemExit(f"--layers must be at least 1, got {args.layers}")

    cells, shapes, reps = common.grid_from_args(args, CELLS)
    notes = []
    torch_ok = importlib.util.find_spec("torch") is not None  # imported in the child process only
    if not torch_ok:
        notes.append("pytorch: skipped, not installed")
    t0 = time.time()
    rows = common.run_grid(cells, shapes, reps, "bidirectional", lambda cell, sname, shape, progress: bench_config(
        cell, sname, shape, args.layers, reps, torch_ok, progress))
    common.report(args.out, args.name, dict(rows=rows, reps=reps, layers=args.layers, torch_threads=os.cpu_count(),
                                            wall_s=time.time() - t0), notes,
                  lambda path: peers.plot(rows, path, f", {args.layers} bidirectional layers"), tables(rows))
    return rows


if __name__ == "__main__":
    main()
