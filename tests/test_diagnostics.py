"""seqjax.diagnostics: per-step gradient norms, the spectral bound, clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import seqjax
from seqjax import diagnostics

B, T, I = 2, 8, 3


def loss(ys, carry):
    return jnp.sum(ys ** 2) + sum(jnp.sum(c) for c in jax.tree.leaves(carry))


@pytest.mark.parametrize("make", [lambda: seqjax.rnn(4), lambda: seqjax.lstm(4), lambda: seqjax.gru(4),
                                  lambda: seqjax.stack([seqjax.gru(3), seqjax.rnn(4)])])
def test_step_gradients_equal_separate_backward_passes(make):
    cell = make()
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    lengths = jnp.array([T, 5])
    g = jax.jit(lambda xs: diagnostics.step_gradients(cell, params, xs, loss, lengths=lengths))(xs)
    assert g.carry.shape == g.x.shape == (B, T)

    def reference(t):
        """dL/dcarry_t by a separate backward pass through the steps after t."""
        head = jnp.minimum(lengths, t + 1)
        c_t, ys_head = seqjax.scan(cell, params, xs[:, :t + 1], lengths=head)

        def loss_from(c):
            c_end, ys_rest = seqjax.scan(cell, params, xs[:, t + 1:], carry=c, lengths=lengths - head)
            return loss(jnp.concatenate([ys_head, ys_rest], 1), c_end)

        return jax.grad(loss_from)(c_t)

    for t in range(T):
        ref = jax.jit(lambda: reference(t))()
        ref_norm = np.sqrt(sum(np.sum(np.asarray(a) ** 2, axis=-1) for a in jax.tree.leaves(ref)))
        valid = np.asarray(t < lengths)
        np.testing.assert_allclose(np.asarray(g.carry[valid, t]), ref_norm[valid], rtol=1e-4, atol=1e-6,
                                   err_msg=f"t={t}")
        assert not np.any(np.asarray(g.carry[~valid, t])), "padded steps receive no gradient"
    gx = jax.grad(lambda xs: loss(*seqjax.scan(cell, params, xs, lengths=lengths)[::-1]))(xs)
    np.testing.assert_allclose(np.asarray(g.x), np.linalg.norm(np.asarray(gx), axis=-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_spectral_bound_holds_for_tanh_rnn(seed, sigma):
    cell = seqjax.rnn(6)
    params = cell.init(jax.random.key(seed), I)
    w = jax.random.normal(jax.random.key(100 + seed), (6, 6))
    params = params._replace(w_h=w * sigma / diagnostics.spectral_norm(w))
    np.testing.assert_allclose(float(diagnostics.spectral_norm(params.w_h)), sigma, rtol=1e-5)
    xs = jax.random.normal(jax.random.key(200 + seed), (1, 20, I))
    g = diagnostics.step_gradients(cell, params, xs, lambda ys, c: jnp.sum(ys[:, -1] * jnp.arange(1.0, 7.0)))
    s = 19
    # ys[:, -1] is h_s itself: dL/dh_s is the loss weights, through the final output; the carry gradient
    # at t < s flows through steps t+1..s.
    grad_s = float(np.linalg.norm(np.arange(1.0, 7.0)))
    dist = s - np.arange(20)
    bound = np.asarray(diagnostics.rnn_gradient_bound(params.w_h, grad_s, dist))
    measured = np.asarray(g.carry[0])
    assert np.all(measured[:s] <= bound[:s] * (1 + 1e-5) + 1e-12)


def test_spectral_radius_and_norm_against_numpy():
    w = np.random.default_rng(0).normal(size=(5, 5)).astype(np.float32)
    np.testing.assert_allclose(float(diagnostics.spectral_norm(w)), np.linalg.svd(w, compute_uv=False)[0], rtol=1e-5)
    np.testing.assert_allclose(float(diagnostics.spectral_radius(w)), np.max(np.abs(np.linalg.eigvals(w))), rtol=1e-5)


def test_recurrent_matrices():
    p = seqjax.lstm(4).init(jax.random.key(0), 3)
    blocks = diagnostics.recurrent_matrices(p)
    assert list(blocks) == ["i", "f", "g", "o"] and blocks["g"].shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(blocks["f"]), np.asarray(p.w_h[:, 4:8]))
    assert list(diagnostics.recurrent_matrices(seqjax.gru(4).init(jax.random.key(0), 3))) == ["r", "z", "n"]
    with pytest.raises(TypeError, match="only the standard 4-gate LSTM"):
        diagnostics.recurrent_matrices(seqjax.lstm_variant("CIFG", 4).init(jax.random.key(0), 3))
    with pytest.raises(TypeError, match="params must be RNNParams, LSTMParams or GRUParams, got tuple"):
        diagnostics.recurrent_matrices((1, 2))


def test_clipping_returns_finite_updates_when_gradients_explode():
    cell = seqjax.rnn(8)
    params = cell.init(jax.random.key(0), I)
    params = params._replace(w_h=params.w_h * 2.0)  # orthogonal * 2: sigma_max = 2, exploding
    xs = jax.random.normal(jax.random.key(1), (4, 30, I))
    loss_fn = lambda p: jnp.mean(seqjax.scan(seqjax.rnn(8, activation="relu"), p, xs)[1][:, -1] ** 2)
    grads = jax.grad(loss_fn)(params)
    assert float(optax.tree.norm(grads)) > 1e3
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    updates, _ = tx.update(grads, tx.init(params))
    assert np.isfinite(float(optax.tree.norm(updates)))
    assert float(optax.tree.norm(updates)) <= 0.1 + 1e-6


def test_step_gradients_on_nnx_module_equal_functional():
    from flax import nnx

    module = seqjax.nnx.Cell(seqjax.lstm(4), I, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    g_module = diagnostics.step_gradients(module, None, xs, loss)
    g_core = diagnostics.step_gradients(module.cell, module.get_params(), xs, loss)
    np.testing.assert_allclose(np.asarray(g_module.carry), np.asarray(g_core.carry), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_module.x), np.asarray(g_core.x), rtol=1e-6)
    with pytest.raises(TypeError, match="cell must be a seqjax Cell or a seqjax.nnx.Cell module, got str"):
        diagnostics.step_gradients("lstm", None, xs, loss)


def test_step_gradients_take_options():
    cell = seqjax.lstm(4)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    lengths = jnp.array([T, 5])
    want = diagnostics.step_gradients(cell, params, xs, loss, lengths=lengths)
    for opts in (seqjax.ScanOptions(kernel="xla"), seqjax.ScanOptions(hoist=True, unroll=3),
                 seqjax.ScanOptions(kernel="xla", backward="autodiff", remat=True)):
        got = diagnostics.step_gradients(cell, params, xs, loss, lengths=lengths, options=opts)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=str(opts))
    # forward mode through the per-step gradients (forward over reverse), against central differences
    opts = seqjax.ScanOptions(kernel="xla", backward="autodiff")
    f = lambda s: diagnostics.step_gradients(cell, params, xs * s, loss, options=opts).carry  # noqa: E731
    tangent = jax.jvp(f, (1.0,), (1.0,))[1]
    eps = 1e-2
    np.testing.assert_allclose(tangent, (f(1.0 + eps) - f(1.0 - eps)) / (2 * eps), rtol=2e-2, atol=1e-4)
    call = "seqjax.diagnostics.step_gradients"
    with pytest.raises(TypeError, match=f"{call}: options must be a seqjax.ScanOptions, got dict"):
        diagnostics.step_gradients(cell, params, xs, loss, options={"kernel": "xla"})
    with pytest.raises(ValueError, match=f"{call}: kernel must be one of"):
        diagnostics.step_gradients(cell, params, xs, loss, options=seqjax.ScanOptions(kernel="fast"))
    with pytest.raises(ValueError, match=f"{call}: kernel='avx2' cannot run this call: .* pass kernel='auto' or 'xla'"):
        diagnostics.step_gradients(cell, params, xs, loss, options=seqjax.ScanOptions(kernel="avx2"))
    with pytest.raises(ValueError, match=f"{call}: backward='fused' cannot run this call"):
        diagnostics.step_gradients(cell, params, xs, loss, options=seqjax.ScanOptions(backward="fused"))
    with pytest.raises(ValueError, match=f"{call}: xs must have shape"):
        diagnostics.step_gradients(cell, params, xs[..., :2], loss)
