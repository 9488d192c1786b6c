#!/usr/bin/env python
"""A character language model trained with truncated BPTT, against count-based n-gram baselines.

Embedding -> stacked LSTM (dropout on the non-recurrent connections only:
embedding output, between layers, before the softmax; Zaremba et al. 2014) ->
softmax, trained with `seqjax.tbptt` (the text batch-ified into B columns, the
state carried across windows, the gradient cut at each window; seed 000).

* **Corpus.** By default the Python standard library's own source files, found
  through ``sysconfig.get_paths()["stdlib"]``, so it exists on any machine: the
  ``.py`` files outside ``site-packages``, sorted by relative path; a file goes
  to validation when ``crc32(relative path) % 20 == 0`` (5%, deterministic),
  and files are taken in order until ``--train-chars`` / ``--valid-chars`` are
  reached. Any text file can be given instead (``--text FILE``: the last 5% is
  validation).
* **Vocabulary.** Characters seen at least ``min_count`` times in the training
  split; the others map to one unknown id (both models share the mapping).
* **Baselines.** Interpolated Kneser-Ney n-gram models (modified-free, one
  discount per order D = n1 / (n1 + 2 n2)), orders 1..5, in NumPy, trained on
  the same training split and scored on the same validation split.
* **Metric.** Validation bits per character; the LSTM is evaluated statefully
  (the carry crosses windows, B columns each starting from a zero state).
* **Generation.** Samples are printed during training with `seqjax.generate`
  (one `lax.scan`, primed with a prompt); ``--generate-from CKPT`` loads an
  Orbax checkpoint written by a training run and samples from it.
* **Budget.** A number of TBPTT updates (``--steps``), never a time: the
  learning rate falls linearly in steps, evaluation runs every
  ``eval_every_steps`` updates, so a run gives the same numbers on any machine
  load; the seconds and tokens/s are reported, not used.

Usage::

    python examples/char_lm.py --quick                  # <= 2 min on 2 CPU cores
    python examples/char_lm.py                          # 4,320 TBPTT updates (default)
    python examples/char_lm.py --text input.txt --out runs/shakespeare
    python examples/char_lm.py --generate-from runs/char_lm/checkpoint --prompt "def " --temperature 0.7
    python examples/char_lm.py --devices 8             # data-parallel over 8 (emulated CPU) devices
    python examples/char_lm.py --devices 8 --resume    # continue from --out's latest training checkpoint
    python examples/char_lm.py --study dropout --out examples/results/char_lm_dropout   # dropout study

The dropout study (``--study dropout``, functions ``dropout_study*``) trains
the same LSTM, from the same initialisation, on the same windows for the same
number of updates, with no dropout, with Zaremba et al.'s dropout on the
non-recurrent connections only (embedding output, between layers, before the
softmax), and with variational recurrent dropout (Gal & Ghahramani 2016: one
mask per sequence on h_{t-1}, reused at every step; ``recurrent_dropout=`` of
`seqjax.deep`), on a training split small enough for the model to overfit,
and compares validation bits/char.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
import zlib


def emulate_devices(argv: list[str]) -> None:
    """``--devices N`` on a CPU host: N emulated devices, which XLA_FLAGS must ask for before JAX starts."""
    for i, arg in enumerate(argv):
        n = argv[i + 1] if arg == "--devices" and i + 1 < len(argv) else arg.partition("=")[2]
        if arg.startswith("--devices") and n.isdigit():
            flag = f"--xla_force_host_platform_device_count={n}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


if __name__ == "__main__":
    emulate_devices(sys.argv[1:])

import jax
import jax.numpy as jnp
import numpy as np
import optax

import seqjax
from seqjax import tbptt
from seqjax.generation import generate
from seqjax.train import init_state
from _report import write_results  # examples/_report.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

DEFAULT = dict(train_chars=3_000_000, valid_chars=200_000, min_count=20, hidden=128, layers=2, embed=64,
               dropout=0.0, batch=32, k1=64, k2=64, lr=3e-3, lr_final=3e-4, clip_norm=1.0,
               train_steps=4320, eval_every_steps=600, eval_window=500, ngram_orders=(1, 2, 3, 4, 5),
               sample_chars=200, seed=0)
"""4,320 updates: what the committed 15-minute run (then a wall-clock budget) trained on a shared 2-core CPU at
~10k tokens/s; a small 2 x 128 LSTM sees the training split ~3 times (8.8M tokens), so dropout is off by default
(``--dropout``; the quick run exercises it)."""
QUICK = dict(DEFAULT, train_chars=600_000, valid_chars=60_000, batch=32, k1=50, k2=50, dropout=0.1,
             train_steps=480, eval_every_steps=240)
PROMPT = "def "


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

def stdlib_corpus(train_chars: int, valid_chars: int) -> tuple[str, str, dict]:
    """The standard library's .py sources: a deterministic file selection and a held-out split by file."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    files.sort()
    train, valid, ntr, nva, used = [], [], 0, 0, {"train": 0, "valid": 0}
    for rel in files:
        is_valid = zlib.crc32(rel.encode()) % 20 == 0
        if (nva >= valid_chars) if is_valid else (ntr >= train_chars):
            if ntr >= train_chars and nva >= valid_chars:
                break
            continue
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if is_valid:
            valid.append(text)
            nva += len(text)
        else:
            train.append(text)
            ntr += len(text)
        used["valid" if is_valid else "train"] += 1
    if ntr == 0 or nva == 0:
        raise SystemExit(f"char_lm: no Python sources found under {root}; pass --text FILE")
    info = {"source": f"stdlib .py files under {root}", "python": sys.version.split()[0], "files": used,
            "selection": "sorted relative paths; valid if crc32(path) % 20 == 0; taken until the size caps"}
    return "".join(train)[:train_chars], "".join(valid)[:valid_chars], info


