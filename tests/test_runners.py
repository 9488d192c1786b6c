"""Generic invariants of the runners, for every registered cell."""
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import seqjax
from seqjax.cells.base import form_of
from registry import CARRY_STRUCTURES, CELLS

B, T, I = 3, 6, 3
LENGTHS = np.array([6, 2, 0])


def setup(name, seed=0):
    cell = CELLS[name]()
    kp, kx, kr = jax.random.split(jax.random.key(seed), 3)
    params = cell.init(kp, I)
    params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(kr, a.shape, a.dtype), params)
    xs = jax.random.normal(kx, (B, T, I))
    return cell, params, xs


def close(a, b, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol), a, b)


def loss_of(runner, cell, **kw):
    def loss(params, xs):
        carry, ys = runner(cell, params, xs, **kw)
        return jnp.sum(ys ** 2) + sum(jnp.sum(c ** 2) for c in jax.tree.leaves(carry))
    return loss


@pytest.mark.parametrize("name", sorted(CELLS))
def test_scan_equals_unrolled_values_and_grads(name):
    cell, params, xs = setup(name)

    def run_and_grad(runner, **kw):
        out = runner(cell, params, xs, lengths=LENGTHS, **kw)
        return out, jax.grad(loss_of(runner, cell, lengths=LENGTHS, **kw), argnums=(0, 1))(params, xs)

    reference = jax.jit(lambda: run_and_grad(seqjax.unrolled, hoist=False))()
    # the default path (unroll 1, no hoist on CPU) is checked against NumPy in test_cells_reference.py
    close(jax.jit(lambda: run_and_grad(seqjax.scan, unroll=3, hoist=True, remat=True))(), reference)


@pytest.mark.parametrize("name", CARRY_STRUCTURES)
def test_jit_equals_eager_and_no_recompilation(name):
    cell, params, xs = setup(name)
    traces = []

    def run(params, xs, lengths):
        traces.append(1)
        return seqjax.scan(cell, params, xs, lengths=lengths)

    eager = run(params, xs, jnp.asarray(LENGTHS))
    jitted = jax.jit(run)
    close(jitted(params, xs, jnp.asarray(LENGTHS)), eager)
    close(jitted(params, xs + 1.0, jnp.asarray(LENGTHS)), run(params, xs + 1.0, jnp.asarray(LENGTHS)))
    assert len(traces) == 3  # 2 eager calls + 1 trace: the second jitted call hit the cache


@pytest.mark.parametrize("name", CARRY_STRUCTURES)
def test_vmap_equals_batch(name):
    cell, params, xs = setup(name)
    carry = cell.initial_carry(params, (B,))
    _, y_batch = cell.apply(params, carry, xs[:, 0])
    _, y_vmap = jax.vmap(lambda c, x: cell.apply(params, c, x))(carry, xs[:, 0])
    close(y_vmap, y_batch)
    # a whole sequence per example: vmap over the batch of [1, T, I] runs
    _, ys = seqjax.scan(cell, params, xs)
    _, ys_v = jax.vmap(lambda x: seqjax.scan(cell, params, x[None]))(xs)
    close(ys_v[:, 0], ys)


@pytest.mark.parametrize("name", CARRY_STRUCTURES)
def test_reverse_equals_flip(name):
    cell, params, xs = setup(name)
    c_rev, ys_rev = seqjax.scan(cell, params, xs, reverse=True)
    c_flip, ys_flip = seqjax.scan(cell, params, xs[:, ::-1])
    close((c_rev, ys_rev), (c_flip, ys_flip[:, ::-1]))


@pytest.mark.parametrize("name", CARRY_STRUCTURES)
@pytest.mark.parametrize("reverse", [False, True])
def test_padded_equals_unpadded(name, reverse):
    cell, params, xs = setup(name)
    carry, ys = seqjax.scan(cell, params, xs, lengths=LENGTHS, reverse=reverse)
    init = cell.initial_carry(params, ())
    for b, L in enumerate(LENGTHS):
        carry_b = jax.tree.map(lambda a: a[b], carry)
        if L == 0:
            close(carry_b, init)
            assert not np.any(np.asarray(ys[b]))
            continue
        cb, yb = seqjax.scan(cell, params, xs[b:b + 1, :L], reverse=reverse)
        close(carry_b, jax.tree.map(lambda a: a[0], cb))
        close(ys[b, :L], yb[0])
        assert not np.any(np.asarray(ys[b, L:])), "outputs past the length must be exactly zero"


