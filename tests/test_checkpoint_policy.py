"""``checkpoint=`` (what reverse mode keeps): the same values and gradients as ``"all"`` on every path.

Per path, against ``checkpoint="all"`` on the same path: the final carry, the
outputs and the cotangents of the inputs and of the initial carry bitwise
where one compiled kernel computes every step (seqjax's x86 kernels: the same
code from the same carries, the segments' gates recomputed bit for bit), else
to a few float32 ulps (XLA compiles the nested loops' bodies on their own, and
its vectorised tanh/exp can round differently in another fusion); the weight
gradients to float32 rounding: every checkpointed
path sums them per segment where "all" sums over the whole sequence at once,
so the additions come in another order.
T = 11 and 13 are no multiples of the segment lengths (remainder segments).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import seqjax
from seqjax._checkpoint import _eta, binomial_plan, segment_sizes
from seqjax.backends import _library

POLICIES = ("sqrt", ("budget", 4), ("budget", 2))


def _has_avx2():
    return _library.unavailable("avx2") is None


# (kernel, backward, the backend explain names, whether values and state/input cotangents are bitwise)
PATHS = {
    "xla autodiff": ("xla", "autodiff", "xla", False),
    "xla custom vjp": ("xla", "fused", "xla+custom_vjp", False),
    "avx2": ("avx2", "auto", "avx2", True),
}


def _problem(cell_name, B=3, T=11, I=4, H=16, seed=0):
    cell = {"lstm": seqjax.lstm(H), "gru": seqjax.gru(H), "rnn": seqjax.rnn(H)}[cell_name]
    params = cell.init(jax.random.key(seed), input_size=I)
    k = jax.random.split(jax.random.key(seed + 1), 3)
    xs = jax.random.normal(k[0], (B, T, I))
    carry = jax.tree.map(lambda a: 0.5 * jax.random.normal(k[1], a.shape), cell.initial_carry(params, (B,)))
    lengths = jnp.array([T, 4, 0][:B])
    resets = jax.random.bernoulli(k[2], 0.2, (B, T))
    return cell, params, xs, carry, lengths, resets


def _value_and_grads(cell, params, xs, carry, policy, kernel, backward, **kw):
    def loss(p, x, c):
        c, ys = seqjax.scan(cell, p, x, carry=c, checkpoint=policy, kernel=kernel, backward=backward, **kw)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(c)), (c, ys)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, xs, carry)
    return out, grads


def _check_same(path, cell_name, policy, reverse, masks, T=11, time_major=False):
    kernel, backward, backend, bitwise = PATHS[path]
    cell, params, xs, carry, lengths, resets = _problem(cell_name, T=T)
    if time_major:
        xs, resets = jnp.swapaxes(xs, 0, 1), resets.T
    kw = dict(reverse=reverse, time_major=time_major, **(dict(lengths=lengths, resets=resets) if masks else {}))
    assert seqjax.backends.explain(cell, params, xs, carry=carry, checkpoint=policy, kernel=kernel,
                                   backward=backward, **kw).backend == backend
    out_all, g_all = _value_and_grads(cell, params, xs, carry, "all", kernel, backward, **kw)
    out, g = _value_and_grads(cell, params, xs, carry, policy, kernel, backward, **kw)
    for a, b in zip(jax.tree.leaves(out_all), jax.tree.leaves(out)):
        if bitwise:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    (dp_all, dx_all, dc_all), (dp, dx, dc) = g_all, g
    for a, b in zip(jax.tree.leaves((dc_all, dx_all)), jax.tree.leaves((dc, dx))):
        if bitwise:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(dp_all), jax.tree.leaves(dp)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return g


@pytest.mark.parametrize("policy, reverse, masks", [
    ("sqrt", False, False), ("sqrt", True, True), (("budget", 4), True, False), (("budget", 4), False, True),
    (("budget", 2), True, True), (("binomial", 2), True, True), (("binomial", 3), False, False)], ids=str)
def test_xla_autodiff_equals_all(policy, reverse, masks):
    _check_same("xla autodiff", "lstm", policy, reverse, masks)


@pytest.mark.parametrize("cell_name, policy, reverse, masks", [
    ("lstm", "sqrt", False, False), ("lstm", ("budget", 4), True, True), ("lstm", ("budget", 2), False, True),
    ("gru", "sqrt", True, True), ("gru", ("budget", 4), False, False), ("rnn", "sqrt", False, True),
    ("rnn", ("budget", 4), True, False), ("lstm", ("binomial", 2), True, True), ("gru", ("binomial", 3), False, True),
    ("rnn", ("binomial", 1), True, False)], ids=str)
def test_custom_vjp_equals_all(cell_name, policy, reverse, masks):
    _check_same("xla custom vjp", cell_name, policy, reverse, masks, T=13)


@pytest.mark.parametrize("variant", ["peepholes+proj", "gru_cho", "bfloat16"])
def test_custom_vjp_variants_equal_all(variant):
    """The LSTMP with peepholes, Cho's GRU and 16-bit params (hoisted projection), lengths and reverse."""
    cell = {"peepholes+proj": seqjax.lstm(16, peepholes=True, proj_size=8), "gru_cho": seqjax.gru(16, reset_after=False),
            "bfloat16": seqjax.lstm(16)}[variant]
    params = cell.init(jax.random.key(0), input_size=4)
    if variant == "bfloat16":
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    xs = jax.random.normal(jax.random.key(1), (3, 13, 4)).astype(jax.tree.leaves(params)[0].dtype)

    def grads(policy):
        def loss(p, x):
            _, ys = seqjax.scan(cell, p, x, checkpoint=policy, kernel="xla", backward="fused", hoist=True,
                                lengths=jnp.array([13, 5, 0]), reverse=True)
            return jnp.sum(jnp.sin(ys.astype(jnp.float32)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs)

    tol = 1e-2 if variant == "bfloat16" else 1e-5
    for a, b in zip(jax.tree.leaves(grads("all")), jax.tree.leaves(grads("sqrt"))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.skipif(not _has_avx2(), reason="seqjax's AVX2 kernels are not available here")
@pytest.mark.parametrize("cell_name, policy, reverse, masks, time_major", [
    ("lstm", "sqrt", False, False, False), ("lstm", "sqrt", True, True, False), ("lstm", ("budget", 4), False, True, True),
    ("lstm", ("budget", 2), True, False, True), ("gru", "sqrt", False, True, False), ("gru", ("budget", 4), True, True, True),
    ("rnn", "sqrt", True, True, False), ("rnn", ("budget", 4), False, False, True),
    ("lstm", ("binomial", 2), False, True, False), ("gru", ("binomial", 3), True, True, True),
    ("rnn", ("binomial", 1), True, False, True)], ids=str)
def test_native_kernels_equal_all(cell_name, policy, reverse, masks, time_major):
    _check_same("avx2", cell_name, policy, reverse, masks, T=13, time_major=time_major)


def test_native_peepholes_and_variants_equal_all():
    """Greff et al.'s peephole LSTM and CIFG on the kernels: the peephole gradients summed per segment."""
    for cell in (seqjax.lstm_variant("vanilla", 16), seqjax.lstm_variant("CIFG", 16)):
        params = cell.init(jax.random.key(0), input_size=4)
        xs = jax.random.normal(jax.random.key(1), (3, 13, 4))

        def grads(policy):
            def loss(p, x):
                return jnp.sum(jnp.sin(seqjax.scan(cell, p, x, checkpoint=policy, lengths=jnp.array([13, 6, 1]))[1]))
            return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs)

        assert seqjax.backends.explain(cell, params, xs, checkpoint="sqrt").backend in ("avx2", "avx512")
        for a, b in zip(jax.tree.leaves(grads("all")), jax.tree.leaves(grads("sqrt"))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_xla_autodiff_gru_against_reference():
    """The checkpointed loop against `seqjax.unrolled` (plain autodiff of a Python loop), GRU, T=7."""
    cell, params, xs, carry, lengths, resets = _problem("gru", T=7)
    kw = dict(lengths=lengths, resets=resets, reverse=True)

    def grads(run, **extra):
        def loss(p, x):
            _, ys = run(cell, p, x, carry=carry, **kw, **extra)
            return jnp.sum(jnp.sin(ys))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs)

    want = grads(seqjax.unrolled)
    got = grads(seqjax.scan, checkpoint="sqrt", kernel="xla", backward="autodiff")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_segment_sizes():
    assert segment_sizes("all", 1000) == ()
    assert segment_sizes("sqrt", 1) == ()
    assert segment_sizes("sqrt", 1000) == (32,) and segment_sizes("sqrt", 1024) == (32,)
    assert segment_sizes("sqrt", 1025) == (33,)
    for T in (2, 10, 999, 10**6):
        for k in (2, 3, 8, 64):
            sizes = segment_sizes(("budget", k), T)
            outer = -(-T // sizes[0])
            inner = sizes[0] // sizes[-1] if len(sizes) > 1 else 0
            assert outer + inner <= k, (T, k, sizes)


def _replay_binomial(plan):
    """Replays a binomial plan's backward pass on the host: (steps in the order reversed, how often each step is
    recomputed, the most slots in use), asserting every range starts from the carry its slot holds."""
    slots = {0: 0, **{i + 1: p for i, p in enumerate(plan.saves)}}
    stack, order, count, most = list(plan.tasks), [], [0] * plan.T, max(slots)
    while stack:
        a, n, top, s, r = stack.pop()
        assert slots[top] == a
        if n == 1:
            order.append(a)
            continue
        m = max(1, n - _eta(s - 1, r))
        for t in range(a, a + m):
            count[t] += 1
        slots[top + 1] = a + m
        most = max(most, top + 1)
        stack += [(a, m, top, s, r - 1), (a + m, n - m, top + 1, s - 1, r)]
    return order, count, most


@pytest.mark.parametrize("T", [2, 3, 7, 13, 64, 100, 1000])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_binomial_plan_reverses_every_step_once(T, k):
    """Every step reversed once, last first, from the right carry; at most k saved carries; each step computed at
    most r times in all (once forward, r - 1 recomputations), r the smallest with C(k + r, k) >= T."""
    plan = binomial_plan(T, k)
    order, count, most = _replay_binomial(plan)
    assert order == list(range(T))[::-1]
    assert most <= k and len(plan.saves) <= k
    assert max(count) <= plan.sweeps - 1
    assert _eta(k, plan.sweeps) >= T and (plan.sweeps == 1 or _eta(k, plan.sweeps - 1) < T)
    assert segment_sizes(("binomial", k), T) == plan


@pytest.mark.parametrize("kernel, backward", [("xla", "autodiff"), ("xla", "fused"), ("auto", "auto")])
def test_memory_falls_with_sqrt(kernel, backward):
    """XLA's compiled memory analysis of a train step: "sqrt" needs a fraction of "all"'s temporaries, and
    ("binomial", 4) less than "sqrt" (T=1024; what is left is mostly the outputs' cotangent, [T, B, H] under
    every policy)."""
    cell, params, xs, carry, _, _ = _problem("lstm", B=4, T=1024, H=32)

    def temp_bytes(policy):
        def loss(p):
            return jnp.sum(seqjax.scan(cell, p, xs, checkpoint=policy, kernel=kernel, backward=backward)[1] ** 2)
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    sqrt = temp_bytes("sqrt")
    assert sqrt < 0.35 * temp_bytes("all")
    assert temp_bytes(("binomial", 4)) < sqrt


@pytest.mark.parametrize("bad", ["none", ("budget", 1), ("budget", 2.0), ("budget", True), ("binomial", 0),
                                 ("revolve", 4), 3, None])
def test_bad_checkpoint_is_refused(bad):
    cell, params, xs, *_ = _problem("rnn")
    if bad is None:
        with pytest.raises(ValueError, match=r"seqjax.scan: checkpoint must be"):
            seqjax.scan(cell, params, xs, options=seqjax.ScanOptions(checkpoint=None))
        return
    with pytest.raises(ValueError, match=r"seqjax.scan: checkpoint must be 'all', 'sqrt', \('budget', k\) with an "
                                         r"int k >= 2 or \('binomial', k\) with an int k >= 1"):
        seqjax.scan(cell, params, xs, checkpoint=bad)


def test_explain_shows_the_policy():
    cell, params, xs, *_ = _problem("lstm", T=100)
    text = str(seqjax.backends.explain(cell, params, xs, checkpoint="sqrt"))
    assert "checkpoint='sqrt': the carry every 10 steps is kept (10 segments of T=100)" in text
    assert seqjax.backends.explain(cell, params, xs).checkpoint.startswith("checkpoint='all'")
    text = seqjax.backends.explain(cell, params, xs, checkpoint=("binomial", 3)).checkpoint
    assert "binomial (revolve) schedule keeps at most 3 carries besides the initial one and recomputes each step " \
           "at most 6 times (T=100)" in text


@pytest.mark.parametrize("kernel, backward", [("auto", "auto"), ("xla", "fused")])
def test_tbptt_keeps_its_semantics(kernel, backward):
    """TBPTT(k1=5, k2=9) with resets over three windows: every policy applies "all"'s updates and carries."""
    import optax
    from seqjax import tbptt
    from seqjax.tbptt import Window
    from seqjax.train import init_state

    cell, B, I = seqjax.lstm(16), 2, 3
    params = {"cell": cell.init(jax.random.key(0), input_size=I), "w": jax.random.normal(jax.random.key(1), (16, 1))}
    xs = jax.random.normal(jax.random.key(2), (5 * 3 + 4, B, I))
    ys = jnp.sum(xs, -1, keepdims=True)
    resets = jnp.zeros(xs.shape[:2], bool).at[7, 0].set(True).at[12, 1].set(True)

    def run(policy):
        def model(p, carry, x, *, resets=None, key=None):
            carry, hs = seqjax.scan(cell, p["cell"], x, carry=carry, resets=resets, time_major=True,
                                    checkpoint=policy, kernel=kernel, backward=backward)
            return carry, hs @ p["w"]

        step = tbptt.make_step(model, lambda out, y: jnp.sum((out - y) ** 2, -1), optax.sgd(0.1), k1=5, k2=9)
        state, carry, trace = init_state(params, optax.sgd(0.1)), cell.initial_carry(params["cell"], (B,)), []
        for t in range(0, 15, 5):
            window = Window(xs[t:t + 9], ys[t:t + 9], resets[t:t + 9], jnp.int32(0))
            state, carry, metrics = step(state, carry, window)
            trace.append(jax.tree.map(np.asarray, (state.params, carry, metrics["loss"])))  # state is donated
        return trace

    want = run("all")
    for policy in ("sqrt", ("budget", 2), ("binomial", 2)):
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(run(policy))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_forward_mode_through_binomial_names_the_fix():
    """("binomial", k) is a custom VJP on XLA's autodiff loop too: jax.jvp and jax.linearize get seqjax's error."""
    cell, params, xs, *_ = _problem("gru", T=7)

    def f(x):
        return seqjax.scan(cell, params, x, checkpoint=("binomial", 2), kernel="xla", backward="autodiff")[1]

    for transform in (lambda: jax.jvp(f, (xs,), (xs,)), lambda: jax.linearize(f, xs)):
        with pytest.raises(TypeError, match=r"seqjax.scan: forward-mode .* checkpoint=\('binomial', 2\).*"
                                            r"pass checkpoint='all', 'sqrt' or \('budget', k\)"):
            transform()
    jax.jvp(lambda x: seqjax.scan(cell, params, x, checkpoint="sqrt", kernel="xla", backward="autodiff")[1],
            (xs,), (xs,))
