"""minGRU, minLSTM and the LRU as seqjax cells: their initialisation, options, errors, and the generic machinery.

Their equations are checked against NumPy in test_cells_reference.py and the
runner invariants in test_runners.py (both through tests/registry.py).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import seqjax
from seqjax.cells.base import form_of


def test_lru_ring_initialisation():
    """Orvieto et al. (2023): |lambda| on the ring [r_min, r_max], phase in [0, max_phase], gamma = sqrt(1 - |lambda|^2)."""
    cell = seqjax.lru(512, output_size=7, r_min=0.4, r_max=0.9, max_phase=math.pi / 10)
    p = cell.init(jax.random.key(3), 5)
    magnitude = np.exp(-np.exp(np.asarray(p.nu_log, np.float64)))
    phase = np.exp(np.asarray(p.theta_log, np.float64))
    assert magnitude.min() >= 0.4 - 1e-6 and magnitude.max() <= 0.9 + 1e-6
    assert phase.min() >= 0.0 and phase.max() <= math.pi / 10 + 1e-6
    np.testing.assert_allclose(np.exp(np.asarray(p.gamma_log, np.float64)), np.sqrt(1 - magnitude ** 2), rtol=1e-5)
    # |lambda|^2 is uniform on [r_min^2, r_max^2] (uniform on the ring's area): its mean is the midpoint
    assert abs(np.mean(magnitude ** 2) - (0.4 ** 2 + 0.9 ** 2) / 2) < 0.03
    assert (p.b_re.shape, p.b_im.shape, p.c_re.shape, p.c_im.shape, p.d.shape) == ((5, 512), (5, 512), (512, 7),
                                                                                   (512, 7), (5, 7))
    # B ~ N(0, 1/(2I)) per part, C ~ N(0, 1/N): the empirical variances are close
    assert abs(np.var(np.asarray(p.b_re)) * 2 * 5 - 1) < 0.15
    assert abs(np.var(np.asarray(p.c_re)) * 512 - 1) < 0.1


def test_lru_default_ring_is_finite():
    """r_min=0, r_max=1 (the defaults) give finite parameters, |lambda| < 1."""
    p = jax.jit(seqjax.lru(2048).init, static_argnums=1)(jax.random.key(0), 2)
    for leaf in jax.tree.leaves(p):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.all(np.exp(-np.exp(np.asarray(p.nu_log))) < 1.0)


@pytest.mark.parametrize("make", [seqjax.min_gru, seqjax.min_lstm])
def test_log_space_variant_steps_with_a_positive_candidate(make):
    """log_space changes the candidate to g(v) > 0 (the paper's log-space model): with all-positive
    pre-activations g(v) = v + 0.5, so the two variants differ by exactly the 0.5 shift."""
    lin, log = make(6), make(6, log_space=True)
    p = lin.init(jax.random.key(0), 3)
    p = p._replace(w_x=jnp.abs(p.w_x), b=jnp.abs(p.b) + 0.1)
    x = jnp.abs(jax.random.normal(jax.random.key(1), (2, 3)))
    h = jnp.zeros((2, 6))
    _, y_lin = lin.apply(p, h, x)
    _, y_log = log.apply(p, h, x)
    shifted = p._replace(b=p.b.at[-6:].add(0.5))
    np.testing.assert_allclose(np.asarray(y_log), np.asarray(lin.apply(shifted, h, x)[1]), rtol=1e-6)
    assert not np.allclose(np.asarray(y_lin), np.asarray(y_log))


def test_min_lstm_normalised_gates_never_divide():
    """Saturated gates (f, i -> 0 in float32) still give f' + i' = 1 and finite gradients."""
    cell = seqjax.min_lstm(3)
    p = cell.init(jax.random.key(0), 2)
    p = p._replace(b=jnp.concatenate([jnp.full(3, -200.0), jnp.full(3, -190.0), jnp.zeros(3)]))
    h = jnp.ones((1, 3))
    x = jnp.zeros((1, 2))
    _, y = cell.apply(p, h, x)
    # log(i/f) = 10: f' = sigmoid(-10), i' = sigmoid(10); the candidate is 0, so y = f' h
    np.testing.assert_allclose(np.asarray(y), 1.0 / (1.0 + np.exp(10.0)), rtol=1e-5)
    g = jax.grad(lambda p: jnp.sum(cell.apply(p, h, x)[1]))(p)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(g))


@pytest.mark.parametrize("make, arg, value, match", [
    (seqjax.min_gru, "hidden_size", 0, "hidden_size must be a positive int"),
    (seqjax.min_gru, "log_space", 1, "log_space must be a bool"),
    (seqjax.min_lstm, "param_dtype", jnp.int32, "param_dtype must be a floating-point dtype"),
    (seqjax.lru, "r_min", 1.0, "0 <= r_min < r_max <= 1"),
    (seqjax.lru, "r_max", 1.5, "0 <= r_min < r_max <= 1"),
    (seqjax.lru, "max_phase", 0.0, "max_phase must be > 0"),
    (seqjax.lru, "output_size", -1, "output_size must be a positive int"),
    (seqjax.rg_lru, "c", 0.0, "c must be > 0"),
    (seqjax.rg_lru, "a_max", 1.0, "0 < a_min < a_max < 1"),
    (seqjax.rg_lru, "a_min", "0.5", "a_min must be a number"),
    (seqjax.rg_lru, "value_projection", 1, "value_projection must be a bool"),
])
def test_factory_errors_name_the_factory_and_argument(make, arg, value, match):
    with pytest.raises(ValueError, match=f"seqjax.{make.__name__}: .*{match}"):
        make(**{"hidden_size": 4, arg: value})


@pytest.mark.parametrize("make", [lambda: seqjax.min_gru(4), lambda: seqjax.lru(4, output_size=3),
                                  lambda: seqjax.rg_lru(4)])
def test_params_of_the_wrong_cell_are_refused(make):
    cell = make()
    other = seqjax.gru(4).init(jax.random.key(0), 2)
    with pytest.raises(ValueError, match="params do not belong to"):
        seqjax.scan(cell, other, jnp.zeros((1, 3, 2)))


def test_linear_form_is_registered_and_voided_by_replacing_step():
    cell = seqjax.min_gru(4)
    assert form_of(cell).linear is not None and form_of(seqjax.gru(4)).linear is None
    assert form_of(cell._replace(step=lambda p, c, px: cell.step(p, c, px))) is None


def test_stack_multilayer_and_nnx_run_the_new_cells():
    """The generic machinery takes the cells: a stack steps like layer-by-layer scans, NNX wraps them."""
    key = jax.random.key(0)
    xs = jax.random.normal(key, (2, 5, 3))
    cell = seqjax.stack([seqjax.min_gru(4), seqjax.lru(4, output_size=4), seqjax.min_lstm(3)])
    params = cell.init(key, 3)

    @jax.jit
    def scanned_and_stepped(xs):
        carry, stepped = cell.initial_carry(params, (2,)), []
        for t in range(5):
            carry, y = cell.apply(params, carry, xs[:, t])
            stepped.append(y)
        return seqjax.scan(cell, params, xs)[1], jnp.stack(stepped, 1)

    ys, stepped = scanned_and_stepped(xs)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(stepped), atol=1e-6)
    model = seqjax.nnx.SequenceClassifier(seqjax.nnx.Recurrent(seqjax.lru(8), 3, num_layers=2, rngs=nnx.Rngs(0)), 5,
                                          rngs=nnx.Rngs(1))
    assert model(xs).shape == (2, 5)


def test_generate_feeds_samples_back_through_a_min_gru():
    V, E = 7, 4
    cell = seqjax.min_gru(6)
    key = jax.random.key(2)
    params = cell.init(key, E)
    embed = jax.random.normal(key, (V, E))
    w, b = jax.random.normal(jax.random.key(3), (6, V)), jnp.zeros(V)
    prompt = jnp.array([[1, 2, 3], [4, 0, 6]])
    tokens = seqjax.generate(cell, params, prompt, key, embed=embed, readout=(w, b), max_new_tokens=4, greedy=True)
    # greedy decoding equals stepping the cell by hand
    carry = cell.initial_carry(params, (2,))
    for t in range(3):
        carry, y = cell.apply(params, carry, embed[prompt[:, t]])
    out = []
    for _ in range(4):
        tok = jnp.argmax(y @ w + b, -1)
        out.append(tok)
        carry, y = cell.apply(params, carry, embed[tok])
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.stack(out, 1)))


@pytest.mark.parametrize("make", [lambda: seqjax.min_lstm(4), lambda: seqjax.lru(4, output_size=2)])
def test_bfloat16_params_keep_their_dtype(make):
    cell = make()
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), cell.init(jax.random.key(0), 3))
    carry, ys = seqjax.scan(cell, params, jnp.ones((2, 5, 3), jnp.bfloat16))
    assert ys.dtype == jnp.bfloat16 and carry.dtype == jnp.bfloat16


def test_rg_lru_initial_decay_lies_in_its_range():
    """a = exp(-softplus(a_param)) with a^2 ~ U(a_min^2, a_max^2): every a in range, the mean of a^2 the midpoint."""
    p = seqjax.rg_lru(4096, a_min=0.9, a_max=0.999).init(jax.random.key(0), 2)
    a = np.exp(-np.logaddexp(0.0, np.asarray(p.a_param, np.float64)))
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
    np.testing.assert_allclose(np.mean(a ** 2), (0.9 ** 2 + 0.999 ** 2) / 2, atol=2e-3)


def test_rg_lru_input_scale_near_unit_decay_is_accurate():
    """With a_t -> 1 the input factor sqrt(1 - a_t^2) is tiny; computed as sqrt(-expm1(2 log a_t)) it keeps its
    relative accuracy where 1 - a_t**2 in float32 rounds to 0 (and its gradient stays finite)."""
    cell = seqjax.rg_lru(2, c=1.0, value_projection=False)
    p = cell.init(jax.random.key(0), 2)
    p = p._replace(a_param=jnp.full(2, 12.0), w_x=jnp.zeros_like(p.w_x), b=jnp.full(4, 30.0))  # r = i = 1
    _, y = cell.apply(p, jnp.zeros((1, 2)), jnp.ones((1, 2)))
    log_a = -np.logaddexp(0.0, 12.0)                     # about -6.1e-6: a = 1 - 6.1e-6
    np.testing.assert_allclose(np.asarray(y), np.sqrt(-np.expm1(2 * log_a)), rtol=1e-5)
    g = jax.grad(lambda p: jnp.sum(cell.apply(p, jnp.ones((1, 2)), jnp.ones((1, 2)))[1]))(p)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(g))


def test_rg_lru_saturated_decay_keeps_gradients_finite():
    """A recurrence gate of exactly 0 (sigmoid(-200) in float32) makes a_t = 1 and 1 - a_t^2 = 0: the state passes
    unchanged, and the capped derivative of the square root keeps every gradient finite (sqrt's own is infinite)."""
    cell = seqjax.rg_lru(2, value_projection=False)
    p = cell.init(jax.random.key(0), 2)
    p = p._replace(w_x=jnp.zeros_like(p.w_x), b=jnp.concatenate([jnp.full(2, -200.0), jnp.zeros(2)]))
    h, x = jnp.array([[0.3, -0.7]]), jnp.ones((1, 2))
    _, y = cell.apply(p, h, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(h))
    for method in ("sequential", "associative"):
        g = jax.grad(lambda p, x: jnp.sum(seqjax.scan(cell, p, x, carry=h, method=method)[1]), argnums=(0, 1))(
            p, jnp.ones((1, 4, 2)))
        assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(g)), method


def test_rg_lru_without_value_projection_needs_input_size_equal_hidden():
    with pytest.raises(ValueError, match=r"seqjax.rg_lru\(value_projection=False\).init: input_size must equal "
                                         r"hidden_size=4 .*got 3"):
        seqjax.rg_lru(4, value_projection=False).init(jax.random.key(0), 3)
