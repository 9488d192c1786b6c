"""The custom VJP (`backward="fused"`) vs autodiff (`backward="autodiff"`) for the cell variants it covers.

Peephole LSTM (Greff et al.'s "vanilla LSTM"), LSTMP (``proj_size=H // 2``), Greff's CIFG (coupled
input and forget gates, with peepholes), Cho's GRU (``reset_after=False``) and the LSTM and GRU with
bfloat16 params (``param_dtype=jnp.bfloat16``; float32 inputs), train step
(`value_and_grad` of mean(ys²) w.r.t. params and input) at the three benchmark shapes,
interleaved, medians.

    python bench/experiments/vjp_variants.py [--variants peephole,lstm_bf16] [--reps 7] [--out bench/experiments/results] [--quick]

Writes <out>/vjp_variants.json and prints one line per configuration.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/: common, peers
import common  # noqa: E402

import seqjax  # noqa: E402

VARIANTS = {"peephole": lambda H: seqjax.lstm(H, peepholes=True), "proj": lambda H: seqjax.lstm(H, proj_size=H // 2),
            "cifg": lambda H: seqjax.lstm_variant("CIFG", H), "gru_cho": lambda H: seqjax.gru(H, reset_after=False),
            "lstm_bf16": lambda H: seqjax.lstm(H, param_dtype=jnp.bfloat16),
            "gru_bf16": lambda H: seqjax.gru(H, param_dtype=jnp.bfloat16)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 7; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few reps (smoke test)")
    ap.add_argument("--variants", default=None, help="comma list (default: all): " + ",".join(VARIANTS))
    ap.add_argument("--name", default="vjp_variants", help="basename of the JSON written")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 7)
    variants = {k: VARIANTS[k] for k in common.parse_list(args.variants, VARIANTS, "variants")}
    rows = []
    for sname, (B, T, I, H) in (common.QUICK_SHAPES if args.quick else common.SHAPES).items():
        for vname, make in variants.items():
            cell = make(H)
            params = cell.init(jax.random.key(0), I)
            x = jax.random.normal(jax.random.key(1), (B, T, I))
            fns = {}
            for backward in ("autodiff", "fused"):
                def loss(p, x, backward=backward):
                    return jnp.mean(seqjax.scan(cell, p, x, backward=backward)[1] ** 2)
                step = common.compile_timed(jax.value_and_grad(loss, argnums=(0, 1)), params, x)["compiled"]
                fns[backward] = lambda step=step: step(params, x)
            samples = common.interleave(fns, args.reps)
            med = {k: common.summarise(v)["median_ms"] for k, v in samples.items()}
            rows.append(dict(variant=vname, shape=sname, B=B, T=T, I=I, H=H, autodiff_ms=med["autodiff"],
                             fused_ms=med["fused"], ratio=med["fused"] / med["autodiff"]))
            print(f"{vname:9s} {sname:8s} train: autodiff {med['autodiff']:7.3g} ms, custom VJP {med['fused']:7.3g} ms, "
                  f"ratio {med['fused'] / med['autodiff']:.2f}", flush=True)
    common.write_json(os.path.join(args.out, f"{args.name}.json"), dict(rows=rows, reps=args.reps))


if __name__ == "__main__":
    main()
