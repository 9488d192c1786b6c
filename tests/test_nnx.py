"""Tests for seqjax.nnx: the NNX wrappers agree with the functional core and work with nnx transforms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import seqjax
import seqjax.nnx as snx
from seqjax.losses import last_valid, mean_valid

B, T, I = 3, 6, 5


def xs(key=0, shape=(B, T, I)):
    return jax.random.normal(jax.random.key(key), shape)


LAYERS = [
    ("rnn", lambda r: snx.RNN(I, 4, activation="relu", rngs=r), lambda: seqjax.rnn(4, activation="relu")),
    ("lstm", lambda r: snx.LSTM(I, 4, peepholes=True, rngs=r), lambda: seqjax.lstm(4, peepholes=True)),
    ("lstm_proj", lambda r: snx.LSTM(I, 6, proj_size=3, num_layers=2, rngs=r), lambda: seqjax.lstm(6, proj_size=3)),
    ("gru", lambda r: snx.GRU(I, 4, reset_after=False, bidirectional=True, rngs=r),
     lambda: seqjax.gru(4, reset_after=False)),
    ("gru_deep_bi", lambda r: snx.GRU(I, 3, num_layers=3, bidirectional=True, rngs=r), lambda: seqjax.gru(3)),
]


@pytest.mark.parametrize("name,make,cell", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_layer_matches_functional_core(name, make, cell):
    model = make(nnx.Rngs(0))
    params = model.get_params()
    # the params are the functional core's pytree, with nnx.Param leaves in the module
    layer = seqjax.multilayer(cell(), model.num_layers, bidirectional=model.bidirectional)
    assert jax.tree.structure(params) == jax.tree.structure(layer.init(jax.random.key(0), I))
    assert all(isinstance(v, nnx.Param) for v in jax.tree.leaves(model.params, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    x, lengths = xs(), jnp.array([6, 2, 0])
    carry, ys = model(x, lengths=lengths, return_carry=True)
    carry_f, ys_f = layer.apply(params, x, lengths=lengths)
    np.testing.assert_array_equal(ys, ys_f)
    jax.tree.map(np.testing.assert_array_equal, carry, carry_f)

    # gradients w.r.t. the same params
    def f_loss(p):
        return jnp.sum(jnp.sin(layer.apply(p, x, lengths=lengths)[1]))

    def m_loss(m):
        return jnp.sum(jnp.sin(m(x, lengths=lengths)))

    g_f = jax.grad(f_loss)(params)
    g_m = nnx.grad(m_loss)(model)
    holder = nnx.clone(model)
    nnx.update(holder, g_m)  # the gradient State, read back as the functional pytree
    g_m = holder.get_params()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g_m, g_f)


def test_cell_wrapper_matches_core_and_scan():
    cell = seqjax.lstm(4, peepholes=True)
    m = snx.Cell(cell, I, rngs=nnx.Rngs(1))
    p = m.get_params()
    assert isinstance(p, seqjax.LSTMParams) and isinstance(m.params.w_x, nnx.Param)
    carry = m.initial_carry((B,))
    x = xs()[:, 0]
    c1, y1 = m(carry, x)
    c2, y2 = cell.apply(p, carry, x)
    np.testing.assert_array_equal(y1, y2)
    _, ys = m.scan(xs())
    _, ys2 = seqjax.scan(cell, p, xs())
    np.testing.assert_array_equal(ys, ys2)
    # set_params round trip
    new = jax.tree.map(lambda a: a + 1.0, p)
    m.set_params(new)
    jax.tree.map(np.testing.assert_array_equal, m.get_params(), new)
    with pytest.raises(ValueError, match="shape"):
        m.set_params(new._replace(w_x=jnp.zeros((2, 2))))


def test_time_major_and_initial_carry():
    m = snx.GRU(I, 4, num_layers=2, rngs=nnx.Rngs(0))
    x = xs()
    carry0 = jax.tree.map(lambda a: a + 0.3, m.initial_carry(B))
    c1, y1 = m(x, carry=carry0, return_carry=True)
    c2, y2 = m(jnp.swapaxes(x, 0, 1), carry=carry0, return_carry=True, time_major=True)
    np.testing.assert_allclose(y1, jnp.swapaxes(y2, 0, 1), rtol=1e-6)
    _, y0 = m(x, return_carry=True)
    assert not np.allclose(y0, y1)


def test_jit_and_optimizer_step_match_functional():
    rngs = nnx.Rngs(0)
    model = snx.SequenceClassifier(snx.LSTM(I, 4, rngs=rngs), 3, rngs=rngs)
    x, y = xs(), jnp.array([0, 1, 2])
    tx = optax.rmsprop(1e-2)
    # functional reference of one step, from the same starting params
    graphdef, state = nnx.split(model, nnx.Param)

    def f_loss(st):
        m = nnx.merge(graphdef, st)
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    loss_f, g = jax.value_and_grad(f_loss)(state)
    upd, _ = tx.update(g, tx.init(state), state)
    state_f = optax.apply_updates(state, upd)

    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
        opt.update(model, grads)
        return loss

    loss = step(model, opt)
    np.testing.assert_allclose(loss, loss_f, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 nnx.state(model, nnx.Param), state_f)
    assert int(opt.step[...]) == 1
    # jit == eager
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), model(x), rtol=1e-6, atol=1e-7)


def test_split_merge_round_trip():
    rngs = nnx.Rngs(0, dropout=1)
    model = snx.SequenceClassifier(snx.GRU(I, 4, num_layers=2, dropout=0.3, rngs=rngs), 2, pooling="mean", rngs=rngs)
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    x = xs()
    np.testing.assert_array_equal(clone(x, deterministic=True), model(x, deterministic=True))
    jax.tree.map(np.testing.assert_array_equal, clone.rnn.get_params(), model.rnn.get_params())
    # params only
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(model.rnn.get_params())) + 2


def test_dropout_train_vs_eval():
    rngs = nnx.Rngs(0, dropout=1)
    m = snx.LSTM(I, 8, num_layers=2, dropout=0.5, rngs=rngs)
    x = xs()
    a, b = m(x), m(x)
    assert not np.allclose(a, b)  # a fresh mask per call (the rng stream advances)
    m.eval()
    assert m.deterministic
    e1, e2 = m(x), m(x)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(e1, m.layer.apply(m.get_params(), x)[1])
    m.train()
    assert not np.allclose(m(x), e1)
    np.testing.assert_array_equal(m(x, deterministic=True), e1)
    # nnx.view and explicit keys
    v = nnx.view(m, deterministic=True)
    np.testing.assert_array_equal(v(x), e1)
    k = jax.random.key(5)
    np.testing.assert_array_equal(m(x, rngs=k), m.layer.apply(m.get_params(), x, key=k)[1])
    # dropout under jit advances the stream too
    f = nnx.jit(lambda m, x: m(x))
    assert not np.allclose(f(m, x), f(m, x))


def test_pytorch_init_ranges():
    H = 4
    k = 1 / math.sqrt(H)
    m = snx.LSTM(8, H, init="pytorch", rngs=nnx.Rngs(0))
    p = m.get_params()[0]
    assert float(jnp.max(jnp.abs(p.w_x))) <= k and float(jnp.max(jnp.abs(p.w_h))) <= k
    assert float(jnp.max(jnp.abs(p.b))) <= 2 * k
    np.testing.assert_array_equal(p.b[H:2 * H], 0.0)  # forget_bias=0
    g = snx.GRU(8, H, init="pytorch", rngs=nnx.Rngs(0)).get_params()[0]
    assert float(jnp.max(jnp.abs(g.b[2 * H:]))) <= k and float(jnp.max(jnp.abs(g.b_hn))) <= k


def test_classifier_pooling():
    rngs = nnx.Rngs(0)
    x, lengths = xs(), jnp.array([6, 3, 1])
    for pooling, pool in (("last", last_valid), ("mean", mean_valid)):
        m = snx.SequenceClassifier(snx.RNN(I, 4, rngs=rngs), 5, pooling=pooling, rngs=rngs)
        ys = m.rnn(x, lengths=lengths)
        np.testing.assert_allclose(m(x, lengths=lengths), m.head(pool(ys, lengths)), rtol=1e-6)
        assert m(x).shape == (B, 5)
    # time-major rnn
    m = snx.SequenceClassifier(snx.GRU(I, 4, time_major=True, rngs=rngs), 2, rngs=rngs)
    assert m(jnp.swapaxes(x, 0, 1)).shape == (B, 2)


def test_bad_inputs():
    rngs = nnx.Rngs(0)
    m = snx.LSTM(I, 4, rngs=rngs)
    with pytest.raises(ValueError, match=r"seqjax.nnx.LSTM: x must have shape \(B, T, I=5\), got \(3, 6, 4\)"):
        m(jnp.ones((3, 6, 4)))
    with pytest.raises(ValueError, match="add a batch axis"):
        m(jnp.ones((6, 5)))
    with pytest.raises(ValueError, match="time_major=True"):
        m(jnp.ones((6, 5, 7)))
    with pytest.raises(ValueError, match="lengths"):
        m(xs(), lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="carry"):
        m(xs(), carry=m.initial_carry(7))
    with pytest.raises(ValueError, match="dropout"):
        snx.LSTM(I, 4, dropout=1.0, rngs=rngs)
    with pytest.raises(ValueError, match="num_layers"):
        snx.GRU(I, 4, num_layers=0, rngs=rngs)
    with pytest.raises(ValueError, match="in_features"):
        snx.RNN(0, 4, rngs=rngs)
    with pytest.raises(TypeError, match="rngs"):
        snx.RNN(I, 4, rngs=0)
    with pytest.raises(ValueError, match="init"):
        snx.RNN(I, 4, init="torch", rngs=rngs)
    with pytest.raises(ValueError, match="activation"):
        snx.RNN(I, 4, activation="swish", rngs=rngs)
    with pytest.raises(TypeError, match="seqjax cell"):
        snx.Cell(object(), I, rngs=rngs)
    with pytest.raises(TypeError, match="recurrent layer"):
        snx.SequenceClassifier(nnx.Linear(2, 2, rngs=rngs), 2, rngs=rngs)
    with pytest.raises(ValueError, match="pooling"):
        snx.SequenceClassifier(m, 2, pooling="max", rngs=rngs)
    with pytest.raises(ValueError, match="num_classes"):
        snx.SequenceClassifier(m, 0, rngs=rngs)
    with pytest.warns(UserWarning, match="no effect"):
        snx.GRU(I, 4, dropout=0.2, rngs=rngs)
    # dropout on without any rng stream for it
    d = snx.GRU(I, 4, num_layers=2, dropout=0.2, rngs=rngs)
    d.rngs = None
    with pytest.raises(ValueError, match="no rngs"):
        d(xs())
