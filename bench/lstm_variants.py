"""Greff et al.'s LSTM variants through seqjax's paths: its CPU kernels against XLA's loop.

PyTorch, Flax, Equinox and Haiku have none of them (no peepholes either), so
this compares seqjax's own ways to run each, at the three shapes of issue 3,
forward and train step (`value_and_grad` of mean(outputs²) with respect to the
parameters and the input). For each variant of `seqjax.lstm_variant`
("vanilla" is the peephole LSTM, "NP" the plain LSTM without peepholes):

* ``<variant>``: ``kernel="auto"``, seqjax's AVX2/AVX-512 kernels where they
  apply;
* ``<variant> kernel=xla``: XLA's loop with `seqjax.fused`'s custom VJP;
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

import argparse
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
        seqjax.native.load_onednn()  # NativeUnavailable (a RuntimeError): skipped with a note
    cell = seqjax.lstm_variant(variant, H, peephole_init=jax.nn.initializers.normal(0.1))
    return (lambda p, x: seqjax.scan(cell, p, x, **scan_kwargs)[1]), cell.init(jax.random.key(0), I)


def bench_shape(shape_name, shape, cands, reps, notes, progress=None):
    B, T, I, H = shape
    x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    fns, meta = {}, {}
    for name, (variant, scan_kwargs) in cands.items():
        try:
            run, params = _build(variant, scan_kwargs, B, T, I, H)
        except RuntimeError as e:
            notes.add(f"{name}: skipped ({e})")
            continue
        modes = {"fwd": run, "train": jax.value_and_grad(common.mean_square_loss(run), argnums=(0, 1))}
        for mode, f in modes.items():
            c = common.compile_timed(f, params, x)
            fns[f"{name}|{mode}"] = (lambda compiled=c["compiled"], params=params: compiled(params, x))
            meta[f"{name}|{mode}"] = {k: v for k, v in c.items() if k != "compiled"}
    samples = common.interleave(fns, reps=reps, warmup=2, progress=progress)
    rows = []
    for key, s in samples.items():
        name, mode = key.split("|")
        rows.append(dict(cell="lstm", shape=shape_name, B=B, T=T, I=I, H=H, library=name, mode=mode,
                         **common.summarise(s), **meta[key]))
    ref = {r["mode"]: r["median_ms"] for r in rows if r["library"] == REFERENCE}
    for r in rows:
        if ref:
            r["ratio_to_plain"] = r["median_ms"] / ref[r["mode"]]
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape and few reps (smoke test)")
    ap.add_argument("--variants", default=None, help="comma list (default: all): " + ",".join(VARIANTS))
    ap.add_argument("--shapes", default=None, help="comma list of small,standard,long")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per shape (default 15)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="lstm_variants", help="basename of the JSON/PNG written")
    args = ap.parse_args(argv)

    shapes = common.QUICK_SHAPES if args.quick else common.SHAPES
    shapes = {k: shapes[k] for k in common.parse_list(args.shapes, list(shapes), "shapes")}
    reps = args.reps or (3 if args.quick else 15)
    cands = candidates(common.parse_list(args.variants, VARIANTS, "variants"))
    notes: set[str] = set()
    progress = common.progress_bar(len(shapes) * reps, "lstm variants")
    rows, t0 = [], time.time()
    for sname, shape in shapes.items():
        rows += bench_shape(sname, shape, cands, reps, notes, progress)
    if progress is not None:
        progress.close()
    for n in sorted(notes):
        print("note:", n)
    os.makedirs(args.out, exist_ok=True)
    common.write_json(os.path.join(args.out, f"{args.name}.json"),
                      dict(rows=rows, notes=sorted(notes), reps=reps, wall_s=time.time() - t0))
    peers.plot(rows, os.path.join(args.out, f"{args.name}.png"), ", Greff et al.'s variants")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
