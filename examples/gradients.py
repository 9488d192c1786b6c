"""Vanishing and exploding gradients, measured (seeds 000, 001, 003, 004).

Three studies, each printed as a table, saved in DIR/results.json and plotted:

1. spectral bound: a tanh RNN whose W_hh is rescaled to sigma_max < 1, = 1, > 1;
   the measured ||dL/dh_t|| against the distance s - t, with the bound
   sigma_max^(s-t) ||dL/dh_s|| of seed 003 drawn, and a check that it holds.
2. temporal order (HARD): the gradient that reaches the inputs at the X/Y
   positions t1, t2 for RNN, LSTM and GRU, at initialisation and during training.
3. clipping: a ReLU RNN with an exploding recurrent matrix trained with and
   without `optax.clip_by_global_norm`, against the MSE of the constant
   predictor (always 0.5, the target's mean): what clipping buys here is a
   finite loss, not a model that has learned the task.

Usage: python examples/gradients.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import seqjax
from seqjax import diagnostics, tasks
from _report import write_results  # examples/_report.py

# ---------------------------------------------------------------- config
CONFIG = dict(
    seed=0,
    spectral=dict(hidden=32, input=4, T=100, batch=16, sigmas=[0.8, 1.0, 1.2]),
    # the LSTM's gate biases make HARD learnable: forget-gate bias 5 (memory that lasts ~100 steps),
    # input-gate bias -3 (distractors are not written in by default); all cells share Adam 3e-2, clipping at 1
    temporal=dict(level="HARD", hidden=32, batch=16, steps=600, lr=3e-2, clip_norm=1.0, probe_every=50,
                  probe_batch=256, lstm_forget_bias=5.0, lstm_input_bias=-3.0),
    clipping=dict(hidden=32, T=50, batch=32, steps=300, lr=0.05, sigma=1.6, clip_norm=1.0),
)
QUICK = dict(temporal=dict(steps=100, probe_every=50, probe_batch=64), clipping=dict(steps=100))


# ---------------------------------------------------------------- 1. spectral bound
def spectral_study(cfg, key):
    """||dL/dh_t|| vs s - t for a tanh RNN with W_hh = sigma * orthogonal, and the sigma^(s-t) bound."""
    H, I, T, B = cfg["hidden"], cfg["input"], cfg["T"], cfg["batch"]
    cell = seqjax.rnn(H)
    kp, kx, kv = jax.random.split(key, 3)
    base = cell.init(kp, I)
    xs = jax.random.normal(kx, (B, T, I))
    v = jax.random.normal(kv, (H,))
    out = {}
    for sigma in cfg["sigmas"]:
        params = base._replace(w_h=base.w_h * sigma)  # orthogonal init: every singular value is sigma
        g = jax.jit(lambda p: diagnostics.step_gradients(cell, p, xs, lambda ys, c: jnp.sum(ys[:, -1] @ v)))(params)
        s = T - 1
        grad_s = float(jnp.linalg.norm(v))  # dL/dh_s = v for every sequence
        dist = s - np.arange(T)
        bound = np.asarray(diagnostics.rnn_gradient_bound(params.w_h, grad_s, dist))
        measured = np.asarray(g.carry)[:, :s]  # [B, s]: gradient flowing back from step s
        holds = bool(np.all(measured <= bound[:s] * (1 + 1e-5)))
        out[str(sigma)] = dict(sigma_max=float(diagnostics.spectral_norm(params.w_h)),
                               spectral_radius=float(diagnostics.spectral_radius(params.w_h)),
                               distance=dist[:s][::-1].tolist(), measured_mean=measured.mean(0)[::-1].tolist(),
                               bound=bound[:s][::-1].tolist(), bound_holds=holds,
                               ratio_at_50=float(measured.mean(0)[s - 50] / grad_s))
    return out


# ---------------------------------------------------------------- 2. temporal order
def make_model(kind, cfg, key):
    """The cell and its initial params; the LSTM's gate biases as in cfg."""
    H = cfg["hidden"]
    cell = {"rnn": seqjax.rnn(H), "lstm": seqjax.lstm(H, forget_bias=cfg["lstm_forget_bias"]),
            "gru": seqjax.gru(H)}[kind]
    params = cell.init(key, 8)
    if kind == "lstm":
        params = params._replace(b=params.b.at[:H].set(cfg["lstm_input_bias"]))  # gate order i, f, g, o
    return cell, params


