"""Greff et al.'s LSTM variants through seqjax's paths: its CPU kernels against XLA's loop.

PyTorch, Flax, Equinox and Haiku have none of them (no peepholes either), so
this compares seqjax's own ways to run each, at the three benchmark shapes,
forward and train step (`value_and_grad` of mean(outputs²) with respect to the
parameters and the input). For each variant of `seqjax.lstm_variant`
("vanilla" is the peephole LSTM, "NP" the plain LSTM without peepholes):

* ``<variant>``: ``kernel="auto"``, seqjax's AVX2/AVX-512 kernels where they
  apply;
* ``<variant> kernel=xla``: XLA's loop with `seqjax.backends._gemm_vjp`'s custom VJP;
* for "vanilla" also ``kernel=onednn`` (oneDNN's ``vanilla_lstm`` with
  peepholes; skipped with a note where oneDNN is not installed) and
  ``kernel=xla, autodiff`` (autodiff of XLA's loop).

Every candidate is interleaved in one process; medians, and ratios to "NP"
through the kernels (the plain LSTM).

    python bench/lstm_variants.py                        # all variants, the three shapes
    python bench/lstm_variants.py --variants vanilla     # the peephole LSTM only
    python bench/lstm_variants.py --quick                # a tiny shape, few reps (smoke test)

Writes <out>/lstm_variants.json, <out>/lstm_variants.png and prints a markdown table.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import peers  # noqa: E402

import seqjax  # noqa: E402

REFERENCE = "NP"
VARIANTS = ("vanilla", "NP", "NIG", "NFG", "NOG", "CIFG", "NIAF", "NOAF")  # FGR: no kernel
# name suffix -> seqjax.scan options; the last two for "vanilla" only
PATHS = {"": {}, " kernel=xla": {"kernel": "xla"}, " kernel=onednn": {"kernel": "onednn"},
         " kernel=xla, autodiff": {"kernel": "xla", "backward": "autodiff"}}


def candidates(variants):
    """name -> (variant, seqjax.scan options)."""
    out = {}
    for variant in variants:
        for suffix, scan_kwargs in list(PATHS.items())[:4 if variant == "vanilla" else 2]:
            out[variant + suffix] = (variant, scan_kwargs)
    return out


def _build(variant, scan_kwargs, B, T, I, H):
    """(run(params, x) -> ys, params); peepholes drawn from N(0, 0.1²) so that they count."""
    if scan_kwargs.get("kernel") == "onednn":
        seqjax.backends._library.load_onednn()  # NativeUnavailable (a RuntimeError): skipped with a note
    cell = seqjax.lstm_variant(variant, H, peephole_init=jax.nn.initializers.normal(0.1))
    return (lambda p, x: seqjax.scan(cell, p, x, **scan_kwargs)[1]), cell.init(jax.random.key(0), I)


def bench_shape(shape_name, shape, candidate_specs, reps, notes, progress=None):
    B, T, I, H = shape
    x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    cands = common.Candidates()
    for name, (variant, scan_kwargs) in candidate_specs.items():
        try:
            run, params = _build(variant, scan_kwargs, B, T, I, H)
        except RuntimeError as e:
            notes.add(f"{name}: skipped ({e})")
            continue
        cands.add_compiled(name, "fwd", run, params, x)
        cands.add_compiled(name, "train", jax.value_and_grad(common.mean_square_loss(run), argnums=(0, 1)), params, x)
    rows = [dict(cell="lstm", shape=shape_name, B=B, T=T, I=I, H=H, library=name, mode=mode, **record)
            for name, mode, record in cands.time(reps, progress)]
    common.add_ratios(rows, REFERENCE, "ratio_to_plain")
    return rows


def table(rows) -> str:
    body = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for lib in dict.fromkeys(r["library"] for r in rows if r["shape"] == shape):
            by = {r["mode"]: r for r in rows if r["shape"] == shape and r["library"] == lib}
            body.append([shape, lib, by["fwd"]["median_ms"], by["fwd"].get("ratio_to_plain", ""),
                         by["train"]["median_ms"], by["train"].get("ratio_to_plain", "")])
    return common.markdown_table(["shape", "candidate", "fwd ms", "fwd / NP", "train ms", "train / NP"], body)


def main(argv=None):
    ap = common.grid_parser(__doc__.split("\n")[0], "lstm_variants", default_reps=15, cells=False)
    ap.add_argument("--variants", default=None, help="comma list (default: all): " + ",".join(VARIANTS))
    args = ap.parse_args(argv)

    _, shapes, reps = common.grid_from_args(args)
    cands = candidates(common.parse_list(args.variants, VARIANTS, "variants"))
    notes: set[str] = set()
    t0 = time.time()
    rows = common.run_grid(["lstm"], shapes, reps, "lstm variants", lambda cell, sname, shape, progress: bench_shape(
        sname, shape, cands, reps, notes, progress))
    common.report(args.out, args.name, dict(rows=rows, reps=reps, wall_s=time.time() - t0), notes,
                  lambda path: peers.plot(rows, path, ", Greff et al.'s variants"), table(rows))
    return rows


if __name__ == "__main__":
    main()
