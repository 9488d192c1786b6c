"""oneDNN's LSTM kernel (seqjax.backends._onednn, kernel="onednn"): numerics against NumPy and autodiff, invariants, errors.

Skipped where the install did not build them or oneDNN's library is missing (``pip install -e '.[onednn]'
-C seqjax.onednn=true``); CI installs both.
"""
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import seqjax
from seqjax.backends import _library as native, _x86  # noqa: F401  (monkeypatched below)
from reference import gru_step, lstm_step, rnn_step

pytestmark = pytest.mark.skipif(not native.onednn_installed(), reason="installed without the oneDNN kernels or "
                                "oneDNN's library: pip install -e '.[onednn]' -C seqjax.onednn=true")

B, T, I, H = 3, 7, 5, 6
VARIANTS = {
    "lstm": lambda: seqjax.lstm(H),
    "lstm_peep": lambda: seqjax.lstm(H, peepholes=True),
    "lstm_proj": lambda: seqjax.lstm(H, proj_size=4),
    "lstm_peep_proj": lambda: seqjax.lstm(H, peepholes=True, proj_size=4),
    "gru": lambda: seqjax.gru(H),
    "gru_cho": lambda: seqjax.gru(H, reset_after=False),
    "rnn_tanh": lambda: seqjax.rnn(H),
    "rnn_relu": lambda: seqjax.rnn(H, activation="relu"),
}


def _setup(variant, seed=0):
    cell = VARIANTS[variant]()
    keys = jax.random.split(jax.random.key(seed), 5)
    params = cell.init(keys[0], I)
    # peepholes, biases and b_hn start at zero or one value: make every one count
    params = jax.tree.map(lambda a, k: a + 0.3 * jax.random.normal(k, a.shape), params,
                          jax.tree.unflatten(jax.tree.structure(params),
                                             list(jax.random.split(keys[1], len(jax.tree.leaves(params))))))
    xs = jax.random.normal(keys[2], (B, T, I))
    carry = jax.tree.map(lambda a: 0.5 * jax.random.normal(keys[3], a.shape), cell.initial_carry(params, (B,)))
    return cell, params, xs, carry


def _numpy_step(variant, p, state, x):
    if variant.startswith("lstm"):
        return lstm_step(p, state, x)
    if variant.startswith("gru"):
        h = gru_step(p, state, x, reset_after=variant == "gru")
    else:
        h = rnn_step(p, state, x, np.tanh if variant == "rnn_tanh" else lambda a: np.maximum(a, 0.0))
    return h, h


def _numpy_scan(variant, params, xs, carry, reverse):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    if variant.startswith("lstm"):
        state = (np.asarray(carry.h, np.float64), np.asarray(carry.c, np.float64), None)
    else:
        state = np.asarray(carry, np.float64)
    ys = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        state, ys[t] = _numpy_step(variant, p, state, np.asarray(xs[:, t], np.float64))
    return state, np.stack(ys, axis=1)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_numpy(variant, reverse):
    cell, params, xs, carry = _setup(variant)
    final, ys = jax.jit(lambda p, x, c: seqjax.scan(cell, p, x, carry=c, reverse=reverse, kernel="onednn"))(
        params, xs, carry)
    final_ref, ys_ref = _numpy_scan(variant, params, xs, carry, reverse)
    np.testing.assert_allclose(ys, ys_ref, rtol=1e-5, atol=1e-6)
    if variant.startswith("lstm"):
        np.testing.assert_allclose(final.h, final_ref[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final.c, final_ref[1], rtol=1e-5, atol=1e-6)
        assert final.gates is None
    else:
        np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=1e-6)
    assert ys.dtype == jnp.float32


