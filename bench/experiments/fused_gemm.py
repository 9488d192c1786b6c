"""Lever: one fused [x, h] @ [[W_x], [W_h]] GEMM per step (seqjax.cells.base.Form.joint_apply) vs two GEMMs, interleaved, medians.

Usage: python bench/experiments/fused_gemm.py REPS OUT.json   (e.g. 9 bench/experiments/results/fused_gemm.json)
"""
import time, sys, jax, jax.numpy as jnp, numpy as np, seqjax
shapes = {"small": (32, 50, 8, 64), "standard": (64, 100, 128, 256), "long": (16, 1000, 32, 128)}
reps = int(sys.argv[1])
res = {}
for cname in ["lstm", "rnn"]:
    for sname, (B, T, I, H) in shapes.items():
        cell = {"lstm": seqjax.lstm(H, forget_bias=0.0), "rnn": seqjax.rnn(H)}[cname]
        old = cell._replace(step=lambda p, c, px, cell=cell: cell.step(p, c, px))  # no Form: two GEMMs
        key = jax.random.key(0)
        p = cell.init(key, I)
        x = jax.random.normal(key, (B, T, I))
        fns = {}
        for n, c in [("two GEMMs", old), ("fused GEMM", cell)]:
            run = lambda p, x, c=c: seqjax.scan(c, p, x, kernel="xla")[1]  # XLA's loop is what this compares
            fwd = jax.jit(run)
            tr = jax.jit(jax.value_and_grad(lambda p, x, run=run: jnp.mean(run(p, x) ** 2), argnums=(0, 1)))
            fns[(n, "fwd")] = fwd
            fns[(n, "train")] = tr
        for f in fns.values():
            jax.block_until_ready(f(p, x))
        times = {k: [] for k in fns}
        for r in range(reps):
            for k, f in fns.items():
                t = time.perf_counter(); jax.block_until_ready(f(p, x)); times[k].append(time.perf_counter() - t)
        med = {k: 1e3 * np.median(v) for k, v in times.items()}
        for mode in ["fwd", "train"]:
            a, b = med[("two GEMMs", mode)], med[("fused GEMM", mode)]
            print(f"{cname} {sname:9s} {mode:5s} two GEMMs {a:8.2f} ms  fused {b:8.2f} ms  ratio {b / a:.2f}", flush=True)
            res[f"{cname} {sname} {mode}"] = dict(two_gemms_ms=a, fused_ms=b, ratio=b / a)
import json; json.dump(res, open(sys.argv[2], "w"), indent=1)
