"""Variable-length batches: seqjax with ``lengths`` against XLA's loop, Flax and PyTorch's packed sequences.

A padded batch whose sequences have different lengths (here uniform in
[T/2, T], seeded) is what language models, classifiers and seq2seq encoders
see. For each cell (LSTM, GRU, Elman RNN) and shape (B, T, I, H) it times the
forward pass and a train step (`value_and_grad` of mean(outputs²) with respect
to the parameters and the input) of:

* ``seqjax``: ``seqjax.scan(..., lengths=L)``, the default (``kernel="auto"``:
  seqjax's CPU kernels, which take lengths);
* ``seqjax, sorted batch``: the same sequences sorted longest first by the
  caller, so that whole tiles of batch rows are padding after the shorter
  sequences end and the kernels skip their products (PyTorch's packed sequences
  work this way; the kernels take the rows in that order themselves, so this
  measures what the caller's sort still adds);
* ``seqjax, no lengths``: the same batch treated as full length (what the
  lengths cost or save);
* ``seqjax kernel=xla``: XLA's loop with lengths (before the kernels took them);
* ``flax.linen nn.RNN``: ``nn.RNN(cell)(x, seq_lengths=L)``;
* ``pytorch packed``: ``pack_padded_sequence(x, L, enforce_sorted=False)``
  through ``nn.LSTM/GRU/RNN`` and ``pad_packed_sequence`` back; ``pytorch
  packed, sorted`` with the sorted batch (``enforce_sorted=True``); ``pytorch,
  no lengths``: the padded batch as if full length (oneDNN's fused kernel, which
  packed sequences cannot use; the outputs past a length and the final state
  are then not those of the sequence).

Every candidate is interleaved in one process (PyTorch in a child process, as in
`peers.py`); medians, ratios to ``pytorch packed``.

    python bench/lengths.py                 # all cells, the three shapes
    python bench/lengths.py --quick         # a tiny shape, few reps (smoke test)

Writes <out>/lengths.json, <out>/lengths.png and prints markdown tables.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import peers  # noqa: E402

import seqjax  # noqa: E402

CELLS = peers.CELLS
REFERENCE = "pytorch packed"


def batch_lengths(B: int, T: int, seed: int = 0) -> np.ndarray:
    """[B] int32 lengths uniform in [T/2, T] (at least 1), seeded."""
    rng = np.random.default_rng(seed)
    return rng.integers(max(1, T // 2), T + 1, B).astype(np.int32)


def _seqjax(cell_name, H, I, key, **scan_kwargs):
    cell = {"lstm": lambda: seqjax.lstm(H, forget_bias=0.0), "gru": lambda: seqjax.gru(H),
            "rnn": lambda: seqjax.rnn(H)}[cell_name]()
    return (lambda p, x, lengths: seqjax.scan(cell, p, x, lengths=lengths, **scan_kwargs)[1]), cell.init(key, I)


def _flax(cell_name, H, I, key, B, T):
    import flax.linen as nn
    cls = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}[cell_name]
    model = nn.RNN(cls(features=H))
    params = model.init(key, jnp.zeros((B, T, I)))
    return (lambda p, x, lengths: model.apply(p, x, seq_lengths=lengths)), params


def jax_candidates(cell_name, B, T, I, H, lengths, order):
    """name -> (run(params, x, lengths) -> ys, params, x, lengths): the batch each candidate sees."""
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    L = jnp.asarray(lengths)
    sorted_x, sorted_L = x[order], jnp.asarray(lengths[order])
    run, params = _seqjax(cell_name, H, I, key)
    cands = {
        "seqjax": (run, params, x, L),
        "seqjax, sorted batch": (run, params, sorted_x, sorted_L),
        "seqjax, no lengths": (lambda p, x, lengths: run(p, x, None), params, x, L),
    }
    run_xla, _ = _seqjax(cell_name, H, I, key, kernel="xla")
    cands["seqjax kernel=xla"] = (run_xla, params, x, L)
    try:
        run_flax, flax_params = _flax(cell_name, H, I, key, B, T)
        cands["flax.linen nn.RNN"] = (run_flax, flax_params, x, L)
    except ImportError:
        pass
    return cands


def torch_fns(cell_name, B, T, I, H, lengths, threads):
    """PyTorch's packed-sequence fwd/train, unsorted and sorted (runs in `common.ProcessTimer`'s child)."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    torch.set_num_threads(threads)
    m = peers.torch_rnn(cell_name, I, H)
    x = torch.randn(B, T, I)
    order = np.argsort(-lengths, kind="stable")
    fns = {}
    for label, xb, lb, is_sorted in (("", x, lengths, False), (", sorted", x[order], lengths[order], True)):
        lt = torch.as_tensor(lb, dtype=torch.int64)

        def run(inp, lt=lt, is_sorted=is_sorted):
            packed = pack_padded_sequence(inp, lt, batch_first=True, enforce_sorted=is_sorted)
            ys, _ = m(packed)
            return pad_packed_sequence(ys, batch_first=True, total_length=T)[0]

        fns[f"{REFERENCE}{label}|fwd"], fns[f"{REFERENCE}{label}|train"] = peers.torch_fwd_train(m, run, xb)
    fns["pytorch, no lengths|fwd"], fns["pytorch, no lengths|train"] = peers.torch_fwd_train(
        m, lambda inp: m(inp)[0], x)
    return fns