def _loss(cell, kernel, reverse, backward="auto"):
    def loss(params, xs, carry):
        final, ys = seqjax.scan(cell, params, xs, carry=carry, reverse=reverse, kernel=kernel, backward=backward)
        weights = jnp.linspace(-1.0, 1.0, ys.size).reshape(ys.shape)  # every output gets its own cotangent
        h, c = (final.h, final.c) if isinstance(final, seqjax.LSTMCarry) else (final, final)
        return jnp.sum(weights * ys) + jnp.sum(jnp.sin(h)) + jnp.sum(c ** 2)
    return loss


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_match_autodiff(variant, reverse):
    """oneDNN's backward primitive against autodiff of XLA's loop, for params, inputs and the initial carry."""
    cell, params, xs, carry = _setup(variant, seed=1)
    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params, xs, carry)  # noqa: E731
    got = grad(_loss(cell, "onednn", reverse))
    want = grad(_loss(cell, "xla", reverse, backward="autodiff"))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_gradients_match_finite_differences():
    cell, params, xs, carry = _setup("lstm_peep_proj", seed=2)
    loss = _loss(cell, "onednn", reverse=False)
    jax.test_util.check_grads(loss, (params, xs, carry), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


def test_jit_vmap_and_stack_agree():
    cell, params, xs, carry = _setup("lstm_peep")
    run = lambda x, kernel: seqjax.scan(cell, params, x, kernel=kernel)[1]  # noqa: E731
    eager = run(xs, "onednn")
    np.testing.assert_allclose(jax.jit(run, static_argnums=1)(xs, "onednn"), eager, rtol=0, atol=0)
    per_row = jax.vmap(lambda x: run(x[None], "onednn")[0])(xs)
    np.testing.assert_allclose(per_row, eager, rtol=1e-6, atol=1e-6)
    stacked = seqjax.stack([seqjax.lstm(H), seqjax.lstm(3, proj_size=2)])
    sp = stacked.init(jax.random.key(3), I)
    np.testing.assert_allclose(seqjax.scan(stacked, sp, xs, kernel="onednn")[1],
                               seqjax.scan(stacked, sp, xs, kernel="xla")[1], rtol=1e-5, atol=1e-6)


def test_layers_pass_the_kernel_on():
    """A bidirectional layer (its backward direction is oneDNN's right-to-left) and an NNX LSTM."""
    from flax import nnx
    xs = jax.random.normal(jax.random.key(5), (B, T, I))
    make = lambda kernel: seqjax.bidirectional(seqjax.lstm(H, peepholes=True), kernel=kernel)  # noqa: E731
    params = make("xla").init(jax.random.key(4), I)
    assert "seqjax_onednn" in _targets(lambda p, x: make("onednn").apply(p, x)[1], params, xs)
    np.testing.assert_allclose(make("onednn").apply(params, xs)[1], make("xla").apply(params, xs)[1],
                               rtol=1e-5, atol=1e-6)
    module = seqjax.nnx.LSTM(I, H, num_layers=2, kernel="onednn", rngs=nnx.Rngs(0))
    assert module(xs).shape == (B, T, H)
    with pytest.raises(ValueError, match="kernel='onednn' cannot run this call"):
        module(xs, lengths=jnp.array([7, 3, 0]))


def _targets(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))


