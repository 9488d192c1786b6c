#!/usr/bin/env python
"""Sequence to sequence with attention: human-written dates -> ISO dates, and numbers spelled out from a vector.

1. **seq2seq, dates.** Dates written in 14 human formats ("tuesday, 3 march
   1987", "the twenty-first of september, two thousand and nine", "9/21/2009",
   "21.09.2009", ...; 8 to ~60 characters) are translated character by
   character into ISO form "2009-09-21". Held-out test dates never occur in
   training in any format. Three models with the same bidirectional GRU
   encoder and GRU decoder: no attention (the decoder starts from the encoder's
   final states, Sutskever et al. 2014), additive attention (Bahdanau et al.
   2015) and scaled dot-product attention. Reported: exact-sequence accuracy,
   greedy vs beam search, accuracy vs input length (Bahdanau's central figure),
   and attention heatmaps for a few test inputs.
2. **vec2seq, numbers.** An integer in [0, 10^6) given as a feature vector
   (one-hot per decimal digit) is spelled out in words ("four hundred twelve
   thousand three hundred five"); the same decoder and the same greedy/beam
   code, with the vector as the decoder's initial state (seed 000's captioning shape).

Usage::

    python examples/seq2seq.py --quick          # ~2 min on 2 CPU cores (most of it XLA compilation)
    python examples/seq2seq.py                  # the full study
    python examples/seq2seq.py --out runs/s2s   # where results.json and PNGs go (default runs/seq2seq)

Budgets are steps, never seconds: training stops after ``max_steps`` (``vec_steps``)
or earlier once the dev accuracy reaches ``target``, so the same command gives
the same numbers on any machine load (the seconds are reported, not used).
The quick run's 150 steps (200 for vec2seq) took 116 s with the 2-core CPU at
load average ~4 and 137-146 s at ~8; XLA compilation is ~80 s of it, so fewer
steps would barely shorten it. Beam search is reported as measured against
greedy: width 1 is greedy decoding, a wider beam is not guaranteed to match or
beat greedy in accuracy or in log-probability.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import time

import jax
import numpy as np
import optax

import seqjax
from seqjax import seq2seq as s2s
from _report import write_results  # examples/_report.py

# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

FULL = dict(hidden=128, embed=32, batch=128, lr=3e-3, clip=1.0, max_steps=6000, eval_every=250,
            target=0.997, dev_size=1000, test_size=4000, beam_width=4, vec_steps=3000,
            vec_test=2000, heatmaps=4)
QUICK = dict(hidden=64, embed=24, batch=64, lr=5e-3, clip=1.0, max_steps=150, eval_every=50,
             target=0.997, dev_size=400, test_size=400, beam_width=3, vec_steps=200,
             vec_test=300, heatmaps=2)   # dev and test of one size: greedy decoding compiles once per model
MODELS = {"no attention": None, "additive": "additive", "scaled dot": "scaled_dot"}
LENGTH_BINS = [(0, 15), (15, 25), (25, 35), (35, 45), (45, 70)]

# ----------------------------------------------------------------------------
# data: dates
# ----------------------------------------------------------------------------

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORD_ONES = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
            "eighteenth", "nineteenth"]


def words_below_100(n: int, sep: str = "-") -> str:
    if n < 20:
        return ONES[n]
    t, o = divmod(n, 10)
    return TENS[t] + (sep + ONES[o] if o else "")


def ordinal_words(n: int) -> str:
    if n < 20:
        return ORD_ONES[n]
    t, o = divmod(n, 10)
    return (TENS[t][:-1] + "ieth") if o == 0 else TENS[t] + "-" + ORD_ONES[o]


def year_words(y: int) -> str:
    if 2000 <= y < 2010:
        return "two thousand" + ("" if y == 2000 else " and " + ONES[y - 2000])
    hi, lo = divmod(y, 100)
    return words_below_100(hi) + " " + ("hundred" if lo == 0 else ("oh " + ONES[lo]) if lo < 10 else words_below_100(lo))


def suffix(d: int) -> str:
    return "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")


FORMATS = [
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    lambda d: f"{d.month}/{d.day}/{d.year}",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year % 100:02d}",
    lambda d: f"{d.year}{d.month:02d}{d.day:02d}",
    lambda d: f"{d.day}{suffix(d.day)} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{DAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{DAYS[d.weekday()][:3]} {MONTHS[d.month - 1][:3]} {d.day:02d} {d.year}",
    lambda d: f"the {ordinal_words(d.day)} of {MONTHS[d.month - 1]}, {year_words(d.year)}",
    lambda d: f"{MONTHS[d.month - 1]} the {ordinal_words(d.day)}, {year_words(d.year)}",
    lambda d: f"{DAYS[d.weekday()]} the {ordinal_words(d.day)} of {MONTHS[d.month - 1]} {d.year}",
]
SRC_VOCAB = s2s.Vocabulary("abcdefghijklmnopqrstuvwxyz0123456789 ,./-")
TGT_VOCAB = s2s.Vocabulary("0123456789-")
FIRST, LAST = dt.date(1950, 1, 1), dt.date(2049, 12, 31)   # two-digit years: 50-99 -> 19xx, 00-49 -> 20xx
SRC_LEN, TGT_LEN = 60, 11                                  # "yyyy-mm-dd" + EOS


def all_dates():
    n = (LAST - FIRST).days + 1
    return [FIRST + dt.timedelta(days=i) for i in range(n)]


def split_dates(seed=0):
    dates = all_dates()
    perm = np.random.default_rng(seed).permutation(len(dates))
    n_test = len(dates) // 10
    test = [dates[i] for i in perm[:n_test]]
    dev = [dates[i] for i in perm[n_test:2 * n_test]]
    train = [dates[i] for i in perm[2 * n_test:]]
    return train, dev, test


def make_examples(dates, rng, n):
    """n (source string, target string) pairs: random dates from ``dates``, formats cycled evenly."""
    idx = rng.integers(0, len(dates), n)
    fmts = np.arange(n) % len(FORMATS)
    rng.shuffle(fmts)
    return [(FORMATS[f](dates[i]), dates[i].isoformat()) for i, f in zip(idx, fmts)]


def encode_pairs(pairs):
    src, sl = SRC_VOCAB.batch([s for s, _ in pairs], length=SRC_LEN)
    tgt, tl = TGT_VOCAB.batch([t for _, t in pairs], eos=True, length=TGT_LEN)
    return s2s.Seq2SeqBatch((src, sl), tgt, tl)


# ----------------------------------------------------------------------------
# data: numbers for vec2seq
# ----------------------------------------------------------------------------

NUM_DIGITS = 6


def number_words(n: int) -> list[str]:
    if n == 0:
        return ["zero"]

    def below_1000(k):
        out = []
        h, r = divmod(k, 100)
        if h:
            out += [ONES[h], "hundred"]
        if r:
            out += words_below_100(r, " ").split()
        return out

    th, r = divmod(n, 1000)
    return (below_1000(th) + ["thousand"] if th else []) + below_1000(r)


WORD_VOCAB = s2s.Vocabulary(sorted({w for n in list(range(1000)) + [1000] for w in number_words(n)}))
WORD_LEN = 12


def number_features(ns):
    digits = (np.asarray(ns)[:, None] // 10 ** np.arange(NUM_DIGITS)[::-1]) % 10
    return np.eye(10, dtype=np.float32)[digits].reshape(len(ns), -1)


def number_batch(ns):
    tgt, tl = WORD_VOCAB.batch([number_words(int(n)) for n in ns], eos=True, length=WORD_LEN)
    return s2s.Seq2SeqBatch(number_features(ns), tgt, tl)


# ----------------------------------------------------------------------------
# train and evaluate
# ----------------------------------------------------------------------------


def decode_eval(model, params, batch, beam_width, max_length):
    """Greedy and beam-search decoding of ``batch``: ``(greedy, beam, greedy exact [B], beam exact [B], checks)``.

    ``checks`` holds what the method guarantees and what was measured:
    ``beam1_equals_greedy``: beam search with width 1 returns greedy's tokens,
    lengths and log-probabilities (the same decision at every step);
    ``beam_differs`` / ``beam_lower_score``: how many examples' best beam differs
    from the greedy output / has a lower length-normalised log-probability than
    it. Beam search with width k > 1 can drop the greedy prefix and end lower, so
    neither is guaranteed to be 0; they are reported as measured.
    """
    g = model.greedy(params, batch.source, max_length=max_length)
    b = model.beam(params, batch.source, max_length=max_length, beam_width=beam_width)
    b1 = model.beam(params, batch.source, max_length=max_length, beam_width=1)
    ok_g = s2s.exact_match(g.tokens, g.lengths, batch.target, batch.target_lengths)
    ok_b = s2s.exact_match(b.best, b.lengths[:, 0], batch.target, batch.target_lengths)
    g_tok, g_len, g_score = (np.asarray(a) for a in (g.tokens, g.lengths, g.scores))
    g_norm = g_score / g_len                                     # length penalty 1.0, as the beam ranks
    same = (np.asarray(b.best) == g_tok).all(axis=1) & (np.asarray(b.lengths[:, 0]) == g_len)
    checks = {
        "beam1_equals_greedy": bool(np.array_equal(np.asarray(b1.best), g_tok)
                                    and np.array_equal(np.asarray(b1.lengths[:, 0]), g_len)
                                    and np.allclose(np.asarray(b1.scores[:, 0]), g_score, rtol=1e-5, atol=1e-5)),
        "beam_differs": int((~same).sum()),
        "beam_lower_score": int((np.asarray(b.normalized_scores[:, 0]) < g_norm - 1e-5).sum()),
    }
    return g, b, ok_g, ok_b, checks


def batches(sample):
    """An endless iterator of fresh training batches; ``fit``'s ``num_steps`` is the budget."""
    return (sample() for _ in itertools.count())