def text_corpus(path: str) -> tuple[str, str, dict]:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    cut = int(len(text) * 0.95)
    if cut < 1000 or len(text) - cut < 100:
        raise SystemExit(f"char_lm: {path} is too short ({len(text)} characters) for a 95/5 split")
    return text[:cut], text[cut:], {"source": os.path.abspath(path), "selection": "first 95% train, last 5% valid"}


class Vocab:
    """Characters seen >= min_count times in training; id 0 is the unknown character."""

    UNK = "\ufffd"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def build(cls, text: str, min_count: int) -> "Vocab":
        values, counts = np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32), return_counts=True)
        keep = sorted(chr(v) for v, c in zip(values, counts) if c >= min_count and chr(v) != cls.UNK)
        return cls([cls.UNK] + keep)

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        table = np.zeros(max(int(codes.max()) + 1, 1) if codes.size else 1, np.int32)
        for c, i in self.index.items():
            if ord(c) < table.size:
                table[ord(c)] = i
        return table[codes]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids))

    def __len__(self):
        return len(self.chars)


# ----------------------------------------------------------------------------
# n-gram baselines: interpolated Kneser-Ney, vectorised in NumPy
# ----------------------------------------------------------------------------

class _Level:
    """Counts of the k-grams at one level: sorted keys, counts, and per-context totals and type counts."""

    def __init__(self, keys: np.ndarray, counts: np.ndarray, V: int):
        self.keys, self.counts = keys, counts.astype(np.float64)
        ctx = keys // V
        self.ctx_keys, start = np.unique(ctx, return_index=True)
        self.ctx_total = np.add.reduceat(self.counts, start)
        self.ctx_types = np.diff(np.append(start, len(keys))).astype(np.float64)
        n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
        self.D = float(n1 / (n1 + 2 * n2)) if n1 + n2 > 0 else 0.5

    @staticmethod
    def _lookup(sorted_keys, values, q):
        i = np.searchsorted(sorted_keys, q)
        i = np.minimum(i, len(sorted_keys) - 1)
        return np.where(sorted_keys[i] == q, values[i], 0.0)

    def count(self, q):
        return self._lookup(self.keys, self.counts, q)

    def context(self, q):
        return self._lookup(self.ctx_keys, self.ctx_total, q), self._lookup(self.ctx_keys, self.ctx_types, q)


def _kgram_keys(ids: np.ndarray, k: int, V: int) -> np.ndarray:
    """key[i] = ids[i] V^(k-1) + ... + ids[i+k-1] for i in [0, len - k]."""
    n = len(ids) - k + 1
    key = np.zeros(n, np.int64)
    for j in range(k):
        key = key * V + ids[j:j + n]
    return key