def test_auto_picks_onednn_only_where_it_applies(monkeypatch):
    """Among the cells seqjax.backends._x86 does not take (here: with its auto routing off)."""
    from seqjax.backends._onednn import AUTO_MIN_HIDDEN
    monkeypatch.setattr(seqjax.backends._x86, "AUTO", False)
    small, params_small, xs, _ = _setup("lstm")
    assert H < AUTO_MIN_HIDDEN["lstm"]
    assert "seqjax_onednn" not in _targets(lambda p, x: seqjax.scan(small, p, x)[1], params_small, xs)
    cell = seqjax.lstm(AUTO_MIN_HIDDEN["lstm"], peepholes=True)
    params = cell.init(jax.random.key(0), I)
    auto = lambda p, x, **kw: seqjax.scan(cell, p, x, **kw)[1]  # noqa: E731
    assert "seqjax_onednn_rnn_forward" in _targets(auto, params, xs)
    assert "seqjax_onednn" not in _targets(lambda p, x: auto(p, x, kernel="xla"), params, xs)
    lengths = jnp.array([7, 3, 0])
    assert "seqjax_onednn" not in _targets(lambda p, x: auto(p, x, lengths=lengths), params, xs)
    assert "seqjax_onednn" not in _targets(lambda p, x: auto(p, x, backward="fused"), params, xs)
    assert "seqjax_onednn" not in _targets(auto, params, jnp.ones((B, 0, I)))
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    assert "seqjax_onednn" not in _targets(auto, p16, xs)
    big = {"gru": seqjax.gru(256), "gru_cho": seqjax.gru(256, reset_after=False), "rnn_tanh": seqjax.rnn(256),
           "rnn_relu": seqjax.rnn(256, activation="relu")}
    for kind, other in big.items():
        routed = "seqjax_onednn" in _targets(lambda p, x: seqjax.scan(other, p, x)[1], other.init(jax.random.key(0), I), xs)
        assert routed == (kind in AUTO_MIN_HIDDEN and 256 >= AUTO_MIN_HIDDEN[kind]), kind


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=np.array([7, 3, 0])), "no per-sequence lengths"),
    (dict(resets=np.zeros((B, T), bool)), "no per-step resets"),
    (dict(remat=True), "remat=True"),
    (dict(backward="autodiff"), "backward='autodiff'"),
    (dict(backward="fused"), "backward='fused'"),
    (dict(xs=np.ones((B, 0, I), np.float32)), r"an empty sequence or batch \(T, B\) = \(0, 3\)"),
])
def test_onednn_refuses_what_it_cannot_run(kwargs, message):
    cell, params, xs, _ = _setup("lstm")
    kwargs = {"xs": xs, **kwargs}
    with pytest.raises(ValueError, match=f"kernel='onednn' cannot run this call: .*{message}"):
        seqjax.scan(cell, params, kernel="onednn", **kwargs)


@pytest.mark.parametrize("make_cell, message", [
    (lambda: seqjax.lstm_variant("CIFG", H), "the oneDNN kernels have no form of lstm"),
    (lambda: seqjax.lstm_variant("FGR", H), "the oneDNN kernels have no form of lstm"),
    (lambda: seqjax.lstm(H, output_activation="identity"), "the oneDNN kernels have no form of lstm"),
    (lambda: seqjax.rnn(H, activation=jnp.sin), "the oneDNN kernels have no form of rnn"),
    (lambda: seqjax.lstm(H, param_dtype=jnp.bfloat16), "float32 only"),
])
def test_onednn_refuses_other_cells(make_cell, message):
    cell = make_cell()
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=message):
        seqjax.scan(cell, params, jnp.ones((B, T, I)), kernel="onednn")


def test_unknown_kernel_is_rejected():
    cell, params, xs, _ = _setup("lstm")
    for run in (seqjax.scan, seqjax.unrolled):
        with pytest.raises(ValueError, match=r"kernel must be one of \['auto', 'xla', 'avx2', 'avx512', 'onednn', 'cuda'\], got 'cudnn'"):
            run(cell, params, xs, kernel="cudnn")


def test_missing_onednn_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQJAX_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(native.NativeUnavailable, match=r"oneDNN not found .*pip install 'seqjax\[onednn\]'"):
        native.onednn_location()


def test_auto_falls_back_to_xla_when_the_kernels_do_not_load(monkeypatch):
    real = native.unavailable
    monkeypatch.setattr(native, "unavailable", lambda name: "no kernels in this test" if name == "onednn" else real(name))
    monkeypatch.setattr(seqjax.backends._x86, "AUTO", False)
    cell = seqjax.lstm(128)
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((B, T, I))
    jaxpr = _targets(lambda p, x: seqjax.scan(cell, p, x)[1], params, xs)
    assert "seqjax_onednn" not in jaxpr
    assert "not available here: no kernels in this test" in dict(seqjax.backends.explain(cell, params, xs).reasons)["onednn"]
    with pytest.raises(native.NativeUnavailable, match="kernel='onednn': no kernels in this test"):
        seqjax.scan(cell, params, xs, kernel="onednn")


def test_build_native_prints_the_library(capsys):
    from seqjax import build_native
    assert build_native.main() == 0
    out = capsys.readouterr().out
    assert "onednn  loads      onednn_rnn.so (" in out and ", oneDNN 3." in out
