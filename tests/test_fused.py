"""The fused-gradient scans (seqjax.backends._gemm_vjp) against the plain autodiff scan: values and gradients.

Kept small and jitted (the whole file runs in seconds): one cell per option for the
combinations, every cell once with all options together, `check_grads` in float64.
"""
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import seqjax
from seqjax.backends import _gemm_vjp as fused

B, T, I, H = 3, 6, 4, 5
CELLS = {
    "lstm": lambda: seqjax.lstm(H),
    "lstm_peep": lambda: seqjax.lstm(H, peepholes=True),
    "lstm_proj": lambda: seqjax.lstm(H, proj_size=3),
    "lstm_peep_proj": lambda: seqjax.lstm(H, peepholes=True, proj_size=3),
    **{f"lstm_{v}": (lambda v=v: seqjax.lstm_variant(v, H)) for v in ["NIG", "NFG", "NOG", "NIAF", "NOAF", "CIFG"]},
    "lstm_nog_noaf_proj": lambda: seqjax.lstm(H, output_gate=False, output_activation="identity", proj_size=2),
    "lstm_cifg_niaf": lambda: seqjax.lstm(H, coupled_input_forget=True, input_activation="identity"),
    "lstm_relu_out": lambda: seqjax.lstm(H, proj_size=3, output_activation="relu"),
    "lstm_sigmoid_in": lambda: seqjax.lstm(H, peepholes=True, input_activation="sigmoid"),
    "gru": lambda: seqjax.gru(H),
    "gru_cho": lambda: seqjax.gru(H, reset_after=False),
    "rnn_tanh": lambda: seqjax.rnn(H),
    "rnn_relu": lambda: seqjax.rnn(H, activation="relu"),
}
NOT_FUSABLE = {
    "lstm_fgr": lambda: seqjax.lstm_variant("FGR", H),
    "lstm_callable": lambda: seqjax.lstm(H, output_activation=lambda c: c),
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


def _vjp_run(cell, params, xs, carry, kw, hoist=False, remat=False, unroll=1):
    return seqjax.scan(cell, params, xs, carry=carry, hoist=hoist, remat=remat, unroll=unroll, backward="fused",
                       **kw)


def _plain_run(cell, params, xs, carry, kw):
    return seqjax.scan(cell, params, xs, carry=carry, hoist=False, backward="autodiff", **kw)


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


@pytest.mark.parametrize("name", ["lstm", "gru", "gru_cho"])
def test_vjp_hoisted(name):
    _compare(lambda *a: _vjp_run(*a, hoist=True), name, ALL)


@pytest.mark.parametrize("name", list(CELLS))
def test_vjp_remat(name):
    """remat=True: only start carries are saved, the residuals are recomputed in the backward loop."""
    _compare(lambda *a: _vjp_run(*a, remat=True), name, ALL)


@pytest.mark.parametrize("name,unroll,remat", [("lstm_peep_proj", 4, False), ("gru", 2, True), ("rnn_tanh", 5, False)])
def test_vjp_unrolled_loops(name, unroll, remat):
    """unroll > 1 (also not dividing T = 6) unrolls both loops of the custom VJP."""
    _compare(lambda *a: _vjp_run(*a, unroll=unroll, remat=remat), name, ALL)


def test_vjp_remat_hoisted():
    _compare(lambda *a: _vjp_run(*a, hoist=True, remat=True), "lstm_peep_proj", ALL)


@pytest.mark.parametrize("make", [lambda: seqjax.lstm(64), lambda: seqjax.gru(64)], ids=["lstm", "gru"])
def test_vjp_remat_saves_memory(make):
    """XLA's compiled memory analysis of the train step: fused remat < fused; autodiff remat (auto's choice) least.

    The ratios are XLA:CPU's; on GPU only fused remat < fused is asserted.
    """
    cell = make()
    params = cell.init(jax.random.key(0), 16)
    xs = jnp.ones((8, 200, 16))

    def temp_bytes(**kw):
        loss = lambda p, x: jnp.sum(seqjax.scan(cell, p, x, unroll=1, **kw)[1] ** 2)  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused, fused_remat = temp_bytes(backward="fused"), temp_bytes(backward="fused", remat=True)
    if jax.default_backend() != "cpu":  # on an H100 fused remat saved only 9 %
        assert fused_remat < fused
        return
    assert fused_remat < 0.75 * fused
    assert temp_bytes(remat=True) < fused_remat


def test_vjp_derives_start_states_from_outputs():
    """Without lengths/resets the backward rebuilds h_{t-1} from ys (both directions, given carry)."""
    for reverse in (False, True):
        _compare(_vjp_run, "lstm", dict(carry=True, reverse=reverse))
        _compare(_vjp_run, "rnn_tanh", dict(carry=True, reverse=reverse))


def _check_grads_64(name, opts, remat=False):
    with jax.enable_x64(True):
        cell, params, xs, carry, kw = _setup(name, opts, dtype=jnp.float64)
        f = jax.jit(lambda p, x, c: _vjp_run(cell, p, x, c, kw, remat=remat))
        jax.test_util.check_grads(f, (params, xs, carry), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["lstm", "lstm_peep_proj", "lstm_CIFG", "lstm_nog_noaf_proj", "lstm_sigmoid_in",
                                  "gru", "gru_cho", "rnn_relu"])
def test_vjp_check_grads(name):
    _check_grads_64(name, dict(ALL, time_major=False))
    _check_grads_64(name, {}, remat=True)


def test_default_is_fused_and_falls_back():
    """scan's default differentiates fusable cells with the custom VJP, anything else with autodiff."""
    xs = jnp.ones((B, T, I))
    lstm = CELLS["lstm"]()
    p = lstm.init(jax.random.key(0), I)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: seqjax.scan(lstm, p, xs))(p))
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: seqjax.scan(lstm, p, xs, remat=True, backward="fused"))(p))
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: seqjax.scan(lstm, p, xs, unroll=2))(p))
    for kw in (dict(backward="autodiff"), dict(remat=True)):
        assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda p: seqjax.scan(lstm, p, xs, **kw))(p)), kw
    cell = NOT_FUSABLE["lstm_fgr"]()
    params = cell.init(jax.random.key(0), I)
    a = seqjax.scan(cell, params, xs)
    b = seqjax.scan(cell, params, xs, backward="autodiff")
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)


