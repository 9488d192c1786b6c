"""The AVX2 kernels (seqjax.backends._x86, kernel="avx2"): numerics against NumPy, XLA's loop and finite differences,
thread-count and jit/vmap invariants, routing and errors. Skipped where the CPU lacks AVX2/FMA or seqjax was
installed without its kernels."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax.backends import _kernel_vjp as persistent, _library as native, _x86 as avx2
from test_cuda import CPU_KINDS, _numpy_scan, _setup, assert_gradients_match_xla

pytestmark = pytest.mark.skipif(not native.avx2_installed() or jax.default_backend() != "cpu",
                                reason="needs an x86-64 CPU with AVX2 and FMA, the installed kernels and the CPU backend")
SHAPES = [(3, 7, 5, 16), (13, 6, 4, 24), (1, 3, 2, 8), (5, 9, 3, 64)]  # (B, T, I, H): tile remainders, one chunk
# the AVX-512 build: hidden sizes of one, two and four 16-unit chunks; batches below, between and above its
# tile heights (6 rows for the LSTM and GRU, 16 for the RNN)
SHAPES_512 = [(13, 6, 4, 16), (20, 5, 3, 32), (3, 7, 5, 64)]
needs_avx512 = pytest.mark.skipif(not native.avx2_installed("avx512"), reason="needs a CPU with AVX-512F")
# every test runs these; Greff et al.'s other LSTM variants (VARIANTS) get tests of their own
KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_peep", "lstm_cifg"]
VARIANTS = [k for k in CPU_KINDS if k not in KINDS]


def _kk(kind):
    """The kernels' kind for a test kind of `CPU_KINDS` (peepholes come with the params)."""
    return {"lstm_peep": "lstm", "lstm_cifg_np": "lstm_cifg"}.get(kind, kind)


def _run(kind, params, xs, carry, reverse, threads, isa="avx2"):
    final, ys = jax.jit(lambda p, x, c: avx2.avx2_scan(_kk(kind), p, x, c, reverse, threads=threads, isa=isa))(
        params, jnp.swapaxes(xs, 0, 1), carry)
    return final, jnp.swapaxes(ys, 0, 1)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B, T, I, H", SHAPES)
def test_forward_matches_numpy(kind, reverse, B, T, I, H):
    cell, params, xs, carry = _setup(kind, B, T, I, H)
    final, ys = _run(kind, params, xs, carry, reverse, threads=2)
    want_final, want_ys = _numpy_scan(kind, params, xs, carry, reverse)
    np.testing.assert_allclose(ys, want_ys, rtol=2e-5, atol=2e-5)
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(want_final)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@needs_avx512
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("B, T, I, H", SHAPES_512)
def test_avx512_gives_the_bits_of_avx2(kind, B, T, I, H):
    """Each hidden unit sees the same operations in the same order in both builds, whatever the tiles."""
    cell, params, xs, carry = _setup(kind, B, T, I, H, seed=7)
    for reverse in (False, True):
        narrow, wide = (_run(kind, params, xs, carry, reverse, 2, isa) for isa in ("avx2", "avx512"))
        for a, b in zip(jax.tree.leaves(narrow), jax.tree.leaves(wide)):
            np.testing.assert_array_equal(a, b)

    def grads(isa):
        return jax.grad(lambda p, x, c: jnp.sum(jnp.sin(_run(kind, p, x, c, True, 0, isa)[1])), argnums=(0, 1, 2))(
            params, xs, carry)
    for a, b in zip(jax.tree.leaves(grads("avx2")), jax.tree.leaves(grads("avx512"))):
        np.testing.assert_array_equal(a, b)


@needs_avx512
@pytest.mark.parametrize("kind", list(KINDS))
def test_avx512_matches_numpy_and_xla(kind):
    B, T, I, H = SHAPES_512[0]
    cell, params, xs, carry = _setup(kind, B, T, I, H, seed=8)
    final, ys = _run(kind, params, xs, carry, False, 1, "avx512")
    want_final, want_ys = _numpy_scan(kind, params, xs, carry, False)
    np.testing.assert_allclose(ys, want_ys, rtol=2e-5, atol=2e-5)
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(want_final)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert_gradients_match_xla("avx512", cell, params, xs, carry, True)


@pytest.mark.parametrize("kind, reverse, B, T, I, H",
                         [(k, r, *shape) for k in KINDS for r in (False, True) for shape in SHAPES[:2]]
                         + [("lstm", False, 16, 40, 8, 128), ("gru", True, 16, 40, 8, 128)])