def bench_config(cell_name, shape_name, shape, reps, torch_ok, progress=None):
    B, T, I, H = shape
    lengths = batch_lengths(B, T)
    order = np.argsort(-lengths, kind="stable")
    cands = common.Candidates()
    for name, (run, params, x, L) in jax_candidates(cell_name, B, T, I, H, lengths, order).items():
        loss = lambda p, x, L, run=run: jnp.mean(jnp.square(run(p, x, L)))  # noqa: E731
        cands.add_compiled(name, "fwd", run, params, x, L)
        cands.add_compiled(name, "train", jax.value_and_grad(loss, argnums=(0, 1)), params, x, L)
    timer = None
    if torch_ok:
        timer = common.ProcessTimer(torch_fns, cell_name, B, T, I, H, lengths, os.cpu_count())
        for name in (REFERENCE, f"{REFERENCE}, sorted", "pytorch, no lengths"):
            for mode in ("fwd", "train"):
                cands.add(name, mode, timer.fn(f"{name}|{mode}"))
    rows = []
    for name, mode, record in cands.time(reps, progress, child=timer):
        flops = common.floor_flops(cell_name, B, T, I, H) * (3.0 if mode == "train" else 1.0)
        rows.append(dict(cell=cell_name, shape=shape_name, B=B, T=T, I=I, H=H, library=name, mode=mode,
                         fill=float(lengths.mean() / T), **record))
        rows[-1]["gflops"] = flops / (record["median_ms"] * 1e-3) / 1e9
    common.add_ratios(rows, REFERENCE, "ratio_to_pytorch_packed")
    return rows


def tables(rows) -> str:
    return common.ratio_tables(rows, CELLS, "ratio_to_pytorch_packed", "packed",
                               lambda head: f"lengths fill {head['fill']:.0%} of the padded batch")


def main(argv=None):
    ap = common.grid_parser(__doc__.split("\n")[0], "lengths", default_reps=15)
    args = ap.parse_args(argv)

    cells, shapes, reps = common.grid_from_args(args, CELLS)
    notes = []
    torch_ok = importlib.util.find_spec("torch") is not None  # imported in the child process only
    if not torch_ok:
        notes.append("pytorch: skipped, not installed")
    t0 = time.time()
    rows = common.run_grid(cells, shapes, reps, "lengths", lambda cell, sname, shape, progress: bench_config(
        cell, sname, shape, reps, torch_ok, progress))
    common.report(args.out, args.name, dict(rows=rows, reps=reps, torch_threads=os.cpu_count(),
                                            lengths="uniform integers in [T/2, T], numpy default_rng(0)",
                                            wall_s=time.time() - t0), notes,
                  lambda path: peers.plot(rows, path, ", lengths uniform in [T/2, T]"), tables(rows))
    return rows


if __name__ == "__main__":
    main()
