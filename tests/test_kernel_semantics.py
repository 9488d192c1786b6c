"""The CPU kernels (kernel="avx2", "avx512") where kernel="xla" defines the semantics: a NaN or an Inf in the
inputs, the initial carry or any param comes out where XLA's loop puts it (outputs, final carry and
gradients), a NaN in a padding step reaches nothing, and saturated units (|pre-activation| up to ~1e4) give
gradients as close to float64 as XLA's float32 loop gets. Skipped where the CPU lacks AVX2/FMA or no C++
compiler is here; the AVX-512 build runs where the CPU has AVX-512F."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax.backends import _library as native
from test_cuda import CPU_KINDS, _setup

pytestmark = pytest.mark.skipif(not native.avx2_installed() or jax.default_backend() != "cpu",
                                reason="needs an x86-64 CPU with AVX2 and FMA, a C++ compiler and the CPU backend")
needs_avx512 = pytest.mark.skipif(not native.avx2_installed("avx512"), reason="needs a CPU with AVX-512F")
ISAS = ["avx2", pytest.param("avx512", marks=needs_avx512)]
# test_cuda.CPU_KINDS: Greff et al.'s variants come with peepholes
KINDS = ["lstm", "lstm_peep", "lstm_nog", "lstm_noaf", "lstm_niaf", "lstm_cifg", "gru", "rnn_tanh", "rnn_relu"]
B, T, I, H = 5, 6, 4, 16


def _places(kind):
    """Where a special value goes: xs, the initial carry, and one element of each param array."""
    lstm = kind.startswith("lstm")
    places = ["xs", "h0", *(["c0"] if lstm else []), "w_x", "w_h", "b"]
    return places + (["peep"] if kind not in ("lstm", "gru", "rnn_tanh", "rnn_relu") else []) + \
        (["b_hn"] if kind == "gru" else [])


# left out: cases that kernels with a tanh(+-Inf) of +-0.99999976 (before the clamp at XLA's bound) already
# got right to the tolerance: c = +-Inf reaches the plain LSTM's results only as o tanh(c) (the peephole
# variants cover c0 = +-Inf), and relu(-Inf) is 0 either way
_ALREADY_SO = {("lstm", "c0", np.inf), ("lstm", "c0", -np.inf), ("rnn_relu", "b", -np.inf)}
CASES = [pytest.param(k, p, v, id=f"{k}-{p}-{v}") for k in KINDS for p in _places(k) for v in (np.nan, np.inf, -np.inf)
         if (k, p, v) not in _ALREADY_SO]


def _put(where, value, params, xs, carry):
    """``(params, xs, carry)`` with ``value`` at one element of ``where``."""
    def at(a, index):
        return jnp.asarray(a).at[index].set(value)
    if where == "xs":
        return params, at(xs, (1, 2, 0)), carry
    if where in ("h0", "c0"):
        if isinstance(carry, seqjax.LSTMCarry):
            name = "h" if where == "h0" else "c"
            return params, xs, carry._replace(**{name: at(getattr(carry, name), (2, 3))})
        return params, xs, at(carry, (2, 3))
    # W_h: a column of the last gate (the LSTM's o where it has one): where h W_h is -Inf there, o = 0 and h = 0
    index = {"w_x": (1, 5), "w_h": (3, params.w_h.shape[1] - H + 7), "b": (4,), "peep": (0, 2), "b_hn": (6,)}[where]
    return params._replace(**{where: at(getattr(params, where), index)}), xs, carry


@functools.cache
def _compiled(kernel, kind):
    """The jitted value and gradients of sum(ys) + sum(final carry), one per kernel and kind (the cases of a
    kind share its shapes, so they share its compilation)."""
    cell = CPU_KINDS[kind](H)

    def loss(p, x, c, masks):
        final, ys = seqjax.scan(cell, p, x, carry=c, kernel=kernel, **masks)
        return jnp.sum(ys) + sum(jnp.sum(a) for a in jax.tree.leaves(final)), (final, ys)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _run(kernel, kind, params, xs, carry, **masks):
    """``{"ys", "final", "grads"}``: outputs, final carry and the gradients of params, xs and the carry."""
    (_, (final, ys)), grads = _compiled(kernel, kind)(params, xs, carry, masks)
    return jax.tree.map(np.array, {"ys": ys, "final": final, "grads": grads})


def _assert_specials_match(got, want):
    """NaN exactly where ``want`` has NaN, Inf of the same sign where it has Inf, exact zeros where it has them
    (a saturated tanh or sigmoid has a derivative of exactly 0), the rest to rounding."""
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    failures = []
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        name, w = jax.tree_util.keystr(path), flat_want[path]
        for what, mask in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf), ("0", lambda a: a == 0)):
            if not np.array_equal(mask(g), mask(w)):
                failures.append(f"{name}: {what} at {int(mask(g).sum())} elements, XLA {int(mask(w).sum())}, "
                                f"{int((mask(g) != mask(w)).sum())} differ")
        finite = np.isfinite(g) & np.isfinite(w)
        if finite.any():
            scale = max(1.0, float(np.abs(w[finite]).max()))
            err = float(np.abs(g[finite] - w[finite]).max())
            if err > 1e-4 * scale:
                failures.append(f"{name}: finite values differ by {err:.3g} (scale {scale:.3g})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind, where, value", CASES)
def test_nan_and_inf_come_out_where_xla_puts_them(kind, where, value, isa):
    """One NaN or +-Inf in xs, h0, c0 or a param: outputs, final carry and the gradients of params, xs and the
    initial carry have NaN, Inf and exact zeros where kernel="xla" has them, and the other values match it."""
    _, params, xs, carry = _setup(kind, B, T, I, H, seed=31)
    params, xs, carry = _put(where, value, params, xs, carry)
    _assert_specials_match(_run(isa, kind, params, xs, carry), _run("xla", kind, params, xs, carry))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["lstm", "lstm_peep", "gru", "rnn_tanh", "rnn_relu"])
def test_nan_in_a_padding_step_does_not_leak(kind, isa):
    """With lengths: a NaN in a valid step (row 0, all T steps valid) spreads as in XLA's loop; a NaN in a
    padding step (row 1, step 4; its length is 3) reaches nothing. The outputs and final carry match kernel="xla" on
    these inputs. XLA's loop computes the padding steps and discards them with a select, so its gradients take
    NaN from them (0 * NaN in its gradient GEMMs): the kernels' gradients are compared with XLA's for the
    same inputs with the padding's NaN replaced by 0, and their gradient of the padding is exactly 0."""
    _, params, xs, carry = _setup(kind, B, T, I, H, seed=32)
    lengths = jnp.array([6, 3, 0, 5, 1])
    xs = xs.at[0, 2, 1].set(np.nan)
    padded = xs.at[1, 4, 2].set(np.nan)
    got, want = _run(isa, kind, params, padded, carry, lengths=lengths), _run("xla", kind, params, padded, carry,
                                                                         lengths=lengths)
    _assert_specials_match({k: got[k] for k in ("ys", "final")}, {k: want[k] for k in ("ys", "final")})
    assert np.isnan(got["ys"][0, 2:]).all() and not np.isnan(got["ys"][1:]).any()
    _assert_specials_match(got, _run("xla", kind, params, xs, carry, lengths=lengths))
    padding = np.arange(T)[None, :] >= np.asarray(lengths)[:, None]
    np.testing.assert_array_equal(got["grads"][1][padding], 0.0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_nan_in_w_h_with_lengths_and_resets(kind, isa):
    """A NaN in W_h makes every h NaN from the first step on, but the gradient that a padding step passes on
    (row 2, length 0: dh0 = dhT) and the one a reset cuts (row 3, a reset at step 0: dh0 = 0) stay finite, as
    XLA's selects keep them: the kernels do not multiply them by W_h. (XLA's loop also runs the padding steps,
    on NaN carries, so its gradient of xs there is NaN where the kernels' is exactly 0: compared elsewhere.)"""
    _, params, xs, carry = _setup(kind, B, T, I, H, seed=33)
    params = params._replace(w_h=params.w_h.at[3, 7].set(np.nan))
    resets = jnp.zeros((B, T), bool).at[3, 0].set(True).at[4, 3].set(True)
    lengths = np.array([6, 3, 0, 5, 4])
    masks = dict(lengths=jnp.asarray(lengths), resets=resets)
    got, want = _run(isa, kind, params, xs, carry, **masks), _run("xla", kind, params, xs, carry, **masks)
    padding = np.arange(T)[None, :] >= lengths[:, None]
    np.testing.assert_array_equal(got["grads"][1][padding], 0.0)
    want["grads"][1][padding] = 0.0
    _assert_specials_match(got, want)
    for dc in jax.tree.leaves(got["grads"][2]):
        assert np.isfinite(dc[2:4]).all() and np.isnan(dc[[0, 1, 4]]).all()


# ------------------------------------------------------------------------------------------- saturation

def _float64_gradients(cell, params, xs):
    """The gradients of sum(ys) w.r.t. params and xs from kernel="xla" in float64."""
    with jax.enable_x64():
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
        return jax.tree.map(np.asarray, _gradients("xla", cell, p64, jnp.asarray(np.asarray(xs), jnp.float64)))


def _gradients(kernel, cell, params, xs):
    loss = lambda p, x: jnp.sum(seqjax.scan(cell, p, x, kernel=kernel)[1])  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind, hidden, top", [("lstm_nog", 48, 3e3), ("lstm", 32, 3e3), ("lstm_noaf", 32, 3e3),
                                               ("gru", 32, 3e3), ("rnn_tanh", 32, 1e4)])