def test_gradients_match_xla(kind, reverse, B, T, I, H):
    assert_gradients_match_xla("avx2", *_setup(kind, B, T, I, H, seed=1), reverse)


@pytest.mark.parametrize("kind", ["lstm", "lstm_peep", "lstm_cifg", "gru"])
def test_gradients_match_finite_differences(kind):
    cell, params, xs, carry = _setup(kind, 2, 5, 3, 8, seed=2)
    loss = lambda p, x, c: jnp.sum(jnp.cos(seqjax.scan(cell, p, x, carry=c, kernel="avx2")[1]))  # noqa: E731
    jax.test_util.check_grads(loss, (params, xs, carry), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("B, lengths", [(7, None), (20, None), (20, "sorted")])
def test_thread_count_does_not_change_a_bit(kind, B, lengths):
    """Two threads split each step's units (B < 16) or the batch (B >= 16; rows 0-15 and 16-19 here), and
    every unit of every row is computed the same way whichever thread does it. Lengths sorted longest first
    leave whole tiles of padding, which skip their products; with resets too, the results match XLA's."""
    cell, params, xs, carry = _setup(kind, B, 30, 4, 64, seed=3)
    resets = None
    if lengths == "sorted":
        lengths = jnp.asarray(np.sort(np.random.default_rng(3).integers(0, 31, B))[::-1].copy())
        resets = _resets(B, 30, 4)

    def run(p, reverse, threads):
        return jax.jit(lambda p, x, c: avx2.avx2_scan(_kk(kind), p, x, c, reverse, threads=threads, time_major=False,
                                                      lengths=lengths, resets=resets))(p, xs, carry)
    one, two = run(params, False, 1), run(params, False, 2)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_array_equal(a, b)
    grad = lambda threads: jax.grad(lambda p: jnp.sum(run(p, True, threads)[1] ** 2))(params)  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad(1)), jax.tree.leaves(grad(2))):
        np.testing.assert_array_equal(a, b)
    if lengths is not None:
        assert_gradients_match_xla("avx2", cell, params, xs, carry, True, lengths=lengths, resets=resets)


# 13 sequences of up to T = 9 steps: empty, full and in between
LENGTHS = np.array([9, 0, 4, 1, 9, 7, 3, 2, 8, 5, 6, 9, 0])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("isa", ["avx2", pytest.param("avx512", marks=needs_avx512)])
def test_lengths_give_each_sequence_its_own_prefix(kind, reverse, isa):
    """With lengths, each batch row equals NumPy run over that sequence's valid steps alone: outputs past its
    length are exactly zero, its final carry is the carry after its last valid step (the initial one for
    length 0), and reverse starts at its own last valid step."""
    B, T = len(LENGTHS), 9
    cell, params, xs, carry = _setup(kind, B, T, 5, 32, seed=10)
    final, ys = jax.jit(lambda p, x, c: avx2.avx2_scan(_kk(kind), p, x, c, reverse, threads=2, isa=isa, time_major=False,
                                                       lengths=jnp.asarray(LENGTHS)))(params, xs, carry)
    for b, n in enumerate(LENGTHS):
        row = jax.tree.map(lambda a: a[b:b + 1], carry)
        want_final, want_ys = _numpy_scan(kind, params, xs[b:b + 1, :n], row, reverse) if n else (row, None)
        if n:
            np.testing.assert_allclose(ys[b, :n], want_ys[0], rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(ys[b, n:], 0.0)
        for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(want_final)):
            np.testing.assert_allclose(got[b], np.asarray(want)[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_gradients_match_xla(kind, reverse):
    cell, params, xs, carry = _setup(kind, len(LENGTHS), 9, 5, 32, seed=11)
    assert_gradients_match_xla(avx2.auto_isa(32), cell, params, xs, carry, reverse, lengths=jnp.asarray(LENGTHS))


def _resets(B, T, seed):
    """[B, T] bool: about one step in five resets, and rows 0 and 3 reset at both ends."""
    r = np.random.default_rng(seed).random((B, T)) < 0.2
    r[[0, 3], 0] = r[[0, 3], -1] = True
    return jnp.asarray(r)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_resets_match_xla(kind, reverse, with_lengths):
    """Per-step resets (the carry is zero before the step; nothing at padding steps), alone and with lengths:
    values and gradients against XLA's loop."""
    B, T = len(LENGTHS), 9
    cell, params, xs, carry = _setup(kind, B, T, 5, 32, seed=15)
    masks = dict(resets=_resets(B, T, 16), lengths=jnp.asarray(LENGTHS) if with_lengths else None)
    assert avx2.auto_isa(32) in str(jax.make_jaxpr(lambda x: seqjax.scan(cell, params, x, **masks))(xs))
    assert_gradients_match_xla(avx2.auto_isa(32), cell, params, xs, carry, reverse, **masks)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "lstm_peep"])
