"""Speed levers of seqjax, each measured against the plain path (the measurements behind docs/design/performance.md).

Candidates (all interleaved in one process with PyTorch as the reference):
  * scan hoist=False   : autodiff of the scan (backward="autodiff"), input projection inside the body
  * scan hoist=True    : the same with the projection hoisted as one GEMM (time-major)
  * fused vjp          : seqjax.backends._gemm_vjp's custom VJP (backward="fused", scan's default since it won):
                         the backward loop carries the state gradients only, the weight gradients
                         and dX are whole-sequence GEMMs
  * fused vjp hoist=True : the same with the hoisted projection
  * scan remat         : autodiff with every step rematerialised (jax.checkpoint), what remat=True picks
  * fused vjp remat    : the custom VJP saving only each step's start carry, gates recomputed backwards
  * ... unroll=k       : k steps per loop iteration (GPU: fewer loop iterations, kernel launches fused)

The custom-JVP form of the same idea (the JVP split into a time-parallel part and a
linear recurrence, transposed by JAX) was measured and removed: docs/design/performance.md.

    python bench/experiments/levers.py [--cells lstm,gru,rnn] [--shapes small,standard,long] [--reps 15] [--quick]

Writes <out>/levers.json and prints markdown tables (docs/design/performance.md is
written by hand from them, with the decisions).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/: common, peers
import common  # noqa: E402
import peers  # noqa: E402

scan_builder = peers.seqjax_builder  # (**scan kwargs) -> builder of (run, params)

CANDIDATES = {
    "scan hoist=False": scan_builder(hoist=False, backward="autodiff"),
    "scan hoist=True": scan_builder(hoist=True, backward="autodiff"),
    "fused vjp": scan_builder(hoist=False, backward="fused"),
    "fused vjp hoist=True": scan_builder(hoist=True, backward="fused"),
    "scan remat": scan_builder(remat=True, backward="autodiff"),
    "fused vjp remat": scan_builder(remat=True, backward="fused"),
    # GPU: per-step launch overhead dominates long sequences; unrolling fuses several steps per loop iteration
    **{f"fused vjp hoist=True unroll={k}": scan_builder(hoist=True, backward="fused", unroll=k) for k in (4, 8, 16)},
    "scan hoist=True unroll=8": scan_builder(hoist=True, backward="autodiff", unroll=8),
}


def main(argv=None):
    ap = common.grid_parser(__doc__.split("\n")[0], "levers", default_reps=15)
    ap.add_argument("--candidates", default=None, help="comma list of candidate names (default: all)")
    ap.add_argument("--default", action="store_true", help="also time seqjax.scan with its defaults")
    args = ap.parse_args(argv)
    cells, shapes, reps = common.grid_from_args(args, peers.CELLS)
    import torch
    torch.set_num_threads(os.cpu_count())
    cands = dict(CANDIDATES)
    if args.candidates:
        cands = {k: cands[k] for k in common.parse_list(args.candidates, list(CANDIDATES), "candidates")}
    if args.default:
        cands["seqjax.scan (defaults)"] = scan_builder()
    notes = set()
    rows = common.run_grid(cells, shapes, reps, "levers", lambda cell, sname, shape, progress: peers.bench_config(
        cell, sname, shape, reps, cands, True, notes, progress))
    common.write_json(os.path.join(args.out, f"{args.name}.json"), dict(rows=rows, reps=reps, notes=sorted(notes)))
    print(peers.tables(rows))


if __name__ == "__main__":
    main()