def test_saturated_units_give_gradients_as_accurate_as_xla(kind, hidden, top, isa):
    """Batch rows with inputs of scale 10 .. ``top`` (pre-activations up to about 1e4): most units saturate,
    some sit at the edge. Their tanh (and sigmoid) must reach exactly +-1 (0, 1) where XLA's does, or the
    derivatives 1 - y^2 and y (1 - y) stay ~1e-7 at every saturated unit and sum into the gradients. Per
    gradient (each param and xs), the distance (Frobenius norm) from float64 is at most twice that of XLA's
    float32 loop plus 1e-6 of the gradient's norm; XLA's own float32 distance is under 1e-4 of the norm (the
    float64 reference is the same loop's)."""
    B_, T_, I_ = 8, 40, 16
    cell, params, _, _ = _setup(kind, B_, T_, I_, hidden, seed=34)
    scale = np.logspace(1, np.log10(top), B_).astype(np.float32)[:, None, None]
    xs = jnp.asarray(scale * np.random.default_rng(34).standard_normal((B_, T_, I_)).astype(np.float32))
    assert 5e3 < float(jnp.max(jnp.abs(xs @ params.w_x))) < 1e5
    want = _float64_gradients(cell, params, xs)
    got, xla = (jax.tree.map(np.asarray, _gradients(k, cell, params, xs)) for k in (isa, "xla"))
    failures = []
    for (path, w), g, x in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got),
                               jax.tree.leaves(xla)):
        norm = np.linalg.norm(w)
        err, err_xla = np.linalg.norm(g - w), np.linalg.norm(x - w)
        assert err_xla < 1e-4 * norm, (jax.tree_util.keystr(path), err_xla, norm)
        if err > 2 * err_xla + 1e-6 * norm:
            failures.append(f"{jax.tree_util.keystr(path)}: |kernel - float64| = {err:.3g}, |xla - float64| = "
                            f"{err_xla:.3g}, |float64| = {norm:.3g}")
    assert not failures, "\n".join(failures)