@pytest.mark.parametrize("B", [7, 40])
def test_rows_taken_longest_first_give_the_bits_of_a_sorted_batch(kind, B):
    """With lengths the kernels take the batch rows longest first (so that tiles of padding skip their work),
    and each row's arithmetic is the same in any position: an unsorted batch gives the bits of the same batch
    sorted by the caller, outputs, final carry and the gradients of xs and the carry (B = 40: split between
    the two threads, each half with its share of long rows). The weight gradients sum the rows in memory
    order, which sorting changes: those agree to rounding."""
    T = 12
    cell, params, xs, carry = _setup(kind, B, T, 5, 32, seed=19)
    lengths = np.random.default_rng(19).integers(0, T + 1, B).astype(np.int32)
    order = np.argsort(-lengths, kind="stable")
    resets = _resets(B, T, 20)
    assert not np.array_equal(order, np.arange(B))

    def grads(p, x, c, L, R, reverse):
        def loss(p, x, c):
            final, ys = avx2.avx2_scan(_kk(kind), p, x, c, reverse, threads=2, time_major=False, lengths=L, resets=R)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(final)), (final, ys)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(p, x, c)

    for reverse in (False, True):
        (_, got), (dp_got, dx_got, dc_got) = grads(params, xs, carry, lengths, resets, reverse)
        (_, want), (dp_want, dx_want, dc_want) = grads(params, xs[order], jax.tree.map(lambda a: a[order], carry),
                                                       lengths[order], resets[order], reverse)
        back = np.argsort(order)  # the sorted batch's rows back in the caller's order
        for a, b in zip(jax.tree.leaves((got, dx_got, dc_got)), jax.tree.leaves((want, dx_want, dc_want))):
            np.testing.assert_array_equal(a, np.asarray(b)[back])
        for a, b in zip(jax.tree.leaves(dp_got), jax.tree.leaves(dp_want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "lstm_peep"])