def train(model, cfg, sample, dev, *, max_steps, max_length, label):
    params = model.init(jax.random.key(0))
    sched = optax.cosine_decay_schedule(cfg["lr"], max_steps, alpha=0.05)
    opt = optax.adam(sched)
    step = seqjax.make_train_step(model.loss, opt, clip_norm=cfg["clip"], has_aux=True)

    def eval_fn(state):
        g = model.greedy(state.params, dev.source, max_length=max_length)
        return {"dev_exact": float(s2s.exact_match(g.tokens, g.lengths, dev.target, dev.target_lengths).mean())}

    t0 = time.perf_counter()
    state, hist = seqjax.fit(step, seqjax.init_state(params, opt), batches(sample),
                             num_steps=max_steps, eval_fn=eval_fn, eval_every=cfg["eval_every"],
                             target=("dev_exact", cfg["target"]), progress=False)
    secs = time.perf_counter() - t0       # reported only: the budget is max_steps
    print(f"  {label:<14} {len(hist.train):5d} steps {secs:6.1f}s  loss {hist.last('loss'):.4f}  "
          f"dev exact {hist.last('dev_exact', 'eval'):.4f}  ({hist.stop_reason})", flush=True)
    return state.params, hist, secs


def length_curve(lengths, ok):
    out = []
    for lo, hi in LENGTH_BINS:
        m = (lengths >= lo) & (lengths < hi)
        out.append({"bin": f"[{lo},{hi})", "n": int(m.sum()), "exact": float(ok[m].mean()) if m.any() else None})
    return out


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------


