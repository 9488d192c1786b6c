"""Sequence layers: stacking, bidirectional, deep layers with dropout, the PyTorch-style multilayer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax

B, T, I = 3, 7, 4
LENGTHS = jnp.array([7, 3, 0])


def close(a, b, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol), a, b)


@pytest.fixture(scope="module")
def xs():
    return jax.random.normal(jax.random.key(3), (B, T, I))


def test_stack_layer_by_layer_equals_stepwise(xs):
    cell = seqjax.stack([seqjax.lstm(5), seqjax.rnn(4), seqjax.gru(3)])
    params = cell.init(jax.random.key(0), I)
    carry, ys = seqjax.scan(cell, params, xs, lengths=LENGTHS)  # runs layer by layer
    # stepping the stacked cell by hand, with the same masking
    c = cell.initial_carry(params, (B,))
    out = []
    for t in range(T):
        new, y = cell.apply(params, c, xs[:, t])
        valid = np.asarray(t < LENGTHS)
        c = jax.tree.map(lambda n, o: jnp.where(valid.reshape(-1, *([1] * (n.ndim - 1))), n, o), new, c)
        out.append(jnp.where(valid[:, None], y, 0.0))
    close((carry, ys), (c, jnp.stack(out, 1)))


def test_stack_output_size_chain():
    cell = seqjax.stack([seqjax.lstm(6, proj_size=2), seqjax.gru(3)])
    params = cell.init(jax.random.key(0), I)
    assert params[1].w_x.shape == (2, 9) and cell.output_size == 3


@pytest.mark.parametrize("merge", ["concat", "sum", "mean", "mul", None])
def test_bidirectional_merge_and_padding(xs, merge):
    layer = seqjax.bidirectional(seqjax.lstm(5), merge=merge)
    params = layer.init(jax.random.key(1), I)
    (cf, cb), ys = layer.apply(params, xs, lengths=LENGTHS)
    cf_ref, yf = seqjax.scan(seqjax.lstm(5), params.forward, xs, lengths=LENGTHS)
    cb_ref, yb = seqjax.scan(seqjax.lstm(5), params.backward, xs, lengths=LENGTHS, reverse=True)
    close((cf, cb), (cf_ref, cb_ref))
    expected = {"concat": jnp.concatenate([yf, yb], -1), "sum": yf + yb, "mean": (yf + yb) / 2, "mul": yf * yb,
                None: (yf, yb)}[merge]
    close(ys, expected)
    # the backward direction of sequence 1 starts at its last valid step (t = 2), not at the padding
    _, yb1 = seqjax.scan(seqjax.lstm(5), params.backward, xs[1:2, :3], reverse=True)
    close(yb[1, :3], yb1[0])
    assert layer.output_size == (10 if merge == "concat" else 5)


def test_deep_dropout_between_layers_only(xs):
    layer = seqjax.multilayer(seqjax.gru(6), num_layers=3, dropout=0.5)
    params = layer.init(jax.random.key(0), I)
    _, y_eval = layer.apply(params, xs)
    _, y_eval2 = layer.apply(params, xs, key=None)
    close(y_eval, y_eval2)
    _, y_a = layer.apply(params, xs, key=jax.random.key(1))
    _, y_b = layer.apply(params, xs, key=jax.random.key(1))
    _, y_c = layer.apply(params, xs, key=jax.random.key(2))
    close(y_a, y_b)  # deterministic given a key
    assert not np.allclose(np.asarray(y_a), np.asarray(y_c))
    assert not np.allclose(np.asarray(y_a), np.asarray(y_eval))
    # a single layer has no non-recurrent connection to drop: key has no effect
    single = seqjax.multilayer(seqjax.gru(6), num_layers=1, dropout=0.5)
    p1 = single.init(jax.random.key(0), I)
    close(single.apply(p1, xs, key=jax.random.key(1)), single.apply(p1, xs))


def test_deep_dropout_mask_statistics():
    x = jnp.ones((200, 50, 8))
    y = seqjax.dropout(jax.random.key(0), x, 0.25)
    kept = np.asarray(y != 0)
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    # masks differ across time steps (not one mask for the whole sequence)
    assert not np.array_equal(kept[:, 0], kept[:, 1])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_multilayer_equals_manual_composition(xs, bidirectional):
    layer = seqjax.multilayer(seqjax.lstm(4), num_layers=2, bidirectional=bidirectional)
    params = layer.init(jax.random.key(5), I)
    carries, ys = layer.apply(params, xs, lengths=LENGTHS)
    assert len(carries) == 2 and ys.shape == (B, T, 8 if bidirectional else 4)
    h = xs
    for p in params:
        if bidirectional:
            _, h = seqjax.bidirectional(seqjax.lstm(4)).apply(p, h, lengths=LENGTHS)
        else:
            _, h = seqjax.scan(seqjax.lstm(4), p, h, lengths=LENGTHS)
    close(ys, h)


def test_multilayer_carry_roundtrip(xs):
    layer = seqjax.multilayer(seqjax.lstm(4), num_layers=2, bidirectional=True)
    params = layer.init(jax.random.key(5), I)
    c_full, y_full = layer.apply(params, xs[:, :4])
    c2, y2 = layer.apply(params, xs[:, :4], carry=layer.initial_carry(params, (B,)))
    close((c_full, y_full), (c2, y2))
    with pytest.raises(ValueError, match="carry must be a tuple of 2 per-layer carries"):
        layer.apply(params, xs, carry=(c_full[0],))


def test_layers_jit_and_grad(xs):
    layer = seqjax.multilayer(seqjax.gru(4), num_layers=2, bidirectional=True, dropout=0.1)
    params = layer.init(jax.random.key(0), I)

    @jax.jit
    def loss(params, key):
        return jnp.mean(layer.apply(params, xs, lengths=LENGTHS, key=key)[1] ** 2)

    g = jax.grad(loss)(params, jax.random.key(0))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    assert any(np.abs(np.asarray(a)).sum() > 0 for a in jax.tree.leaves(g))


def test_public_api_is_pinned():
    assert set(seqjax.__all__) >= {
        "rnn", "lstm", "gru", "lstm_variant", "stack", "scan", "unrolled", "sequence", "bidirectional", "deep",
        "multilayer", "Cell", "Layer", "LSTMParams", "LSTMCarry", "GRUParams", "RNNParams"}
    for name in seqjax.__all__:
        assert hasattr(seqjax, name), name