class KneserNey:
    """Interpolated Kneser-Ney of order n (Chen & Goodman 1998, one discount per order).

    ``P_n(w | h) = max(c(h w) - D, 0) / c(h) + D N1+(h .) / c(h) * P_{n-1}(w | h')``;
    lower orders use continuation counts ``N1+(. h' w)``; the base is uniform 1/V.
    """

    def __init__(self, train_ids: np.ndarray, order: int, V: int):
        self.order, self.V = order, V
        self.levels = []
        for k in range(1, order + 1):
            if k == order:
                keys, counts = np.unique(_kgram_keys(train_ids, k, V), return_counts=True)
            else:   # continuation counts: distinct left neighbours of each k-gram
                left = np.unique(_kgram_keys(train_ids, k + 1, V))
                keys, counts = np.unique(left % (V ** k), return_counts=True)
            self.levels.append(_Level(keys, counts, V))

    def bits_per_char(self, ids: np.ndarray, start: int) -> float:
        """Mean -log2 P(ids[i] | ids[i-n+1:i]) over i >= start (start >= order - 1)."""
        V = self.V
        n = len(ids) - start
        p = np.full(n, 1.0 / V)
        for k, lev in enumerate(self.levels, start=1):
            q = _kgram_keys(ids[start - k + 1:], k, V)[:n]
            ctx = q // V
            total, types = lev.context(ctx)
            c = lev.count(q)
            seen = total > 0
            safe = np.where(seen, total, 1.0)
            p = np.where(seen, np.maximum(c - lev.D, 0.0) / safe + lev.D * types / safe * p, p)
        return float(-np.mean(np.log2(p)))


def ngram_baselines(train_ids, valid_ids, V, orders) -> dict:
    start = max(orders) - 1
    out = {}
    for n in orders:
        t0 = time.perf_counter()
        out[str(n)] = {"bits_per_char": KneserNey(train_ids, n, V).bits_per_char(valid_ids, start),
                       "seconds": time.perf_counter() - t0}
    return out


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------

def make_model(cfg: dict, V: int):
    """Returns (cell, deep layer, init, model fn): embed -> LSTM x L -> readout, dropout on non-recurrent links."""
    cell = seqjax.stack([seqjax.lstm(cfg["hidden"]) for _ in range(cfg["layers"])])   # for generation
    layer = seqjax.deep([seqjax.lstm(cfg["hidden"]) for _ in range(cfg["layers"])], dropout_rate=cfg["dropout"],
                        recurrent_dropout=cfg.get("recurrent_dropout", 0.0))
    rate = cfg["dropout"]

    def init(key):
        ke, kc, kw = jax.random.split(key, 3)
        return {"embed": jax.random.normal(ke, (V, cfg["embed"])) * 0.1,
                "cell": layer.init(kc, cfg["embed"]),
                "w": jax.random.normal(kw, (cfg["hidden"], V)) / math.sqrt(cfg["hidden"]),
                "b": jnp.zeros(V)}

    def model(params, carry, xs, *, resets=None, key=None):          # xs [T, B] ids -> logits [T, B, V]
        k_in, k_mid, k_out = (None, None, None) if key is None else jax.random.split(key, 3)
        x = seqjax.dropout(k_in, params["embed"][xs], rate)
        carry, hs = layer.apply(params["cell"], x, carry=carry, resets=resets, time_major=True, key=k_mid)
        hs = seqjax.dropout(k_out, hs, rate)
        return carry, hs @ params["w"] + params["b"]

    return cell, layer, init, model


def loss_fn(logits, targets):
    """Per-step cross-entropy in nats, [T, B]."""
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def sample(cell, params, vocab: Vocab, prompt: str, key, n: int, temperature=0.8, top_k=None) -> str:
    ids = vocab.encode(prompt)
    toks = generate(cell, params["cell"], jnp.asarray(ids), key, embed=params["embed"],
                    readout=(params["w"], params["b"]), max_new_tokens=n, temperature=temperature, top_k=top_k)
    return prompt + vocab.decode(toks)


# ----------------------------------------------------------------------------
# checkpoint (Orbax)
# ----------------------------------------------------------------------------

def save_checkpoint(path: str, params, cfg: dict, vocab: Vocab) -> None:
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(path, "params"), params, force=True)
    ck.wait_until_finished()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": {k: cfg[k] for k in ("hidden", "layers", "embed", "dropout")}, "vocab": vocab.chars}, f)


def load_checkpoint(path: str):
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    vocab = Vocab(meta["vocab"])
    cell, _, init, _ = make_model(meta["model"], len(vocab))
    abstract = jax.eval_shape(init, jax.random.key(0))
    params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract)
    return cell, params, vocab, meta


# ----------------------------------------------------------------------------
# several devices, resuming
# ----------------------------------------------------------------------------

