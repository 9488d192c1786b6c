"""Tests for seqjax.train (Optax loop) and seqjax.losses."""

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seqjax import losses as L
from seqjax.train import (
    NonFiniteLossError,
    TrainState,
    fit,
    init_state,
    make_nnx_train_step,
    make_train_step,
)

W_TRUE = np.array([[1.5], [-2.0], [0.5]], np.float32)


def linreg_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def linreg_batches(key):
    x = jax.random.normal(key, (32, 3))
    return x, x @ W_TRUE + 0.25


def zeros_params():
    return {"w": jnp.zeros((3, 1)), "b": jnp.zeros((1,))}


# --------------------------------------------------------------------------
# NumPy references
# --------------------------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_bce(x, y):
    p = 1.0 / (1.0 + np.exp(-x))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------


def test_last_step_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    B, T, C = 5, 7, 4
    logits = rng.normal(size=(B, T, C)).astype(np.float32)
    labels = rng.integers(0, C, size=B)
    lengths = np.array([1, 7, 3, 5, 2])
    ref = np.mean([-np_log_softmax(logits[b, lengths[b] - 1])[labels[b]]
                   for b in range(B)])
    got = L.last_step_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(lengths))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    ref_full = np.mean([-np_log_softmax(logits[b, T - 1])[labels[b]]
                        for b in range(B)])
    np.testing.assert_allclose(
        L.last_step_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
        ref_full, rtol=1e-5)


def test_masked_cross_entropy_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(1)
    B, T, C = 4, 6, 5
    logits = rng.normal(size=(B, T, C)).astype(np.float32)
    labels = rng.integers(0, C, size=(B, T))
    lengths = np.array([6, 2, 0, 4])
    terms = [-np_log_softmax(logits[b, t])[labels[b, t]]
             for b in range(B) for t in range(lengths[b])]
    ref = np.mean(terms)
    got = L.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                 jnp.asarray(lengths))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # padded labels may be garbage (-1) and padded logits anything
    labels2 = labels.copy(); logits2 = logits.copy()
    for b in range(B):
        labels2[b, lengths[b]:] = -1
        logits2[b, lengths[b]:] = 1e3
    got2 = L.masked_cross_entropy(jnp.asarray(logits2), jnp.asarray(labels2),
                                  jnp.asarray(lengths))
    np.testing.assert_allclose(got2, ref, rtol=1e-5)
    # explicit mask == lengths
    mask = np.arange(T)[None] < lengths[:, None]
    got3 = L.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                  mask=jnp.asarray(mask))
    np.testing.assert_allclose(got3, ref, rtol=1e-5)


def test_masked_binary_cross_entropy_matches_numpy():
    rng = np.random.default_rng(2)
    B, T, D = 3, 5, 2
    x = rng.normal(size=(B, T, D)).astype(np.float32) * 3
    y = rng.integers(0, 2, size=(B, T, D)).astype(np.float32)
    lengths = np.array([5, 1, 3])
    vals = np.concatenate([np_bce(x[b, :lengths[b]], y[b, :lengths[b]]).ravel()
                           for b in range(B)])
    got = L.masked_binary_cross_entropy(jnp.asarray(x), jnp.asarray(y),
                                        jnp.asarray(lengths))
    np.testing.assert_allclose(got, vals.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        L.masked_binary_cross_entropy(jnp.asarray(x), jnp.asarray(y)),
        np_bce(x, y).mean(), rtol=1e-5)