def temporal_study(cfg, key):
    """Gradient reaching x_{t1}, x_{t2} (and the mean over distractor steps) during training, per cell."""
    H, B = cfg["hidden"], cfg["batch"]
    results = {}
    for kind in ["rnn", "lstm", "gru"]:
        kc, kh, kd = jax.random.split(jax.random.fold_in(key, ["rnn", "lstm", "gru"].index(kind)), 3)
        cell, cell_params = make_model(kind, cfg, kc)
        params = dict(cell=cell_params, head=jax.random.normal(kh, (H, 4)) / np.sqrt(H), b=jnp.zeros(4))

        def logits_of(p, x):
            _, ys = seqjax.scan(cell, p["cell"], x)
            return ys[:, -1] @ p["head"] + p["b"]

        def loss_fn(p, batch):
            return optax.softmax_cross_entropy_with_integer_labels(logits_of(p, batch.x), batch.y).mean()

        tx = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]), optax.adam(cfg["lr"]))
        probe = tasks.temporal_order(kd, cfg["probe_batch"], level=cfg["level"])

        @jax.jit
        def probe_fn(state):
            p = state.params

            def seq_loss(ys, c):
                logits = ys[:, -1] @ p["head"] + p["b"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, probe.y).sum()

            g = diagnostics.step_gradients(cell, p["cell"], probe.x, seq_loss)
            rows = jnp.arange(probe.x.shape[0])
            acc = jnp.mean(jnp.argmax(logits_of(p, probe.x), -1) == probe.y)
            return dict(grad_x_t1=jnp.mean(g.x[rows, probe.positions[:, 0]]),
                        grad_x_t2=jnp.mean(g.x[rows, probe.positions[:, 1]]),
                        grad_x_last=jnp.mean(g.x[:, -1]), accuracy=acc)  # front padding: x_T is the E

        state = seqjax.init_state(params, tx)
        at_init = {k: float(v) for k, v in probe_fn(state).items()}
        _, hist = seqjax.fit(seqjax.make_train_step(loss_fn, tx), state,
                             lambda k: tasks.temporal_order(k, B, level=cfg["level"]), num_steps=cfg["steps"],
                             eval_fn=probe_fn, eval_every=cfg["probe_every"], steps_per_call=cfg["probe_every"],
                             seed=int(jax.random.randint(kd, (), 0, 2 ** 30)), progress=False)
        history = [dict(step=0, **at_init)] + hist.eval
        results[kind] = history
    return results