@pytest.mark.parametrize("name", CARRY_STRUCTURES)
def test_resets_equal_separate_runs(name):
    cell, params, xs = setup(name)
    resets = np.zeros((B, T), bool)
    resets[0, 2] = resets[1, 4] = resets[2, 0] = True
    carry0 = jax.tree.map(lambda a: a + 0.5, cell.initial_carry(params, (B,)))
    carry, ys = seqjax.scan(cell, params, xs, resets=resets, carry=carry0)
    for b in range(B):
        cut = int(np.argmax(resets[b]))
        c_b = jax.tree.map(lambda a: a[b:b + 1], carry0)
        _, first = seqjax.scan(cell, params, xs[b:b + 1, :cut], carry=c_b) if cut else (None, jnp.zeros((1, 0, ys.shape[-1])))
        c2, second = seqjax.scan(cell, params, xs[b:b + 1, cut:])
        close(jnp.concatenate([first, second], 1)[0], ys[b])
        close(jax.tree.map(lambda a: a[0], c2), jax.tree.map(lambda a: a[b], carry))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_check_grads_cell(name):
    cell, params, xs = setup(name)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
        carry = jax.tree.map(lambda a: a + 0.1, cell.initial_carry(params, (2,)))
        x = jnp.asarray(np.asarray(xs[:2, 0]), jnp.float64)
        check_grads(lambda p, c, x: cell.apply(p, c, x), (params, carry, x), order=1, modes=["rev"],
                                  atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh", "lstm_FGR"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_dtype_preserved(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        cell, params, xs = setup(name)
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        carry, ys = seqjax.scan(cell, params, xs.astype(dtype), lengths=LENGTHS)
        assert ys.dtype == jnp.dtype(dtype)
        assert all(c.dtype == jnp.dtype(dtype) for c in jax.tree.leaves(carry))
        # bf16 params accumulate in float32: close to the float32 result
        if dtype == "bfloat16":
            params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
            _, ys32 = seqjax.scan(cell, params32, xs.astype(dtype).astype(jnp.float32), lengths=LENGTHS)
            np.testing.assert_allclose(np.asarray(ys, np.float32), np.asarray(ys32), atol=0.05)


def test_time_major_equals_batch_major():
    cell, params, xs = setup("lstm")
    resets = np.zeros((B, T), bool)
    resets[1, 3] = True
    c1, y1 = seqjax.scan(cell, params, xs, lengths=LENGTHS, resets=resets)
    c2, y2 = seqjax.scan(cell, params, jnp.swapaxes(xs, 0, 1), lengths=LENGTHS, resets=resets.T, time_major=True)
    close((c1, y1), (c2, jnp.swapaxes(y2, 0, 1)))


def test_truncated_bptt_by_feeding_the_carry_back():
    cell, params, xs = setup("lstm")
    c_full, y_full = seqjax.scan(cell, params, xs)
    c_a, y_a = seqjax.scan(cell, params, xs[:, :3])
    c_b, y_b = seqjax.scan(cell, params, xs[:, 3:], carry=jax.lax.stop_gradient(c_a))
    close((c_full, y_full), (c_b, jnp.concatenate([y_a, y_b], 1)))

    def window_loss(xs2):  # no gradient flows into the first window through the carry
        return jnp.sum(seqjax.scan(cell, params, xs2, carry=jax.lax.stop_gradient(c_a))[1])

    g = jax.grad(lambda x: window_loss(seqjax.scan(cell, params, x)[1][:, :0].sum() + xs[:, 3:]))(xs[:, :3])
    assert not np.any(np.asarray(g))


def test_users_can_compose_cells_in_their_own_scan():
    cell, params, xs = setup("gru")
    carry, ys = jax.lax.scan(lambda c, x: cell.apply(params, c, x), cell.initial_carry(params, (B,)),
                             jnp.swapaxes(xs, 0, 1))
    close((carry, jnp.swapaxes(ys, 0, 1)), seqjax.scan(cell, params, xs))


@pytest.mark.parametrize("name", ["rnn_relu", "lstm_peep_proj", "lstm_FGR", "lstm_CIFG"])
def test_fused_input_recurrent_gemm_equals_apply(name):
    cell, params, xs = setup(name)
    joint_apply = form_of(cell).joint_apply
    assert joint_apply is not None
    carry = jax.tree.map(lambda a: a + 0.3, cell.initial_carry(params, (B,)))
    close(joint_apply(params)(carry, xs[:, 0]), cell.apply(params, carry, xs[:, 0]))
    # the runner's default path uses it; a cell with a wrapped step (no Form: two GEMMs) gives the same sequence
    two_gemms = cell._replace(step=lambda p, c, px: cell.step(p, c, px))
    assert form_of(two_gemms) is None
    close(seqjax.scan(cell, params, xs, lengths=LENGTHS, hoist=False, kernel="xla"),
          seqjax.scan(two_gemms, params, xs, lengths=LENGTHS, hoist=False, kernel="xla"))
