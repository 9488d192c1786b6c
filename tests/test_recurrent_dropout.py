"""Variational recurrent dropout (``recurrent_dropout=``, `seqjax.scan`'s ``recurrent_mask``) and the learned
initial carry (``learnable_initial_carry=True``), against NumPy transcriptions of the masked recurrences."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

import seqjax
from seqjax import nnx as snx

B, T, I, H = 3, 6, 4, 8
RATE = 0.4


def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def np_masked(cell_kind, p, xs, mask, h0=None, c0=None, lengths=None, reverse=False):
    """NumPy transcription: h_{t-1} * mask feeds the recurrent matmul at every step (one mask [B, O] for all t)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    xs, mask = np.asarray(xs, np.float64), np.asarray(mask, np.float64)
    Bn, Tn, _ = xs.shape
    h = np.zeros((Bn, H)) if h0 is None else np.asarray(h0, np.float64).copy()
    c = np.zeros((Bn, H)) if c0 is None else np.asarray(c0, np.float64).copy()
    ys = np.zeros((Bn, Tn, H))
    for b in range(Bn):
        n = Tn if lengths is None else int(lengths[b])
        hb, cb = h[b].copy(), c[b].copy()
        for t in (reversed(range(n)) if reverse else range(n)):
            x, hm = xs[b, t], hb * mask[b]
            if cell_kind == "lstm":
                a = x @ p.w_x + p.b + hm @ p.w_h
                i, f, g, o = (a[k * H:(k + 1) * H] for k in range(4))
                cb = _sig(f) * cb + _sig(i) * np.tanh(g)
                hb = _sig(o) * np.tanh(cb)
            elif cell_kind == "gru":                     # reset_after=True; z interpolates the unmasked h
                px, gh = x @ p.w_x + p.b, hm @ p.w_h
                r, z = _sig(px[:H] + gh[:H]), _sig(px[H:2 * H] + gh[H:2 * H])
                nn = np.tanh(px[2 * H:] + r * (gh[2 * H:] + p.b_hn))
                hb = (1 - z) * nn + z * hb
            elif cell_kind == "gru_cho":                 # reset_after=False: (r * masked h) W_hn
                px = x @ p.w_x + p.b
                r = _sig(px[:H] + hm @ p.w_h[:, :H])
                z = _sig(px[H:2 * H] + hm @ p.w_h[:, H:2 * H])
                nn = np.tanh(px[2 * H:] + (r * hm) @ p.w_h[:, 2 * H:])
                hb = (1 - z) * nn + z * hb
            else:
                hb = np.tanh(x @ p.w_x + p.b + hm @ p.w_h)
            ys[b, t] = hb
        h[b], c[b] = hb, cb
    return h, c, ys


CELLS = {"lstm": lambda: seqjax.lstm(H), "gru": lambda: seqjax.gru(H),
         "gru_cho": lambda: seqjax.gru(H, reset_after=False), "rnn": lambda: seqjax.rnn(H)}


def documented_mask(key, rate=RATE, shape=(B, H)):
    """The mask `seqjax.sequence(..., recurrent_dropout=rate).apply(..., key=key)` draws, as its docstring says."""
    return jnp.where(jax.random.bernoulli(key, 1.0 - rate, shape), 1.0 / (1.0 - rate), 0.0)