def device_mesh(devices):
    """The mesh of ``--devices N`` (its first N devices on one batch axis), or None for one device."""
    if devices is None:
        return None
    if devices < 1 or jax.device_count() < devices:
        raise SystemExit(f"char_lm: --devices {devices} needs {devices} devices, JAX sees {jax.device_count()} "
                         "(run the script directly: it asks for emulated CPU devices before JAX starts)")
    return jax.make_mesh((devices,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])


def training_checkpoints(out: str, every: int, resume: bool):
    """Orbax checkpoints of the training run in OUT/train_state, every ``every`` updates; without ``--resume`` an
    earlier run's are removed first (so the run starts afresh), with it `seqjax.tbptt.fit` continues from them."""
    import shutil
    from seqjax.checkpoint import Checkpoints
    directory = os.path.join(out, "train_state")
    if not resume and os.path.isdir(directory):
        shutil.rmtree(directory)
    ckpt = Checkpoints(directory, every=every, keep=2)
    print(f"training checkpoints: {directory}, every {every} updates"
          + (f"; resuming from update {ckpt.latest()}" if ckpt.latest() is not None else ""), flush=True)
    return ckpt


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

def plot_curve(curve: list, baselines: dict, out: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    t = [r["step"] for r in curve]
    ax.plot(t, [r["train_bpc"] for r in curve], "-", label="LSTM train (recent windows)")
    ax.plot(t, [r["valid_bpc"] for r in curve], "o-", label="LSTM validation")
    for n, r in baselines.items():
        if int(n) >= 2:
            ax.axhline(r["bits_per_char"], ls="--", lw=1, color=f"C{int(n) + 1}", label=f"{n}-gram KN (valid)")
    ax.set_xlabel("TBPTT updates")
    ax.set_ylabel("bits per character")
    ax.set_title(title)
    lo = min(min(r["valid_bpc"] for r in curve), min(b["bits_per_char"] for b in baselines.values()))
    ax.set_ylim(lo - 0.2, max(4.0, lo + 1.0))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "char_lm_learning_curve.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def generate_main(args) -> None:
    cell, params, vocab, meta = load_checkpoint(args.generate_from)
    key = jax.random.key(args.seed)
    for i in range(args.num_samples):
        print(f"--- sample {i + 1} (temperature {args.temperature}, top_k {args.top_k}) ---")
        print(sample(cell, params, vocab, args.prompt, jax.random.fold_in(key, i), args.length, args.temperature,
                     args.top_k))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a reduced run (<= 2 min on 2 CPU cores)")
    ap.add_argument("--out", default="runs/char_lm", help="output directory (results.json, PNG, checkpoint)")
    ap.add_argument("--text", default=None, help="train on this text file instead of the stdlib sources")
    ap.add_argument("--steps", type=int, default=None, help="TBPTT updates (default 4320, quick 480)")
    ap.add_argument("--generate-from", default=None, metavar="CKPT", help="load a checkpoint and only generate")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=None, help="--study dropout: seeds per variant (default 3, quick 1)")
    ap.add_argument("--dropout", type=float, default=None, help="dropout on non-recurrent connections")
    ap.add_argument("--devices", type=int, default=None,
                    help="train data-parallel over N devices (on a CPU: N emulated devices)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/train_state")
    ap.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                    help="save the training state every N updates (default: every evaluation)")
    ap.add_argument("--study", choices=["dropout"], default=None,
                    help="dropout: none vs between-layer (Zaremba) vs variational recurrent dropout")
    args = ap.parse_args(argv)
    if args.generate_from:
        return generate_main(args)
    if args.study == "dropout":
        return dropout_study(args)

    cfg = dict(QUICK if args.quick else DEFAULT)
    if args.steps is not None:
        if args.steps < 1:
            ap.error(f"--steps must be >= 1, got {args.steps}")
        cfg["train_steps"] = args.steps
    if args.dropout is not None:
        cfg["dropout"] = args.dropout
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    # data
    train_text, valid_text, info = (text_corpus(args.text) if args.text
                                    else stdlib_corpus(cfg["train_chars"], cfg["valid_chars"]))
    vocab = Vocab.build(train_text, cfg["min_count"])
    V = len(vocab)
    train_ids, valid_ids = vocab.encode(train_text), vocab.encode(valid_text)
    info.update(train_chars=len(train_ids), valid_chars=len(valid_ids), vocab_size=V,
                valid_unknown_fraction=float(np.mean(valid_ids == 0)))
    print(f"corpus: {info['source']}: {len(train_ids):,} train / {len(valid_ids):,} valid characters, "
          f"vocabulary {V}", flush=True)

    # baselines
    t0 = time.perf_counter()
    baselines = ngram_baselines(train_ids, valid_ids, V, cfg["ngram_orders"])
    best_n = min(baselines, key=lambda n: baselines[n]["bits_per_char"])
    print("n-gram (interpolated Kneser-Ney) validation bits/char: "
          + ", ".join(f"{n}: {r['bits_per_char']:.3f}" for n, r in baselines.items())
          + f" ({time.perf_counter() - t0:.0f}s)", flush=True)

    # model
    cell, layer, init, model = make_model(cfg, V)
    key = jax.random.key(cfg["seed"])
    params = init(jax.random.fold_in(key, 0))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    B, k1, k2 = cfg["batch"], cfg["k1"], cfg["k2"]
    n_steps = cfg["train_steps"]
    lr = optax.linear_schedule(cfg["lr"], cfg["lr_final"], n_steps)    # linear in updates, not in time
    opt = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]),
                      optax.inject_hyperparams(optax.adam)(learning_rate=lr))
    step = tbptt.make_step(model, loss_fn, opt, k1=k1, k2=k2)
    ev = tbptt.make_eval(model, loss_fn)
    train_stream = tbptt.Stream(tbptt.batchify(train_ids, B))
    valid_stream = tbptt.Stream(tbptt.batchify(valid_ids, B))
    h0 = layer.initial_carry(params["cell"], (B,))
    print(f"model: embed {cfg['embed']} -> {cfg['layers']} x LSTM({cfg['hidden']}) -> softmax {V}, dropout "
          f"{cfg['dropout']}, {n_params:,} parameters; TBPTT(k1={k1}, k2={k2}), batch {B}, Adam {cfg['lr']} -> "
          f"{cfg['lr_final']} (linear in updates), clip {cfg['clip_norm']}; budget {n_steps:,} updates",
          flush=True)

    curve, samples = [], []
    eval_every = cfg["eval_every_steps"]
    every = math.gcd(10, n_steps, eval_every)     # callback cadence: hits the budget and every evaluation exactly
    clock = {"start": None, "step0": 0, "eval_time": 0.0, "ema": None}   # wall time: reported, never a stopping rule

    def valid_bpc(p):
        m, _ = tbptt.evaluate(ev, p, valid_stream, T=cfg["eval_window"], initial_carry=h0)
        return m["loss"] / math.log(2)

    def elapsed():
        return time.perf_counter() - clock["start"] - clock["eval_time"]

    def record(gstep, st, secs, vb):
        timed = (gstep - clock["step0"]) * B * k1    # tokens trained since the clock started (compilation excluded)
        row = {"step": gstep, "seconds": secs, "tokens": gstep * B * k1, "tokens_per_second": timed / max(secs, 1e-9),
               "train_bpc": clock["ema"] / math.log(2), "valid_bpc": vb,
               "learning_rate": float(st.opt_state[1].hyperparams["learning_rate"])}
        curve.append(row)
        return row

    def callback(gstep, st, last):
        """Every ``every`` windows: the step budget, periodic evaluation and samples."""
        if "loss" in last:
            clock["ema"] = last["loss"] if clock["ema"] is None else 0.9 * clock["ema"] + 0.1 * last["loss"]
        if clock["start"] is None:      # the clock starts after the first windows (compilation excluded)
            clock.update(start=time.perf_counter(), step0=gstep)
        if gstep >= n_steps:
            return True
        if gstep % eval_every == 0:
            te = time.perf_counter()
            row = record(gstep, st, elapsed(), valid_bpc(st.params))
            txt = sample(cell, st.params, vocab, PROMPT, jax.random.fold_in(key, gstep), cfg["sample_chars"])
            samples.append({"step": gstep, "text": txt})
            print(f"[{row['seconds'] / 60:5.1f} min] step {gstep}: train {row['train_bpc']:.3f} valid "
                  f"{row['valid_bpc']:.3f} bits/char, {row['tokens_per_second']:,.0f} tokens/s\n"
                  f"--- sample ---\n{txt}\n---", flush=True)
            clock["eval_time"] += time.perf_counter() - te
        return False

    mesh = device_mesh(args.devices)
    ckpt_train = training_checkpoints(args.out, args.checkpoint_every or eval_every, args.resume)
    resumed_from = ckpt_train.latest()
    state, _, hist = tbptt.fit(step, init_state(params, opt), train_stream, initial_carry=h0, num_epochs=10 ** 6,
                               key=jax.random.fold_in(key, 1), callback=callback, callback_every=every,
                               log_every=every, mesh=mesh, checkpoint=ckpt_train)
    ckpt_train.close()
    train_seconds = elapsed()
    gsteps = int(state.step)
    epochs = hist.train[-1]["epoch"] + 1
    final_bpc = valid_bpc(state.params)
    row = record(gsteps, state, train_seconds, final_bpc)
    tokens, tokens_per_second = row["tokens"], row["tokens_per_second"]
    final_sample = sample(cell, state.params, vocab, PROMPT, jax.random.fold_in(key, 10 ** 6), 400)
    ckpt = os.path.join(args.out, "checkpoint")
    save_checkpoint(ckpt, state.params, cfg, vocab)

    best = baselines[best_n]["bits_per_char"]
    print(f"\nCharacter LM on {info['source']}")
    print(f"{'model':32s} {'valid bits/char':>16s}")
    for n, r in baselines.items():
        print(f"{n + '-gram Kneser-Ney':32s} {r['bits_per_char']:16.3f}")
    print(f"{'LSTM ' + str(cfg['layers']) + 'x' + str(cfg['hidden']) + ' (TBPTT)':32s} {final_bpc:16.3f}")
    print(f"LSTM - best n-gram ({best_n}-gram): {final_bpc - best:+.3f} bits/char; "
          f"{tokens:,} training tokens in {gsteps} updates ({epochs} epoch(s) started); "
          f"{train_seconds / 60:.1f} min of training, {tokens_per_second:,.0f} tokens/s")
    print(f"--- final sample ---\n{final_sample}\n---")
    plots = {"learning_curve": plot_curve(curve, baselines, args.out,
                                          f"char LM: {cfg['layers']}x LSTM({cfg['hidden']}) vs n-grams")}
    res = {"mode": "quick" if args.quick else "full", "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                                 for k, v in cfg.items()},
           "corpus": info, "parameters": n_params, "ngram_valid_bpc": baselines, "best_ngram_order": int(best_n),
           "best_ngram_bpc": best, "lstm_valid_bpc": final_bpc, "lstm_minus_best_ngram": final_bpc - best,
           "beats_best_ngram": bool(final_bpc < best), "train_seconds": train_seconds, "train_tokens": tokens,
           "tokens_per_second": tokens_per_second, "updates": gsteps, "curve": curve,
           "samples": samples + [{"step": gsteps, "text": final_sample}],
           "checkpoint": os.path.relpath(ckpt, args.out),     # relative to --out, where results.json is
           "plots": plots, "seconds": time.perf_counter() - t_start,
           "devices": len(jax.tree.leaves(state.params)[0].sharding.device_set), "resumed_from_update": resumed_from}
    return write_results(args.out, res, [plots["learning_curve"], ckpt], t_start)


