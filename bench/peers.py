"""seqjax against the RNN libraries users would pick: PyTorch, Flax (linen, NNX), Equinox, Haiku.

For each cell (LSTM, GRU, Elman RNN) and shape (B, T, I, H) it times the
forward pass and a train step (`value_and_grad` of mean(outputs²) with respect
to all parameters and the input; PyTorch: forward + backward with grads on
the input) in float32, with every candidate interleaved in one process, and
reports medians, ratios to PyTorch and GFLOP/s against the matmul floor (the
input projection as one GEMM plus T recurrent GEMMs). Optional peers that are
not installed are skipped with a message.

    python bench/peers.py                 # all cells, the three shapes
    python bench/peers.py --quick         # tiny shapes, few reps (smoke test, < 2 min)
    python bench/peers.py --cells lstm --shapes standard --reps 20

Writes <out>/peers.json, <out>/peers.png and prints markdown tables.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import seqjax  # noqa: E402

CELLS = ("lstm", "gru", "rnn")


def _fwd_train(run):
    loss = common.mean_square_loss(run)
    return run, jax.value_and_grad(loss, argnums=(0, 1))


# --------------------------------------------------------------------------- JAX candidates
# Each builder returns (run(params, x) -> ys, params) or raises ImportError.

def seqjax_builder(**scan_kwargs):
    def build(cell_name, B, T, I, H, key):
        if scan_kwargs.get("kernel") == "onednn":
            seqjax.backends._library.load_onednn()  # NativeUnavailable (a RuntimeError): skipped with a note
        if scan_kwargs.get("kernel") in ("avx2", "avx512"):
            seqjax.backends._library.load_avx2(scan_kwargs["kernel"])
        cell = {"lstm": lambda: seqjax.lstm(H, forget_bias=0.0), "gru": lambda: seqjax.gru(H),
                "rnn": lambda: seqjax.rnn(H)}[cell_name]()
        params = cell.init(key, I)
        return (lambda p, x: seqjax.scan(cell, p, x, **scan_kwargs)[1]), params
    return build


def matmul_floor(cell_name, B, T, I, H, key):
    """One input GEMM plus T recurrent GEMMs and nothing else (the floor; forward only)."""
    G = common.GATES[cell_name]
    k1, k2 = jax.random.split(key)
    params = (jax.random.normal(k1, (I, G * H)) * 0.1, jax.random.normal(k2, (H, G * H)) * 0.01)

    def run(p, x):
        wx, wh = p
        px = (x.reshape(-1, I) @ wx).reshape(B, T, G * H).swapaxes(0, 1)

        def body(h, pxt):
            a = pxt + h @ wh
            return a[:, :H], a[:, :H]
        return jax.lax.scan(body, jnp.zeros((B, H)), px)[1]
    return run, params


def flax_linen(kind):
    def build(cell_name, B, T, I, H, key):
        import flax.linen as nn
        cls = {("lstm", "optimized"): nn.OptimizedLSTMCell, ("lstm", "plain"): nn.LSTMCell,
               ("gru", "plain"): nn.GRUCell, ("rnn", "plain"): nn.SimpleCell}.get((cell_name, kind))
        if cls is None:
            raise LookupError
        model = nn.RNN(cls(features=H))
        params = model.init(key, jnp.zeros((B, T, I)))
        return (lambda p, x: model.apply(p, x)), params
    return build


def flax_nnx(cell_name, B, T, I, H, key):
    from flax import nnx
    cls = {"lstm": nnx.OptimizedLSTMCell, "gru": nnx.GRUCell, "rnn": nnx.SimpleCell}[cell_name]
    model = nnx.RNN(cls(I, H, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)

    def run(p, x):
        z = jnp.zeros((B, H), x.dtype)
        return nnx.merge(graphdef, p, rest)(x, initial_carry=(z, z) if cell_name == "lstm" else z)
    return run, state


def equinox(cell_name, B, T, I, H, key):
    import equinox as eqx
    cls = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}.get(cell_name)
    if cls is None:
        raise LookupError  # Equinox has no Elman cell
    model = cls(I, H, key=key)
    params, static = eqx.partition(model, eqx.is_array)

    def run(p, x):
        m = eqx.combine(p, static)
        step = jax.vmap(m)
        init = (jnp.zeros((B, H)), jnp.zeros((B, H))) if cell_name == "lstm" else jnp.zeros((B, H))

        def body(carry, xt):
            carry = step(xt, carry)
            return carry, (carry[0] if cell_name == "lstm" else carry)
        return jax.lax.scan(body, init, jnp.swapaxes(x, 0, 1))[1].swapaxes(0, 1)
    return run, params


def haiku(cell_name, B, T, I, H, key):
    import haiku as hk
    ctor = {"lstm": hk.LSTM, "gru": hk.GRU, "rnn": hk.VanillaRNN}[cell_name]

    def f(x):
        core = ctor(H)
        ys, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(B))
        return jnp.swapaxes(ys, 0, 1)
    model = hk.without_apply_rng(hk.transform(f))
    params = model.init(key, jnp.zeros((B, T, I)))
    return model.apply, params


def experimental_rnn(cell_name, B, T, I, H, key):
    """jax.experimental.rnn (cuDNN); LSTM only, GPU only."""
    if jax.default_backend() != "gpu":
        raise RuntimeError("jax.experimental.rnn needs a GPU (cuDNN)")
    if cell_name != "lstm":
        raise LookupError
    from jax.experimental import rnn
    weights = rnn.init_lstm_weight(key, I, H, 1, False)
    seq_lengths = jnp.full((B,), T, jnp.int32)

    def run(w, x):
        h0 = jnp.zeros((1, B, H))
        ys, _, _ = rnn.lstm(x, h0, h0, w, seq_lengths, input_size=I, hidden_size=H, num_layers=1,
                            dropout=0.0, bidirectional=False)
        return ys
    return run, weights


VARIANTS = {  # --variants: seqjax.scan options worth comparing with the default
    "autodiff": dict(backward="autodiff"),
    "unroll=1": dict(unroll=1),
    "hoist": dict(hoist=True),
    "no-hoist": dict(hoist=False),
    "autodiff-hoist": dict(backward="autodiff", hoist=True),
    "autodiff-no-hoist": dict(backward="autodiff", hoist=False),
    "xla": dict(kernel="xla"),
    "onednn": dict(kernel="onednn"),
    "avx2": dict(kernel="avx2"),
    "avx512": dict(kernel="avx512"),
}


def jax_candidates(extra: dict | None = None) -> dict:
    cands = {
        "seqjax": seqjax_builder(),
        "flax.linen OptimizedLSTMCell": flax_linen("optimized"),
        "flax.linen cell": flax_linen("plain"),
        "flax.nnx RNN": flax_nnx,
        "equinox": equinox,
        "haiku": haiku,
        "jax.experimental.rnn": experimental_rnn,
        "matmul floor": matmul_floor,
    }
    cands.update(extra or {})
    return cands


# --------------------------------------------------------------------------- PyTorch

def torch_rnn(cell_name, I, H, seed=0, **kwargs):
    """``torch.nn.LSTM/GRU/RNN(I, H, batch_first=True, **kwargs)`` for ``cell_name``, after
    ``torch.manual_seed(seed)``."""
    import torch
    torch.manual_seed(seed)
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell_name]
    return cls(I, H, batch_first=True, **kwargs)


def torch_fwd_train(m, run, x, sync=lambda: None):
    """PyTorch's forward pass (inference mode) and train step (mean(ys²) back into ``m``'s parameters and the
    input) of ``run(inp) -> ys`` over the tensor ``x``; ``sync`` waits for the device after each."""
    import torch
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.inference_mode():
            run(x)
        sync()

    def train():
        for p in m.parameters():
            p.grad = None
        xg.grad = None
        run(xg).pow(2).mean().backward()
        sync()
    return fwd, train


def torch_candidate(cell_name, B, T, I, H, seed=0):
    import torch
    dev = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    m = torch_rnn(cell_name, I, H, seed).to(dev)
    x = torch.randn(B, T, I, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    fwd, train = torch_fwd_train(m, lambda inp: m(inp)[0], x, sync)
    return fwd, train, dev


def torch_fns(cell_name, B, T, I, H, threads):
    """PyTorch's fwd/train for `common.ProcessTimer` (runs in the child process)."""
    import torch
    torch.set_num_threads(threads)
    fwd, train, _ = torch_candidate(cell_name, B, T, I, H)
    return {"fwd": fwd, "train": train}