@pytest.fixture(scope="module")
def xs():
    return jax.random.normal(jax.random.key(0), (B, T, I))


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_scan_recurrent_mask_matches_numpy(kind, xs):
    cell = CELLS[kind]()
    params = cell.init(jax.random.key(1), I)
    mask = jax.random.uniform(jax.random.key(2), (B, H), minval=0.0, maxval=2.0)
    lengths = np.array([T, 2, 0])
    carry, ys = seqjax.scan(cell, params, xs, recurrent_mask=mask, lengths=lengths)
    h, c, ys_np = np_masked(kind, params, xs, mask, lengths=lengths)
    np.testing.assert_allclose(ys, ys_np, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(carry.h if kind == "lstm" else carry, h, rtol=2e-5, atol=2e-5)
    _, ys_rev = seqjax.unrolled(cell, params, xs, recurrent_mask=mask, lengths=lengths, reverse=True)
    np.testing.assert_allclose(ys_rev, np_masked(kind, params, xs, mask, lengths=lengths, reverse=True)[2],
                               rtol=2e-5, atol=2e-5)


def test_layer_mask_is_one_per_sequence_reused_at_every_step(xs):
    cell = seqjax.lstm(H)
    layer = seqjax.sequence(cell, recurrent_dropout=RATE)
    params = layer.init(jax.random.key(1), I)
    key = jax.random.key(5)
    _, ys = layer.apply(params, xs, key=key)
    mask = documented_mask(key)
    np.testing.assert_allclose(ys, np_masked("lstm", params, xs, mask)[2], rtol=2e-5, atol=2e-5)
    # one draw per (row, unit): the rows' masks differ, and with the same sequence in every row the outputs differ
    assert len({tuple(np.asarray(m)) for m in mask}) == B
    same = jnp.broadcast_to(xs[:1], xs.shape)
    _, ys_same = layer.apply(params, same, key=key)
    assert not np.allclose(ys_same[0], ys_same[1])
    _, ys_eval = layer.apply(params, same)
    np.testing.assert_array_equal(ys_eval[0], ys_eval[1])


def test_mask_statistics_and_scale():
    layer = seqjax.sequence(seqjax.rnn(256), recurrent_dropout=0.3)
    params = layer.init(jax.random.key(0), 2)
    m = documented_mask(jax.random.key(3), 0.3, (64, 256))
    assert abs(float(jnp.mean(m == 0)) - 0.3) < 0.02
    np.testing.assert_allclose(np.unique(np.asarray(m)), [0.0, 1 / 0.7], rtol=1e-6)
    assert layer.apply(params, jnp.ones((64, 3, 2)), key=jax.random.key(3))[1].shape == (64, 3, 256)


def test_reproducible_from_the_key_and_off_at_evaluation(xs):
    layer = seqjax.multilayer(seqjax.gru(H), 2, recurrent_dropout=RATE)
    plain = seqjax.multilayer(seqjax.gru(H), 2)
    params = layer.init(jax.random.key(1), I)
    _, a = layer.apply(params, xs, key=jax.random.key(7))
    _, b = jax.jit(lambda p, x, k: layer.apply(p, x, key=k))(params, xs, jax.random.key(7))
    _, c = layer.apply(params, xs, key=jax.random.key(8))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(layer.apply(params, xs)[1], plain.apply(params, xs)[1])


def test_bidirectional_with_lengths_uses_one_mask_per_direction(xs):
    cell = seqjax.lstm(H)
    layer = seqjax.bidirectional(cell, recurrent_dropout=RATE)
    params = layer.init(jax.random.key(1), I)
    key, lengths = jax.random.key(4), jnp.array([T, 3, 1])
    _, ys = layer.apply(params, xs, key=key, lengths=lengths)
    kf, kb = jax.random.split(key)            # each direction draws from its half of the key
    yf = np_masked("lstm", params.forward, xs, documented_mask(kf), lengths=lengths)[2]
    yb = np_masked("lstm", params.backward, xs, documented_mask(kb), lengths=lengths, reverse=True)[2]
    np.testing.assert_allclose(ys, np.concatenate([yf, yb], -1), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(ys)[1, 3:] == 0)


def test_native_kernels_are_skipped_under_a_mask_and_explained(xs):
    cell = seqjax.lstm(H)                     # H = 8: seqjax's AVX2 kernels run it when there is no mask
    params = cell.init(jax.random.key(1), I)
    mask = documented_mask(jax.random.key(2))
    e = seqjax.backends.explain(cell, params, xs, recurrent_mask=mask)
    assert e.backend == "xla"
    reasons = dict(e.reasons)
    assert "recurrent_mask" in reasons["avx2"] and "recurrent_mask" in reasons["xla+custom_vjp"]
    with pytest.raises(ValueError, match="kernel='avx2' cannot run this call: a recurrent_mask"):
        seqjax.scan(cell, params, xs, recurrent_mask=mask, kernel="avx2")
    # the layer: training takes XLA's loop, evaluation the path the call takes without dropout
    layer = seqjax.multilayer(cell, 2, recurrent_dropout=RATE)
    lp = layer.init(jax.random.key(1), I)
    auto = layer.apply(lp, xs, key=jax.random.key(3))[1]
    ref = seqjax.multilayer(cell, 2, recurrent_dropout=RATE, kernel="xla", backward="autodiff")
    np.testing.assert_allclose(auto, ref.apply(lp, xs, key=jax.random.key(3))[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.apply(lp, xs)[1], ref.apply(lp, xs)[1], rtol=2e-5, atol=2e-5)


def test_masked_gradients(xs):
    cell = seqjax.gru(H)
    params = cell.init(jax.random.key(1), I)
    mask = documented_mask(jax.random.key(2))
    loss = lambda p, m: jnp.sum(seqjax.scan(cell, p, xs, recurrent_mask=m)[1] ** 2)  # noqa: E731
    check_grads(lambda p: loss(p, mask), (params,), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)
    g = jax.grad(loss)(params, mask)
    g_ref = jax.grad(lambda p: jnp.sum(seqjax.unrolled(cell, p, xs, recurrent_mask=mask)[1] ** 2))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)


def test_bad_rates_and_cells_are_named():
    with pytest.raises(ValueError, match=r"seqjax.multilayer: recurrent_dropout must be a float in \[0, 1\), got 1.0"):
        seqjax.multilayer(seqjax.lstm(4), recurrent_dropout=1.0)
    with pytest.raises(ValueError, match="seqjax.deep: recurrent_dropout must be a float in"):
        seqjax.deep([seqjax.lstm(4)], recurrent_dropout=-0.1)
    with pytest.raises(ValueError, match="seqjax.sequence: recurrent_dropout must be a float in"):
        seqjax.sequence(seqjax.lstm(4), recurrent_dropout=True)
    with pytest.raises(ValueError, match=r"seqjax.nnx.GRU: recurrent_dropout must be a float in \[0, 1\)"):
        snx.GRU(I, 4, recurrent_dropout=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="seqjax.multilayer: recurrent_dropout needs a cell whose h_.t-1. enters a "
                                         "recurrent matmul.*min_gru"):
        seqjax.multilayer(seqjax.min_gru(4), recurrent_dropout=0.2)
    with pytest.raises(ValueError, match="seqjax.deep: recurrent_dropout=0.2 applies to layers given as cells"):
        seqjax.deep([seqjax.sequence(seqjax.lstm(4))], recurrent_dropout=0.2)
    cell = seqjax.lstm(H)
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=r"seqjax.scan: recurrent_mask must be a floating-point array of shape "
                                         r"\(B, O\)=\(3, 8\), got shape \(3, 4\)"):
        seqjax.scan(cell, params, jnp.ones((B, T, I)), recurrent_mask=jnp.ones((B, 4)))
    stacked = seqjax.stack([cell, seqjax.lstm(H)])
    with pytest.raises(ValueError, match="seqjax.scan: recurrent_mask needs .*a stacked cell"):
        seqjax.scan(stacked, stacked.init(jax.random.key(0), I), jnp.ones((B, T, I)), recurrent_mask=jnp.ones((B, H)))
    with pytest.raises(ValueError, match="seqjax.multilayer: learnable_initial_carry must be a bool"):
        seqjax.multilayer(cell, learnable_initial_carry=1)


