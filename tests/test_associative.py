"""`seqjax.scan(..., method="associative")`: the parallel prefix scan equals the sequential loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax.backends import _associative

I = 3
LINEAR = {
    "min_gru": lambda: seqjax.min_gru(4),
    "min_gru_log": lambda: seqjax.min_gru(4, log_space=True),
    "min_lstm": lambda: seqjax.min_lstm(4),
    "min_lstm_log": lambda: seqjax.min_lstm(4, log_space=True),
    "lru": lambda: seqjax.lru(4, output_size=3, r_min=0.5, r_max=0.99),
    "rg_lru": lambda: seqjax.rg_lru(4, c=4.0, a_min=0.5, a_max=0.99),
}


def setup(name, B=3, T=7, seed=0):
    cell = LINEAR[name]()
    kp, kx, kr, kc = jax.random.split(jax.random.key(seed), 4)
    params = cell.init(kp, I)
    params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(kr, a.shape, a.dtype), params)
    xs = jax.random.normal(kx, (B, T, I))
    # a non-zero initial carry of both signs: the log-space form must not need h_0 > 0
    carry = jax.tree.map(lambda a: jax.random.normal(kc, a.shape, a.dtype), cell.initial_carry(params, (B,)))
    return cell, params, xs, carry


def close(a, b, atol=2e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol), a, b)


def run_and_grad(cell, params, xs, carry, method, **kw):
    """``(scan's output, gradients of a loss of ys and the final carry)`` for params, xs and carry."""
    def loss(params, xs, carry):
        c, ys = seqjax.scan(cell, params, xs, method=method, carry=carry, **kw)
        return jnp.sum(ys ** 2) + sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(c))
    return seqjax.scan(cell, params, xs, method=method, carry=carry, **kw), jax.grad(loss, argnums=(0, 1, 2))(
        params, xs, carry)


@pytest.mark.parametrize("name, T", [(name, 13) for name in sorted(LINEAR)] +
                         [("min_gru_log", 1), ("lru", 1), ("min_lstm", 2), ("rg_lru", 1)])