def test_backward_option_errors():
    lstm = CELLS["lstm"]()
    p = lstm.init(jax.random.key(0), I)
    xs = jnp.ones((B, T, I))
    with pytest.raises(ValueError, match="backward must be one of"):
        seqjax.scan(lstm, p, xs, backward="custom")
    with pytest.raises(ValueError, match="backward must be one of"):
        seqjax.unrolled(lstm, p, xs, backward="fast")
    peep = NOT_FUSABLE["lstm_fgr"]()
    with pytest.raises(ValueError, match="needs a fusable cell.*gate_recurrence=True"):
        seqjax.scan(peep, peep.init(jax.random.key(0), I), xs, backward="fused")


@pytest.mark.parametrize("name", list(NOT_FUSABLE))
def test_variants_are_not_fused(name):
    cell = NOT_FUSABLE[name]()
    assert fused.fusable(cell, cell.init(jax.random.key(0), I)) is None


def test_fusable_kinds_and_dtypes():
    for name, make in CELLS.items():
        cell = make()
        kind = fused.fusable(cell, cell.init(jax.random.key(0), I))
        assert isinstance(kind, fused.LSTMSpec) if name.startswith("lstm") else kind == name
    spec = lambda **kw: fused.fusable(seqjax.lstm(H, **kw), seqjax.lstm(H, **kw).init(jax.random.key(0), I))  # noqa
    assert spec() == fused.LSTMSpec()
    assert spec(peepholes=True, proj_size=2) == fused.LSTMSpec()
    assert spec(input_gate=False) == fused.LSTMSpec(input_gate=False)
    assert spec(coupled_input_forget=True, output_activation="identity") == \
        fused.LSTMSpec(coupled=True, output_activation="identity")
    assert spec(input_activation="relu", output_activation="sigmoid") == \
        fused.LSTMSpec(input_activation="relu", output_activation="sigmoid")
    cell = seqjax.lstm(H)
    params = cell.init(jax.random.key(0), I)
    assert fused.fusable(cell, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)) == fused.LSTMSpec()
    assert fused.fusable(cell, params._replace(b=params.b.astype(jnp.bfloat16))) is None  # mixed dtypes
    assert fused.fusable(cell, jax.tree.map(lambda a: a.astype(jnp.float16), params)._replace(
        b=params.b.astype(jnp.bfloat16))) is None  # two 16-bit dtypes