def test_mse_with_and_without_lengths():
    rng = np.random.default_rng(3)
    p = rng.normal(size=(3, 4, 2)).astype(np.float32)
    t = rng.normal(size=(3, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(L.mse(p, t), ((p - t) ** 2).mean(), rtol=1e-5)
    lengths = np.array([4, 2, 1])
    ref = np.concatenate([((p[b, :n] - t[b, :n]) ** 2).ravel()
                          for b, n in enumerate(lengths)]).mean()
    np.testing.assert_allclose(L.mse(p, t, jnp.asarray(lengths)), ref, rtol=1e-5)


def test_last_valid_and_mean_valid_match_numpy():
    rng = np.random.default_rng(4)
    ys = rng.normal(size=(4, 5, 3)).astype(np.float32)
    lengths = np.array([5, 1, 3, 0])
    last = np.stack([ys[b, n - 1] if n > 0 else np.zeros(3, np.float32)
                     for b, n in enumerate(lengths)])
    mean = np.stack([ys[b, :n].mean(0) if n > 0 else np.zeros(3, np.float32)
                     for b, n in enumerate(lengths)])
    np.testing.assert_allclose(L.last_valid(jnp.asarray(ys), jnp.asarray(lengths)),
                               last, rtol=1e-6)
    np.testing.assert_allclose(L.mean_valid(jnp.asarray(ys), jnp.asarray(lengths)),
                               mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(L.last_valid(jnp.asarray(ys)), ys[:, -1])
    np.testing.assert_allclose(L.mean_valid(jnp.asarray(ys)), ys.mean(1), rtol=1e-6)
    # also under jit (lengths traced)
    np.testing.assert_allclose(jax.jit(L.mean_valid)(ys, lengths), mean,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.last_step_cross_entropy(jnp.zeros((2, 3, 4)), jnp.array([0, 4])),
         r"labels must lie in \[0, C=4\).*max 4"),
        (lambda: L.last_step_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 1])),
         r"logits must have rank 3 \(B, T, C\).*\(2, 3\)"),
        (lambda: L.last_step_cross_entropy(jnp.zeros((2, 3, 4)), jnp.array([0, 1, 2])),
         r"labels must have shape \(B,\) = \(2,\).*\(3,\)"),
        (lambda: L.last_step_cross_entropy(jnp.zeros((2, 3, 4)), jnp.array([0, 1]),
                                           jnp.array([3])),
         r"lengths must have shape \(B,\) = \(2,\), got \(1,\)"),
        (lambda: L.last_step_cross_entropy(jnp.zeros((2, 3, 4)), jnp.array([0, 1]),
                                           jnp.array([0, 3])),
         r"lengths must lie in \[1, T=3\]"),
        (lambda: L.last_step_cross_entropy(jnp.zeros((2, 3, 4)), jnp.array([0.0, 1.0])),
         r"labels must be integer"),
        (lambda: L.masked_cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), int)),
         r"labels must have shape \(B, T\) = \(2, 3\).*\(2, 4\)"),
        (lambda: L.masked_cross_entropy(jnp.zeros((2, 3, 4)), jnp.full((2, 3), 7),
                                        jnp.array([3, 3])),
         r"labels must lie in \[0, C=4\)"),
        (lambda: L.masked_cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), int),
                                        jnp.array([3, 3]), mask=jnp.ones((2, 3))),
         r"either lengths or mask"),
        (lambda: L.masked_binary_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4))),
         r"targets must have the shape of logits \(2, 3\), got \(2, 4\)"),
        (lambda: L.mean_valid(jnp.zeros((2, 3, 4)), jnp.array([1, 4])),
         r"mean_valid: lengths must lie in \[0, T=3\]"),
        (lambda: L.last_valid(jnp.zeros((2, 3)), None),
         r"last_valid: ys must have rank 3"),
        (lambda: L.mse(jnp.zeros((2, 3)), jnp.zeros((3, 2))),
         r"mse: targets must have the shape"),
    ],
)
def test_loss_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------
# train step
# --------------------------------------------------------------------------


