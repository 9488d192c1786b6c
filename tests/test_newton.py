"""`seqjax.scan(..., method="newton")`: quasi-Newton iterations over the whole sequence equal the sequential loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax.backends import _newton

I, H = 3, 4
CELLS = {
    "gru": lambda: seqjax.gru(H),
    "lstm": lambda: seqjax.lstm(H),
    "lstm_peepholes": lambda: seqjax.lstm(H, peepholes=True, peephole_init=jax.nn.initializers.normal(0.5)),
    "rnn": lambda: seqjax.rnn(H),
}
TIGHT = seqjax.ScanOptions(method="newton", newton=seqjax.NewtonOptions(tol=1e-6))


def setup(name, B=4, T=13, seed=0):
    cell = CELLS[name]()
    kp, kx, kc = jax.random.split(jax.random.key(seed), 3)
    params = cell.init(kp, I)
    xs = jax.random.normal(kx, (B, T, I))
    carry = jax.tree.map(lambda a: 0.5 * jax.random.normal(kc, a.shape, a.dtype), cell.initial_carry(params, (B,)))
    return cell, params, xs, carry


def close(a, b, atol=1e-4):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol), a, b)


def run_and_grad(cell, params, xs, carry, options, **kw):
    """``(scan's output, gradients of a loss of ys and the final carry)`` for params, xs and carry."""
    def loss(params, xs, carry):
        c, ys = seqjax.scan(cell, params, xs, carry=carry, options=options, **kw)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(c))
    return (seqjax.scan(cell, params, xs, carry=carry, options=options, **kw),
            jax.grad(loss, argnums=(0, 1, 2))(params, xs, carry))


def sequential(options):
    return options._replace(method="sequential", kernel="xla")


