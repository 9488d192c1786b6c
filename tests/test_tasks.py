"""Tests for seqjax.tasks: the temporal-order, adding and comparison generators."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.tasks import (
    ADDING_TOLERANCE,
    CLASSES_6A,
    CLASSES_6B,
    LEVELS,
    SYMBOLS,
    TaskBatch,
    TemporalOrderLevel,
    adding_correct,
    adding_problem,
    compare_batch,
    compare_dataset,
    decode,
    temporal_order,
    temporal_order_6b,
)

# The tables of specs/tasks.md section 1, written out independently (inclusive ranges).
TABLE = {
    "EASY": ((7, 8), (1, 2), (4, 5), 9),
    "NORMAL": ((30, 40), (2, 5), (20, 27), 41),
    "MODERATE": ((60, 80), (10, 20), (45, 54), 81),
    "HARD": ((100, 110), (10, 20), (50, 60), 111),
    "NIGHTMARE": ((300, 500), (10, 80), (250, 290), 501),
}
PATTERNS_6A = {"XX": "Q", "XY": "R", "YX": "S", "YY": "U"}
PATTERNS_6B = {
    "XXX": "Q", "XXY": "R", "XYX": "S", "XYY": "U",
    "YXX": "V", "YXY": "A", "YYX": "B", "YYY": "C",
}


N = 2048  # one batch size everywhere, so each (level, padding) compiles once


def _key(i=0):
    return jax.random.key(i)


@functools.lru_cache(maxsize=None)
def _batch(level, padding, seed=1):
    n = 128 if level == "NIGHTMARE" else N
    if level == "6B":
        batch = temporal_order_6b(_key(seed), N, padding=padding)
    else:
        batch = temporal_order(_key(seed), n, level=level, padding=padding)
    assert all(isinstance(v, jax.Array) for v in batch)
    return _np(batch)  # numpy from here on: eager jax ops would each compile


@functools.lru_cache(maxsize=None)
def _adding(T, padding, seed=10):
    return _np(adding_problem(_key(seed), N, min_length=T, padding=padding))


def _np(batch):
    return jax.tree.map(np.asarray, batch)


def _check_symbols(batch, padding, n_pos):
    """Vectorised structure check of a temporal-order batch; returns (offsets, t)."""
    b = _np(batch)
    n, T, _ = b.x.shape
    assert np.all((b.x == 0) | (b.x == 1))
    rowsum = b.x.sum(-1)
    assert np.all((rowsum == 0) | (rowsum == 1)), "rows must be one-hot or all-zero pads"
    off = T - b.lengths if padding == "front" else np.zeros(n, int)
    t = np.arange(T)[None, :]
    real = (t >= off[:, None]) & (t < (off + b.lengths)[:, None])
    np.testing.assert_array_equal(rowsum == 1, real)  # pads exactly where expected
    idx = np.where(real, b.x.argmax(-1), -1)
    rows = np.arange(n)
    assert np.all(idx[rows, off] == SYMBOLS.index("B"))
    assert np.all(idx[rows, off + b.lengths - 1] == SYMBOLS.index("E"))
    xy = (idx == 0) | (idx == 1)
    assert np.all(xy.sum(1) == n_pos)
    np.testing.assert_array_equal(np.nonzero(xy)[1].reshape(n, n_pos), b.positions)
    bits = idx[rows[:, None], b.positions]  # 0 = X, 1 = Y
    np.testing.assert_array_equal(bits @ (2 ** np.arange(n_pos)[::-1]), b.y)
    inner = real & ~xy
    inner[rows, off] = inner[rows, off + b.lengths - 1] = False
    assert np.all((idx[inner] >= 2) & (idx[inner] <= 5)), "distractors must be a..d"
    return off, b.positions - off[:, None]


def _decoded_labels(batch, patterns, classes, k=64):
    """Independent string-level check on the first k sequences."""
    for row, y in zip(np.asarray(batch.x[:k]), np.asarray(batch.y[:k])):
        s = decode(row)
        assert s[0] == "B" and s[-1] == "E"
        assert patterns["".join(c for c in s if c in "XY")] == classes[y]


def test_levels_match_spec_table():
    assert set(LEVELS) == set(TABLE)
    for name, (length, t1, t2, padded) in TABLE.items():
        lv = LEVELS[name]
        assert (lv.length, lv.t1, lv.t2, lv.padded_length) == (length, t1, t2, padded)
    assert SYMBOLS == "XYabcdBE" and CLASSES_6A == "QRSU" and CLASSES_6B == "QRSUVABC"


@pytest.mark.parametrize("level", list(TABLE))
@pytest.mark.parametrize("padding", ["front", "right"])
def test_temporal_order_structure(level, padding):
    (lmin, lmax), (a1, b1), (a2, b2), padded = TABLE[level]
    batch = _batch(level, padding)
    n = batch.y.shape[0]
    assert isinstance(batch, TaskBatch)
    assert batch.x.shape == (n, padded, 8) and batch.x.dtype == jnp.float32
    assert batch.y.shape == (n,) and batch.y.dtype == jnp.int32
    assert batch.lengths.shape == (n,) and batch.lengths.dtype == jnp.int32
    assert batch.positions.shape == (n, 2) and batch.positions.dtype == jnp.int32
    b = _np(batch)
    off, t = _check_symbols(batch, padding, 2)
    assert np.all((b.lengths >= lmin) & (b.lengths <= lmax))
    assert np.all((t[:, 0] >= a1) & (t[:, 0] <= b1) & (t[:, 1] >= a2) & (t[:, 1] <= b2))
    _decoded_labels(batch, PATTERNS_6A, CLASSES_6A)
    if padding == "front":  # the last row is always E, the first always a pad row
        assert np.all(b.x[:, -1, SYMBOLS.index("E")] == 1)
    assert np.all(b.x[:, -1 if padding == "right" else 0] == 0)
    if level != "NIGHTMARE":  # every value of every range occurs; classes balanced
        assert set(b.lengths.tolist()) == set(range(lmin, lmax + 1))
        assert set(t[:, 0].tolist()) == set(range(a1, b1 + 1))
        assert set(t[:, 1].tolist()) == set(range(a2, b2 + 1))
        np.testing.assert_allclose(np.bincount(b.y, minlength=4) / n, 0.25, atol=0.04)


@pytest.mark.parametrize("level", list(TABLE))
def test_front_and_right_padding_agree(level):
    f, r = _batch(level, "front"), _batch(level, "right")
    np.testing.assert_array_equal(f.y, r.y)
    np.testing.assert_array_equal(f.lengths, r.lengths)
    T = TABLE[level][3]
    np.testing.assert_array_equal(f.positions, r.positions + (T - r.lengths)[:, None])
    assert [decode(v) for v in f.x[:64]] == [decode(v) for v in r.x[:64]]


def test_distractors_uniform_and_6b_balanced():
    b = _np(_batch("HARD", "right"))
    idx = b.x.argmax(-1)[b.x.sum(-1) > 0]
    counts = np.bincount(idx, minlength=8)[2:6]
    np.testing.assert_allclose(counts / counts.sum(), 0.25, atol=0.01)
    y6 = np.asarray(_batch("6B", "front").y)
    np.testing.assert_allclose(np.bincount(y6, minlength=8) / N, 0.125, atol=0.03)


def test_temporal_order_deterministic():
    a, b = _batch("HARD", "front"), temporal_order(_key(1), N, "HARD")
    c = temporal_order(_key(6), N, "HARD")
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.x, c.x)
    # raw uint32 keys work too
    raw = jax.random.PRNGKey(5)
    assert temporal_order(raw, 4).x.shape == (4, 9, 8)
    # the generator can be called inside a user's jit with a traced key
    xs = jax.jit(lambda k: temporal_order(k, N, "EASY").x)(_key(1))
    np.testing.assert_array_equal(xs, _batch("EASY", "front").x)


@pytest.mark.parametrize("padding", ["front", "right"])
def test_temporal_order_6b_structure(padding):
    batch = _batch("6B", padding)
    assert batch.x.shape == (N, 111, 8) and batch.positions.shape == (N, 3)
    _, t = _check_symbols(batch, padding, 3)
    lengths = np.asarray(batch.lengths)
    assert lengths.min() >= 100 and lengths.max() <= 110
    for k, (lo, hi) in enumerate([(10, 20), (33, 43), (66, 76)]):
        assert set(t[:, k].tolist()) == set(range(lo, hi + 1))
    _decoded_labels(batch, PATTERNS_6B, CLASSES_6B)


def test_custom_level_and_decode():
    lv = TemporalOrderLevel(length=(12, 12), t1=(3, 3), t2=(8, 8))
    b = _np(temporal_order(_key(9), 8, level=lv, padding="right"))
    assert b.x.shape == (8, 13, 8)
    for v, y in zip(b.x, b.y):
        s = decode(v)
        assert len(s) == 12 and PATTERNS_6A[s[3] + s[8]] == CLASSES_6A[int(y)]
    # the documented NYU example row, front-padded as NYU does
    row = np.zeros((9, 8), np.float32)
    row[1:] = np.eye(8)[[SYMBOLS.index(c) for c in "BbXcXcbE"]]
    assert decode(row) == "BbXcXcbE"
    np.testing.assert_array_equal(temporal_order(_key(1), N, "easy").x, _batch("EASY", "front").x)


def test_temporal_order_errors():
    with pytest.raises(ValueError, match=r"level must be one of .*'EASY'.*got 'HARDEST'"):
        temporal_order(_key(), 4, level="HARDEST")
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match=r"batch_size must be a positive int.*got"):
            temporal_order(_key(), bad)
    with pytest.raises(ValueError, match=r"padding must be one of \('front', 'right'\), got 'left'"):
        temporal_order(_key(), 4, padding="left")
    with pytest.raises(ValueError, match="batch_size"):
        temporal_order_6b(_key(), 0)
    with pytest.raises(ValueError, match="ranges must satisfy"):
        temporal_order(_key(), 4, level=TemporalOrderLevel((7, 8), (1, 2), (2, 5)))
    with pytest.raises(ValueError, match=r"shape \(T, 8\)"):
        decode(np.zeros((2, 9, 8)))


@pytest.mark.parametrize("T, padding", [(100, "right"), (100, "front"), (20, "right")])
def test_adding_problem_structure(T, padding):
    n = N
    batch = _adding(T, padding)
    tmax = T + T // 10
    assert batch.x.shape == (n, tmax, 2) and batch.x.dtype == jnp.float32
    assert batch.y.shape == (n,) and batch.y.dtype == jnp.float32
    assert batch.lengths.dtype == jnp.int32 and batch.positions.shape == (n, 2)
    b = _np(batch)
    assert b.lengths.min() >= T and b.lengths.max() <= tmax
    for i in range(256):
        L = int(b.lengths[i])
        off = tmax - L if padding == "front" else 0
        seq = b.x[i, off : off + L]
        assert np.all(np.delete(b.x[i], np.arange(off, off + L), axis=0) == 0)
        vals, marks = seq[:, 0], seq[:, 1]
        assert np.all(np.abs(vals) <= 1)
        ones = np.flatnonzero(marks == 1)
        assert len(ones) == 2 and sorted(b.positions[i] - off) == ones.tolist()
        p1, p2 = b.positions[i] - off
        assert 0 <= p1 < 10
        unmarked_before = p2 - (p1 < p2)  # rank of X2 among pairs other than X1
        assert 0 <= unmarked_before < T // 2 - 1
        rest = np.delete(marks, ones)
        expect = np.zeros(L)
        expect[[0, -1]] = -1
        expect = np.delete(expect, ones)
        np.testing.assert_array_equal(rest, expect)
        if 0 in ones:
            assert vals[0] == 0
        np.testing.assert_allclose(b.y[i], 0.5 + vals[ones].sum() / 4, rtol=0, atol=1e-6)
    assert np.all((b.y >= 0) & (b.y <= 1))
    rows = np.arange(n)  # vectorised over the whole batch: targets from x
    vals = b.x[rows[:, None], b.positions, 0]
    assert np.all(b.x[rows[:, None], b.positions, 1] == 1)
    np.testing.assert_allclose(b.y, 0.5 + vals.sum(1) / 4, rtol=0, atol=1e-6)
    assert np.all((b.x[..., 1] == 1).sum(1) == 2)


def test_adding_problem_distribution_and_determinism():
    n, T = N, 100
    b = _np(_adding(T, "right"))
    assert set(b.lengths.tolist()) == set(range(100, 111))
    assert set(b.positions[:, 0].tolist()) == set(range(10))
    assert b.positions[:, 1].max() == T // 2 - 1  # reachable only when X1 precedes it
    np.testing.assert_allclose(np.bincount(b.positions[:, 0]) / n, 0.1, atol=0.03)
    assert abs(b.y.mean() - 0.5) < 0.02
    a1 = _adding(T, "right")
    a2 = adding_problem(_key(10), N)
    a3 = adding_problem(_key(13), N)
    for u, v in zip(a1, a2):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a1.x, a3.x)
    fr = _adding(T, "front")
    np.testing.assert_array_equal(fr.y, a1.y)
    np.testing.assert_array_equal(fr.x[:, -1], a1.x[np.arange(N), a1.lengths - 1])


def test_adding_correct_and_errors():
    y = jnp.array([0.5, 0.5, 0.2])
    p = jnp.array([0.5 + 0.039, 0.5 - 0.041, 0.2])
    assert adding_correct(p, y).tolist() == [True, False, True]
    assert adding_correct(p[:, None], y).shape == (3,)
    assert ADDING_TOLERANCE == 0.04
    with pytest.raises(ValueError, match="predictions must have the targets' shape"):
        adding_correct(jnp.zeros(4), y)
    with pytest.raises(ValueError, match=r"min_length \(T\) must be an int >= 11, got 5"):
        adding_problem(_key(), 4, min_length=5)
    with pytest.raises(ValueError, match="batch_size must be a positive int.*got 0"):
        adding_problem(_key(), 0)
    with pytest.raises(ValueError, match="padding must be one of"):
        adding_problem(_key(), 4, padding="pre")


def test_compare_task():
    data = compare_dataset(_key(14))
    assert [p.x.shape for p in data] == [(8000, 2, 1), (4000, 2, 1), (4000, 2, 1)]
    assert all(p.x.dtype == jnp.float32 and p.y.dtype == jnp.int32 for p in data)
    x = np.concatenate([np.asarray(p.x) for p in data])
    y = np.concatenate([np.asarray(p.y) for p in data])
    assert set(np.unique(x).tolist()) == set(range(1, 10))
    np.testing.assert_array_equal(y, (x[:, 0, 0] - x[:, 1, 0] > 0).astype(np.int32))
    assert abs((y == 0).mean() - 45 / 81) < 0.015  # majority baseline ~55.6%
    assert np.all(np.asarray(data.test.lengths) == 2)
    again = compare_dataset(_key(14))
    np.testing.assert_array_equal(again.test.x, data.test.x)
    assert not np.array_equal(compare_dataset(_key(15)).train.x, data.train.x)
    # the split is ordered: one draw of sum(sizes) sequences, cut in order
    small = compare_dataset(_key(0), sizes=(10, 5, 3))
    assert [p.y.shape[0] for p in small] == [10, 5, 3]
    whole = compare_batch(_key(0), 18)
    np.testing.assert_array_equal(np.concatenate([p.x for p in small]), whole.x)
    np.testing.assert_array_equal(np.concatenate([p.y for p in small]), whole.y)
    with pytest.raises(ValueError, match=r"sizes must be three positive ints.*got \(8000, 4000\)"):
        compare_dataset(_key(), sizes=(8000, 4000))
    with pytest.raises(ValueError, match="batch_size"):
        compare_batch(_key(), -1)
