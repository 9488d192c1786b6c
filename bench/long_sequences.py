"""Long sequences: peak memory and time of a full-BPTT LSTM train step against T, per checkpointing policy.

The train step: ``jax.value_and_grad`` of mean(ys²) (ys: the LSTM's outputs;
``--loss mean``: mean(ys), whose cotangent XLA keeps as a broadcast constant)
with respect to the params, full backpropagation through time, B=16, I=32,
H=128, float32, `seqjax.scan` with ``kernel="auto"`` (the x86 kernels here)
and ``checkpoint`` = each policy (``--policies``; ``budget:k`` is ``("budget", k)``, ``binomial:k``
``("binomial", k)``).

The outputs and their cotangent, ys and dys ([B, T, H] each: 16 GB at
T=10^6), grow like T under every policy; the plot also shows XLA's
temporaries without them, the memory the policy decides (sqrt(T) for "sqrt").

Per (T, policy) point, in a fresh subprocess (so that its peak RSS is its own):
XLA's compiled memory analysis (arguments + outputs + temporaries - aliases),
then, if that fits ``--mem-limit-gb``, the step run ``--reps`` times (the
first call apart: it includes the first-touch of the buffers) and the
process's peak RSS (``ru_maxrss``). A point that does not fit is compiled
only: its XLA estimate is recorded and the reason it did not run.

Time of "sqrt" against "all": for each T up to ``--pair-max-t`` where "all"
fits, one more subprocess compiles both and interleaves them (medians,
ratio); above that the single-point medians give the ratio.

    python bench/long_sequences.py                       # T = 10^3 .. 10^6
    python bench/long_sequences.py --Ts 1000,10000 --policies all,sqrt
    python bench/long_sequences.py --quick               # smoke test (T <= 300, B=2, H=16)

Writes <out>/long_sequences.json and long_sequences.png (log-log, a sqrt(T) guide line).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SHAPE = dict(B=16, I=32, H=128)
QUICK_SHAPE = dict(B=2, I=4, H=16)
TS = (1000, 3000, 10000, 30000, 100000, 300000, 1000000)
QUICK_TS = (50, 200)


def _policy(text: str):
    for form in ("budget", "binomial"):
        if text.startswith(form + ":"):
            return (form, int(text.split(":", 1)[1]))
    return text


LOSSES = {"mean_square": "mean(ys²): the other benchmarks' loss; its backward holds ys and dys [B, T, H]",
          "mean": "mean(ys): dys is a broadcast constant, so only ys [B, T, H] is held"}


def _step(T: int, policy: str, shape: dict, loss: str = "mean_square"):
    """The jitted train step and its inputs."""
    import jax
    import jax.numpy as jnp
    import seqjax

    cell = seqjax.lstm(shape["H"])
    params = cell.init(jax.random.key(0), input_size=shape["I"])
    xs = jax.jit(lambda k: jax.random.normal(k, (shape["B"], T, shape["I"])))(jax.random.key(1))

    def run(p, x):
        return seqjax.scan(cell, p, x, checkpoint=_policy(policy))[1]

    backend = seqjax.backends.explain(cell, params, xs, checkpoint=_policy(policy)).backend
    if loss == "mean":
        return jax.value_and_grad(lambda p, x: jnp.mean(run(p, x))), (params, xs), backend
    return jax.value_and_grad(common.mean_square_loss(run)), (params, xs), backend


def _point(T: int, policy: str, shape: dict, reps: int, mem_limit: float, loss: str) -> dict:
    """One (T, policy) point in this (fresh) process; prints the compile record first (a JSON line), so that a
    run killed for memory still leaves XLA's estimate behind."""
    fn, args, backend = _step(T, policy, shape, loss)
    c = common.compile_timed(fn, *args)
    m = c["memory"]
    xla_peak = m.get("argument_bytes", 0) + m.get("output_bytes", 0) + m.get("temp_bytes", 0) - m.get("alias_bytes", 0)
    row = dict(T=T, policy=policy, backend=backend, compile_s=c["compile_s"], memory=m, xla_peak_bytes=xla_peak,
               rss_after_compile_bytes=common.rss_bytes()["peak_rss_bytes"])
    if xla_peak > mem_limit:
        row.update(ran=False, why=f"XLA's estimate {xla_peak / 2**30:.1f} GiB exceeds --mem-limit-gb "
                                  f"{mem_limit / 2**30:.1f}")
        return row
    print(json.dumps(dict(row, ran=False, why="killed while running")), flush=True)
    compiled = c["compiled"]
    t0 = time.perf_counter()
    common.block(compiled(*args))
    first = time.perf_counter() - t0
    times = [common.time_once(lambda: compiled(*args)) for _ in range(reps)]
    row.update(ran=True, first_call_s=first, run=common.summarise(times) if times else None,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return row


def _pair(T: int, shape: dict, reps: int, policies, loss: str) -> dict:
    """"sqrt" (and the other policies) against "all", interleaved in this process."""
    fns, backends = {}, {}
    for policy in policies:
        fn, args, backends[policy] = _step(T, policy, shape, loss)
        compiled = common.compile_timed(fn, *args)["compiled"]
        fns[policy] = lambda compiled=compiled, args=args: compiled(*args)
    samples = common.interleave(fns, reps=reps, warmup=1)
    med = {p: common.summarise(s) for p, s in samples.items()}
    return dict(T=T, backends=backends, run=med,
                ratio_to_all={p: med[p]["median_ms"] / med["all"]["median_ms"] for p in policies})


def _child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        partial = json.loads(lines[-1]) if lines else {}
        why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else proc.stderr[-1500:]
        return dict(partial, error=f"exit {proc.returncode}: {why}")
    return json.loads(lines[-1])


def _outputs_bytes(T: int, shape: dict) -> int:
    """The outputs ys and their cotangent dys, [B, T, H] float32 each: what any loss on all outputs holds."""
    return 2 * shape["B"] * T * shape["H"] * 4


def plot(path: str, points: list[dict], pairs: list[dict], policies, shape: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    for k, policy in enumerate(policies):
        rows = [r for r in points if r.get("policy") == policy and "xla_peak_bytes" in r]
        color = f"C{k}"
        xs = [r["T"] for r in rows]
        ax.plot(xs, [r["memory"].get("temp_bytes", 0) / 2**20 for r in rows], "--", color=color, marker=".",
                label=f"{policy}: XLA temporaries")
        ran = [r for r in rows if r.get("ran")]
        ax.plot([r["T"] for r in ran], [r["peak_rss_bytes"] / 2**20 for r in ran], "-", color=color, marker="o",
                label=f"{policy}: peak RSS")
        ax.plot(xs, [max(r["memory"].get("temp_bytes", 0) - _outputs_bytes(r["T"], shape), 1) / 2**20 for r in rows],
                "-.", color=color, marker="x", label=f"{policy}: XLA temporaries - ys - dys")
    sq = [r for r in points if r.get("policy") == "sqrt" and r.get("memory", {}).get("temp_bytes")]
    if sq:
        T0, m0 = sq[-1]["T"], max(sq[-1]["memory"]["temp_bytes"] - _outputs_bytes(sq[-1]["T"], shape), 1) / 2**20
        Ts = np.array([r["T"] for r in sq], float)
        ax.plot(Ts, m0 * np.sqrt(Ts / T0), ":", color="gray", label="∝ √T (guide)")
        ax.plot(Ts, m0 * (Ts / T0), ":", color="black", label="∝ T (guide)")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("T (steps)"), ax.set_ylabel("MiB")
    ax.set_title("LSTM train step, B=16 I=32 H=128: memory")
    ax.legend(fontsize=7)
    for k, policy in enumerate(p for p in policies if p != "all"):
        rows = [r for r in pairs if policy in r.get("ratio_to_all", {})]
        bx.plot([r["T"] for r in rows], [r["ratio_to_all"][policy] for r in rows], marker="o", color=f"C{k + 1}",
                label=policy)
    bx.axhline(1.4, color="red", ls=":", label="goal 1.4×")
    if any("ratio_to_all" in r for r in pairs):
        bx.set_xscale("log")
    bx.set_xlabel("T (steps)"), bx.set_ylabel("time / time of 'all' (median)")
    bx.set_title("train step time relative to checkpoint='all'")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke test")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--Ts", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--policies", default="all,sqrt,budget:64")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed runs per point after the first call (default: 3 up to T=3e4, 1 up to 3e5, else 0: the "
                         "first call's time)")
    ap.add_argument("--pair-max-t", type=int, default=30000, help="interleave the policies up to this T")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0, help="run a point only below this XLA estimate")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per subprocess")
    ap.add_argument("--loss", default="mean_square", choices=sorted(LOSSES))
    ap.add_argument("--name", default="long_sequences", help="the results' file name (without .json/.png)")
    ap.add_argument("--point", nargs=2, metavar=("T", "POLICY"), help=argparse.SUPPRESS)
    ap.add_argument("--pair", type=int, metavar="T", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shape = QUICK_SHAPE if a.quick else SHAPE
    policies = a.policies.split(",")
    if a.point:
        T = int(a.point[0])
        reps = a.reps if a.reps is not None else (3 if T <= 30000 else 1 if T <= 300000 else 0)
        print(json.dumps(_point(T, a.point[1], shape, reps, a.mem_limit_gb * 2**30, a.loss)))
        return
    if a.pair:
        print(json.dumps(_pair(a.pair, shape, a.reps or 5, policies, a.loss)))
        return

    Ts = [int(float(t)) for t in a.Ts.split(",")] if a.Ts else list(QUICK_TS if a.quick else TS)
    common_args = (["--quick"] if a.quick else []) + ["--mem-limit-gb", str(a.mem_limit_gb), "--loss", a.loss] + \
        (["--reps", str(a.reps)] if a.reps is not None else [])
    points, pairs, notes = [], [], set()
    progress = common.progress_bar(len(Ts) * len(policies), "long sequences")
    for T in Ts:
        for policy in policies:
            if progress is not None:
                progress.set_postfix_str(f"T={T} {policy}")
            row = _child(["--point", str(T), policy, *common_args], a.timeout_s)
            points.append(dict(dict(T=T, policy=policy), **row))
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    fits = {r["T"] for r in points if r.get("policy") == "all" and r.get("ran")}
    for T in Ts:
        if T in fits and T <= a.pair_max_t:
            pair = _child(["--pair", str(T), "--policies", ",".join(policies), *common_args], a.timeout_s)
            pairs.append(dict(dict(T=T, interleaved=True), **pair))
        elif T in fits:  # too long to interleave: the single points' medians
            run = {r["policy"]: r["run"] for r in points if r["T"] == T and r.get("ran") and r.get("run")}
            if "all" in run:
                pairs.append(dict(T=T, interleaved=False, run=run,
                                  ratio_to_all={p: run[p]["median_ms"] / run["all"]["median_ms"] for p in run}))
    for r in points:
        if r.get("error"):
            notes.add(f"T={r['T']} {r['policy']}: {r['error'][:300]}")
        elif not r.get("ran"):
            notes.add(f"T={r['T']} {r['policy']}: not run: {r['why']}")

    lines = ["| T | policy | backend | XLA estimate GiB | XLA temp GiB | peak RSS GiB | median s | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in points:
        if "memory" not in r:
            continue
        if r.get("error"):
            r["ran"] = False
        med = r["run"]["median_ms"] / 1e3 if r.get("run") else (r.get("first_call_s") if r.get("ran") else None)
        lines.append(f"| {r['T']} | {r['policy']} | {r['backend']} | {r['xla_peak_bytes'] / 2**30:.3f} | "
                     f"{r['memory'].get('temp_bytes', 0) / 2**30:.3f} | "
                     f"{r['peak_rss_bytes'] / 2**30 if r.get('ran') else float('nan'):.3f} | "
                     f"{med if med is not None else float('nan'):.3f} | {r['compile_s']:.1f} |")
    lines += ["", "| T | interleaved | " + " | ".join(f"{p} / all" for p in policies if p != "all") + " |",
              "|---|---|" + "---|" * (len(policies) - 1)]
    for r in pairs:
        if "ratio_to_all" in r:
            lines.append(f"| {r['T']} | {r['interleaved']} | " + " | ".join(
                f"{r['ratio_to_all'].get(p, float('nan')):.2f}" for p in policies if p != "all") + " |")
    payload = dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]), shape=shape, policies=policies,
                   loss=a.loss, loss_note=LOSSES[a.loss],
                   Ts=Ts, mem_limit_gb=a.mem_limit_gb, points=points, pairs=pairs)
    common.report(a.out, a.name, payload, notes, lambda path: plot(path, points, pairs, policies, shape),
                  "\n".join(lines))


if __name__ == "__main__":
    main()
