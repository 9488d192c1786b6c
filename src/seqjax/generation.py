"""Autoregressive sampling from a recurrent language model: `generate`.

The model is a cell (any `seqjax` cell, a `seqjax.stack` included) between an
input embedding and an output readout::

    x_t      = embed(token_t)                  # [B, I]
    carry, y = cell.apply(params, carry, x_t)  # [B, O]
    logits   = readout(y)                      # [B, V]

The prompt is read in one `seqjax.scan` (its input projection can be hoisted,
a stacked cell runs layer by layer); then ``max_new_tokens`` tokens are drawn
in ONE `jax.lax.scan`, each fed back as the next input.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cells.base import Array, Cell
from seqjax.options import ScanOptions, resolve
from seqjax.runners import scan

__all__ = ["generate", "sample_logits"]

Embed = Union[Array, Callable[[Array], Array]]
Readout = Union[Array, tuple, Callable[[Array], Array]]


def sample_logits(key: Array, logits: Array, *, temperature=1.0, top_k: Optional[int] = None,
                  greedy: bool = False) -> Array:
    """Draws one token per row from ``logits`` [..., V]: argmax, or softmax(logits / temperature) over the top k.

    Args:
      key: PRNG key (unused when ``greedy``).
      logits: [..., V] float.
      temperature: > 0 (may be a traced scalar).
      top_k: keep only the ``top_k`` largest logits (ties at the threshold are kept); None = all.
      greedy: take the argmax.

    Returns:
      [...] int32 token ids.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cell", "embed_fn", "readout_fn", "max_new_tokens", "top_k", "greedy",
                                   "has_carry", "options"))
def _generate(cell, params, embed_arg, readout_arg, prompt, key, temperature, carry, *, embed_fn, readout_fn,
              max_new_tokens, top_k, greedy, has_carry, options):
    emb = lambda ids: embed_fn(ids) if embed_arg is None else embed_fn(ids, embed_arg)
    out = lambda y: readout_fn(y) if readout_arg is None else readout_fn(y, readout_arg)
    xs = emb(prompt)                                              # [B, P, I]
    carry, ys = scan(cell, params, xs, carry=carry if has_carry else None, options=options)
    logits = out(ys[:, -1])                                       # [B, V]

    def body(state, k):
        carry, logits = state
        tok = sample_logits(k, logits, temperature=temperature, top_k=top_k, greedy=greedy)
        carry, y = cell.apply(params, carry, emb(tok))
        return (carry, out(y)), tok

    (carry, _), toks = jax.lax.scan(body, (carry, logits), jax.random.split(key, max_new_tokens))
    return jnp.swapaxes(toks, 0, 1), carry


def _linear(y, w):
    return y @ w


def _affine(y, wb):
    return y @ wb[0] + wb[1]


def _take(ids, table):
    return jnp.take(table, ids, axis=0)


def _readout_parts(readout):
    """(fn, arg) for a callable (fn(y)), a matrix W [O, V] or a pair (W, b) (fn(y, arg))."""
    if callable(readout):
        return readout, None
    if isinstance(readout, (tuple, list)) and len(readout) == 2:
        return _affine, tuple(jnp.asarray(a) for a in readout)
    if hasattr(readout, "shape") and len(np.shape(readout)) == 2:
        return _linear, jnp.asarray(readout)
    raise TypeError("seqjax.generate: readout must be a callable y -> logits, a matrix W [O, V] or a pair (W [O, V], "
                    f"b [V]), got {type(readout).__name__}")