def test_jitted_step_equals_manual_optax_update():
    opt = optax.adam(1e-2)
    params = {"w": jnp.arange(3.0).reshape(3, 1) / 3, "b": jnp.ones((1,))}
    batch = linreg_batches(jax.random.key(0))
    # manual reference: two plain optax updates (jitted only to save dispatch time)
    @jax.jit
    def manual(params):
        o = opt.init(params)
        upd, o = opt.update(jax.grad(linreg_loss)(params, batch), o, params)
        p1 = optax.apply_updates(params, upd)
        upd, o = opt.update(jax.grad(linreg_loss)(p1, batch), o, p1)
        return p1, optax.apply_updates(p1, upd)

    ref_params, ref_params2 = manual(params)

    step = make_train_step(linreg_loss, opt)
    state = init_state(params, opt)
    state, m = step(state, batch)
    np.testing.assert_allclose(m["loss"], linreg_loss(params, batch), rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(state.params[k], ref_params[k], rtol=1e-6)
    state, _ = step(state, batch)
    for k in params:
        np.testing.assert_allclose(state.params[k], ref_params2[k], rtol=1e-6)
    assert int(state.step) == 2
    # the caller's params were not donated away
    assert float(params["b"][0]) == 1.0


def test_clipping_huge_gradients_and_grad_norm():
    def loss_fn(p, batch):
        return 1e8 * jnp.sum(p["a"] ** 2) + 1e8 * jnp.sum(p["c"])

    params = {"a": np.array([1.0, -2.0], np.float32),
              "c": np.ones((2, 2), np.float32)}
    # analytic gradient: d/da = 2e8 a, d/dc = 1e8 (NumPy, float64)
    g = {"a": 2e8 * params["a"].astype(np.float64), "c": np.full((2, 2), 1e8)}
    ref_norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    opt = optax.sgd(1.0)
    step = make_train_step(loss_fn, opt, clip_norm=0.5)
    state, m = step(init_state(params, opt), None)
    np.testing.assert_allclose(float(m["grad_norm"]), ref_norm, rtol=1e-5)
    new = jax.device_get(state.params)
    delta = {k: new[k].astype(np.float64) - params[k] for k in params}
    assert all(np.all(np.isfinite(x)) for x in delta.values())
    # clipped SGD step: -g * 0.5 / ||g||
    for k in params:
        np.testing.assert_allclose(delta[k], -g[k] * 0.5 / ref_norm, rtol=1e-4)
    # same as chaining optax.clip_by_global_norm before the optimizer
    tx = optax.chain(optax.clip_by_global_norm(0.5), opt)

    @jax.jit
    def chained(params):
        u, _ = tx.update(jax.grad(loss_fn)(params, None), tx.init(params), params)
        return optax.apply_updates(params, u)

    ref = chained(params)
    for k in params:
        np.testing.assert_allclose(new[k], ref[k], rtol=1e-6)


def test_has_aux_metrics_and_reserved_names():
    def loss_fn(p, b):
        l = linreg_loss(p, b)
        return l, {"rmse": jnp.sqrt(l)}

    opt = optax.sgd(0.1)
    step = make_train_step(loss_fn, opt, has_aux=True)
    _, m = step(init_state(zeros_params(), opt), linreg_batches(jax.random.key(1)))
    np.testing.assert_allclose(m["rmse"], np.sqrt(m["loss"]), rtol=1e-6)
    bad = make_train_step(lambda p, b: (linreg_loss(p, b), {"loss": 0.0}), opt,
                          has_aux=True)
    with pytest.raises(ValueError, match="reserved"):
        bad(init_state(zeros_params(), opt), linreg_batches(jax.random.key(1)))


def test_step_errors():
    with pytest.raises(ValueError, match="clip_norm must be a positive"):
        make_train_step(linreg_loss, optax.sgd(0.1), clip_norm=-1.0)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        make_train_step(linreg_loss, "adam")
    step = make_train_step(lambda p, b: (p["w"] - 1.0) ** 2, optax.sgd(0.1))
    with pytest.raises(ValueError, match="scalar loss"):
        step(init_state(zeros_params(), optax.sgd(0.1)), None)


# --------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------


def test_fit_linear_regression_with_adam():
    opt = optax.adam(5e-2)
    step = make_train_step(linreg_loss, opt)
    state, hist = fit(step, init_state(zeros_params(), opt), linreg_batches,
                      num_steps=400, progress=False)
    assert hist.train[0]["loss"] > 1.0
    assert hist.train[-1]["loss"] < 1e-3
    np.testing.assert_allclose(state.params["w"], W_TRUE, atol=2e-2)
    assert hist.stop_reason == "num_steps"
    assert [r["step"] for r in hist.train] == list(range(1, 401))
    assert int(state.step) == 400


def logistic_setup():
    w = np.array([2.0, -1.0], np.float32)

    def batches(key):
        x = jax.random.normal(key, (64, 2))
        return x, (x @ w > 0).astype(jnp.float32)

    def loss_fn(p, b):
        x, y = b
        logit = x @ p["w"] + p["b"]
        loss = jnp.mean(optax.losses.sigmoid_binary_cross_entropy(logit, y))
        return loss, {"accuracy": jnp.mean((logit > 0) == (y > 0.5))}

    xe, ye = batches(jax.random.key(123))

    def eval_fn(state):
        logit = xe @ state.params["w"] + state.params["b"]
        return {"accuracy": jnp.mean((logit > 0) == (ye > 0.5))}

    params = {"w": jnp.zeros((2,)), "b": jnp.zeros(())}
    return batches, loss_fn, eval_fn, params


def test_fit_logistic_early_stop_on_target_and_logs(tmp_path):
    batches, loss_fn, eval_fn, params = logistic_setup()
    opt = optax.adam(1e-1)
    step = make_train_step(loss_fn, opt, has_aux=True)
    state, hist = fit(step, init_state(params, opt), batches, num_steps=2000,
                      eval_fn=eval_fn, eval_every=5, target=("accuracy", 0.98),
                      progress=True, log_path=tmp_path / "run" / "hist")
    assert hist.stop_reason == "target"
    assert hist.eval[-1]["accuracy"] >= 0.98
    assert len(hist.train) < 2000 and len(hist.train) % 5 == 0
    assert hist.eval[-1]["step"] == hist.train[-1]["step"]
    assert "accuracy" in hist.train[-1]
    # JSON and CSV written and consistent with the history
    js = json.loads((tmp_path / "run" / "hist.json").read_text())
    assert js["train"] == hist.train and js["eval"] == hist.eval
    assert js["stop_reason"] == "target"
    with open(tmp_path / "run" / "hist.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(hist.train)
    assert list(rows[0])[:3] == ["step", "loss", "grad_norm"]
    assert "eval_accuracy" in rows[0]
    assert rows[4]["eval_accuracy"] != "" and rows[0]["eval_accuracy"] == ""
    np.testing.assert_allclose(float(rows[-1]["loss"]), hist.train[-1]["loss"])
    steps, acc = hist.series("accuracy", "eval")
    assert steps[-1] == hist.train[-1]["step"] and acc[-1] >= 0.98


def test_fit_is_deterministic_given_seed():
    batches, loss_fn, eval_fn, params = logistic_setup()
    opt = optax.adam(1e-1)
    step = make_train_step(loss_fn, opt, has_aux=True)
    runs = [fit(step, init_state(params, opt), batches, num_steps=20,
                eval_fn=eval_fn, eval_every=7, progress=False, seed=s)[1]
            for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0].train != runs[2].train
    # eval at 7, 14 and a final one at 20
    assert [r["step"] for r in runs[0].eval] == [7, 14, 20]


def test_fit_iterator_batches_and_data_exhaustion():
    opt = optax.sgd(0.1)
    step = make_train_step(linreg_loss, opt)
    data = [linreg_batches(jax.random.key(i)) for i in range(5)]
    state, hist = fit(step, init_state(zeros_params(), opt), iter(data),
                      num_steps=10, progress=False)
    assert hist.stop_reason == "data_exhausted" and len(hist.train) == 5
    # a second fit continues the step numbering from state.step
    state, hist2 = fit(step, state, data, num_steps=2, progress=False)
    assert [r["step"] for r in hist2.train] == [6, 7]


def test_nan_loss_stops_with_step_and_last_good_state(tmp_path):
    def loss_fn(p, b):
        return jnp.mean((b[0] @ p["w"] + p["b"] - b[1]) ** 2) + b[2]

    good = linreg_batches(jax.random.key(0))
    data = [(*good, 0.0)] * 3 + [(*good, jnp.nan)] + [(*good, 0.0)] * 3
    opt = optax.adam(1e-2)
    step = make_train_step(loss_fn, opt)
    # the reference: three good steps
    ref, _ = fit(step, init_state(zeros_params(), opt), data[:3], num_steps=3,
                 progress=False)
    with pytest.raises(NonFiniteLossError, match="step 4") as ei:
        fit(step, init_state(zeros_params(), opt), data, num_steps=7,
            progress=False, log_path=tmp_path / "h")
    err = ei.value
    assert isinstance(err, FloatingPointError)
    assert err.step == 4 and math.isnan(err.metrics["loss"])
    assert isinstance(err.state, TrainState) and int(err.state.step) == 3
    for k in ("w", "b"):
        np.testing.assert_array_equal(err.state.params[k], ref.params[k])
        assert np.all(np.isfinite(err.state.params[k]))
    assert len(err.history.train) == 3 and err.history.stop_reason == "non_finite"
    assert json.loads((tmp_path / "h.json").read_text())["stop_reason"] == "non_finite"


def test_inf_gradient_is_not_applied():
    opt = optax.sgd(0.1)
    step = make_train_step(lambda p, b: jnp.sum(jnp.sqrt(p * b)), opt)
    state = init_state(jnp.zeros(2), opt)
    state, m = step(state, jnp.ones(2))  # d sqrt(x)/dx at 0 = inf
    assert math.isinf(float(m["grad_norm"]))
    assert int(state.step) == 0 and np.all(np.asarray(state.params) == 0)


def test_fit_errors():
    opt = optax.sgd(0.1)
    step = make_train_step(linreg_loss, opt)
    s = init_state(zeros_params(), opt)
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        fit(step, s, linreg_batches, num_steps=0)
    with pytest.raises(ValueError, match="target must be"):
        fit(step, s, linreg_batches, num_steps=1, target="accuracy")
    with pytest.raises(TypeError, match="batches must be an iterable"):
        fit(step, s, 42, num_steps=1)


# --------------------------------------------------------------------------
# flax.nnx
# --------------------------------------------------------------------------


def test_nnx_linear_trains_through_fit():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(5e-2), wrt=nnx.Param)

    def loss_fn(m, batch):
        x, y = batch
        return jnp.mean((m(x) - y) ** 2)

    step = make_nnx_train_step(loss_fn, clip_norm=10.0)
    xe, ye = linreg_batches(jax.random.key(99))

    def eval_fn(state):
        m, _ = state
        return {"mse": jnp.mean((m(xe) - ye) ** 2)}

    (model2, opt2), hist = fit(step, (model, optimizer), linreg_batches,
                               num_steps=400, eval_fn=eval_fn, eval_every=50,
                               target=("mse", 1e-4), progress=False)
    assert model2 is model and opt2 is optimizer
    assert hist.stop_reason == "target"
    assert hist.eval[-1]["mse"] <= 1e-4 < hist.train[0]["loss"]
    np.testing.assert_allclose(model.kernel[...], W_TRUE, atol=2e-2)
    assert int(optimizer.step[...]) == hist.train[-1]["step"]


def test_nnx_step_matches_manual_and_nan_is_not_applied():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(1))
    w0 = np.asarray(model.kernel[...]); b0 = np.asarray(model.bias[...])
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    step = make_nnx_train_step(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2))
    x, y = linreg_batches(jax.random.key(5))
    # manual: plain JAX grad of the same function
    def f(w, b):
        return jnp.mean((x @ w + b - y) ** 2)
    gw, gb = jax.grad(f, argnums=(0, 1))(w0, b0)
    state, m = step((model, optimizer), (x, y))
    np.testing.assert_allclose(m["loss"], f(w0, b0), rtol=1e-6)
    np.testing.assert_allclose(model.kernel[...], w0 - 0.1 * gw, rtol=1e-5)
    np.testing.assert_allclose(model.bias[...], b0 - 0.1 * gb, rtol=1e-5)
    w1 = np.asarray(model.kernel[...])
    bad = (x.at[0, 0].set(jnp.nan), y)
    with pytest.raises(NonFiniteLossError, match="step 2") as ei:
        fit(step, state, [bad], num_steps=1, progress=False)
    np.testing.assert_array_equal(ei.value.state[0].kernel[...], w1)
    assert int(optimizer.step[...]) == 1
    with pytest.raises(TypeError, match=r"\(model, nnx.Optimizer\)"):
        step(model, (x, y))