# ----------------------------------------------------------------------------
# dropout study: none / between-layer (Zaremba) / variational recurrent (Gal)
# ----------------------------------------------------------------------------

DROPOUT_STUDY = dict(DEFAULT, train_chars=50_000, valid_chars=25_000, hidden=128, layers=2, embed=64,
                     batch=16, k1=64, k2=64, lr=3e-3, lr_final=3e-4, train_steps=1200, eval_every_steps=200,
                     seed=0, seeds=3, variants=(("none", 0.0, 0.0), ("between-layer (Zaremba)", 0.5, 0.0),
                                       ("variational recurrent", 0.0, 0.25)))
"""A 2 x 128 LSTM (~0.23M parameters) on 50k characters of the stdlib sources: 1,200 updates of 16 x 64 characters
are ~25 passes over the training split, so without dropout the model overfits (its validation bits/char is best
half way and then rises); each variant gets the same step budget, initialisation and windows, per seed (seeds
``seed``, ``seed + 1``, ...; the variants are compared as paired differences). Rates: 0.5 on the non-recurrent
connections (Zaremba et al.'s medium setting), 0.25 on the recurrent state (Gal & Ghahramani's
recurrent rates are of that order); neither is tuned."""
DROPOUT_QUICK = dict(DROPOUT_STUDY, train_chars=30_000, valid_chars=10_000, hidden=32, embed=16, batch=8, k1=32,
                     k2=32, train_steps=40, eval_every_steps=20, eval_window=200, seeds=1)