def test_a_row_gets_the_same_bits_alone_as_in_a_batch(kind):
    """The backward's recurrent tiles are 8 rows high, and a batch's last rows (or a batch of fewer) go in
    tiles of 4, 2 and 1: a row sees the same operations in any of them. Rows of a 13-row batch (a full tile,
    then 4 + 1), alone and in a batch of 3 (2 + 1), give the same outputs, final carry and carry gradients to
    the bit. (The input gradients come from XLA's GEMM, whose blocking depends on the batch: to rounding.)"""
    B, T, isa = 13, 9, avx2.auto_isa(32)
    cell, params, xs, carry = _setup(kind, B, T, 5, 32, seed=23)

    def grads(x, c):
        def loss(c, x):
            final, ys = avx2.avx2_scan(_kk(kind), params, x, c, threads=1, isa=isa, time_major=False)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(final)), (final, ys)
        (_, out), (dc, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(c, x)
        return out, dc, dx

    out, dc, dx = grads(xs, carry)
    for rows in ([12], [3, 9, 12]):
        sel = np.asarray(rows)
        got_out, got_dc, got_dx = grads(xs[sel], jax.tree.map(lambda a: a[sel], carry))
        for a, b in zip(jax.tree.leaves((got_out, got_dc)), jax.tree.leaves((out, dc))):
            np.testing.assert_array_equal(a, np.asarray(b)[sel])
        np.testing.assert_allclose(got_dx, np.asarray(dx)[sel], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", VARIANTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_variants_match_numpy_and_xla(kind, reverse):
    """Greff et al.'s NIG, NFG, NOG, NIAF and NOAF (with peepholes) and CIFG without them: each row with lengths
    against float64 NumPy over its valid prefix, gradients with lengths and resets against XLA's loop, and the
    AVX-512 build's bits against the AVX2 build's."""
    B, T = len(LENGTHS), 9
    cell, params, xs, carry = _setup(kind, B, T, 5, 32, seed=17)
    assert avx2.kind_of(cell, params) == (_kk(kind), None)
    lengths = jnp.asarray(LENGTHS)

    def run(isa):
        return jax.jit(lambda p, x, c: avx2.avx2_scan(_kk(kind), p, x, c, reverse, threads=2, isa=isa,
                                                      time_major=False, lengths=lengths))(params, xs, carry)
    final, ys = run("avx2")
    for b, n in enumerate(LENGTHS[:6]):
        if n:
            row = jax.tree.map(lambda a: a[b:b + 1], carry)
            want_final, want_ys = _numpy_scan(kind, params, xs[b:b + 1, :n], row, reverse)
            np.testing.assert_allclose(ys[b, :n], want_ys[0], rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(final.c[b], want_final[1][0], rtol=2e-5, atol=2e-5)
    if native.avx2_installed("avx512"):
        for a, b in zip(jax.tree.leaves(run("avx512")), jax.tree.leaves((final, ys))):
            np.testing.assert_array_equal(a, b)
    assert_gradients_match_xla(avx2.auto_isa(32), cell, params, xs, carry, reverse, lengths=lengths,
                               resets=_resets(B, T, 18))


@pytest.mark.parametrize("kind", ["lstm", "lstm_peep", "lstm_cifg", "gru"])
def test_padding_values_never_reach_the_results(kind):
    """Outputs, final carry and gradients keep their bits whatever the padding holds, and the padding's
    gradient is exactly zero."""
    B, T = len(LENGTHS), 9
    cell, params, xs, carry = _setup(kind, B, T, 5, 32, seed=12)
    padding = jnp.arange(T)[None, :, None] >= jnp.asarray(LENGTHS)[:, None, None]
    other = jnp.where(padding, 5.0 * jax.random.normal(jax.random.key(13), xs.shape), xs)
    w = jax.random.normal(jax.random.key(14), (B, T, 32))

    def run(x):
        def loss(p, x, c):
            final, ys = seqjax.scan(cell, p, x, carry=c, lengths=jnp.asarray(LENGTHS), reverse=True)
            return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(final)), (final, ys)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, carry)

    assert avx2.auto_isa(32) in str(jax.make_jaxpr(lambda x: seqjax.scan(cell, params, x, lengths=LENGTHS))(xs))
    (_, aux_a), grads_a = run(xs)
    (_, aux_b), grads_b = run(other)
    for a, b in zip(jax.tree.leaves((aux_a, grads_a[0], grads_a[2])), jax.tree.leaves((aux_b, grads_b[0], grads_b[2]))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jnp.where(padding, grads_a[1], 0.0), 0.0)
    np.testing.assert_array_equal(jnp.where(padding, grads_b[1], 0.0), 0.0)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("isa", ["avx2", pytest.param("avx512", marks=needs_avx512)])
def test_batch_major_gives_the_bits_of_time_major(kind, isa):
    """The kernels read [B, T, I] and write [B, T, H] where they are given them, computing the same."""
    cell, params, xs, carry = _setup(kind, 13, 9, 5, 32, seed=9)

    def run(p, x, c, reverse, time_major):
        x_in = jnp.swapaxes(x, 0, 1) if time_major else x
        final, ys = avx2.avx2_scan(_kk(kind), p, x_in, c, reverse, isa=isa, time_major=time_major)
        return final, (jnp.swapaxes(ys, 0, 1) if time_major else ys)

    for reverse in (False, True):
        want, got = (jax.jit(run, static_argnums=(3, 4))(params, xs, carry, reverse, tm) for tm in (True, False))
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(a, b)
        (dp_tm, dx_tm, dc_tm), (dp_bm, dx_bm, dc_bm) = [
            jax.grad(lambda p, x, c: jnp.sum(jnp.sin(run(p, x, c, reverse, tm)[1])), argnums=(0, 1, 2))(
                params, xs, carry) for tm in (True, False)]
        for a, b in zip(jax.tree.leaves((dx_tm, dc_tm)), jax.tree.leaves((dx_bm, dc_bm))):
            np.testing.assert_array_equal(a, b)
        # XLA's weight-gradient GEMMs sum the same T*B rows in another order
        for a, b in zip(jax.tree.leaves(dp_tm), jax.tree.leaves(dp_bm)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("isa", ["avx2", pytest.param("avx512", marks=needs_avx512)])
@pytest.mark.parametrize("batch_major, reverse, with_lengths", [(True, False, False), (False, True, False),
                                                                (True, True, True)])
def test_weight_gradient_kernel_matches_numpy(kind, isa, batch_major, reverse, with_lengths):
    """The weight-gradient target: dW_x = sum x^T dpx, dW_h = sum h_{t-1}^T dA (the GRU's n block: dghn), db and
    db_hn as row sums. T*B = 280 rows make three blocks of 128 in two halves; I = 13 and H = 48 leave partial
    feature tiles and gradient panels, and the GRU's n block starts inside a panel. With lengths (reverse),
    h_{t-1} at a sequence's last valid step is h0, and padding rows are left out of the sums; with resets,
    h_{t-1} is zero at a reset step."""
    B, T, I, H = 7, 40, 13, 48
    G = {"lstm": 4, "lstm_peep": 4, "lstm_cifg": 3, "gru": 3}.get(kind, 1)
    rng = np.random.default_rng(11)
    lead = (B, T) if batch_major else (T, B)
    xs, ys, dpx = (rng.standard_normal((*lead, n)).astype(np.float32) for n in (I, H, G * H))
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    gru = kind == "gru"
    dghn = rng.standard_normal((*lead, H)).astype(np.float32) if gru else np.zeros((0,), np.float32)
    b_hn = np.zeros((H,) if gru else (0,), np.float32)
    native.load_avx2(isa)
    target = persistent.Target(f"seqjax_{isa}_rnn", persistent.CELLS[_kk(kind)], reverse,
                               (("threads", 2), ("batch_major", batch_major)), True)
    lengths = np.array([40, 0, 17, 1, 39, 25, 40] if with_lengths else [], np.int32)
    resets = rng.random((T, B)) < 0.2 if with_lengths else np.zeros((0,), bool)
    got = jax.jit(lambda *a: persistent._kernel_weight_grads(target, *a[:-2], a[-2:]))(
        xs, ys, h0, dpx, dghn, b_hn, lengths, resets)

    tm = (lambda a: a) if not batch_major else (lambda a: np.swapaxes(a, 0, 1))  # to [T, B, .]
    x64, y64, d64 = (tm(a).astype(np.float64) for a in (xs, ys, dpx))
    h_prev = np.concatenate([y64[1:], h0[None]]) if reverse else np.concatenate([h0[None], y64[:-1]])
    dghn64 = tm(dghn).astype(np.float64) if gru else None
    if with_lengths:  # reverse: step lengths[b] - 1 starts sequence b; the kernel leaves padding rows out
        for b, n in enumerate(lengths):
            h_prev[max(n - 1, 0):, b] = h0[b]
            d64[n:, b] = 0.0
            if gru:
                dghn64[n:, b] = 0.0
        h_prev[resets] = 0.0  # h_{t-1} after a reset (at padding rows, which are left out, it does not matter)
    dA = d64.copy()
    if gru:
        dA[..., 2 * H:] = dghn64
    want = (np.einsum("tbi,tbn->in", x64, d64), np.einsum("tbh,tbn->hn", h_prev, dA), d64.sum((0, 1)),
            dghn64.sum((0, 1)) if gru else np.zeros((0,)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


_FAULTS_SCRIPT = """
import hashlib, resource, jax, jax.numpy as jnp, numpy as np, seqjax
cell = seqjax.lstm(256)
params = cell.init(jax.random.key(0), 128)
xs = jax.random.normal(jax.random.key(1), (64, 100, 128))
step = jax.jit(jax.grad(lambda p, x: jnp.mean(seqjax.scan(cell, p, x, kernel="avx2")[1] ** 2), argnums=(0, 1)))
for _ in range(2):
    grads = jax.block_until_ready(step(params, xs))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    grads = jax.block_until_ready(step(params, xs))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3
digest = hashlib.sha256(b"".join(np.asarray(g).tobytes() for g in jax.tree.leaves(grads))).hexdigest()
print(faults, digest)
"""


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs transparent huge pages in madvise mode")
def test_huge_pages_can_be_turned_on_and_change_no_bit():
    """SEQJAX_HUGE_PAGES=1 makes the kernels advise huge pages on their large results (fewer page faults on
    XLA's fresh buffers; off by default, and with any other value). Same gradients to the bit."""
    def run(value):
        env = dict(os.environ)
        env.pop("SEQJAX_HUGE_PAGES", None)
        if value is not None:
            env["SEQJAX_HUGE_PAGES"] = value
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        faults, digest = out.stdout.split()[-2:]
        return int(faults), digest
    (plain, a), (huge, b), (other, c) = run(None), run("1"), run("0")
    assert a == b == c
    if min(plain, other) < 5000:
        pytest.skip(f"the allocator reused its memory ({plain}, {other} faults per step without huge pages)")
    assert huge < min(plain, other) / 2, (huge, plain, other)


@pytest.mark.parametrize("kind", ["lstm", "lstm_peep", "gru"])
def test_backward_in_place_gives_the_same_bits_in_less_memory(kind):
    """The backward target writes dpx over the forward's act (and the GRU's dghn over aux)."""
    cell, params, xs, carry = _setup(kind, 16, 20, 4, 64, seed=6)
    xs_tm = jnp.swapaxes(xs, 0, 1)
    native.load_avx2()

    def train(in_place):
        def loss(p, x):
            run = persistent.native_scan("seqjax_avx2_rnn", _kk(kind), p, x, carry, False,
                                         (("threads", 1), ("batch_major", False)),
                                         projects=True, in_place=in_place)
            return jnp.sum(jnp.sin(run[1]))
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs_tm).compile()

    copying, in_place = train(False), train(True)
    for a, b in zip(jax.tree.leaves(copying(params, xs_tm)), jax.tree.leaves(in_place(params, xs_tm))):
        np.testing.assert_array_equal(a, b)
    act_bytes = 20 * 16 * params.w_h.shape[1] * 4
    saved = copying.memory_analysis().temp_size_in_bytes - in_place.memory_analysis().temp_size_in_bytes
    assert saved >= act_bytes, (saved, act_bytes)


def test_jit_vmap_and_layers_agree():
    cell, params, xs, carry = _setup("lstm", 4, 12, 3, 16, seed=4)
    run = lambda x: seqjax.scan(cell, params, x, kernel="avx2")[1]  # noqa: E731
    eager = run(xs)
    np.testing.assert_array_equal(jax.jit(run)(xs), eager)
    per_row = jax.vmap(lambda x: run(x[None])[0])(xs)
    np.testing.assert_allclose(per_row, eager, rtol=1e-6, atol=1e-6)
    make = lambda kernel: seqjax.bidirectional(seqjax.gru(16), kernel=kernel)  # noqa: E731
    bp = make("xla").init(jax.random.key(5), 3)
    got = make("avx2").apply(bp, xs)[1]
    assert "seqjax_avx2_rnn_forward" in str(jax.make_jaxpr(lambda p, x: make("avx2").apply(p, x)[1])(bp, xs))
    np.testing.assert_allclose(got, make("xla").apply(bp, xs)[1], rtol=1e-5, atol=1e-6)


def _targets(cell, params, xs, **kw):
    return str(jax.make_jaxpr(lambda p, x: seqjax.scan(cell, p, x, **kw)[1])(params, xs))


def test_auto_takes_the_kernels_where_they_apply():
    assert avx2.AUTO
    wide = "avx512" if native.avx2_installed("avx512") else "avx2"
    cell, params, xs, _ = _setup("gru", 4, 20, 3, 32)
    assert avx2.auto_isa(32) == wide
    assert f"seqjax_{wide}_rnn_forward" in _targets(cell, params, xs)
    assert "seqjax_avx" not in _targets(cell, params, xs, kernel="xla")
    assert f"seqjax_{wide}_rnn_forward" in _targets(cell, params, xs, lengths=jnp.array([20, 3, 0, 9]))
    assert f"seqjax_{wide}_rnn_forward" in _targets(cell, params, xs, resets=jnp.zeros((4, 20), bool))
    assert "seqjax_avx" not in _targets(cell, params, xs, backward="autodiff")
    assert "seqjax_avx" not in _targets(cell, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), xs)
    narrow, narrow_params, _, _ = _setup("rnn_tanh", 4, 20, 3, 24)  # a multiple of 8, not of 16
    assert avx2.auto_isa(24) == "avx2"
    assert "seqjax_avx2_rnn_forward" in _targets(narrow, narrow_params, xs)
    odd, odd_params, _, _ = _setup("lstm", 4, 20, 3, 12)
    assert "seqjax_avx" not in _targets(odd, odd_params, xs)
    for name in ("vanilla", "NIG", "NFG", "NOG", "CIFG", "NIAF", "NOAF", "NP"):
        variant = seqjax.lstm_variant(name, 16)
        assert f"seqjax_{wide}_rnn_forward" in _targets(variant, variant.init(jax.random.key(0), 3), xs), name
    for other in (seqjax.lstm(16, proj_size=8), seqjax.lstm_variant("FGR", 16),
                  seqjax.lstm(16, input_gate=False, output_gate=False), seqjax.lstm(16, output_activation="relu")):
        assert "seqjax_avx" not in _targets(other, other.init(jax.random.key(0), 3), xs)


@pytest.mark.parametrize("make_cell, kwargs, message", [
    (lambda: seqjax.lstm(12), {}, "need a hidden size that is a multiple of 8, got 12"),
    (lambda: seqjax.lstm(16, proj_size=8), {}, "seqjax's x86 kernels have no form of"),
    (lambda: seqjax.lstm_variant("FGR", 16), {}, "seqjax's x86 kernels have no form of"),
    (lambda: seqjax.gru(16, reset_after=False), {}, "seqjax's x86 kernels have no form of"),
    (lambda: seqjax.rnn(16), dict(remat=True), "remat=True"),
])
def test_avx2_refuses_what_it_cannot_run(make_cell, kwargs, message):
    cell = make_cell()
    params = cell.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=f"kernel='avx2' cannot run this call: .*{message}"):
        seqjax.scan(cell, params, jnp.ones((2, 3, 3)), kernel="avx2", **kwargs)


def test_avx512_refuses_hidden_sizes_that_are_not_multiples_of_16():
    cell = seqjax.lstm(24)
    params = cell.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match="kernel='avx512' cannot run this call: the avx512 kernels need a hidden size "
                                         "that is a multiple of 16, got 24"):
        seqjax.scan(cell, params, jnp.ones((2, 3, 3)), kernel="avx512")


