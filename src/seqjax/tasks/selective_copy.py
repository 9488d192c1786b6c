"""The selective copying task (Gu & Dao 2023, Mamba; used by Feng et al. 2024 for minGRU and minLSTM).

A sequence holds ``num_tokens`` data tokens at random positions among ``num_noise + num_tokens`` blank steps,
followed by ``num_tokens`` marker steps; at the marker steps the model must output the data tokens in the
order they appeared. The layout is the S4 repository's ``torch_copying_data(..., variable=True)``: token 0 is
the blank, ``vocab_size - 1`` the marker, data tokens are drawn uniformly from ``1 .. vocab_size - 2``.
"""

from __future__ import annotations

import operator
from functools import partial

import jax
import jax.numpy as jnp

from seqjax.tasks._common import TaskBatch, check_batch_size

BLANK = 0
"""The token of the blank (noise) steps."""


def _check_count(fn: str, name: str, value, minimum: int) -> int:
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return operator.index(value)


@partial(jax.jit, static_argnames=("batch_size", "num_noise", "num_tokens", "vocab_size"))
def _generate(key, batch_size, num_noise, num_tokens, vocab_size):
    k_tok, k_pos = jax.random.split(key)
    span = num_noise + num_tokens
    tokens = jax.random.randint(k_tok, (batch_size, num_tokens), 1, vocab_size - 1, dtype=jnp.int32)
    # num_tokens distinct positions in [0, span), increasing: the smallest of a random permutation's ranks
    order = jnp.argsort(jax.random.uniform(k_pos, (batch_size, span)), axis=-1)
    positions = jnp.sort(order[:, :num_tokens], axis=-1).astype(jnp.int32)
    rows = jnp.arange(batch_size)[:, None]
    ids = jnp.zeros((batch_size, span), jnp.int32).at[rows, positions].set(tokens)
    markers = jnp.full((batch_size, num_tokens), vocab_size - 1, jnp.int32)
    ids = jnp.concatenate([ids, markers], axis=1)                       # [B, T]
    x = jax.nn.one_hot(ids, vocab_size, dtype=jnp.float32)               # [B, T, A]
    T = span + num_tokens
    return TaskBatch(x=x, y=tokens, lengths=jnp.full((batch_size,), T, jnp.int32), positions=positions)


def selective_copy(key, batch_size: int, num_noise: int = 4080, num_tokens: int = 16,
                   vocab_size: int = 16) -> TaskBatch:
    """Sample a batch of the selective copying task.

    Defaults are Mamba's setting (16 data tokens among 4,096 steps, vocabulary 16): ``T = num_noise +
    2 * num_tokens`` (4,112 with the defaults).

    Args:
      key: a ``jax.random`` key.
      batch_size: B >= 1.
      num_noise: blank steps mixed with the data tokens (>= 0).
      num_tokens: M data tokens to copy (>= 1).
      vocab_size: A >= 3 (blank, at least one data token, marker).

    Returns:
      A `TaskBatch`: ``x`` float32 one-hot [B, T, A]; ``y`` int32 [B, M], the data tokens in order (the
      targets of the last M steps, the markers); ``lengths`` [B] = T; ``positions`` int32 [B, M], the
      increasing time steps of the data tokens.

    Example:
      >>> b = seqjax.tasks.selective_copy(jax.random.key(0), 32, num_noise=64, num_tokens=16)
      >>> b.x.shape, b.y.shape
      ((32, 96, 16), (32, 16))
    """
    fn = "seqjax.tasks.selective_copy"
    batch_size = check_batch_size(fn, batch_size)
    num_noise = _check_count(fn, "num_noise", num_noise, 0)
    num_tokens = _check_count(fn, "num_tokens", num_tokens, 1)
    vocab_size = _check_count(fn, "vocab_size", vocab_size, 3)
    return _generate(key, batch_size, num_noise, num_tokens, vocab_size)


def copy_accuracy(logits, y) -> jax.Array:
    """Fraction of copied tokens right: ``logits`` [B, M, A] at the marker steps, ``y`` [B, M] -> [] float32."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)