def plot_all(out, results, heat, hists):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    centers = [(lo + hi) / 2 for lo, hi in LENGTH_BINS]
    for name, r in results["dates"].items():
        ys = [c["exact"] for c in r["by_length_greedy"]]
        ax.plot(centers, ys, "o-", label=name)
    ax.set_xlabel("source length (characters)")
    ax.set_ylabel("exact-match accuracy (greedy, held-out)")
    ax.set_title("Dates -> ISO: accuracy vs input length")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_length.png"), dpi=110)
    plt.close(fig)
    plots["accuracy_vs_length"] = "accuracy_vs_length.png"

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in hists.items():
        s, l = h.series("loss")
        ax.semilogy(s, l, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training_loss.png"), dpi=110)
    plt.close(fig)
    plots["training_loss"] = "training_loss.png"

    for name, items in heat.items():
        fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 3.6))
        axes = np.atleast_1d(axes)
        for ax, (src, out_str, w) in zip(axes, items):
            ax.imshow(w, aspect="auto", cmap="Greys", vmin=0, vmax=1)
            ax.set_xticks(range(len(src)))
            ax.set_xticklabels(list(src), fontsize=6)
            ax.set_yticks(range(len(out_str)))
            ax.set_yticklabels(list(out_str), fontsize=7)
            ax.set_title(src if len(src) < 40 else src[:37] + "...", fontsize=7)
        fig.suptitle(f"attention weights ({name}): output row attends over input column", fontsize=9)
        fig.tight_layout()
        fname = f"attention_{name.replace(' ', '_')}.png"
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        plots[f"attention_{name}"] = fname
    return plots


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~2 minute run with a smaller model")
    ap.add_argument("--out", default="runs/seq2seq", help="output directory (results.json, *.png)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    # --- data
    train_dates, dev_dates, test_dates = split_dates()
    rng_train = np.random.default_rng(1)
    dev = encode_pairs(make_examples(dev_dates, np.random.default_rng(2), cfg["dev_size"]))
    test_pairs = make_examples(test_dates, np.random.default_rng(3), cfg["test_size"])
    test = encode_pairs(test_pairs)
    src_len = np.asarray(test.source[1])
    sample = lambda: encode_pairs(make_examples(train_dates, rng_train, cfg["batch"]))
    print(f"dates: {len(train_dates)} train / {len(dev_dates)} dev / {len(test_dates)} test dates, "
          f"{len(FORMATS)} formats, source length {src_len.min()}-{src_len.max()} chars", flush=True)
    print("  e.g. " + "; ".join(f"{s!r} -> {t}" for s, t in test_pairs[:3]))

    # --- seq2seq models
    results = {"mode": "quick" if args.quick else "full", "config": cfg, "dates": {}, "vec2seq": {}}
    hists, heat = {}, {}
    for name, kind in MODELS.items():
        model = s2s.seq2seq(len(SRC_VOCAB), len(TGT_VOCAB), embed_size=cfg["embed"], hidden_size=cfg["hidden"],
                            attention=kind)
        params, hist, secs = train(model, cfg, sample, dev, max_steps=cfg["max_steps"], max_length=TGT_LEN, label=name)
        g, b, ok_g, ok_b, checks = decode_eval(model, params, test, cfg["beam_width"], TGT_LEN)
        hists[name] = hist
        results["dates"][name] = {
            "attention": kind, "steps": len(hist.train), "train_seconds": round(secs, 1),
            "stop_reason": hist.stop_reason, "final_loss": hist.last("loss"),
            "test_exact_greedy": float(ok_g.mean()), "test_exact_beam": float(ok_b.mean()), **checks,
            "by_length_greedy": length_curve(src_len, ok_g), "by_length_beam": length_curve(src_len, ok_b),
            "eval": hist.eval,
        }
        if kind is not None:
            picks = [i for i in range(len(test_pairs)) if len(test_pairs[i][0]) > 12][:cfg["heatmaps"]]
            items = []
            for i in picks:
                src, _ = test_pairs[i]
                L = int(g.lengths[i])
                out_str = TGT_VOCAB.decode(g.tokens[i]) + "$"
                items.append((src, out_str[:L], np.asarray(g.trace[i, :L, :len(src)])))
            heat[name] = items

    # --- vec2seq
    nums = np.random.default_rng(4).permutation(10 ** NUM_DIGITS)
    nt = cfg["vec_test"]
    test_nums, dev_nums, train_nums = nums[:nt], nums[nt:nt + 300], nums[nt + 300:]
    rng_vec = np.random.default_rng(5)
    vsample = lambda: number_batch(rng_vec.choice(train_nums, cfg["batch"]))
    vdev = number_batch(dev_nums)
    vtest = number_batch(test_nums)
    vmodel = s2s.vec2seq(NUM_DIGITS * 10, len(WORD_VOCAB), embed_size=cfg["embed"], hidden_size=cfg["hidden"])
    vcfg = dict(cfg, target=0.999)
    vparams, vhist, vsecs = train(vmodel, vcfg, vsample, vdev, max_steps=cfg["vec_steps"], max_length=WORD_LEN,
                                  label="vec2seq")
    g, b, ok_g, ok_b, checks = decode_eval(vmodel, vparams, vtest, cfg["beam_width"], WORD_LEN)
    hists["vec2seq (numbers)"] = vhist
    results["vec2seq"] = {"steps": len(vhist.train), "train_seconds": round(vsecs, 1), "stop_reason": vhist.stop_reason,
                          "test_exact_greedy": float(ok_g.mean()), "test_exact_beam": float(ok_b.mean()), **checks,
                          "examples": [(int(n), WORD_VOCAB.decode(g.tokens[i], sep=" "))
                                       for i, n in enumerate(test_nums[:5])]}

    # --- report
    results["plots"] = plot_all(args.out, results, heat, hists)
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    table = []
    print("\nSeq2seq: exact-sequence accuracy on held-out data (greedy and beam as measured)")
    head = (f"{'task':<8} {'model':<14} {'steps':>6} {'train s':>8} {'greedy':>8} {'beam':>8} {'differ':>7} "
            f"{'b<g':>5} {'k=1==g':>7}   by input length (greedy): "
            + " ".join(f"{c['bin']:>8}" for c in length_curve(src_len, np.ones_like(src_len, bool))))
    print(head)
    print("-" * len(head))
    rows = [("dates", name, r) for name, r in results["dates"].items()] + [("numbers", "vec2seq", results["vec2seq"])]
    for task, name, r in rows:
        curve = " ".join(f"{c['exact']:8.3f}" if c["exact"] is not None else f"{'-':>8}"
                         for c in r.get("by_length_greedy", []))
        print(f"{task:<8} {name:<14} {r['steps']:6d} {r['train_seconds']:8.1f} {r['test_exact_greedy']:8.4f} "
              f"{r['test_exact_beam']:8.4f} {r['beam_differs']:7d} {r['beam_lower_score']:5d} "
              f"{'yes' if r['beam1_equals_greedy'] else 'NO':>7}   {' ' * 26}{curve}".rstrip())
        table.append({"task": task, "model": name, "steps": r["steps"], "train_seconds": r["train_seconds"],
                      "greedy": r["test_exact_greedy"], "beam": r["test_exact_beam"],
                      "beam_minus_greedy": r["test_exact_beam"] - r["test_exact_greedy"],
                      "beam_differs": r["beam_differs"], "beam_lower_score": r["beam_lower_score"],
                      "beam1_equals_greedy": r["beam1_equals_greedy"]})
    results["table"] = table
    v = results["vec2seq"]
    print(f"(bins: source characters; n = {[c['n'] for c in length_curve(src_len, np.ones_like(src_len, bool))]}; "
          f"beam width {cfg['beam_width']}, length penalty 1.0; differ: test outputs where the best beam differs from "
          f"greedy; b<g: of those, best beam with a lower length-normalised log-probability than greedy's (beam "
          f"search does not rule it out); k=1==g: width-1 beam search returns greedy's tokens and scores)")
    print("vec2seq e.g. " + "; ".join(f"{n} -> {w!r}" for n, w in v["examples"][:3]))
    return write_results(args.out, results, list(results["plots"].values()), t_start)


if __name__ == "__main__":
    main()