def test_direct_entry_point_checks_its_arguments():
    cell, params, xs, carry = _setup("rnn_tanh", 2, 3, 3, 8)
    xs_tm = jnp.swapaxes(xs, 0, 1)
    with pytest.raises(ValueError, match="kind must be one of .*got 'lstmp'"):
        avx2.avx2_scan("lstmp", params, xs_tm, carry)
    with pytest.raises(ValueError, match="threads must be 0 .*, 1 or 2, got 3"):
        avx2.avx2_scan("rnn_tanh", params, xs_tm, carry, threads=3)
    with pytest.raises(ValueError, match=r"isa must be one of \['avx2', 'avx512'\], got 'sse'"):
        avx2.avx2_scan("rnn_tanh", params, xs_tm, carry, isa="sse")
    with pytest.raises(ValueError, match="isa must be one of .*got 'neon'"):
        native.load_avx2("neon")
    with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \(B,\)=\(2,\), got shape \(3,\)"):
        avx2.avx2_scan("rnn_tanh", params, xs_tm, carry, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"lengths must be an integer array .*dtype float32"):
        avx2.avx2_scan("rnn_tanh", params, xs_tm, carry, lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"resets must have shape \(T, B\)=\(3, 2\), got \(2, 3\)"):
        avx2.avx2_scan("rnn_tanh", params, xs_tm, carry, resets=jnp.zeros((2, 3), bool))


def test_a_cpu_without_avx2_or_avx512_is_named(monkeypatch):
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"sse2", "fma"})
    assert re.search("avx2 kernels need an x86-64 CPU with AVX2 and FMA; .* without avx2", native._cpu_blocker("avx2"))
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"sse2", "fma", "avx2"})
    assert re.search("avx512 kernels need an x86-64 CPU with AVX-512F; .* without avx512f",
                     native._cpu_blocker("avx512"))


def test_auto_falls_back_to_xla_when_the_kernels_do_not_load(monkeypatch):
    real = native.unavailable
    monkeypatch.setattr(native, "unavailable", lambda name: "no kernels in this test" if name in ("avx2", "avx512")
                        else real(name))
    monkeypatch.setattr(seqjax.backends._table, "_warned", set())
    cell, params, xs, _ = _setup("lstm", 2, 4, 3, 16)
    with pytest.warns(RuntimeWarning, match="avx2 kernels would run this call but are not available"):
        assert "seqjax_avx" not in _targets(cell, params, xs)
    with pytest.raises(native.NativeUnavailable, match="kernel='avx2': no kernels in this test"):
        seqjax.scan(cell, params, xs, kernel="avx2")
