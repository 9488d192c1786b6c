"""What one loop iteration of seqjax.scan compiles to: the ops in each while-loop body.

On a GPU every fusion, custom call (cuBLAS GEMM, Triton GEMM) and copy in the body of
the scan's while loop is at least one kernel launch per iteration, and the long
sequences are launch-bound (docs/design/performance.md, the GPU). This script compiles the
forward and the train step of `seqjax.scan` at its defaults (or with the given scan
options), lists the launching ops of every while-loop body, and times both, so that
XLA flags (set through the XLA_FLAGS environment variable, one process per setting)
can be compared by what they do to the loop, not only by the clock.

    XLA_FLAGS=... python bench/experiments/loop_kernels.py --cells lstm --shapes long --label myflags

Writes <out>/<name>.json (one entry per run, appended, keyed by --label) and prints a table.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/: common, peers
import common  # noqa: E402
import peers  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

_NO_LAUNCH = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
              "opt-barrier", "partition-id", "replica-id"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")
_WHILE_BODY = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KIND = re.compile(r"kind=(k\w+)")


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Splits an HLO module's text into computation name -> instruction lines."""
    comps, name = {}, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    return comps


def loop_bodies(hlo_text: str) -> list[dict]:
    """Every while-loop body of a compiled module: its launching ops, counted by kind.

    An op is named by its opcode, a fusion also by its kind (kLoop, kInput,
    kCustom, ...) and a custom call by its target (e.g. ``__cublas$gemm``).
    """
    comps = computations(hlo_text)
    bodies = []
    for lines in comps.values():
        for line in lines:
            m = _WHILE_BODY.search(line)
            if m and m.group(1) in comps:
                bodies.append(m.group(1))
    out = []
    for body in bodies:
        counts = collections.Counter()
        for line in comps[body]:
            m = _INSTRUCTION.match(line)
            if not m or m.group(1) in _NO_LAUNCH:
                continue
            op = m.group(1)
            if op == "fusion":
                k = _KIND.search(line)
                op += f"[{k.group(1) if k else '?'}]"
                fused = re.search(r"calls=%?([\w.\-]+)", line)
                if fused and fused.group(1) in comps:
                    inner = " ".join(comps[fused.group(1)])
                    if " dot(" in inner:
                        op += "+dot"
            elif op == "custom-call":
                t = _TARGET.search(line)
                op += f"[{t.group(1) if t else '?'}]"
            counts[op] += 1
        out.append(dict(body=body, launches=sum(counts.values()), ops=dict(counts)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="lstm")
    ap.add_argument("--shapes", default="long,standard")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--label", default=os.environ.get("XLA_FLAGS", "") or "no flags")
    ap.add_argument("--scan", default="", help="scan options, e.g. 'hoist=True,unroll=1'")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 3 reps (smoke test)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="loop_kernels")
    ap.add_argument("--dump", action="store_true", help="also write each compiled module's HLO text to --out")
    args = ap.parse_args(argv)
    scan_kwargs = {"kernel": "xla"}  # the while loop XLA compiles is what this counts (oneDNN has none)
    for item in filter(None, args.scan.split(",")):
        k, _, v = item.partition("=")
        scan_kwargs[k.strip()] = int(v) if v.isdigit() else {"True": True, "False": False, "None": None}.get(v, v)
    shapes = common.QUICK_SHAPES if args.quick else common.SHAPES
    reps = 3 if args.quick else args.reps
    cells = common.parse_list(args.cells, peers.CELLS, "cells")
    shape_names = list(shapes) if args.quick else common.parse_list(args.shapes, list(shapes), "shapes")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for cell in cells:
        for sname in shape_names:
            B, T, I, H = shapes[sname]
            run, params = peers.seqjax_builder(**scan_kwargs)(cell, B, T, I, H, jax.random.key(0))
            x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
            fns = {}
            for mode, f in zip(("fwd", "train"), peers._fwd_train(run)):
                c = common.compile_timed(f, params, x)
                compiled = c["compiled"]
                if args.dump:
                    tag = re.sub(r"\W+", "_", args.label).strip("_")
                    with open(os.path.join(args.out, f"hlo_{tag}_{cell}_{sname}_{mode}.txt"), "w") as fh:
                        fh.write(compiled.as_text())
                fns[mode] = lambda compiled=compiled: compiled(params, x)
                rows.append(dict(cell=cell, shape=sname, mode=mode, compile_s=c["compile_s"],
                                 loops=loop_bodies(compiled.as_text())))
            samples = common.interleave(fns, reps=reps)
            for r in rows[-2:]:
                r.update(common.summarise(samples[r["mode"]]))
    table = [[r["cell"], r["shape"], r["mode"], r["median_ms"], r["compile_s"],
              " / ".join(f"{lp['launches']}: " + ", ".join(f"{k}×{v}" for k, v in sorted(lp["ops"].items()))
                         for lp in r["loops"])] for r in rows]
    print(f"## {args.label}  (scan options: {scan_kwargs or 'defaults'})")
    print(common.markdown_table(["cell", "shape", "mode", "median ms", "compile s",
                                 "launching ops per loop body"], table))
    path = os.path.join(args.out, f"{args.name}.json")
    runs = {}
    if os.path.exists(path):
        with open(path) as fh:
            runs = json.load(fh).get("runs", {})
    runs[args.label] = dict(scan=scan_kwargs, xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows)
    common.write_json(path, dict(runs=runs))


if __name__ == "__main__":
    main()