# ----------------------------------------------------------------------------------------- learned initial carry


def test_learned_carry_is_the_start_and_an_explicit_carry_wins(xs):
    layer = seqjax.multilayer(seqjax.lstm(H), 2, learnable_initial_carry=True)
    plain = seqjax.multilayer(seqjax.lstm(H), 2)
    params = layer.init(jax.random.key(1), I)
    assert isinstance(params, seqjax.InitialCarryParams)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params.layer, plain.init(jax.random.key(1), I))
    assert [a.shape for a in jax.tree.leaves(params.carry)] == [(H,)] * 4      # 2 layers x (h, c)
    np.testing.assert_array_equal(layer.apply(params, xs)[1], plain.apply(params.layer, xs)[1])   # zeros at init
    learned = jax.tree.map(lambda a: jax.random.normal(jax.random.key(9), a.shape), params.carry)
    params = params._replace(carry=learned)
    start = jax.tree.map(lambda a: jnp.broadcast_to(a, (B, H)), learned)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), layer.initial_carry(params, (B,)), start)
    np.testing.assert_allclose(layer.apply(params, xs)[1], plain.apply(params.layer, xs, carry=start)[1],
                               rtol=1e-6, atol=1e-6)
    other = plain.initial_carry(params.layer, (B,))
    np.testing.assert_array_equal(layer.apply(params, xs, carry=other)[1], plain.apply(params.layer, xs)[1])
    g = jax.grad(lambda c: jnp.sum(layer.apply(params._replace(carry=c), xs, carry=other)[1]))(learned)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g))