def test_fusable_only_for_seqjax_own_step():
    """A cell with another step or projection (replaced, or hand-made under an LSTM's name) runs that step.

    Neither the custom VJP nor the constructor's joint [x, h] GEMM (`Form.joint_apply`) may stand in for it: values and gradients
    are checked against a hand-written `lax.scan` over the replacement step.
    """
    lstm = seqjax.lstm(H)
    params = lstm.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))

    def leaky_step(p, carry, px):  # not an LSTM: c leaks, h = tanh(c)
        new, _ = lstm.step(p, carry, px)
        c = 0.5 * new.c
        return new._replace(c=c, h=jnp.tanh(c)), jnp.tanh(c)

    replaced = lstm._replace(step=leaky_step, apply=lambda p, c, x: leaky_step(p, c, lstm.project(p, x)))
    impostor = seqjax.Cell(lstm.init, lstm.initial_carry, lstm.project, leaky_step, replaced.apply,
                           lstm.input_size, H, H, lstm.name)
    double = lambda p, x: 2.0 * lstm.project(p, x)  # noqa: E731
    other_project = lstm._replace(project=double, apply=lambda p, c, x: lstm.step(p, c, double(p, x)))

    def by_hand(project, step):  # sum(ys²) of a plain lax.scan, batch-major xs
        def loss(p):
            body = lambda c, x: step(p, c, project(p, x))  # noqa: E731
            carry = lstm.initial_carry(p, (B,))
            return jnp.sum(jax.lax.scan(body, carry, jnp.swapaxes(xs, 0, 1))[1] ** 2)
        return loss

    refs = [by_hand(lstm.project, leaky_step)] * 2 + [by_hand(double, lstm.step)]
    for cell, ref in zip((replaced, impostor, other_project), refs):
        assert fused.fusable(cell, params) is None
        for runner in (seqjax.scan, seqjax.unrolled):
            loss = lambda p: jnp.sum(runner(cell, p, xs, hoist=False)[1] ** 2)  # noqa: E731
            np.testing.assert_allclose(loss(params), ref(params), rtol=1e-5)
            for a, b in zip(jax.tree.leaves(jax.grad(loss)(params)), jax.tree.leaves(jax.grad(ref)(params))):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="needs a fusable cell"):
            seqjax.scan(cell, params, xs, backward="fused")
    assert fused.fusable(lstm, params) == fused.LSTMSpec()
    assert fused.fusable(seqjax.rnn(H, activation=jnp.tanh), seqjax.rnn(H).init(jax.random.key(0), I)) is None
    assert fused.fusable(seqjax.lstm_variant("CIFG", H), params) is None  # 4-gate params for a 3-gate cell
    gru, cho = seqjax.gru(H), seqjax.gru(H, reset_after=False)
    assert fused.fusable(gru, cho.init(jax.random.key(0), I)) is None  # no b_hn
    assert fused.fusable(cho, gru.init(jax.random.key(0), I)) is None


