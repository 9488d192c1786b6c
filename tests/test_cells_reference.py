"""Every cell against a NumPy transcription of its equations (tests/reference.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
import seqjax
from registry import CELLS

relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
identity = lambda a: a  # noqa: E731

LSTM_FLAGS = {
    "lstm": {}, "lstm_proj": {}, "lstm_peep_proj": {}, "lstm_vanilla": {}, "lstm_NP": {}, "lstm_FGR": {},
    "lstm_NIG": dict(input_gate=False), "lstm_NFG": dict(forget_gate=False), "lstm_NOG": dict(output_gate=False),
    "lstm_NIAF": dict(in_act=identity), "lstm_NOAF": dict(out_act=identity), "lstm_CIFG": dict(coupled=True),
}


def numpy_step(name):
    if name.startswith("rnn"):
        act = np.tanh if name == "rnn_tanh" else relu
        return lambda p, h, x: (lambda h: (h, h))(ref.rnn_step(p, h, x, act))
    if name.startswith("gru"):
        return lambda p, h, x: (lambda h: (h, h))(ref.gru_step(p, h, x, name == "gru"))
    if name.startswith("lstm"):
        flags = LSTM_FLAGS[name]
        return lambda p, c, x: ref.lstm_step(p, tuple(c), x, **flags)
    if name.startswith("min_gru") or name.startswith("min_lstm"):
        ref_step = ref.min_gru_step if name.startswith("min_gru") else ref.min_lstm_step
        return lambda p, h, x: (lambda h: (h, h))(ref_step(p, h, x, name.endswith("_log")))
    if name.startswith("rg_lru"):
        c, proj = (8.0, True) if name == "rg_lru" else (2.0, False)
        return lambda p, h, x: (lambda h: (h, h))(ref.rg_lru_step(p, h, x, c, proj))
    if name.startswith("lru"):
        def step(p, carry, x):
            N = carry.shape[-1] // 2
            state, y = ref.lru_step(p, carry[..., :N] + 1j * carry[..., N:], x)
            return np.concatenate([state.real, state.imag], -1), y
        return step
    raise KeyError(name)


def to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def numpy_run(name, params, carry, xs):
    """Runs the NumPy reference over xs [B, T, I]; returns ys [B, T, O]."""
    if name == "stack":
        ys = xs
        for k, sub in enumerate(["lstm", "gru"]):
            ys = numpy_run(sub, params[k], carry[k], ys)
        return ys
    step = numpy_step(name)
    params, carry = to_numpy(params), to_numpy(carry)
    ys = []
    for t in range(xs.shape[1]):
        carry, y = step(params, carry, xs[:, t])
        ys.append(y)
    return np.stack(ys, 1)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_matches_numpy_equations(name):
    cell = CELLS[name]()
    kp, kx, kr = jax.random.split(jax.random.key(1), 3)
    params = cell.init(kp, 3)
    # non-zero peepholes/biases so every term is exercised
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(kr, a.shape, a.dtype), params)
    xs = jax.random.normal(kx, (4, 7, 3))
    _, ys = seqjax.scan(cell, params, xs)
    expected = numpy_run(name, params, cell.initial_carry(params, (4,)), np.asarray(xs, np.float64))
    np.testing.assert_allclose(np.asarray(ys), expected, atol=2e-5, rtol=2e-5)


def test_lstm_forget_bias_set_in_init_only():
    cell = seqjax.lstm(4, forget_bias=2.5)
    p = cell.init(jax.random.key(0), 3)
    np.testing.assert_array_equal(np.asarray(p.b[4:8]), 2.5)
    np.testing.assert_array_equal(np.asarray(p.b[:4]), 0.0)
    # CIFG has no forget block: the bias is (i, g, o), nothing set to 2.5
    q = seqjax.lstm_variant("CIFG", 4, forget_bias=2.5).init(jax.random.key(0), 3)
    assert q.b.shape == (12,) and not np.any(np.asarray(q.b) == 2.5)


def test_documented_parameter_shapes():
    k = jax.random.key(0)
    p = seqjax.lstm(6, proj_size=2, peepholes=True, gate_recurrence=True).init(k, 3)
    assert (p.w_x.shape, p.w_h.shape, p.b.shape, p.peep.shape, p.w_proj.shape, p.w_gates.shape) == \
        ((3, 24), (2, 24), (24,), (3, 6), (6, 2), (18, 18))
    g = seqjax.gru(6).init(k, 3)
    assert (g.w_x.shape, g.w_h.shape, g.b.shape, g.b_hn.shape) == ((3, 18), (6, 18), (18,), (6,))
    assert seqjax.gru(6, reset_after=False).init(k, 3).b_hn is None
    r = seqjax.rnn(6).init(k, 3)
    assert (r.w_x.shape, r.w_h.shape, r.b.shape) == ((3, 6), (6, 6), (6,))


def test_recurrent_init_is_orthogonal_per_gate():
    p = seqjax.lstm(8).init(jax.random.key(0), 3)
    for k in range(4):
        block = np.asarray(p.w_h[:, 8 * k:8 * (k + 1)])
        np.testing.assert_allclose(block.T @ block, np.eye(8), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("make", [lambda **kw: seqjax.lstm(8, peepholes=True, proj_size=4, **kw),
                                  lambda **kw: seqjax.lstm_variant("FGR", 8, **kw), lambda **kw: seqjax.gru(8, **kw),
                                  lambda **kw: seqjax.rnn(8, **kw)], ids=["lstm_peep_proj", "lstm_FGR", "gru", "rnn"])
def test_16bit_param_dtype(make, dtype):
    """param_dtype=bfloat16/float16: every param and the carry in that dtype, the recurrent blocks drawn in float32
    (CPU has no 16-bit QR for the orthogonal initialiser) so they are the float32 draw rounded, and a scan runs
    with gates in float32 (its outputs match the float32 cell on the same rounded params to the 16-bit rounding)."""
    cell = make(param_dtype=dtype)
    p = cell.init(jax.random.key(0), 3)
    p32 = make().init(jax.random.key(0), 3)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p32)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b.astype(dtype), np.float32))
    xs = jax.random.normal(jax.random.key(1), (2, 7, 3))
    carry, ys = seqjax.scan(cell, p, xs)
    assert ys.dtype == dtype and all(a.dtype == dtype for a in jax.tree.leaves(carry))
    _, ys32 = seqjax.scan(make(), jax.tree.map(lambda a: a.astype(jnp.float32), p), xs)
    np.testing.assert_allclose(np.asarray(ys, np.float32), ys32, atol=8 * float(jnp.finfo(dtype).eps))


def test_injectable_initialisers():
    ones = jax.nn.initializers.ones
    p = seqjax.rnn(3, kernel_init=ones, recurrent_init=jax.nn.initializers.zeros,
                   bias_init=jax.nn.initializers.constant(0.5)).init(jax.random.key(0), 2)
    np.testing.assert_array_equal(np.asarray(p.w_x), 1.0)
    np.testing.assert_array_equal(np.asarray(p.w_h), 0.0)
    np.testing.assert_array_equal(np.asarray(p.b), 0.5)
    u = seqjax.symmetric_uniform(0.1)(jax.random.key(1), (1000,))
    assert float(jnp.min(u)) >= -0.1 and float(jnp.max(u)) <= 0.1 and float(jnp.min(u)) < -0.09


def test_custom_activation_callable():
    cell = seqjax.rnn(3, activation=jnp.sin)
    p = cell.init(jax.random.key(0), 2)
    x = jnp.ones((1, 2))
    _, y = cell.apply(p, cell.initial_carry(p, (1,)), x)
    np.testing.assert_allclose(np.asarray(y), np.sin(np.asarray(x @ p.w_x + p.b)), rtol=1e-6)
