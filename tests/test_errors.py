"""Bad input raises a clear error, before tracing, naming the argument, what was expected and what was given."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax


@pytest.fixture(scope="module")
def lstm():
    cell = seqjax.lstm(4)
    return cell, cell.init(jax.random.key(0), 3)


@pytest.mark.parametrize("runner", [seqjax.scan, seqjax.unrolled])
def test_xs_rank_and_feature_size(lstm, runner):
    cell, params = lstm
    with pytest.raises(ValueError, match=r"xs must have shape \(B, T, I=3\), got \(5, 4\); pass time_major=True"):
        runner(cell, params, jnp.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"xs must have shape \(B, T, I=3\), got \(2, 5, 7\)"):
        runner(cell, params, jnp.zeros((2, 5, 7)))
    with pytest.raises(ValueError, match=r"xs must have shape \(T, B, I=3\).*time_major=False"):
        runner(cell, params, jnp.zeros((2, 5, 7)), time_major=True)
    with pytest.raises(ValueError, match="floating-point"):
        runner(cell, params, jnp.zeros((2, 5, 3), jnp.int32))


def test_lengths_out_of_range_shape_dtype(lstm):
    cell, params = lstm
    xs = jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\], got values in \[-1, 2\]"):
        seqjax.scan(cell, params, xs, lengths=jnp.array([2, -1]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\], got values in \[3, 6\]"):
        seqjax.scan(cell, params, xs, lengths=np.array([6, 3]))
    with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \(B,\)=\(2,\), got shape \(3,\)"):
        seqjax.scan(cell, params, xs, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="integer array.*float32"):
        seqjax.scan(cell, params, xs, lengths=jnp.array([1.0, 2.0]))
    # a length of 0 is valid
    carry, ys = seqjax.scan(cell, params, xs + 1, lengths=jnp.array([0, 5]))
    assert not np.any(np.asarray(ys[0])) and not np.any(np.asarray(carry.c[0]))


def test_lengths_checked_under_jit_by_shape(lstm):
    cell, params = lstm
    f = jax.jit(lambda xs, lengths: seqjax.scan(cell, params, xs, lengths=lengths))
    with pytest.raises(ValueError, match="lengths must be an integer array of shape"):
        f(jnp.zeros((2, 5, 3)), jnp.zeros((2, 1), jnp.int32))


def test_carry_mismatch(lstm):
    cell, params = lstm
    xs = jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match=r"carry does not match lstm\(hidden_size=4\) with batch size B=2"):
        seqjax.scan(cell, params, xs, carry=cell.initial_carry(params, (3,)))
    with pytest.raises(ValueError, match="carry does not match"):
        seqjax.scan(cell, params, xs, carry=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="carry does not match"):
        seqjax.scan(cell, params, xs, carry=jax.tree.map(lambda a: a.astype(jnp.float16), cell.initial_carry(params, (2,))))


def test_resets_shape(lstm):
    cell, params = lstm
    with pytest.raises(ValueError, match=r"resets must have shape \(B, T\)=\(2, 5\), got \(5, 2\)"):
        seqjax.scan(cell, params, jnp.zeros((2, 5, 3)), resets=jnp.zeros((5, 2), bool))


def test_unknown_options(lstm):
    cell, params = lstm
    xs = jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match="unroll must be a positive int or None, got 0"):
        seqjax.scan(cell, params, xs, unroll=0)
    with pytest.raises(ValueError, match="reverse must be a bool, got 'yes'"):
        seqjax.scan(cell, params, xs, reverse="yes")
    with pytest.raises(TypeError, match="cell must be a seqjax Cell"):
        seqjax.scan(lambda *a: a, params, xs)
    with pytest.raises(ValueError, match=r"activation must be one of \['relu', 'tanh'\] or a callable, got 'gelu'"):
        seqjax.rnn(4, activation="gelu")
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        seqjax.lstm(0)
    with pytest.raises(ValueError, match="proj_size must be a positive int"):
        seqjax.lstm(4, proj_size=-1)
    with pytest.raises(ValueError, match="name must be one of"):
        seqjax.lstm_variant("NOPE", 4)
    with pytest.raises(ValueError, match="coupled_input_forget=True .* needs input_gate=True"):
        seqjax.lstm(4, coupled_input_forget=True, input_gate=False)
    with pytest.raises(ValueError, match="reset_after must be a bool"):
        seqjax.gru(4, reset_after="after")
    with pytest.raises(ValueError, match="merge must be one of"):
        seqjax.bidirectional(seqjax.gru(3), merge="max")
    with pytest.raises(ValueError, match="seqjax.multilayer: dropout must be a float in \\[0, 1\\), got 1.0"):
        seqjax.multilayer(seqjax.gru(3), 2, dropout=1.0)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        seqjax.multilayer(seqjax.gru(3), 0)


def test_cell_apply_feature_size(lstm):
    cell, params = lstm
    with pytest.raises(ValueError, match=r"seqjax.lstm: x must have shape \(\.\.\., 3\), got \(2, 5\)"):
        cell.apply(params, cell.initial_carry(params, (2,)), jnp.zeros((2, 5)))
