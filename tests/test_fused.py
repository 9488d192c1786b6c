"""The fused-gradient scans (seqjax.fused) against the plain autodiff scan: values and gradients.

Kept small and jitted (the whole file runs in seconds): one cell per option for the
combinations, every cell once with all options together, `check_grads` in float64.
"""
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import seqjax
from seqjax import fused
from seqjax.scan import _plan

B, T, I, H = 3, 6, 4, 5
CELLS = {
    "lstm": lambda: seqjax.lstm(H),
    "gru": lambda: seqjax.gru(H),
    "rnn_tanh": lambda: seqjax.rnn(H),
    "rnn_relu": lambda: seqjax.rnn(H, activation="relu"),
}
NOT_FUSABLE = {
    "lstm_peep": lambda: seqjax.lstm(H, peepholes=True),
    "lstm_proj": lambda: seqjax.lstm(H, proj_size=3),
    "lstm_cifg": lambda: seqjax.lstm_variant("CIFG", H),
    "lstm_fgr": lambda: seqjax.lstm_variant("FGR", H),
    "gru_cho": lambda: seqjax.gru(H, reset_after=False),
    "stack": lambda: seqjax.stack([seqjax.lstm(H), seqjax.gru(4)]),
}
ALL = dict(reverse=True, lengths=True, resets=True, carry=True, time_major=True)


def _setup(name, opts, seed=0, dtype=jnp.float32):
    cell = CELLS[name]()
    k = jax.random.split(jax.random.key(seed), 4)
    params = cell.init(k[0], I)
    # non-trivial biases so every parameter's gradient is exercised
    params = jax.tree.map(lambda a, kk=k[3]: (a + 0.1 * jax.random.normal(kk, a.shape, a.dtype)).astype(dtype),
                          params)
    xs = jax.random.normal(k[1], (B, T, I), dtype)
    if opts.get("time_major"):
        xs = jnp.swapaxes(xs, 0, 1)
    kw = dict(reverse=opts.get("reverse", False), time_major=opts.get("time_major", False))
    if opts.get("lengths"):
        kw["lengths"] = np.array([T, 3, 0])
    if opts.get("resets"):
        r = jax.random.bernoulli(k[2], 0.3, (B, T))
        kw["resets"] = r.T if opts.get("time_major") else r
    carry = jax.tree.map(lambda a: jnp.zeros_like(a), cell.initial_carry(params, (B,)))
    if opts.get("carry"):
        carry = jax.tree.map(lambda a: 0.5 * jax.random.normal(k[3], a.shape, a.dtype), carry)
    return cell, params, xs, carry, kw


def _jvp_run(cell, params, xs, carry, kw, hoist=False):
    kind = fused.fusable(cell, params)
    plan = _plan("test", cell, params, xs, carry, kw.get("lengths"), kw.get("resets"), kw["time_major"])
    c, ys = fused.fused_scan(kind, params, plan.xs, plan.carry, plan.valid, plan.resets, kw["reverse"], hoist)
    if kind == "lstm":
        c = seqjax.LSTMCarry(c.h, c.c)
    return c, (ys if kw["time_major"] else jnp.swapaxes(ys, 0, 1))


def _vjp_run(cell, params, xs, carry, kw):
    return fused.scan_fused(cell, params, xs, carry=carry, **kw)


def _plain_run(cell, params, xs, carry, kw):
    return seqjax.scan(cell, params, xs, carry=carry, hoist=False, **kw)


def _loss(run, cell, kw):
    def loss(params, xs, carry):
        c, ys = run(cell, params, xs, carry, kw)
        w = jnp.arange(ys.size, dtype=ys.dtype).reshape(ys.shape) / ys.size
        return jnp.sum(jnp.sin(ys) * w) + sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(c))
    return loss


def _compare(run, name, opts):
    cell, params, xs, carry, kw = _setup(name, opts)

    def values_and_grads(r):  # one compilation per runner
        def f(p, x, c):
            return r(cell, p, x, c, kw), jax.grad(_loss(r, cell, kw), argnums=(0, 1, 2))(p, x, c)
        return jax.jit(f)

    want, g_want = values_and_grads(_plain_run)(params, xs, carry)
    got, g_got = values_and_grads(run)(params, xs, carry)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    assert jax.tree.structure(g_got) == jax.tree.structure(g_want)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", [{}, dict(lengths=True, resets=True)], ids=["plain", "lengths_resets"])
def test_vjp_options_lstm(opts):
    _compare(_vjp_run, "lstm", opts)


@pytest.mark.parametrize("name", list(CELLS))
def test_vjp_all_options(name):
    _compare(_vjp_run, name, ALL)


def test_jvp_all_options():
    _compare(lambda *a: _jvp_run(*a, hoist=True), "gru", ALL)


def _check_grads_64(run, name, modes, order):
    with jax.enable_x64(True):
        cell, params, xs, carry, kw = _setup(name, dict(ALL, time_major=False), dtype=jnp.float64)
        f = jax.jit(lambda p, x, c: run(cell, p, x, c, kw))
        jax.test_util.check_grads(f, (params, xs, carry), order=order, modes=modes, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_vjp_check_grads(name):
    _check_grads_64(_vjp_run, name, ["rev"], 1)


def test_jvp_check_grads_forward_mode():
    _check_grads_64(_jvp_run, "lstm", ["fwd"], 1)


def test_scan_fused_falls_back():
    """Non-fusable cells and options run the plain scan (same results, forward mode works)."""
    cell = NOT_FUSABLE["lstm_peep"]()
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((B, T, I))
    a = fused.scan_fused(cell, params, xs)
    b = seqjax.scan(cell, params, xs)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    lstm = CELLS["lstm"]()
    p = lstm.init(jax.random.key(0), I)
    out = fused.scan_fused(lstm, p, xs, remat=True)[1]
    np.testing.assert_allclose(out, seqjax.scan(lstm, p, xs)[1], atol=1e-6)
    with pytest.raises(ValueError, match="scan_fused"):
        fused.scan_fused(lstm, p, jnp.ones((B, T, I + 1)))


@pytest.mark.parametrize("name", list(NOT_FUSABLE))
def test_variants_are_not_fused(name):
    cell = NOT_FUSABLE[name]()
    assert fused.fusable(cell, cell.init(jax.random.key(0), I)) is None


def test_fusable_kinds_and_dtypes():
    for name, make in CELLS.items():
        cell = make()
        assert fused.fusable(cell, cell.init(jax.random.key(0), I)) == name
    cell = seqjax.lstm(H)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), cell.init(jax.random.key(0), I))
    assert fused.fusable(cell, params) is None


def test_scan_fused_has_no_forward_mode():
    """The documented trade-off of the custom VJP: forward mode raises (seqjax.scan keeps it)."""
    cell = CELLS["rnn_tanh"]()
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((B, T, I))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: fused.scan_fused(cell, params, x)[1], (xs,), (xs,))