# --------------------------------------------------------------------------- driver

def bench_config(cell_name, shape_name, shape, reps, candidates, torch_ok, notes, progress=None, min_time_s=0.0,
                 torch_process=False):
    """Compiles every candidate for one (cell, shape), then times all of them interleaved.

    ``torch_process``: PyTorch runs in a child process (`common.ProcessTimer`), still interleaved.
    """
    B, T, I, H = shape
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    cands = common.Candidates()
    for name, build in candidates.items():
        try:
            run, params = build(cell_name, B, T, I, H, key)
        except LookupError:
            continue
        except ImportError as e:
            notes.add(f"{name}: skipped, not installed ({e})")
            continue
        except RuntimeError as e:
            notes.add(f"{name}: skipped ({e})")
            continue
        fwd, train = _fwd_train(run)
        cands.add_compiled(name, "fwd", fwd, params, x)
        if name != "matmul floor":
            cands.add_compiled(name, "train", train, params, x)
    timer, reference = None, "pytorch"
    if torch_ok and torch_process:
        timer = common.ProcessTimer(torch_fns, cell_name, B, T, I, H, os.cpu_count())
        cands.add(reference, "fwd", timer.fn("fwd"))
        cands.add(reference, "train", timer.fn("train"))
    elif torch_ok:
        tf, tt, dev = torch_candidate(cell_name, B, T, I, H)
        reference += " (cuDNN)" if dev == "cuda" else ""
        cands.add(reference, "fwd", tf)
        cands.add(reference, "train", tt)
    rows = []
    for n, m, record in cands.time(reps, progress, min_time_s=min_time_s, child=timer):
        flops = common.floor_flops(cell_name, B, T, I, H) * (3.0 if m == "train" else 1.0)
        rows.append(dict(cell=cell_name, shape=shape_name, B=B, T=T, I=I, H=H, library=n, mode=m, **record,
                         gflops=flops / (record["median_ms"] * 1e-3) / 1e9))
    common.add_ratios(rows, reference, "ratio_to_pytorch")
    return rows