# ---------------------------------------------------------------- 3. clipping
def clipping_study(cfg, key):
    """Adding-problem regression with a ReLU RNN whose W_hh has sigma_max > 1, with and without clipping."""
    H, T, B = cfg["hidden"], cfg["T"], cfg["batch"]
    cell = seqjax.rnn(H, activation="relu")
    kc, kh, kd = jax.random.split(key, 3)
    p0 = cell.init(kc, 2)
    p0 = dict(cell=p0._replace(w_h=p0.w_h * cfg["sigma"]), head=jax.random.normal(kh, (H,)) / np.sqrt(H))

    def loss_fn(p, batch):
        _, ys = seqjax.scan(cell, p["cell"], batch.x, lengths=batch.lengths)
        pred = seqjax.losses.last_valid(ys, batch.lengths) @ p["head"]
        return jnp.mean((pred - batch.y) ** 2)

    # the reference: the best constant prediction, E[y] = 0.5, scores Var(y). y = 0.5 + (X1 + X2) / 4 with
    # X1, X2 ~ U[-1, 1] (variance 1/3 each), except that a marked first pair has value 0: X1 is there with
    # probability 1/10, X2 with 9/10 * 1/(T//2 - 1) (seqjax.tasks.adding_problem).
    p_zero = 0.1 + 0.9 / (T // 2 - 1)
    ref = tasks.adding_problem(jax.random.fold_in(kd, 10 ** 6), 8192, min_length=T)
    out = {"constant_predictor_mse": (2 - p_zero) / 3 / 16,
           "constant_predictor_mse_sampled": float(jnp.mean((ref.y - 0.5) ** 2))}
    for name, tx in [("unclipped", optax.sgd(cfg["lr"])),
                     ("clipped", optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]), optax.sgd(cfg["lr"])))]:
        # on_non_finite="stop_run": the run ends at its first non-finite step (the bad update is not applied)
        _, hist = seqjax.fit(seqjax.make_train_step(loss_fn, tx), seqjax.init_state(p0, tx),
                             lambda k: tasks.adding_problem(k, B, min_length=T), num_steps=cfg["steps"],
                             steps_per_call=cfg["steps"], on_non_finite="stop_run",
                             seed=int(jax.random.randint(kd, (), 0, 2 ** 30)), progress=False)
        losses, norms = hist.series("loss")[1], hist.series("grad_norm")[1]
        finite = hist.stop_reason != "non_finite"
        out[name] = dict(loss=losses.tolist(), grad_norm=norms.tolist(), all_finite=finite,
                         first_non_finite_step=None if finite else len(losses),
                         final_loss=float(losses[-1]) if finite else None,
                         mean_loss_last_50=float(np.mean(losses[-50:])) if finite else None,
                         max_grad_norm=float(np.max(norms)) if len(norms) else None)
    return out