def dropout_study_train(cfg: dict, data: dict, name: str, dropout: float, recurrent: float) -> dict:
    """Trains one variant for ``cfg["train_steps"]`` updates; returns its curve and final bits/char (dropout off)."""
    V, B, k1 = data["V"], cfg["batch"], cfg["k1"]
    run_cfg = dict(cfg, dropout=dropout, recurrent_dropout=recurrent)
    _, layer, init, model = make_model(run_cfg, V)
    key = jax.random.key(cfg["seed"])
    params = init(jax.random.fold_in(key, 0))                # the same initialisation for every variant
    n_steps = cfg["train_steps"]
    opt = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]),
                      optax.adam(optax.linear_schedule(cfg["lr"], cfg["lr_final"], n_steps)))
    step = tbptt.make_step(model, loss_fn, opt, k1=k1, k2=cfg["k2"])
    ev = tbptt.make_eval(model, loss_fn)
    h0 = layer.initial_carry(params["cell"], (B,))

    def bpc(p, stream):
        m, _ = tbptt.evaluate(ev, p, stream, T=cfg["eval_window"], initial_carry=h0)
        return m["loss"] / math.log(2)

    curve, clock = [], {"start": None, "step0": 0, "eval": 0.0}

    def evaluate_at(gstep, p):
        te = time.perf_counter()
        row = {"step": gstep, "valid_bpc": bpc(p, data["valid"]), "train_bpc": bpc(p, data["train_eval"])}
        curve.append(row)
        clock["eval"] += time.perf_counter() - te
        return row

    def callback(gstep, st, last):
        if clock["start"] is None:                           # compilation excluded from the reported time
            clock.update(start=time.perf_counter(), step0=gstep)
        if gstep >= n_steps:
            return True
        if gstep % cfg["eval_every_steps"] == 0:
            row = evaluate_at(gstep, st.params)
            print(f"  {name}: step {gstep}: train {row['train_bpc']:.3f} valid {row['valid_bpc']:.3f} bits/char",
                  flush=True)
        return False

    every = math.gcd(10, n_steps, cfg["eval_every_steps"])
    state, _, _ = tbptt.fit(step, init_state(params, opt), data["train"], initial_carry=h0, num_epochs=10 ** 6,
                            key=jax.random.fold_in(key, 1), callback=callback, callback_every=every, log_every=every)
    seconds = time.perf_counter() - clock["start"] - clock["eval"]
    final = evaluate_at(int(state.step), state.params)
    timed = (int(state.step) - clock["step0"]) * B * k1
    best = min(curve, key=lambda r: r["valid_bpc"])
    print(f"  {name}: final train {final['train_bpc']:.3f} valid {final['valid_bpc']:.3f} bits/char "
          f"({seconds / 60:.1f} min)", flush=True)
    return {"dropout": dropout, "recurrent_dropout": recurrent, "updates": int(state.step),
            "valid_bpc": final["valid_bpc"], "train_bpc": final["train_bpc"],
            "generalisation_gap": final["valid_bpc"] - final["train_bpc"],
            "best_valid_bpc": best["valid_bpc"], "best_step": best["step"], "curve": curve,
            "train_seconds": seconds, "tokens_per_second": timed / max(seconds, 1e-9)}