def plot(rows, path, title_suffix=""):
    """Horizontal bars of median ms per (cell, shape) and mode, fastest first; seqjax red, PyTorch blue."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = sorted({(r["cell"], r["shape"]) for r in rows}, key=lambda c: (CELLS.index(c[0]), c[1]))
    fig, axes = plt.subplots(len(configs), 2, figsize=(12, 2.2 + 1.6 * len(configs)), squeeze=False)
    for i, (cell, shape) in enumerate(configs):
        for j, mode in enumerate(("fwd", "train")):
            ax = axes[i][j]
            sel = sorted([r for r in rows if r["cell"] == cell and r["shape"] == shape and r["mode"] == mode],
                         key=lambda r: r["median_ms"])
            if not sel:
                ax.axis("off")
                continue
            names = [r["library"] for r in sel]
            vals = [r["median_ms"] for r in sel]
            colors = ["C3" if n.startswith("seqjax") else "C0" if n.startswith("pytorch") else
                      "0.6" if n == "matmul floor" else "C2" for n in names]
            ax.barh(names, vals, color=colors)
            ax.set_xlabel("ms (median)")
            ax.set_title(f"{cell} {shape} {mode}{title_suffix}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tables(rows) -> str:
    out = []
    configs = sorted({(r["cell"], r["shape"]) for r in rows}, key=lambda c: (CELLS.index(c[0]), c[1]))
    for cell, shape in configs:
        sel = [r for r in rows if r["cell"] == cell and r["shape"] == shape]
        B, T, I, H = sel[0]["B"], sel[0]["T"], sel[0]["I"], sel[0]["H"]
        libs = list(dict.fromkeys(r["library"] for r in sel))
        body = []
        for lib in libs:
            by = {r["mode"]: r for r in sel if r["library"] == lib}
            f, t = by.get("fwd"), by.get("train")
            body.append([lib,
                         f["median_ms"] if f else "", f.get("ratio_to_pytorch", "") if f else "",
                         t["median_ms"] if t else "", t.get("ratio_to_pytorch", "") if t else "",
                         f["gflops"] if f else "", (t or f or {}).get("compile_s", "") or ""])
        body.sort(key=lambda r: r[3] if isinstance(r[3], float) else 1e9)
        out.append(f"**{cell} {shape} (B={B}, T={T}, I={I}, H={H})**\n\n" + common.markdown_table(
            ["library", "fwd ms", "fwd / torch", "train ms", "train / torch", "fwd GFLOP/s", "train compile s"],
            body))
    return "\n\n".join(out)


def main(argv=None):
    ap = common.grid_parser(__doc__.split("\n")[0], "peers", default_reps=15)
    ap.add_argument("--min-time", type=float, default=0.0, help="keep timing a configuration for this many s")
    ap.add_argument("--variants", default="", help="extra seqjax rows, comma list of " + ",".join(VARIANTS))
    ap.add_argument("--libs", default=None,
                    help="comma list of the JAX candidates to run (default: all; PyTorch always runs): "
                         + ",".join(jax_candidates()))
    ap.add_argument("--precision", choices=("default", "highest"), default="default",
                    help="highest: full-fp32 matmuls everywhere (jax_default_matmul_precision=highest; "
                         "PyTorch/cuDNN with TF32 off); default: each library's default (TF32 on GPUs)")
    ap.add_argument("--torch", choices=("auto", "process", "inline"), default="auto",
                    help="where PyTorch runs: in a child process (isolated thread pools, still interleaved) or "
                         "in this one; auto: process on CPU, inline on GPU")
    args = ap.parse_args(argv)

    cells, shapes, reps = common.grid_from_args(args, CELLS)

    notes = set()
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    try:
        import torch
        torch.set_num_threads(os.cpu_count())
        torch_ok = True
        if args.precision == "highest":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    except ImportError:
        notes.add("pytorch: skipped, not installed")
        torch_ok = False
    torch_process = args.torch == "process" or (args.torch == "auto" and jax.default_backend() == "cpu")
    cands = jax_candidates({f"seqjax {v}": seqjax_builder(**VARIANTS[v])
                            for v in common.parse_list(args.variants, VARIANTS, "variants") if args.variants})
    if args.libs is not None:
        cands = {k: cands[k] for k in common.parse_list(args.libs, list(cands), "libs")}
    t0 = time.time()
    rows = common.run_grid(cells, shapes, reps, "peers", lambda cell, sname, shape, progress: bench_config(
        cell, sname, shape, reps, cands, torch_ok, notes, progress, args.min_time, torch_process))
    common.report(args.out, args.name, dict(rows=rows, reps=reps, torch_threads=os.cpu_count(),
                                            torch_process=torch_process, precision=args.precision,
                                            wall_s=time.time() - t0), notes,
                  lambda path: plot(rows, path), tables(rows))
    return rows


if __name__ == "__main__":
    main()