# ---------------------------------------------------------------- report
def plot(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, (sigma, r) in enumerate(results["spectral"].items()):
        color = f"C{k}"
        ax.semilogy(r["distance"], r["measured_mean"], color=color, label=f"measured, sigma_max={float(sigma):.1f}")
        ax.semilogy(r["distance"], r["bound"], color=color, ls="--", label=f"bound sigma^(s-t), {float(sigma):.1f}")
    ax.set(xlabel="distance s - t", ylabel="||dL/dh_t||", title="tanh RNN: gradient vs distance, with the spectral bound")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "spectral_bound.png"), dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, (kind, hist) in enumerate(results["temporal"].items()):
        steps = [h["step"] for h in hist]
        floor = 1e-20  # exact zeros (underflow) drawn at the floor of the log axis
        axes[0].semilogy(steps, [max(h["grad_x_t1"], floor) for h in hist], f"C{k}-", label=f"{kind}: ||dL/dx_t1||")
        axes[0].semilogy(steps, [h["grad_x_last"] for h in hist], f"C{k}:", label=f"{kind}: ||dL/dx_T||")
        axes[1].plot(steps, [h["accuracy"] for h in hist], f"C{k}-", label=kind)
    axes[0].set(xlabel="training step", ylabel="gradient norm", title="HARD temporal order: gradient at X/Y position t1")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="training step", ylabel="accuracy", title="probe accuracy", ylim=(0, 1.05))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "temporal_order_gradients.png"), dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = {k: v for k, v in results["clipping"].items() if isinstance(v, dict)}
    const = results["clipping"]["constant_predictor_mse"]
    for k, (name, r) in enumerate(runs.items()):
        loss = [np.nan if x is None else x for x in r["loss"]]
        gn = [np.nan if x is None else x for x in r["grad_norm"]]
        bad = r["first_non_finite_step"]
        label = name if bad is None else f"{name} (NaN/inf from step {bad})"
        axes[0].semilogy(loss, f"C{k}-", marker="o" if bad is not None else None, ms=5, label=label)
        axes[1].semilogy(gn, f"C{k}-", marker="o" if bad is not None else None, ms=5, label=label)
        if bad is not None:
            for a in axes:
                a.axvline(bad, color=f"C{k}", ls=":")
    axes[0].axhline(const, color="k", ls="--", lw=1, label=f"constant predictor 0.5 (= E[y]): MSE {const:.3f}")
    axes[0].set(xlabel="step", ylabel="training MSE (one batch per step)",
                title="exploding ReLU RNN: clipping keeps the loss finite;\n"
                      "it ends near the constant predictor's MSE (not a learned solution)")
    axes[1].set(xlabel="step", ylabel="global gradient norm (before clipping)")
    for a in axes:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "clipping.png"), dpi=120)
    plt.close("all")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (about a minute on 2 CPU cores)")
    parser.add_argument("--out", default="runs/gradients", help="output directory")
    args = parser.parse_args(argv)
    cfg = json.loads(json.dumps(CONFIG))
    if args.quick:
        for section, over in QUICK.items():
            cfg[section].update(over)
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.key(cfg["seed"])
    k1, k2, k3 = jax.random.split(key, 3)
    t0 = time.perf_counter()
    results = dict(settings=dict(cfg, quick=args.quick, jax=jax.__version__, backend=jax.default_backend()),
                   spectral=spectral_study(cfg["spectral"], k1),
                   temporal=temporal_study(cfg["temporal"], k2),
                   clipping=clipping_study(cfg["clipping"], k3))
    results["wall_time_s"] = time.perf_counter() - t0

    print("\n1. Spectral bound (tanh RNN, T=%d): ||dL/dh_t|| / ||dL/dh_s|| at s - t = 50" % cfg["spectral"]["T"])
    print(f"{'sigma_max':>10} {'radius':>8} {'measured ratio':>15} {'bound sigma^50':>15} {'bound holds':>12}")
    for sigma, r in results["spectral"].items():
        print(f"{r['sigma_max']:>10.3f} {r['spectral_radius']:>8.3f} {r['ratio_at_50']:>15.3e} "
              f"{r['sigma_max'] ** 50:>15.3e} {str(r['bound_holds']):>12}")
    print("\n2. HARD temporal order: mean ||dL/dx_t|| at t1 (first X/Y) vs at the last step")
    print(f"{'cell':>5} {'step':>6} {'grad t1':>10} {'grad t2':>10} {'grad T':>10} {'t1/T':>9} {'accuracy':>9}")
    for kind, hist in results["temporal"].items():
        for h in (hist[0], hist[-1]):
            print(f"{kind:>5} {h['step']:>6} {h['grad_x_t1']:>10.2e} {h['grad_x_t2']:>10.2e} {h['grad_x_last']:>10.2e} "
                  f"{h['grad_x_t1'] / h['grad_x_last']:>9.1e} {h['accuracy']:>9.3f}")
    print("\n3. Clipping (ReLU RNN, sigma_max=%.1f, SGD lr=%g)" % (cfg["clipping"]["sigma"], cfg["clipping"]["lr"]))
    print(f"{'run':>10} {'all finite':>11} {'first non-finite step':>22} {'final loss':>11} {'last 50 mean':>13} "
          f"{'max grad norm':>14}")
    for name, r in results["clipping"].items():
        if not isinstance(r, dict):
            continue
        fl = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        ml = "-" if r["mean_loss_last_50"] is None else f"{r['mean_loss_last_50']:.4f}"
        print(f"{name:>10} {str(r['all_finite']):>11} {str(r['first_non_finite_step']):>22} {fl:>11} {ml:>13} "
              f"{r['max_grad_norm']:>14.3e}")
    print(f"constant predictor (always 0.5 = E[y]): MSE {results['clipping']['constant_predictor_mse']:.4f} "
          f"(sampled: {results['clipping']['constant_predictor_mse_sampled']:.4f})")
    plot(results, args.out)
    return write_results(args.out, results, ["spectral_bound.png", "temporal_order_gradients.png", "clipping.png"],
                         t0)


if __name__ == "__main__":
    main()
