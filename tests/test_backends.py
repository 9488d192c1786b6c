"""The seam of the fast paths: `seqjax.backends.explain`, `ScanOptions` everywhere, transformations, validation."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax.backends import _library, _table

B, T, I, H = 3, 7, 5, 16
X86 = _library.unavailable("avx512") is None and "avx512" or _library.unavailable("avx2") is None and "avx2"
needs_x86 = pytest.mark.skipif(not X86, reason="seqjax's x86 kernels are not available here")


def setup(cell=None):
    cell = seqjax.lstm(H) if cell is None else cell
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    return cell, params, xs


def targets(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))


# ----------------------------------------------------------------------------- explain

@needs_x86
def test_explain_names_the_path_the_call_takes_and_agrees_with_the_jaxpr():
    cell, params, xs = setup()
    cases = [({}, X86), (dict(kernel="xla"), "xla+custom_vjp"), (dict(backward="autodiff"), "xla"),
             (dict(remat=True), "xla"), (dict(lengths=[7, 3, 0]), X86)]
    for kwargs, want in cases:
        e = seqjax.backends.explain(cell, params, xs, **kwargs)
        assert e.backend == want, (kwargs, str(e))
        assert [n for n, _ in e.reasons] == [n for n in seqjax.backends.names() if n != want]
        jaxpr = targets(lambda p, x: seqjax.scan(cell, p, x, **kwargs)[1], params, xs)
        assert (f"seqjax_{X86}_rnn_forward" in jaxpr) == (want == X86), kwargs
        assert str(e).startswith(f"runs on: {want} (placed on cpu)")


def test_explain_gives_each_reason_a_person_can_act_on():
    cell, params, xs = setup()
    replaced = cell._replace(step=lambda p, c, px: cell.step(p, c, px))
    e = seqjax.backends.explain(replaced, params, xs)
    assert e.backend == "xla"
    reasons = dict(e.reasons)
    assert "project and step unchanged" in reasons["xla+custom_vjp"]
    assert "GPU kernel" in reasons["cuda"]
    e = seqjax.backends.explain(seqjax.lstm(17), seqjax.lstm(17).init(jax.random.key(0), I), xs)
    assert "multiple of" in dict(e.reasons)["avx2"] or "not available" in dict(e.reasons)["avx2"]
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    e = seqjax.backends.explain(cell, p16, xs)
    assert e.backend == "xla+custom_vjp" and "float32" in dict(e.reasons)["avx2"]


def test_explain_of_a_stack_has_one_line_per_layer():
    cell, params, xs = setup(seqjax.stack([seqjax.lstm(H), seqjax.rnn(H, activation=jnp.sin)]))
    e = seqjax.backends.explain(cell, params, xs, kernel="xla")
    assert [layer.backend for layer in e.layers] == ["xla+custom_vjp", "xla"]
    assert str(e).startswith("layer 0: runs on: xla+custom_vjp")


def test_explain_raises_what_scan_raises():
    cell, params, xs = setup(seqjax.lstm(H, gate_recurrence=True))
    with pytest.raises(ValueError, match="seqjax.backends.explain: backward='fused' needs a fusable cell"):
        seqjax.backends.explain(cell, params, xs, backward="fused")
    with pytest.raises(ValueError, match="seqjax.scan: backward='fused' needs a fusable cell"):
        seqjax.scan(cell, params, xs, backward="fused")


# ----------------------------------------------------------------------------- options

def test_scan_options_equal_the_keywords_and_keywords_win():
    cell, params, xs = setup()
    opts = seqjax.ScanOptions(kernel="xla", backward="autodiff", unroll=2)
    by_value = targets(lambda p, x: seqjax.scan(cell, p, x, options=opts)[1], params, xs)
    by_keyword = targets(lambda p, x: seqjax.scan(cell, p, x, kernel="xla", backward="autodiff", unroll=2)[1],
                         params, xs)
    assert by_value == by_keyword
    assert seqjax.backends.explain(cell, params, xs, options=opts, backward="auto").backend == "xla+custom_vjp"
    with pytest.raises(TypeError, match="seqjax.scan: options must be a seqjax.ScanOptions, got dict"):
        seqjax.scan(cell, params, xs, options=dict(kernel="xla"))
    with pytest.raises(ValueError, match="seqjax.multilayer: kernel must be one of"):
        seqjax.multilayer(cell, 2, options=seqjax.ScanOptions(kernel="fast"))


def _jvp_matches_finite_difference(f, x, dx):
    _, tangent = jax.jvp(f, (x,), (dx,))
    eps = 1e-3
    fd = (f(x + eps * dx) - f(x - eps * dx)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("make", ["sequence", "bidirectional", "deep", "multilayer", "nnx"])
def test_forward_mode_reaches_every_layer_through_options(make):
    """``options=ScanOptions(kernel="xla", backward="autodiff")`` makes jax.jvp work through every layer kind."""
    cell, _, xs = setup()
    opts = seqjax.ScanOptions(kernel="xla", backward="autodiff")
    if make == "nnx":
        from flax import nnx
        module = seqjax.nnx.LSTM(I, H, num_layers=2, bidirectional=True, options=opts, rngs=nnx.Rngs(0))
        f = lambda x: module(x)  # noqa: E731
    else:
        layer = {"sequence": lambda: seqjax.sequence(cell, options=opts),
                 "bidirectional": lambda: seqjax.bidirectional(cell, options=opts),
                 "deep": lambda: seqjax.deep([cell, cell], options=opts),
                 "multilayer": lambda: seqjax.multilayer(cell, 2, bidirectional=True, options=opts)}[make]()
        params = layer.init(jax.random.key(0), I)
        f = lambda x: layer.apply(params, x)[1]  # noqa: E731
    _jvp_matches_finite_difference(f, xs, jax.random.normal(jax.random.key(2), xs.shape))


def test_generate_and_seq2seq_take_options():
    cell = seqjax.lstm(H)
    params = cell.init(jax.random.key(0), 4)
    embed, readout = jnp.eye(6, 4), jnp.ones((H, 6))
    args = (cell, params, jnp.array([1, 2, 3]), jax.random.key(0))
    kw = dict(embed=embed, readout=readout, max_new_tokens=4, greedy=True)
    np.testing.assert_array_equal(seqjax.generate(*args, **kw),
                                  seqjax.generate(*args, **kw, options=seqjax.ScanOptions(kernel="xla")))
    opts = seqjax.ScanOptions(kernel="xla", backward="autodiff")
    model = seqjax.seq2seq.seq2seq(9, 7, hidden_size=H, options=opts)
    mp = model.init(jax.random.key(0))
    batch = seqjax.seq2seq.Seq2SeqBatch((jnp.ones((2, 5), jnp.int32), jnp.array([5, 3])),
                                        jnp.full((2, 4), 2, jnp.int32), jnp.array([4, 2]))
    loss = lambda p: model.loss(p, batch)[0]  # noqa: E731
    # forward mode through the encoder's bidirectional scan and the decoder's teacher-forced scan
    _, tangent = jax.jvp(loss, (mp,), (mp,))
    np.testing.assert_allclose(tangent, jax.tree.reduce(jnp.add, jax.tree.map(jnp.vdot, jax.grad(loss)(mp), mp)),
                               rtol=1e-4)


# ----------------------------------------------------------------------------- transformations

def test_forward_mode_through_a_reverse_mode_only_path_names_the_fix():
    cell, params, xs = setup()
    f = lambda p, **kw: jnp.sum(seqjax.scan(cell, p, xs, **kw)[1] ** 2)  # noqa: E731
    for kwargs in ({}, dict(kernel="xla")):
        with pytest.raises(TypeError, match=r"seqjax.scan: forward-mode .* pass kernel='xla', backward='autodiff'"):
            jax.jvp(lambda p: f(p, **kwargs), (params,), (params,))
        with pytest.raises(TypeError, match="backward='autodiff'"):
            jax.jacfwd(lambda b: f(params._replace(b=b), **kwargs))(params.b)
        # raised by jax.linearize itself, not later by the tangent map with JAX's generic custom_vjp message
        with pytest.raises(TypeError, match=r"seqjax.scan: forward-mode .* pass kernel='xla', backward='autodiff'"):
            jax.linearize(lambda p: f(p, **kwargs), params)
        with pytest.raises(TypeError, match=r"seqjax.scan: forward-mode .*backward='autodiff'"):
            jax.linearize(jax.jit(lambda p: f(p, **kwargs)), params)
        # linearized in a variable the scan does not see: no tangent reaches it, nothing to refuse
        readout = lambda w: jnp.sum(seqjax.scan(cell, params, xs, **kwargs)[1] @ w)  # noqa: E731
        w = jnp.ones((H, 2))
        np.testing.assert_allclose(jax.linearize(readout, w)[1](w), readout(w), rtol=1e-5)
    auto = lambda p: f(p, kernel="xla", backward="autodiff")  # noqa: E731
    np.testing.assert_allclose(jax.linearize(auto, params)[1](params), jax.jvp(auto, (params,), (params,))[1],
                               rtol=1e-5)


@pytest.mark.parametrize("make", ["multilayer", "nnx"])
@pytest.mark.parametrize("kernel", ["auto", "xla"])
def test_linearize_through_layers_and_modules_names_the_fix(make, kernel):
    cell, _, xs = setup()

    def loss(opts):
        if make == "nnx":
            from flax import nnx
            module = seqjax.nnx.LSTM(I, H, options=opts, rngs=nnx.Rngs(0))
            return lambda x: jnp.sum(module(x) ** 2)
        layer = seqjax.multilayer(cell, 1, bidirectional=True, options=opts)
        params = layer.init(jax.random.key(0), I)
        return lambda x: jnp.sum(layer.apply(params, x)[1] ** 2)

    f = loss(seqjax.ScanOptions(kernel=kernel))
    jax.grad(f)(xs)  # reverse mode traces the same call and is not refused
    with pytest.raises(TypeError, match=r"forward-mode differentiation .* pass kernel='xla', backward='autodiff'"):
        jax.linearize(f, xs)
    fixed = loss(seqjax.ScanOptions(kernel="xla", backward="autodiff"))  # the option the message names works
    np.testing.assert_allclose(jax.linearize(fixed, xs)[1](xs), jax.jvp(fixed, (xs,), (xs,))[1], rtol=1e-5)


def test_second_derivatives_work_on_xla_and_name_the_fix_on_the_kernels():
    cell, params, xs = setup()
    f = lambda b, **kw: jnp.sum(seqjax.scan(cell, params._replace(b=b), xs, **kw)[1] ** 2)  # noqa: E731
    want = jax.hessian(lambda b: f(b, kernel="xla", backward="autodiff"))(params.b)
    np.testing.assert_allclose(jax.hessian(lambda b: f(b, kernel="xla"))(params.b), want, rtol=1e-4, atol=1e-5)
    gg = lambda b, **kw: jnp.sum(jax.grad(f)(b, **kw) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.grad(lambda b: gg(b, kernel="xla"))(params.b),
                               jax.grad(lambda b: gg(b, kernel="xla", backward="autodiff"))(params.b), rtol=1e-4,
                               atol=1e-6)
    if X86:
        with pytest.raises(TypeError, match="differentiable once.*pass kernel='xla'"):
            jax.hessian(f)(params.b)
        with pytest.raises(TypeError, match="differentiable once.*pass kernel='xla'"):
            jax.grad(gg)(params.b)


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("case", ["family", "hidden", "stack", "cho", "peepholes", "proj", "int"])
def test_params_that_do_not_belong_to_the_cell_are_refused_before_tracing(case):
    lstm = seqjax.lstm(H)
    cell, params = {
        "family": lambda: (lstm, seqjax.gru(H).init(jax.random.key(0), I)),
        "hidden": lambda: (lstm, seqjax.lstm(H + 8).init(jax.random.key(0), I)),
        "stack": lambda: (lstm, seqjax.stack([lstm, lstm]).init(jax.random.key(0), I)),
        "cho": lambda: (seqjax.gru(H), seqjax.gru(H, reset_after=False).init(jax.random.key(0), I)),
        "peepholes": lambda: (lstm, seqjax.lstm(H, peepholes=True).init(jax.random.key(0), I)),
        "proj": lambda: (seqjax.lstm(H, proj_size=8), lstm.init(jax.random.key(0), I)),
        "int": lambda: (lstm, jax.tree.map(lambda a: a.astype(jnp.int32), lstm.init(jax.random.key(0), I))),
    }[case]()
    xs = jnp.ones((B, T, I))
    with pytest.raises(ValueError, match=r"seqjax.scan: params do not belong to (lstm|gru)\(hidden_size="):
        seqjax.scan(cell, params, xs)
    with pytest.raises(ValueError, match=r"seqjax.sequence\(\.\.\.\)\.apply: params do not belong"):
        seqjax.sequence(cell).apply(params, xs)
    with pytest.raises(ValueError, match=r"seqjax.multilayer\(\.\.\.\)\.apply: params do not belong"):
        seqjax.multilayer(cell, 2, bidirectional=True).apply((seqjax.BidirectionalParams(params, params),) * 2, xs)


def test_lengths_take_any_integer_array_like():
    cell, params, xs = setup()
    want = seqjax.scan(cell, params, xs, lengths=jnp.array([7, 3, 0]), kernel="xla")
    for lengths in ([7, 3, 0], (7, 3, 0), np.array([7, 3, 0], np.int64), np.array([7, 3, 0], np.uint8)):
        got = seqjax.scan(cell, params, xs, lengths=lengths, kernel="xla")
        jax.tree.map(np.testing.assert_array_equal, got, want)
    for bad, message in (([7.0, 3.0, 0.0], "integer array of shape"), ([7, 3], r"shape \(B,\)=\(3,\)"),
                         ("abc", "integer array"), ([[7, 3, 0]], "shape")):
        with pytest.raises(ValueError, match=f"seqjax.scan: lengths must be an {message}" if "integer" in message
                           else f"seqjax.scan: lengths .*{message}"):
            seqjax.scan(cell, params, xs, lengths=bad)


@pytest.mark.parametrize("make, message", [
    (lambda: seqjax.lstm(H, forget_bias="1"), "seqjax.lstm: forget_bias must be a number, got '1'"),
    (lambda: seqjax.lstm(H, param_dtype=jnp.int32), "seqjax.lstm: param_dtype must be a floating-point dtype"),
    (lambda: seqjax.gru(H, param_dtype="banana"), "seqjax.gru: param_dtype must be a floating-point dtype"),
    (lambda: seqjax.rnn(H, recurrent_init=0.1), "seqjax.rnn: recurrent_init must be an initialiser"),
    (lambda: seqjax.multilayer(seqjax.gru(H), 2, dropout=1.5), "seqjax.multilayer: dropout must be a float"),
    (lambda: seqjax.scan(*setup(), unroll=0), "seqjax.scan: unroll must be a positive int"),
    (lambda: seqjax.sequence(seqjax.gru(H), hoist="yes"), "seqjax.sequence: hoist must be a bool"),
])
def test_factory_and_option_errors_name_the_function_and_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ----------------------------------------------------------------------------- missing kernels

def test_a_missing_kernel_library_warns_once_and_falls_back_to_xla(monkeypatch):
    cell, params, xs = setup()
    reason = "seqjax was installed without its native kernels; reinstall with a C++ compiler"
    monkeypatch.setattr(_library, "unavailable", lambda name: reason if name in ("avx2", "avx512") else
                        "oneDNN is not installed")
    monkeypatch.setattr(_table, "_warned", set())
    with pytest.warns(RuntimeWarning, match="seqjax's avx2 kernels would run this call but are not available.*"
                                            "reinstall with a C\\+\\+ compiler"):
        got = seqjax.scan(cell, params, xs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        seqjax.scan(cell, params, xs)
        seqjax.scan(cell, params, xs, kernel="xla")
    want = seqjax.scan(cell, params, xs, kernel="xla")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    assert seqjax.backends.explain(cell, params, xs).backend == "xla+custom_vjp"
    with pytest.raises(seqjax.backends.NativeUnavailable, match="kernel='avx2': seqjax was installed without"):
        seqjax.scan(cell, params, xs, kernel="avx2")


def test_placement_decides_the_platform():
    cell, params, xs = setup()
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        assert seqjax.backends.explain(cell, params, xs).platform == "cpu"
    assert _table.platform_of(jax.device_put(xs, cpu)) == "cpu"
    assert _table.platform_of(np.ones(3)) == _table._family(jax.default_backend())


@needs_x86
def test_with_several_platforms_each_lowers_its_own_choice(monkeypatch):
    """On a host with an accelerator, a traced call without a known placement branches per platform at lowering
    (`jax.lax.platform_dependent`): the CPU lowering runs the CPU kernels, with the CPU's defaults."""
    from seqjax import runners
    cell, params, xs = setup()
    loss = lambda p, x: jnp.sum(seqjax.scan(cell, p, x)[1] ** 2)  # noqa: E731
    want = jax.jit(jax.value_and_grad(loss))(params, xs)
    monkeypatch.setattr(runners, "placements", lambda: ("cpu", "gpu"))
    step = jax.jit(jax.value_and_grad(loss))
    assert "platform_index" in targets(step, params, xs)
    hlo = step.lower(params, xs).compile().as_text()
    assert f"seqjax_{X86}_rnn_forward" in hlo and " while(" not in hlo
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), step(params, xs), want)
    # a committed input fixes the placement: no branches
    committed = jax.device_put(xs, jax.devices("cpu")[0])
    assert "platform_index" not in targets(lambda p: loss(p, committed), params)