def test_forward_mode_needs_autodiff():
    """The documented trade-off of the custom VJP: forward mode raises; backward="autodiff" keeps it."""
    cell = CELLS["rnn_tanh"]()
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((B, T, I))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: seqjax.scan(cell, params, x)[1], (xs,), (xs,))
    out, tangent = jax.jvp(lambda x: seqjax.scan(cell, params, x, backward="autodiff")[1], (xs,), (xs,))
    assert tangent.shape == out.shape and np.all(np.isfinite(tangent))


def _rel_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12)


@pytest.mark.parametrize("name,dtype,loop",
                         [(n, jnp.bfloat16, {}) for n in ("lstm_peep_proj", "lstm_cifg_niaf", "gru", "gru_cho",
                                                          "rnn_relu")]
                         + [(n, jnp.float16, {}) for n in ("lstm", "rnn_tanh")]
                         + [pytest.param("lstm_peep_proj", jnp.bfloat16, dict(hoist=True, unroll=3),
                                         id="lstm_peep_proj-bf16-hoist-unroll3"),
                            pytest.param("gru_cho", jnp.bfloat16, dict(remat=True), id="gru_cho-bf16-remat")])
def test_vjp_16bit_params(name, dtype, loop):
    """16-bit params (every option at once): the custom VJP runs the cell's forward (gates in float32, carry
    rounded to the params' dtype each step) and its gradients, in the params' dtypes, are at least as close
    to a float32 reference on the same values as autodiff's. Also hoisted and unrolled, and rematerialised."""
    cell, params, xs, carry, kw = _setup(name, ALL, dtype=dtype)
    assert fused.fusable(cell, params) is not None

    def vjp_run(cell, params, xs, carry, kw):
        return _vjp_run(cell, params, xs, carry, kw, **loop)

    def values_and_grads(run, p, x, c):
        return jax.jit(lambda p, x, c: (run(cell, p, x, c, kw), jax.grad(_loss(run, cell, kw), (0, 1, 2))(p, x, c)))(
            p, x, c)

    got, g_got = values_and_grads(vjp_run, params, xs, carry)
    want, g_ad = values_and_grads(_plain_run, params, xs, carry)
    wide = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    _, g_ref = values_and_grads(_plain_run, wide(params), wide(xs), wide(carry))
    eps = float(jnp.finfo(dtype).eps)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # the same forward: equal up to an ulp
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=eps, atol=eps)
    for a, b, ref in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ad), jax.tree.leaves(g_ref)):
        assert a.dtype == b.dtype
        err, err_autodiff = _rel_err(a, ref), _rel_err(b, ref)
        assert err <= 1.25 * err_autodiff + eps / 4, (a.shape, err, err_autodiff)


def test_mixed_input_dtype_gradient():
    """bf16 inputs into float32 params: dxs comes back in the input's dtype."""
    cell = CELLS["lstm"]()
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((B, T, I), jnp.bfloat16)
    g = jax.grad(lambda x: jnp.sum(seqjax.scan(cell, params, x)[1]))(xs)
    g_ref = jax.grad(lambda x: jnp.sum(seqjax.scan(cell, params, x, backward="autodiff")[1]))(xs)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(np.float32), g_ref.astype(np.float32), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_vjp_empty_sequence(name):
    """T = 0: the final carry is the initial one and its gradient passes straight through."""
    cell, params, _, carry, _ = _setup(name, dict(carry=True))
    xs = jnp.zeros((B, 0, I))
    g = jax.grad(lambda c: sum(jnp.sum(a) for a in jax.tree.leaves(seqjax.scan(cell, params, xs, carry=c)[0])))(carry)
    for a in jax.tree.leaves(g):
        np.testing.assert_array_equal(a, np.ones_like(a))
    gp = jax.grad(lambda p: sum(jnp.sum(a) for a in jax.tree.leaves(seqjax.scan(cell, p, xs, carry=carry)[0])))(params)
    assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(gp))