def generate(cell: Cell, params, prompt, key: Array, *, embed: Embed, readout: Readout, max_new_tokens: int,
             temperature: float = 1.0, top_k: Optional[int] = None, greedy: bool = False, carry=None,
             return_carry: bool = False, options: ScanOptions | None = None):
    """Samples ``max_new_tokens`` tokens after ``prompt`` from ``readout(cell(embed(tokens)))``.

    Equivalent Python loop (one row)::

        carry, ys = seqjax.scan(cell, params, embed(prompt)[None])   # read the prompt
        logits = readout(ys[:, -1])
        for n in range(max_new_tokens):
            tok = argmax(logits) if greedy else categorical(key_n, top_k(logits) / temperature)
            carry, y = cell.apply(params, carry, embed(tok))
            logits = readout(y)
            out.append(tok)

    The sampling loop is one `jax.lax.scan`, jitted; with array ``embed`` /
    ``readout`` a second call with new weights or a new prompt of the same
    shape does not recompile.

    Args:
      cell: any `Cell` (e.g. ``seqjax.stack([seqjax.lstm(256)] * 2)``).
      params: the cell's params.
      prompt: [P] or [B, P] int token ids in [0, V), P >= 1.
      key: PRNG key; sampling is a deterministic function of it.
      embed: an embedding matrix [V, I] (rows looked up) or a callable
        ``ids [...] -> x [..., I]``.
      readout: a matrix W [O, V], a pair (W [O, V], b [V]), or a callable
        ``y [..., O] -> logits [..., V]``.
      max_new_tokens: number of tokens to draw, >= 1.
      temperature: > 0; logits are divided by it (ignored when ``greedy``).
      top_k: sample among the ``top_k`` most likely tokens (1 <= top_k <= V); None = all.
      greedy: take the argmax at every step (same as ``top_k=1``).
      carry: optional carry for batch (B,) to start from (default zeros).
      return_carry: also return the carry after the last generated token was fed.
      options: the `seqjax.ScanOptions` of the scan that reads the prompt.

    Returns:
      [max_new_tokens] (or [B, max_new_tokens]) int32 ids, and the carry if
      ``return_carry``.

    Raises:
      ValueError: a prompt id outside [0, V), an empty or non-integer prompt,
        temperature <= 0, top_k outside [1, V], max_new_tokens < 1.

    Example:
      >>> cell = seqjax.stack([seqjax.lstm(64), seqjax.lstm(64)])
      >>> params = cell.init(jax.random.key(0), input_size=16)
      >>> emb = jax.random.normal(jax.random.key(1), (50, 16)); w = jnp.zeros((64, 50))
      >>> toks = seqjax.generate(cell, params, jnp.array([1, 2, 3]), jax.random.key(2), embed=emb, readout=w,
      ...                        max_new_tokens=20, temperature=0.8, top_k=10)
    """
    call = "seqjax.generate"
    if not isinstance(cell, Cell):
        raise TypeError(f"{call}: cell must be a seqjax Cell, got {type(cell).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"{call}: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(greedy, bool):
        raise ValueError(f"{call}: greedy must be a bool, got {greedy!r}")
    if not isinstance(temperature, jax.core.Tracer):
        t = float(np.asarray(temperature))
        if not (np.isfinite(t) and t > 0):
            raise ValueError(f"{call}: temperature must be a finite number > 0, got {temperature!r}; "
                             f"use greedy=True for argmax decoding")
    prompt = jnp.asarray(prompt)
    squeeze = prompt.ndim == 1
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"{call}: prompt must be token ids of shape (P,) or (B, P) with P >= 1, got shape "
                         f"{tuple(jnp.shape(prompt))}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"{call}: prompt must hold integer token ids, got dtype {prompt.dtype}")

    if callable(embed):
        embed_fn, embed_arg = embed, None
    else:
        embed_arg = jnp.asarray(embed)
        if embed_arg.ndim != 2:
            raise ValueError(f"{call}: embed must be a matrix [V, I] or a callable, got shape {embed_arg.shape}")
        embed_fn = _take
    readout_fn, readout_arg = _readout_parts(readout)

    # the vocabulary size V: from the readout's output
    y_shape = jax.ShapeDtypeStruct((1, cell.output_size), jnp.float32)
    lg = jax.eval_shape(lambda y: readout_fn(y) if readout_arg is None else readout_fn(y, readout_arg), y_shape)
    V = lg.shape[-1]
    if embed_arg is not None and embed_arg.shape[0] != V:
        raise ValueError(f"{call}: embed has {embed_arg.shape[0]} rows but readout gives V={V} logits; "
                         f"they must agree")
    if not isinstance(prompt, jax.core.Tracer):
        lo, hi = int(jnp.min(prompt)), int(jnp.max(prompt))
        if lo < 0 or hi >= V:
            raise ValueError(f"{call}: prompt ids must lie in [0, V={V}) (the vocabulary), got values in "
                             f"[{lo}, {hi}]; map unknown symbols to a vocabulary id first")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= V:
            raise ValueError(f"{call}: top_k must be an int in [1, V={V}] or None, got {top_k!r}")
        top_k = int(top_k)
    if carry is not None:
        want = jax.tree.structure(cell.initial_carry(params, (prompt.shape[0],)))
        if jax.tree.structure(carry) != want:
            raise ValueError(f"{call}: carry must match {cell.name}'s carry for batch B={prompt.shape[0]}")

    toks, carry = _generate(cell, params, embed_arg, readout_arg, prompt.astype(jnp.int32), key,
                            jnp.asarray(temperature, jnp.float32), carry, embed_fn=embed_fn, readout_fn=readout_fn,
                            max_new_tokens=int(max_new_tokens), top_k=top_k, greedy=greedy,
                            has_carry=carry is not None, options=resolve(call, options))
    if squeeze:
        toks = toks[0]
    return (toks, carry) if return_carry else toks
