"""seqjax.tasks.selective_copy: the labels, positions and layout checked element by element in NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.tasks import BLANK, copy_accuracy, selective_copy


def decode_reference(x, num_tokens, vocab_size):
    """Independent reading of one one-hot sequence [T, A]: (data tokens in order, their steps)."""
    x = np.asarray(x)
    assert np.all(x.sum(-1) == 1.0) and set(np.unique(x)) <= {0.0, 1.0}   # one-hot at every step
    ids = x.argmax(-1)
    body, tail = ids[:-num_tokens], ids[-num_tokens:]
    assert np.all(tail == vocab_size - 1)                                 # the markers close the sequence
    assert not np.any(body == vocab_size - 1)
    steps = [t for t, i in enumerate(body) if i != BLANK]
    return [int(body[t]) for t in steps], steps


@pytest.mark.parametrize("num_noise,num_tokens,vocab_size", [(40, 16, 16), (0, 5, 3), (7, 1, 10)])
def test_labels_are_the_data_tokens_in_order(num_noise, num_tokens, vocab_size):
    b = selective_copy(jax.random.key(3), 64, num_noise=num_noise, num_tokens=num_tokens, vocab_size=vocab_size)
    T = num_noise + 2 * num_tokens
    assert b.x.shape == (64, T, vocab_size) and b.x.dtype == jnp.float32
    assert b.y.shape == (64, num_tokens) and b.y.dtype == jnp.int32
    assert np.all(np.asarray(b.lengths) == T)
    for x, y, pos in zip(b.x, np.asarray(b.y), np.asarray(b.positions)):
        tokens, steps = decode_reference(x, num_tokens, vocab_size)
        assert tokens == y.tolist() and steps == pos.tolist()
        assert len(steps) == num_tokens and all(1 <= t <= vocab_size - 2 for t in tokens)


def test_positions_and_tokens_cover_their_ranges():
    b = selective_copy(jax.random.key(0), 2000, num_noise=24, num_tokens=8, vocab_size=16)
    pos, y = np.asarray(b.positions), np.asarray(b.y)
    assert np.all(np.diff(pos, axis=1) > 0)                     # distinct and increasing
    counts = np.bincount(pos.ravel(), minlength=32)
    assert counts.shape == (32,) and counts.min() > 0.8 * counts.mean()   # every step of the span used, evenly
    assert set(np.unique(y)) == set(range(1, 15))


def test_deterministic_and_key_dependent():
    a, b = selective_copy(jax.random.key(1), 8, 10, 4), selective_copy(jax.random.key(1), 8, 10, 4)
    c = selective_copy(jax.random.key(2), 8, 10, 4)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


def test_copy_accuracy():
    y = jnp.array([[1, 2], [3, 4]])
    logits = jax.nn.one_hot(jnp.array([[1, 2], [3, 5]]), 6)
    assert float(copy_accuracy(logits, y)) == 0.75


@pytest.mark.parametrize("kwargs,match", [(dict(batch_size=0), "batch_size"), (dict(num_noise=-1), "num_noise"),
                                          (dict(num_tokens=0), "num_tokens"), (dict(vocab_size=2), "vocab_size"),
                                          (dict(num_tokens=2.5), "num_tokens")])
def test_errors(kwargs, match):
    args = dict(batch_size=2, num_noise=4, num_tokens=2, vocab_size=5) | kwargs
    with pytest.raises(ValueError, match=f"seqjax.tasks.selective_copy: {match}"):
        selective_copy(jax.random.key(0), **args)