@pytest.mark.parametrize("name, T", [(name, 13) for name in sorted(CELLS)] + [("gru", 1)])
def test_newton_equals_sequential_values_and_grads(name, T):
    """Lengths (full, 1, short, 0), resets (at step 0 and in the middle), both directions, values and gradients."""
    cell, params, xs, carry = setup(name, T=T)
    lengths = np.array([T, min(1, T), max(T // 2, 1), 0])
    resets = np.zeros((4, T), bool)
    resets[0, T // 2] = resets[2, 0] = True

    @jax.jit
    def both(params, xs, carry):
        return {(o.method, reverse): run_and_grad(cell, params, xs, carry, o, lengths=lengths, resets=resets,
                                                  reverse=reverse)
                for o in (TIGHT, sequential(TIGHT)) for reverse in (False, True)}

    out = both(params, xs, carry)
    for reverse in (False, True):
        close(out["newton", reverse], out["sequential", reverse])


def stats(cell, params, xs, newton):
    """The `Stats` of a forward run with no masks."""
    unit = _newton.unitwise_of(cell)
    px = cell.project(params, jnp.swapaxes(xs, 0, 1))
    c0 = cell.initial_carry(params, (xs.shape[0],))
    return jax.jit(lambda p, x: _newton.iterate(unit, newton, 1, p, x, c0, c0, None, None)[2])(params, px)


def bistable(name):
    """A cell whose step is (about) tanh(px + 1.5h): undamped Newton from h = 0 multiplies ~1.5^T slopes."""
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), I)
    if name == "rnn":
        return cell, params._replace(w_h=1.5 * jnp.eye(H))
    zero = jnp.zeros((H, H))     # GRU: r = 1, z = 0, n = tanh(px_n + 1.5h)
    return cell, params._replace(w_h=jnp.concatenate([zero, zero, 1.5 * jnp.eye(H)], axis=1),
                                 b=params.b.at[:H].set(8.0).at[H:2 * H].set(-8.0))


@pytest.mark.parametrize("name", ["rnn", "gru"])
def test_an_overflowing_iteration_needs_the_damped_fallback(name):
    cell, params = bistable(name)
    xs = 0.1 * jax.random.normal(jax.random.key(1), (2, 256, I))
    never = stats(cell, params, xs, seqjax.NewtonOptions(max_iters=100, damping="never"))
    auto = stats(cell, params, xs, seqjax.NewtonOptions(max_iters=100, damping="auto"))
    assert not bool(never.converged)
    assert bool(auto.converged) and bool(auto.damped) and int(auto.iterations) < 100
    options = seqjax.ScanOptions(method="newton", newton=seqjax.NewtonOptions(max_iters=100))
    out = jax.jit(lambda p, x: run_and_grad(cell, p, x, None, options))(params, xs)
    close(out, jax.jit(lambda p, x: run_and_grad(cell, p, x, None, sequential(options)))(params, xs))


def test_the_iteration_bound_finishes_sequentially():
    """Two iterations cannot converge over 13 steps: the sequential loop computes the result and its gradients."""
    cell, params, xs, carry = setup("lstm")
    bounded = seqjax.ScanOptions(method="newton", newton=seqjax.NewtonOptions(max_iters=2))
    s = stats(cell, params, xs, bounded.newton)
    assert int(s.iterations) == 2 and not bool(s.converged)
    lengths = np.array([13, 5, 1, 0])
    run = jax.jit(lambda o: run_and_grad(cell, params, xs, carry, o, lengths=lengths), static_argnums=0)
    close(run(bounded), run(sequential(bounded)), atol=1e-6)


def test_nan_in_padding_does_not_leak_and_nan_in_a_valid_step_propagates():
    cell, params, xs, _ = setup("gru", B=2, T=6)
    run = jax.jit(lambda x: seqjax.scan(cell, params, x, lengths=jnp.array([4, 6]), method="newton"))
    xs = xs.at[0, 4].set(jnp.nan)
    carry, ys = run(xs)
    assert np.isfinite(np.asarray(ys[0])).all() and np.isfinite(np.asarray(carry[0])).all()
    assert np.isnan(np.asarray(ys[1:, 4:])).sum() == 0
    xs = xs.at[1, 2].set(jnp.nan)
    carry, ys = run(xs)
    assert np.isnan(np.asarray(ys[1, 2:])).all() and np.isfinite(np.asarray(ys[1, :2])).all()
    assert np.isfinite(np.asarray(ys[0])).all()


def test_stack_bidirectional_time_major_and_vmap():
    cell, params, xs, _ = setup("gru", B=3, T=7)
    lengths = np.array([7, 4, 0])
    layers = {m: seqjax.bidirectional(cell, options=TIGHT._replace(method=m)) for m in ("sequential", "newton")}
    bparams = layers["sequential"].init(jax.random.key(1), I)
    stack = seqjax.stack([seqjax.lstm(H), seqjax.rnn(5)])
    sparams = stack.init(jax.random.key(2), I)

    @jax.jit
    def runs(xs):
        out = {m: (layers[m].apply(bparams, xs, lengths=lengths),
                   seqjax.scan(stack, sparams, xs, lengths=lengths, options=TIGHT._replace(method=m)))
               for m in layers}
        tm = seqjax.scan(cell, params, jnp.swapaxes(xs, 0, 1), time_major=True, options=TIGHT)
        per_row = jax.vmap(lambda x: seqjax.scan(cell, params, x[None], options=TIGHT))(xs)
        return out, (tm[0], jnp.swapaxes(tm[1], 0, 1)), (per_row[0][:, 0], per_row[1][:, 0])

    out, time_major, per_row = runs(xs)
    close(out["newton"], out["sequential"])
    reference = seqjax.scan(cell, params, xs, kernel="xla")
    close(time_major, reference)
    close(per_row, reference)


def test_empty_sequence_and_unrolled_ignores_the_method():
    cell, params, xs, carry = setup("lstm", B=2, T=5)
    close(seqjax.scan(cell, params, xs[:, :0], carry=carry, method="newton"), (carry, jnp.zeros((2, 0, H))))
    close(seqjax.unrolled(cell, params, xs, carry=carry, method="newton"),
          seqjax.scan(cell, params, xs, carry=carry, kernel="xla"), atol=1e-6)


def test_explain_names_the_method_and_auto_never_picks_it():
    cell, params, xs, _ = setup("gru")
    e = seqjax.backends.explain(cell, params, xs, options=TIGHT)
    assert (e.backend, e.method, e.reasons) == ("xla", "newton", ())
    assert "quasi-Newton" in e.method_reason and "tol=1e-06" in e.method_reason and "method: newton" in str(e)
    assert seqjax.backends.explain(cell, params, xs).method == "sequential"


@pytest.mark.parametrize("cell, kw, match", [
    (seqjax.gru(H, reset_after=False), {}, "needs a cell whose step .* got gru"),
    (seqjax.lstm(H, proj_size=2), {}, "got lstm"),
    (seqjax.min_gru(H), {}, "got min_gru"),
    (seqjax.gru(H), {"kernel": "avx2"}, "kernel='avx2'"),
    (seqjax.gru(H), {"backward": "autodiff"}, "backward='autodiff'"),
    (seqjax.gru(H), {"checkpoint": "sqrt"}, "checkpoint='sqrt'"),
])
def test_errors_name_the_call_and_the_fix(cell, kw, match):
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match="seqjax.scan: method='newton' " + ".*" + match):
        seqjax.scan(cell, params, jnp.ones((2, 5, I)), method="newton", **kw)


@pytest.mark.parametrize("newton, match", [
    (seqjax.NewtonOptions(tol=0.0), "newton.tol must be a positive finite number"),
    (seqjax.NewtonOptions(tol=float("nan")), "newton.tol"),
    (seqjax.NewtonOptions(max_iters=0), "newton.max_iters must be a positive int"),
    (seqjax.NewtonOptions(max_iters=2.5), "newton.max_iters"),
    (seqjax.NewtonOptions(damping="kalman"), "newton.damping must be one of"),
])
def test_newton_options_are_validated(newton, match):
    cell = seqjax.gru(H)
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match="seqjax.scan: " + match):
        seqjax.scan(cell, params, jnp.ones((2, 5, I)), options=seqjax.ScanOptions(method="newton", newton=newton))
    with pytest.raises(TypeError, match="newton must be a seqjax.NewtonOptions"):
        seqjax.scan(cell, params, jnp.ones((2, 5, I)), options=seqjax.ScanOptions(newton={"tol": 1e-3}))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_unitwise_step_is_the_step_and_local_keeps_each_units_own_weights(name):
    cell, params, xs, carry = setup(name, T=1)
    unit = _newton.unitwise_of(cell)
    px = cell.project(params, xs[:, 0])
    close(unit.pointwise(params, carry, unit.recurrent(params, carry), px), cell.step(params, carry, px), atol=1e-6)
    G = params.w_h.shape[1] // H
    mask = jnp.tile(jnp.eye(H), (1, G))                  # the diagonal of each [H, H] block
    close(unit.local(params, carry), unit.recurrent(params._replace(w_h=params.w_h * mask), carry), atol=1e-6)
