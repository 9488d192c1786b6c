"""Shared timing utilities of the seqjax benchmarks.

* `compile_timed` traces, lowers and compiles a function separately
  (``jax.jit(f).trace(*args).lower().compile()``) and reports each phase's time
  and XLA's compiled memory analysis.
* `interleave` runs several alternatives round-robin in one process (the
  machine is shared and noisy: alternating them exposes every candidate to the
  same noise), and `summarise` reduces the samples to medians.
* `environment` records the machine and library versions; `write_json` writes
  results with that record attached.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {  # (B, T, I, H)
    "small": (32, 50, 8, 64),
    "standard": (64, 100, 128, 256),
    "long": (16, 1000, 32, 128),
}
QUICK_SHAPES = {"tiny": (4, 12, 8, 16)}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def floor_flops(cell: str, B: int, T: int, I: int, H: int) -> float:
    """FLOPs of the matmul floor of a forward pass: the input GEMM plus T recurrent GEMMs."""
    G = GATES[cell]
    return 2.0 * B * T * I * G * H + 2.0 * B * T * H * G * H


def mean_square_loss(run):
    """mean(ys²) as a function of (params, x): the loss of every benchmarked train step."""
    def loss(params, x):
        ys = run(params, x)
        return jnp.mean(jnp.square(ys))
    return loss


def block(tree):
    """Waits for every array in ``tree``."""
    return jax.block_until_ready(tree)


def compile_timed(fn: Callable, *args, jit_kwargs: dict | None = None) -> dict:
    """Traces, lowers and compiles ``fn`` for ``args``, timing each phase.

    Returns a dict with ``trace_s``, ``lower_s``, ``compile_s``, ``compiled``
    (call it with the same args) and ``memory`` (XLA's memory analysis, bytes).
    """
    jitted = jax.jit(fn, **(jit_kwargs or {}))
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return dict(trace_s=t1 - t0, lower_s=t2 - t1, compile_s=t3 - t2, compiled=compiled,
                memory=memory_analysis(compiled))


def memory_analysis(compiled) -> dict:
    """XLA's compiled memory analysis as a dict of byte counts (empty if unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without the analysis
        return {}
    if m is None:
        return {}
    out = {}
    for key in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes"):
        value = getattr(m, key, None)
        if value is not None:
            out[key.replace("_size_in_bytes", "_bytes")] = int(value)
    return out


def rss_bytes() -> dict:
    """The process's current and peak resident set size in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"peak_rss_bytes": int(peak)}
    try:
        import psutil
        out["rss_bytes"] = int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        pass
    return out


def time_once(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, waiting for its result.

    A function marked ``fn.self_timed = True`` (one that runs elsewhere, as
    `ProcessTimer`'s do) returns the seconds it measured itself.
    """
    if getattr(fn, "self_timed", False):
        return float(fn())
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def interleave(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2, shuffle: bool = True,
               min_time_s: float = 0.0, progress=None) -> dict[str, list[float]]:
    """Round-robin timing of several alternatives.

    Each round calls every function once (in a shuffled order when
    ``shuffle``); ``warmup`` rounds are discarded. With ``min_time_s`` more
    rounds run until that much time was spent (at most 4x ``reps`` rounds).

    Returns:
      name -> list of seconds (one per kept round).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            block(fns[n]())
    samples: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    t_start = time.perf_counter()
    rounds = 0
    while rounds < reps or (time.perf_counter() - t_start < min_time_s and rounds < 4 * reps):
        order = names[:]
        if shuffle:
            rng.shuffle(order)
        for n in order:
            samples[n].append(time_once(fns[n]))
        rounds += 1
        if progress is not None:
            progress.update(1)
    gc.collect()
    return samples


def _serve(conn, factory, args):
    fns = factory(*args)
    while True:
        name = conn.recv()
        if name is None:
            break
        conn.send(time_once(fns[name]))
    conn.close()


class ProcessTimer:
    """Runs functions in a child process and times them there, one call per request.

    Isolates libraries whose thread pools fight when they share a process (two
    OpenMP thread teams on 2 cores: PyTorch's and oneDNN's under seqjax):
    while the child runs, this process waits on a pipe, and the other way round.
    ``factory(*args)`` runs in the child (a fresh interpreter, ``spawn``) and
    returns ``{name: fn}``; `fn(name)` gives a function for `interleave` that
    returns the child's own timing (``self_timed``), without the pipe's latency.
    """

    def __init__(self, factory: Callable[..., dict], *args):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, factory, args), daemon=True)
        self._proc.start()
        child.close()

    def fn(self, name: str) -> Callable[[], float]:
        def run():
            self._conn.send(name)
            return self._conn.recv()
        run.self_timed = True
        return run

    def close(self):
        self._conn.send(None)
        self._proc.join(timeout=30)


class Candidates:
    """The alternatives of one benchmark configuration, timed together by `interleave`.

    Keys are ``"name|mode"`` (mode ``fwd`` or ``train``). `add_compiled` compiles a JAX function with
    `compile_timed` and keeps its compile record; `add` takes any function (e.g. a `ProcessTimer`'s).
    """

    def __init__(self):
        self.fns: dict[str, Callable[[], Any]] = {}
        self.meta: dict[str, dict] = {}

    def add_compiled(self, name: str, mode: str, fn: Callable, *args) -> None:
        c = compile_timed(fn, *args)
        self.add(name, mode, lambda compiled=c["compiled"]: compiled(*args))
        self.meta[f"{name}|{mode}"] = {k: v for k, v in c.items() if k != "compiled"}

    def add(self, name: str, mode: str, fn: Callable[[], Any]) -> None:
        self.fns[f"{name}|{mode}"] = fn
        self.meta[f"{name}|{mode}"] = {}

    def time(self, reps: int, progress=None, min_time_s: float = 0.0, child: "ProcessTimer | None" = None):
        """Interleaves them (2 warm-up rounds, then ``reps``) and closes ``child`` afterwards, whatever happens.

        Returns:
          ``[(name, mode, record)]`` in the order added; ``record`` holds `summarise`'s medians and the
          compile record.
        """
        try:
            samples = interleave(self.fns, reps=reps, warmup=2, progress=progress, min_time_s=min_time_s)
        finally:
            if child is not None:
                child.close()
        return [(*key.split("|"), {**summarise(s), **self.meta[key]}) for key, s in samples.items()]


def run_grid(cells, shapes: dict, reps: int, desc: str, bench: Callable) -> list[dict]:
    """The rows of ``bench(cell, shape_name, shape, progress)`` for every cell and shape, in that order, under
    one progress bar of ``reps`` rounds per configuration."""
    progress = progress_bar(len(cells) * len(shapes) * reps, desc)
    rows = []
    for cell in cells:
        for shape_name, shape in shapes.items():
            if progress is not None:
                progress.set_postfix_str(f"{cell} {shape_name}")
            rows += bench(cell, shape_name, shape, progress)
    if progress is not None:
        progress.close()
    return rows


def report(out_dir: str, name: str, payload: dict, notes, plot: Callable[[str], None], text: str) -> None:
    """Prints the notes, writes ``out_dir/name.json`` (``payload``, the notes and the environment) and the plot
    ``out_dir/name.png`` (``plot(path)``), then prints ``text`` (the results tables)."""
    notes = sorted(notes)
    for n in notes:
        print("note:", n)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), dict(payload, notes=notes))
    plot(os.path.join(out_dir, f"{name}.png"))
    print(text)


def progress_bar(total: int, desc: str):
    """A tqdm progress bar on stderr, or None where tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr)


def summarise(samples: list[float]) -> dict:
    """Median, quartiles and min of a list of seconds, in milliseconds."""
    a = np.asarray(samples) * 1e3
    return dict(median_ms=float(np.median(a)), q1_ms=float(np.percentile(a, 25)),
                q3_ms=float(np.percentile(a, 75)), min_ms=float(a.min()), n=int(a.size))


def environment() -> dict:
    """The machine, the command and the library versions of this run."""
    env = dict(command=" ".join(["python", *sys.argv]), python=platform.python_version(), machine=platform.machine(), processor=platform.processor(),
               cpu_count=os.cpu_count(), platform=platform.platform(), jax=jax.__version__,
               backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
               time=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("jaxlib", "flax", "torch", "equinox", "haiku", "optax", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return env


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` plus the environment record to ``path`` (dirs created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {"environment": environment(), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def add_ratios(rows: list[dict], reference: str, key: str) -> None:
    """Sets ``row[key]`` = its median over the ``reference`` library's median of the same mode (in place)."""
    ref = {r["mode"]: r["median_ms"] for r in rows if r["library"] == reference}
    for r in rows:
        if r["mode"] in ref:
            r[key] = r["median_ms"] / ref[r["mode"]]


def ratio_tables(rows: list[dict], cells, key: str, label: str, caption) -> str:
    """One markdown table per (cell, shape): each library's fwd and train medians and their ``key`` ratios
    (headed "fwd / label"), fastest train step first; ``caption(first_row)`` follows the cell and shape."""
    out = []
    configs = sorted({(r["cell"], r["shape"]) for r in rows}, key=lambda c: (list(cells).index(c[0]), c[1]))
    for cell, shape in configs:
        sel = [r for r in rows if r["cell"] == cell and r["shape"] == shape]
        head = sel[0]
        body = []
        for lib in dict.fromkeys(r["library"] for r in sel):
            by = {r["mode"]: r for r in sel if r["library"] == lib}
            body.append([lib, by["fwd"]["median_ms"], by["fwd"].get(key, ""),
                         by["train"]["median_ms"], by["train"].get(key, "")])
        body.sort(key=lambda r: r[3])
        out.append(f"**{cell} {shape} (B={head['B']}, T={head['T']}, I={head['I']}, H={head['H']}, "
                   f"{caption(head)})**\n\n" + markdown_table(
                       ["library", "fwd ms", f"fwd / {label}", "train ms", f"train / {label}"], body))
    return "\n\n".join(out)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def grid_parser(description: str, name: str, default_reps: int, cells: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the options of the scripts that time a grid of cells and shapes: --quick,
    --cells (where ``cells``), --shapes, --reps, --out and --name (``name``: the JSON/PNG basename)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="the tiny shape, the LSTM and 3 reps (smoke test)")
    if cells:
        ap.add_argument("--cells", default=None, help="comma list of lstm,gru,rnn")
    ap.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=None,
                    help=f"timed rounds per configuration (default {default_reps})")
    ap.add_argument("--out", default=RESULTS_DIR, help="folder of the JSON/PNG written")
    ap.add_argument("--name", default=name, help=f"basename of the JSON/PNG written (default {name})")
    ap.set_defaults(default_reps=default_reps)
    return ap


def grid_from_args(args: argparse.Namespace, cells=None) -> tuple[list[str], dict, int]:
    """``(cells, shapes, reps)`` that `grid_parser`'s options chose, the cells from ``cells`` (names)."""
    chosen = parse_list(args.cells or ("lstm" if args.quick else None), cells, "cells") if cells else []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    shapes = {k: shapes[k] for k in parse_list(args.shapes, list(shapes), "shapes")}
    return chosen, shapes, args.reps or (3 if args.quick else args.default_reps)


def parse_list(text: str | None, allowed, what: str) -> list[str]:
    """Comma-separated CLI list, validated against ``allowed``."""
    if text is None:
        return list(allowed)
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; choose from {list(allowed)}")
    return items