# ----------------------------------------------------------------------------- padding

PAD_LENGTHS = (7, 3, 0)
PATHS = {  # every implementation that takes lengths, and the reference
    "auto": (seqjax.scan, {}),
    "xla+custom_vjp": (seqjax.scan, dict(kernel="xla")),
    "xla+custom_vjp hoist remat": (seqjax.scan, dict(kernel="xla", backward="fused", hoist=True, remat=True)),
    "xla": (seqjax.scan, dict(kernel="xla", backward="autodiff", hoist=True)),
    "unrolled": (seqjax.unrolled, {}),
}


def _both_directions(run, cell, params, xs, **kwargs):
    """sum(ys²) + sum(final carry) of a forward and a reverse run (what the padding must not reach)."""
    total = 0.0
    for reverse in (False, True):
        carry, ys = run(cell, params, xs, reverse=reverse, **kwargs)
        total = total + jnp.sum(ys ** 2) + sum(jnp.sum(c) for c in jax.tree.leaves(carry))
    return total


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("make", [lambda: seqjax.lstm(8), lambda: seqjax.gru(8), lambda: seqjax.rnn(8)],
                         ids=["lstm", "gru", "rnn"])
def test_padding_holding_nan_and_garbage_changes_nothing(make, path):
    cell = make()
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    pad = np.arange(T)[None, :] >= np.array(PAD_LENGTHS)[:, None]
    garbage = np.where(np.arange(T)[None, :] % 2, np.nan, 1e30)[..., None]
    padded = jnp.where(pad[..., None], garbage, xs)
    run, kwargs = PATHS[path]
    loss = lambda p, x: _both_directions(run, cell, p, x, lengths=jnp.array(PAD_LENGTHS), **kwargs)  # noqa: E731
    value, (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1))(params, padded)

    # unpadded: each sequence alone, over its own length (the empty one contributes nothing)
    want_value, want_gp = 0.0, jax.tree.map(jnp.zeros_like, params)
    want_gx = np.zeros(xs.shape, np.float32)
    for b, n in enumerate(PAD_LENGTHS):
        if n:
            alone = lambda p, x: _both_directions(seqjax.unrolled, cell, p, x)  # noqa: E731
            v, (g, g_x) = jax.value_and_grad(alone, argnums=(0, 1))(params, xs[b:b + 1, :n])
            want_value, want_gp = want_value + v, jax.tree.map(jnp.add, want_gp, g)
            want_gx[b, :n] = g_x[0]
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(gp), jax.tree.leaves(want_gp)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-4, atol=1e-5)  # exactly 0 on the padding
    assert not np.any(np.asarray(gx)[pad])
