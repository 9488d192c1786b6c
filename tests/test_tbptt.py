"""Truncated BPTT: data layout, windows, gradients against full BPTT, carried state, the k1 < k2 schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import seqjax
from seqjax import tbptt
from seqjax.tbptt import Stream, Window
from seqjax.train import TrainState, init_state

jax.config.update("jax_enable_x64", False)

V, E, H, B = 7, 3, 5, 2
CELL = seqjax.rnn(H)


@jax.jit
def _make_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"emb": jax.random.normal(k1, (V, E)), "cell": CELL.init(k2, E),
            "w": 0.5 * jax.random.normal(k3, (H, V)), "b": jnp.zeros(V)}


def make_params(seed=0):
    return _make_params(jax.random.key(seed))


def model(params, carry, xs, *, resets=None, key=None):
    """Token ids [T, B] -> logits [T, B, V]."""
    carry, hs = seqjax.scan(CELL, params["cell"], params["emb"][xs], carry=carry, resets=resets, time_major=True)
    return carry, hs @ params["w"] + params["b"]


def loss_fn(logits, targets):
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)


def zeros():
    return jnp.zeros((B, H))


def stream(n, seed=1):
    return jax.random.randint(jax.random.key(seed), (n, B), 0, V)


def sgd_grad(step, params, carry, window):
    """The gradient a step applies, read back through plain SGD with learning rate 1."""
    state = init_state(params, optax.sgd(1.0))
    new, c, m = step(state, jnp.array(carry), window)
    return jax.tree.map(lambda a, b: a - b, params, new.params), c, m


def assert_tree_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ----------------------------------------------------------------------------- layout


def test_batchify_matches_seed_figure():
    letters = list("abcdefghijklmnopqrstuvwxyz")
    got = tbptt.batchify(letters, 4)
    want = np.array([list("agms"), list("bhnt"), list("ciou"), list("djpv"), list("ekqw"), list("flrx")])
    np.testing.assert_array_equal(got, want)
    # seed 000: with T = 3, x[1:T] and y[1:T] (1-based) are the first window
    x, y = next(tbptt.windows(got, 3))
    np.testing.assert_array_equal(x, [list("agms"), list("bhnt"), list("ciou")])
    np.testing.assert_array_equal(y, [list("bhnt"), list("ciou"), list("djpv")])


def test_batchify_keeps_feature_axes():
    x = np.arange(20).reshape(10, 2)
    got = tbptt.batchify(x, 3)
    assert got.shape == (3, 3, 2)
    np.testing.assert_array_equal(got[:, 1], x[3:6])


def test_windows_lm_and_targets():
    data = tbptt.batchify(np.arange(26), 4)          # [6, 4]
    ws = list(tbptt.windows(data, 3))
    assert [w[0].shape[0] for w in ws] == [3, 2]
    np.testing.assert_array_equal(ws[1][0][:, 0], [3, 4])
    np.testing.assert_array_equal(ws[1][1][:, 0], [4, 5])
    assert len(list(tbptt.windows(data, 3, drop_last=True))) == 1
    tg = data * 10
    ws = list(tbptt.windows(data, 2, targets=tg))
    assert len(ws) == 3
    np.testing.assert_array_equal(ws[2][1], tg[4:6])
    ws = list(tbptt.windows(data, 4, stride=2, drop_last=True))  # TBPTT(k1=2, k2=4)
    assert [int(w[0][0, 0]) for w in ws] == [0]
    ws = list(tbptt.windows(data, 3, stride=2, drop_last=True))
    assert [int(w[0][0, 0]) for w in ws] == [0, 2]


def test_errors_name_argument_expected_and_given():
    with pytest.raises(ValueError, match=r"batch_size=5 leaves no data.*4 tokens"):
        tbptt.batchify([1, 2, 3, 4], 5)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        tbptt.batchify([1, 2, 3], 0)
    data = tbptt.batchify(np.arange(26), 4)
    with pytest.raises(ValueError, match=r"T=6 are longer than the stream: expected at least 6 \+ 1 = 7.*got 6"):
        list(tbptt.windows(data, 6))
    with pytest.raises(ValueError, match="T must be a positive int"):
        list(tbptt.windows(data, 0))
    with pytest.raises(ValueError, match="k2 .* must be >= k1"):
        tbptt.make_step(model, loss_fn, optax.sgd(0.1), k1=5, k2=3)
    step = tbptt.make_step(model, loss_fn, optax.sgd(0.1), k1=8)
    with pytest.raises(ValueError, match="T=8 are longer than the stream"):
        tbptt.fit(step, init_state(make_params(), optax.sgd(0.1)), Stream(stream(8)), initial_carry=zeros())
    with pytest.raises(ValueError, match="time-major"):
        tbptt.fit(step, init_state(make_params(), optax.sgd(0.1)), Stream(np.arange(30)), initial_carry=zeros())


# ----------------------------------------------------------------------------- correctness


def full_loss(params, xs, ys, carry=None, start=0):
    _, logits = model(params, zeros() if carry is None else carry, xs)
    return jnp.mean(loss_fn(logits, ys)[start:])


def test_single_window_gradient_equals_full_bptt():
    T = 9
    s = stream(T + 1)
    params = make_params()
    step = tbptt.make_step(model, loss_fn, optax.sgd(1.0), k1=T)
    g, _, m = sgd_grad(step, params, zeros(), Window(s[:-1], s[1:], None, jnp.int32(0)))
    loss, want = jax.value_and_grad(full_loss)(params, s[:-1], s[1:])
    assert_tree_close(g, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-6)


def test_carried_state_equals_one_long_scan():
    T, n = 4, 5
    s = stream(n * T + 1)
    params = make_params()
    long_carry, _ = model(params, zeros(), s[:n * T])
    # training with a zero learning rate: the carry after n windows
    opt = optax.sgd(0.0)
    step = tbptt.make_step(model, loss_fn, opt, k1=T)
    _, carry, hist = tbptt.fit(step, init_state(params, opt), Stream(s), initial_carry=zeros())
    assert len(hist.train) == n
    np.testing.assert_allclose(carry, long_carry, rtol=1e-5, atol=1e-6)
    # stateful evaluation: same carry and the same loss whatever the window length
    ev = tbptt.make_eval(model, loss_fn)
    (m3, c3), (m7, c7) = (tbptt.evaluate(ev, params, Stream(s), T=t, initial_carry=zeros()) for t in (5, 10))
    np.testing.assert_allclose(c3, long_carry, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c7, long_carry, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m3["loss"], full_loss(params, s[:-1], s[1:]), rtol=1e-5)
    np.testing.assert_allclose(m3["loss"], m7["loss"], rtol=1e-5)
    assert m3["count"] == n * T * B


def test_stop_gradient_cuts_between_windows():
    T = 4
    params = make_params()
    xs = jax.random.normal(jax.random.key(3), (2 * T, B, E))
    ys = stream(2 * T, seed=4)

    def cmodel(p, carry, x, *, resets=None, key=None):       # continuous inputs [T, B, E]
        carry, hs = seqjax.scan(CELL, p["cell"], x, carry=carry, resets=resets, time_major=True)
        return carry, hs @ p["w"] + p["b"]

    step = tbptt.make_step(cmodel, loss_fn, optax.sgd(0.1), k1=T, jit=False)   # traced inside the outer jit
    state = TrainState(jnp.int32(0), params, optax.sgd(0.1).init(params))

    def window2_loss(x1):
        _, c1, _ = step(state, zeros(), Window(x1, ys[:T], None, 0))
        _, _, m = step(state, c1, Window(xs[T:], ys[T:], None, 0))
        return m["loss"]

    g = jax.jit(jax.grad(window2_loss))(xs[:T])
    assert float(jnp.max(jnp.abs(g))) == 0.0

    def uncut(x1):                                            # full BPTT: the gradient does flow back
        _, logits = cmodel(params, zeros(), jnp.concatenate([x1, xs[T:]]))
        return jnp.mean(loss_fn(logits[T:], ys[T:]))

    assert float(jnp.max(jnp.abs(jax.grad(uncut)(xs[:T])))) > 1e-4


def test_k1_less_than_k2_schedule():
    k1, k2 = 2, 5
    N = 12                                                   # windows start at 0, 2, 4, 6 (6 + 5 + 1 = 12)
    s = stream(N)
    params = make_params()
    step = tbptt.make_step(model, loss_fn, optax.sgd(1.0), k1=k1, k2=k2)
    # window 0 (after a reset): loss on all k2 steps, full BPTT over them
    g0, c0, _ = sgd_grad(step, params, zeros(), Window(s[:k2], s[1:k2 + 1], None, jnp.int32(0)))
    assert_tree_close(g0, jax.grad(full_loss)(params, s[:k2], s[1:k2 + 1]), rtol=1e-5, atol=1e-6)
    # the carry handed on is the state after k1 steps, not after k2
    np.testing.assert_allclose(c0, model(params, zeros(), s[:k1])[0], rtol=1e-5, atol=1e-6)
    # window 1: starts at k1 from that carry, re-runs k2 - k1 steps, loss on the last k1 steps only
    w1 = Window(s[k1:k1 + k2], s[k1 + 1:k1 + k2 + 1], None, jnp.int32(k2 - k1))
    g1, c1, m1 = sgd_grad(step, params, c0, w1)
    want = jax.grad(full_loss)(params, s[k1:k1 + k2], s[k1 + 1:k1 + k2 + 1], c0, k2 - k1)
    assert_tree_close(g1, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["loss"], full_loss(params, w1.inputs, w1.targets, c0, k2 - k1), rtol=1e-5)
    # fit: 4 windows; the final carry is the state after 4 * k1 steps of one long scan
    opt = optax.sgd(0.0)
    step0 = tbptt.make_step(model, loss_fn, opt, k1=k1, k2=k2)
    _, carry, hist = tbptt.fit(step0, init_state(params, opt), Stream(s), initial_carry=zeros())
    assert len(hist.train) == 4
    np.testing.assert_allclose(carry, model(params, zeros(), s[:4 * k1])[0], rtol=1e-5, atol=1e-6)


def test_document_resets_and_epoch_reset():
    T = 3
    s = stream(3 * T + 1)
    resets = jnp.zeros((3 * T + 1, B), bool).at[4, 0].set(True).at[7, 1].set(True)
    params = make_params()
    want, _ = seqjax.scan(CELL, params["cell"], params["emb"][s[:3 * T]], resets=resets[:3 * T], time_major=True)
    ev = tbptt.make_eval(model, loss_fn)
    _, c = tbptt.evaluate(ev, params, Stream(s, None, resets), T=T, initial_carry=zeros())
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-6)
    # fit resets the carry at each epoch start: two epochs end in the same carry as one
    opt = optax.sgd(0.0)
    step = tbptt.make_step(model, loss_fn, opt, k1=T)
    _, c2, hist = tbptt.fit(step, init_state(params, opt), Stream(s, None, resets), initial_carry=zeros(),
                            num_epochs=2)
    np.testing.assert_allclose(c2, want, rtol=1e-5, atol=1e-6)
    assert [r["epoch"] for r in hist.train] == [0, 0, 0, 1, 1, 1]


def test_fit_learns_echo_and_aux_metrics():
    """A tiny echo task (delay 2) is learned with the carry crossing windows."""
    rng = np.random.default_rng(0)
    cell = seqjax.gru(8)

    def emodel(p, carry, xs, *, resets=None, key=None):
        carry, hs = seqjax.scan(cell, p["cell"], xs, carry=carry, resets=resets, time_major=True)
        return carry, (hs @ p["w"] + p["b"])[..., 0]

    def eloss(logits, targets):
        return (optax.losses.sigmoid_binary_cross_entropy(logits, targets),
                {"accuracy": ((logits > 0) == (targets > 0.5)).astype(jnp.float32)})

    def data(epoch):
        x = rng.integers(0, 2, (2000, 8)).astype(np.float32)
        y = np.concatenate([np.zeros((2, 8), np.float32), x[:-2]])
        return Stream(x[..., None], y)

    k = jax.random.split(jax.random.key(0), 2)
    params = {"cell": cell.init(k[0], 1), "w": 0.1 * jax.random.normal(k[1], (8, 1)), "b": jnp.zeros(1)}
    opt = optax.adam(1e-2)
    step = tbptt.make_step(emodel, eloss, opt, k1=10, has_aux=True)
    ev = tbptt.make_eval(emodel, eloss, has_aux=True)
    state, _, hist = tbptt.fit(step, init_state(params, opt), data, initial_carry=jnp.zeros((8, 8)), num_epochs=2,
                               scan_epoch=True,
                               eval_fn=lambda st: tbptt.evaluate(ev, st.params, data(-1), T=500,
                                                                 initial_carry=jnp.zeros((8, 8)))[0])
    assert hist.eval[-1]["accuracy"] > 0.97
    assert "accuracy" in hist.train[-1] and hist.train[-1]["step"] == 400


def test_scan_epoch_equals_window_loop(k1=2, k2=5):
    s = stream(20)
    resets = jnp.zeros((20, B), bool).at[6, 1].set(True)
    opt = optax.adam(1e-2)
    step = tbptt.make_step(model, loss_fn, opt, k1=k1, k2=k2)
    runs = [tbptt.fit(step, init_state(make_params(), opt), Stream(s, None, resets), initial_carry=zeros(),
                      num_epochs=2, scan_epoch=flag, key=jax.random.key(0)) for flag in (False, True)]
    (st_a, c_a, h_a), (st_b, c_b, h_b) = runs
    assert_tree_close(st_a.params, st_b.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(c_a, c_b, rtol=1e-4, atol=1e-6)
    assert [r["step"] for r in h_a.train] == [r["step"] for r in h_b.train]
    np.testing.assert_allclose([r["loss"] for r in h_a.train], [r["loss"] for r in h_b.train], rtol=1e-5)


# ----------------------------------------------------------------------------- options


def model_with_options(params, carry, xs, *, resets=None, key=None, options=None):
    """`model` with the execution options passed on to `seqjax.scan`."""
    carry, hs = seqjax.scan(CELL, params["cell"], params["emb"][xs], carry=carry, resets=resets, time_major=True,
                            options=options)
    return carry, hs @ params["w"] + params["b"]


def test_options_reach_the_models_scan():
    T = 6
    s = stream(T + 1)
    params = make_params()
    window = Window(s[:-1], s[1:], None, jnp.int32(0))
    want, c_want, _ = sgd_grad(tbptt.make_step(model_with_options, loss_fn, optax.sgd(1.0), k1=3, k2=T), params,
                               zeros(), window)
    xla = seqjax.ScanOptions(kernel="xla", unroll=2)
    got, c_got, _ = sgd_grad(tbptt.make_step(model_with_options, loss_fn, optax.sgd(1.0), k1=3, k2=T, options=xla),
                             params, zeros(), window)
    assert_tree_close(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_got, c_want, rtol=1e-5, atol=1e-6)
    ev = tbptt.make_eval(model_with_options, loss_fn, options=xla)
    m, _ = tbptt.evaluate(ev, params, Stream(s), T=T, initial_carry=zeros())
    np.testing.assert_allclose(m["loss"], full_loss(params, s[:-1], s[1:]), rtol=1e-5)
    # a kernel that cannot run the model's scan is refused by that scan: the option arrived
    step = tbptt.make_step(model_with_options, loss_fn, optax.sgd(1.0), k1=T, options=seqjax.ScanOptions(kernel="cuda"))
    with pytest.raises(ValueError, match="seqjax.scan: kernel='cuda' cannot run this call"):
        sgd_grad(step, params, zeros(), window)


def test_options_make_forward_mode_through_a_step_possible():
    T = 5
    s = stream(T + 1)
    params = make_params()
    window = Window(s[:-1], s[1:], None, jnp.int32(0))
    opt = optax.sgd(0.0)

    def step_loss(options):
        step = tbptt.make_step(model_with_options, loss_fn, opt, k1=T, jit=False, options=options)
        return lambda p: step(init_state(p, opt), zeros(), window)[2]["loss"]

    tangent = jax.tree.map(jnp.ones_like, params)
    opts = seqjax.ScanOptions(kernel="xla", backward="autodiff")
    eps = 1e-3
    want = (step_loss(opts)(jax.tree.map(lambda p, t: p + eps * t, params, tangent))
            - step_loss(opts)(jax.tree.map(lambda p, t: p - eps * t, params, tangent))) / (2 * eps)
    np.testing.assert_allclose(jax.jvp(step_loss(opts), (params,), (tangent,))[1], want, rtol=1e-2)
    # pure forward mode (no gradient inside): the evaluation of a window
    def eval_loss(options):
        ev = tbptt.make_eval(model_with_options, loss_fn, options=options)
        return lambda p: ev(p, zeros(), window)[1]["loss"]

    want = (eval_loss(opts)(jax.tree.map(lambda p, t: p + eps * t, params, tangent))
            - eval_loss(opts)(jax.tree.map(lambda p, t: p - eps * t, params, tangent))) / (2 * eps)
    np.testing.assert_allclose(jax.jvp(eval_loss(opts), (params,), (tangent,))[1], want, rtol=1e-2)
    # the default path is reverse mode only (under make_eval's jax.jit the message is JAX's own: the jit hides
    # the transformation from seqjax.scan)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(eval_loss(seqjax.ScanOptions()), (params,), (tangent,))


def test_bad_options_name_the_builder():
    for build, name in ((lambda m, o: tbptt.make_step(m, loss_fn, optax.sgd(1.0), k1=2, options=o), "make_step"),
                        (lambda m, o: tbptt.make_eval(m, loss_fn, options=o), "make_eval")):
        with pytest.raises(TypeError, match=f"seqjax.tbptt.{name}: options must be a seqjax.ScanOptions, got str"):
            build(model_with_options, "xla")
        with pytest.raises(ValueError, match=f"seqjax.tbptt.{name}: unroll must be a positive int"):
            build(model_with_options, seqjax.ScanOptions(unroll=0))
        with pytest.raises(TypeError, match=f"seqjax.tbptt.{name}: options was given, so model must take an "
                                            "options= keyword .*model has none"):
            build(model, seqjax.ScanOptions(kernel="xla"))