def dropout_study_plot(runs: dict, out: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, (name, r) in enumerate(runs.items()):
        t = [row["step"] for row in r["curve"]]
        ax.plot(t, [row["valid_bpc"] for row in r["curve"]], "o-", color=f"C{k}", label=f"{name}: validation")
        ax.plot(t, [row["train_bpc"] for row in r["curve"]], "--", color=f"C{k}", lw=1, label=f"{name}: train")
    ax.set_xlabel("TBPTT updates")
    ax.set_ylabel("bits per character (dropout off)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "char_lm_dropout.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def dropout_study_summary(per_seed: dict, baseline: str) -> dict:
    """Per variant: validation and training bits/char over seeds, and the paired difference to ``baseline``'s."""
    def stats(values):
        v = np.asarray(values, float)
        sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        return {"mean": float(v.mean()), "std": sd, "per_seed": v.tolist()}
    base = [r["valid_bpc"] for r in per_seed[baseline]]
    return {name: {"valid_bpc": stats([r["valid_bpc"] for r in rs]), "train_bpc": stats([r["train_bpc"] for r in rs]),
                   "vs_none": stats([r["valid_bpc"] - b for r, b in zip(rs, base)])}
            for name, rs in per_seed.items()}


def _mean_sd(s: dict, signed: bool = False) -> str:
    return f"{s['mean']:{'+' if signed else ''}.3f} ± {s['std']:.3f}"


def dropout_study(args) -> dict:
    """``--study dropout``: the three variants at an equal step budget; prints a table, writes results.json and a PNG."""
    cfg = dict(DROPOUT_QUICK if args.quick else DROPOUT_STUDY)
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"char_lm: --steps must be >= 1, got {args.steps}")
        cfg["train_steps"] = args.steps
        cfg["eval_every_steps"] = min(cfg["eval_every_steps"], args.steps)
    cfg["seed"] = args.seed
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"char_lm: --seeds must be >= 1, got {args.seeds}")
        cfg["seeds"] = args.seeds
    out = args.out if args.out != "runs/char_lm" else "runs/char_lm_dropout"
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    train_text, valid_text, info = (text_corpus(args.text) if args.text
                                    else stdlib_corpus(cfg["train_chars"], cfg["valid_chars"]))
    vocab = Vocab.build(train_text, cfg["min_count"])
    train_ids, valid_ids = vocab.encode(train_text), vocab.encode(valid_text)
    B = cfg["batch"]
    data = {"V": len(vocab), "train": tbptt.Stream(tbptt.batchify(train_ids, B)),
            "valid": tbptt.Stream(tbptt.batchify(valid_ids, B)),
            # the training split's first len(valid) characters, scored like validation (dropout off)
            "train_eval": tbptt.Stream(tbptt.batchify(train_ids[:len(valid_ids)], B))}
    info.update(train_chars=len(train_ids), valid_chars=len(valid_ids), vocab_size=len(vocab))
    passes = cfg["train_steps"] * B * cfg["k1"] / len(train_ids)
    print(f"dropout study: {info['source']}: {len(train_ids):,} train / {len(valid_ids):,} valid characters, "
          f"vocabulary {len(vocab)}; {cfg['layers']} x LSTM({cfg['hidden']}), {cfg['train_steps']} updates of "
          f"{B} x {cfg['k1']} (~{passes:.1f} passes over the training split)", flush=True)
    seeds = [cfg["seed"] + s for s in range(cfg["seeds"])]
    per_seed = {}                                            # variant -> one run per seed
    for seed in seeds:
        for name, dropout, recurrent in cfg["variants"]:
            print(f"{name} (dropout {dropout}, recurrent_dropout {recurrent}), seed {seed}", flush=True)
            per_seed.setdefault(name, []).append(
                dropout_study_train(dict(cfg, seed=seed), data, name, dropout, recurrent))
    runs = {name: rs[0] for name, rs in per_seed.items()}   # the first seed's runs, with their curves
    summary = dropout_study_summary(per_seed, cfg["variants"][0][0])
    print(f"\nDropout study: {cfg['layers']} x LSTM({cfg['hidden']}), {cfg['train_steps']} updates each, "
          f"validation and training bits/char with dropout off; mean ± sd over seeds {seeds}")
    print(f"{'variant':26s} {'dropout':>8s} {'recurrent':>10s} {'valid':>15s} {'train':>15s} "
          f"{'vs none (paired)':>17s}")
    for name, s in summary.items():
        r = runs[name]
        print(f"{name:26s} {r['dropout']:8.2f} {r['recurrent_dropout']:10.2f} {_mean_sd(s['valid_bpc']):>15s} "
              f"{_mean_sd(s['train_bpc']):>15s} {_mean_sd(s['vs_none'], signed=True):>17s}")
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
        make_model(cfg, len(vocab))[2](jax.random.key(0))))
    title = f"char LM dropout study: {cfg['layers']}x LSTM({cfg['hidden']}), seed {seeds[0]}"
    plots = {"curves": dropout_study_plot(runs, out, title)}
    res = {"mode": "quick" if args.quick else "full", "study": "dropout",
           "config": {k: ([list(v) for v in val] if k == "variants" else list(val) if isinstance(val, tuple) else val)
                      for k, val in cfg.items() for v in [val]},
           "corpus": info, "parameters": n_params, "passes_over_train": passes, "seeds": seeds, "runs": runs,
           "per_seed": {name: [{k: v for k, v in r.items() if k != "curve"} for r in rs]
                        for name, rs in per_seed.items()},
           "summary": summary, "best_variant": min(summary, key=lambda n: summary[n]["valid_bpc"]["mean"]),
           "plots": plots,
           "command": "python examples/char_lm.py --study dropout" + (" --quick" if args.quick else "")
                      + ("" if args.seeds is None else f" --seeds {args.seeds}")}
    return write_results(out, res, [plots["curves"]], t_start)


if __name__ == "__main__":
    main()