def test_associative_equals_sequential_values_and_grads(name, T):
    """Lengths (0, 1, short, full), resets (at step 0 and in the middle) and reverse, values and gradients."""
    cell, params, xs, carry = setup(name, B=4, T=T)
    lengths = np.array([T, min(1, T), max(T // 2, 1), 0])
    resets = np.zeros((4, T), bool)
    resets[0, T // 2] = resets[2, 0] = True

    @jax.jit
    def both(params, xs, carry):
        return {(method, reverse): run_and_grad(cell, params, xs, carry, method, lengths=lengths, resets=resets,
                                                reverse=reverse)
                for method in ("sequential", "associative") for reverse in (False, True)}

    out = both(params, xs, carry)
    for reverse in (False, True):
        close(out["associative", reverse], out["sequential", reverse])


def test_no_masks_time_major_and_remat():
    cell, params, xs, carry = setup("lru", T=9)

    @jax.jit
    def runs(params, xs, carry):
        grad = lambda **kw: jax.grad(lambda p: jnp.sum(seqjax.scan(cell, p, xs, **kw)[1]))(params)  # noqa: E731
        tm = seqjax.scan(cell, params, jnp.swapaxes(xs, 0, 1), carry=carry, time_major=True, method="associative")
        return (seqjax.scan(cell, params, xs, carry=carry, method="sequential"),
                seqjax.scan(cell, params, xs, carry=carry, method="associative"), (tm[0], jnp.swapaxes(tm[1], 0, 1)),
                grad(method="sequential"), grad(method="associative", remat=True))

    reference, parallel, time_major, grad, grad_remat = runs(params, xs, carry)
    close(parallel, reference)
    close(time_major, reference)
    close(grad_remat, grad)


def test_bidirectional_and_stack_take_the_method():
    cell, params, xs, _ = setup("min_lstm")
    lengths = np.array([7, 4, 0])
    layers = {m: seqjax.bidirectional(cell, options=seqjax.ScanOptions(method=m)) for m in ("sequential", "associative")}
    bparams = layers["sequential"].init(jax.random.key(1), I)
    stack = seqjax.stack([seqjax.min_gru(4), seqjax.lru(4, output_size=5)])
    sparams = stack.init(jax.random.key(2), I)

    @jax.jit
    def runs(xs):
        return {m: (layers[m].apply(bparams, xs, lengths=lengths), seqjax.scan(stack, sparams, xs, lengths=lengths,
                                                                                method=m))
                for m in layers}

    out = runs(xs)
    close(out["associative"], out["sequential"])


def test_jit_equals_eager_and_vmap_equals_batch():
    cell, params, xs, carry = setup("lru", T=5)
    lengths = jnp.array([5, 2, 4])
    eager = seqjax.scan(cell, params, xs, carry=carry, lengths=lengths, method="associative")
    close(jax.jit(lambda p, x, c, n: seqjax.scan(cell, p, x, carry=c, lengths=n, method="associative"))(
        params, xs, carry, lengths), eager)
    per_row = jax.vmap(lambda x, c, n: seqjax.scan(cell, params, x[None], carry=c[None], lengths=n[None],
                                                   method="associative"))(xs, carry, lengths)
    close((per_row[0][:, 0], per_row[1][:, 0]), eager)


def test_empty_sequence_and_batch():
    cell, params, _, carry = setup("min_gru")
    for shape in [(3, 0, I), (0, 5, I)]:
        xs = jnp.zeros(shape)
        c = carry if shape[0] else cell.initial_carry(params, (0,))
        close(seqjax.scan(cell, params, xs, carry=c, method="associative"),
              seqjax.scan(cell, params, xs, carry=c, method="sequential"))


def test_nan_in_padding_does_not_leak_and_nan_in_a_valid_step_propagates():
    cell, params, xs, _ = setup("min_gru")
    xs = xs.at[1, 5].set(jnp.nan)            # row 1 has length 4: step 5 is padding
    xs = xs.at[0, 2].set(jnp.nan)            # row 0: a valid step
    lengths = np.array([7, 4, 7])
    for method in ("associative", "sequential"):
        carry, ys = seqjax.scan(cell, params, xs, lengths=lengths, method=method)
        assert np.all(np.isfinite(np.asarray(ys[1:]))) and np.all(np.isfinite(np.asarray(carry[1:])))
        assert np.all(np.isfinite(np.asarray(ys[0, :2]))) and np.all(np.isnan(np.asarray(ys[0, 2:])))


def test_bfloat16_accumulates_in_float32():
    """bfloat16 params: the scan runs in float32 and rounds once, so it equals the float32 evaluation of the
    same (bfloat16-valued) numbers to bfloat16 rounding, over a long sequence with a ≈ 1."""
    cell = seqjax.lru(8, r_min=0.99, r_max=0.999)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), cell.init(jax.random.key(0), 2))
    xs = jax.random.normal(jax.random.key(1), (2, 512, 2)).astype(jnp.bfloat16)
    up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # noqa: E731  exact
    run = jax.jit(lambda p, x: seqjax.scan(cell, p, x, method="associative"))
    carry, ys = run(params, xs)
    assert ys.dtype == carry.dtype == jnp.bfloat16
    _, ys32 = run(up(params), up(xs))
    np.testing.assert_allclose(np.asarray(ys, np.float32), np.asarray(ys32), rtol=2 ** -7, atol=2 ** -7 * float(
        jnp.max(jnp.abs(ys32))))


def test_errors():
    gru = seqjax.gru(4)
    params = gru.init(jax.random.key(0), I)
    xs = jnp.zeros((2, 5, I))
    with pytest.raises(ValueError, match=r"seqjax.scan: method='associative' needs a cell with a linear recurrence.*"
                                         r"got gru\(hidden_size=4"):
        seqjax.scan(gru, params, xs, method="associative")
    with pytest.raises(ValueError, match="seqjax.scan: method must be one of"):
        seqjax.scan(gru, params, xs, method="parallel")
    with pytest.raises(ValueError, match="seqjax.sequence: method must be one of"):
        seqjax.sequence(gru, options=seqjax.ScanOptions(method=None))
    cell, p, xs, _ = setup("min_gru")
    with pytest.raises(ValueError, match="method='associative' runs on XLA and cannot use kernel='avx2'"):
        seqjax.scan(cell, p, xs, method="associative", kernel="avx2")
    with pytest.raises(ValueError, match="no fused backward pass"):
        seqjax.scan(cell, p, xs, method="associative", backward="fused")
    # a replaced step voids the linear form: the cell is no longer known to be linear
    replaced = cell._replace(step=lambda p, c, px: cell.step(p, c, px))
    with pytest.raises(ValueError, match="needs a cell with a linear recurrence"):
        seqjax.scan(replaced, p, xs, method="associative")
    # a stack with a non-linear layer names that layer
    stack = seqjax.stack([cell, gru])
    with pytest.raises(ValueError, match=r"got gru\(hidden_size=4"):
        seqjax.scan(stack, stack.init(jax.random.key(0), I), xs, method="associative")


def test_unrolled_ignores_the_method():
    cell, params, xs, _ = setup("min_lstm")
    e = seqjax.unrolled(cell, params, xs, method="associative")
    close(e, seqjax.scan(cell, params, xs, method="sequential"))


def test_explain_says_which_method_and_why(monkeypatch):
    cell, params, _, _ = setup("min_gru")
    short, long = jnp.zeros((2, 15, I)), jnp.zeros((2, 16, I))
    e = seqjax.backends.explain(cell, params, long)           # the measured CPU table: no crossover
    assert e.method == "sequential" and "no crossover T on CPU" in e.method_reason
    assert "method: sequential" in str(e)
    monkeypatch.setitem(_associative.AUTO_MIN_T, "cpu", 16)
    e = seqjax.backends.explain(cell, params, long)
    assert e.method == "associative" and "from T=16 on CPU" in e.method_reason and e.reasons == ()
    assert "method: associative" in str(e)
    e = seqjax.backends.explain(cell, params, short)
    assert e.method == "sequential" and "got T=15" in e.method_reason and e.backend == "xla"
    assert seqjax.backends.explain(cell, params, long, method="sequential").method == "sequential"
    assert seqjax.backends.explain(cell, params, short, method="associative").method == "associative"
    gru = seqjax.gru(4)
    e = seqjax.backends.explain(gru, gru.init(jax.random.key(0), I), long)
    assert e.method == "sequential" and "no linear recurrence" in e.method_reason


def test_auto_runs_what_explain_says(monkeypatch):
    """method="auto" follows AUTO_MIN_T: the associative scan runs from the crossover length on."""
    cell, params, xs, _ = setup("min_gru")
    traced = []
    real = _associative.run
    monkeypatch.setattr(_associative, "run", lambda request: traced.append(1) or real(request))
    monkeypatch.setitem(_associative.AUTO_MIN_T, "cpu", xs.shape[1] + 1)
    seqjax.scan(cell, params, xs)
    assert traced == []
    monkeypatch.setitem(_associative.AUTO_MIN_T, "cpu", xs.shape[1])
    seqjax.scan(cell, params, xs)
    assert traced == [1]