def test_learned_carry_gradients(xs):
    with jax.enable_x64(True):
        layer = seqjax.sequence(seqjax.gru(H, param_dtype=jnp.float64), learnable_initial_carry=True)
        params = layer.init(jax.random.key(1), I)
        x64 = xs.astype(jnp.float64)
        lengths = jnp.array([T, 2, 0])
        f = lambda c: jnp.sum(jnp.tanh(layer.apply(params._replace(carry=c), x64, lengths=lengths)[1]))  # noqa: E731
        check_grads(f, (params.carry,), order=1, modes=["rev"])
        g = jax.grad(f)(params.carry)
        assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g))
    # float32 on the native kernel path (kernel="auto") gives the reference path's gradient
    layer = seqjax.multilayer(seqjax.lstm(H), 1, learnable_initial_carry=True)
    ref = seqjax.multilayer(seqjax.lstm(H), 1, learnable_initial_carry=True, kernel="xla", backward="autodiff")
    params = layer.init(jax.random.key(1), I)
    assert seqjax.backends.explain(seqjax.lstm(H), params.layer[0], xs).backend.startswith("avx")
    grads = [jax.grad(lambda p: jnp.sum(lay.apply(p, xs)[1] ** 2))(params) for lay in (layer, ref)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)
    assert float(jnp.abs(grads[0].carry[0].c).max()) > 0


def test_learned_carry_with_tbptt_state_taking_precedence():
    """tbptt.fit starts from initial_carry (here the learned carry) and hands every window the previous one's carry."""
    layer = seqjax.sequence(seqjax.rnn(H), learnable_initial_carry=True)

    def model(params, carry, x, *, resets=None, key=None):
        return layer.apply(params, x, carry=carry, resets=resets, time_major=True, key=key)

    params = layer.init(jax.random.key(0), 1)
    params = params._replace(carry=jnp.linspace(-0.5, 0.5, H))
    xs = jax.random.normal(jax.random.key(1), (12, 2, 1))
    opt = optax.sgd(0.0)                               # the params stay put, so the carry path can be checked
    step = seqjax.tbptt.make_step(model, lambda out, y: jnp.mean((out - y) ** 2, -1), opt, k1=4)
    state = seqjax.train.init_state(params, opt)
    h0 = layer.initial_carry(params, (2,))
    _, final, hist = seqjax.tbptt.fit(step, state, seqjax.tbptt.Stream(xs, jnp.zeros((12, 2, H))), initial_carry=h0)
    assert len(hist.train) == 3                        # three windows of 4 steps
    whole, _ = layer.apply(params, xs, time_major=True)   # one run of all 12 steps from the learned carry
    np.testing.assert_allclose(final, whole, rtol=1e-5, atol=1e-6)
    zeros, _ = layer.apply(params, xs, carry=jnp.zeros((2, H)), time_major=True)
    assert not np.allclose(whole, zeros)


def test_nnx_module_trains_the_learned_carry_and_switches_recurrent_dropout():
    rngs = nnx.Rngs(0, dropout=1)
    m = snx.LSTM(I, H, num_layers=2, recurrent_dropout=RATE, learnable_initial_carry=True, rngs=rngs)
    xs = jax.random.normal(jax.random.key(0), (B, T, I))
    assert isinstance(m.get_params(), seqjax.InitialCarryParams)
    a, b = m(xs), m(xs)                            # training: a fresh mask per call
    assert not np.allclose(a, b)
    m.eval()
    plain = snx.LSTM(I, H, num_layers=2, rngs=nnx.Rngs(0))
    plain.set_params(m.get_params().layer)
    np.testing.assert_allclose(m(xs), plain(xs), rtol=1e-6, atol=1e-6)
    m.train()
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(m, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(m)
        opt.update(m, g)
        return loss

    for _ in range(3):
        train_step(m, opt, xs)
    assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(m.get_params().carry))
