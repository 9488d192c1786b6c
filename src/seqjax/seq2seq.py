"""Encoder-decoder models: an attention decoder cell, teacher forcing, greedy and beam-search decoding.

Three levels, each usable on its own:

1. **The attention decoder cell.** ``attention_decoder(cell, attention=...)``
   wraps any seqjax cell; ``decoder.bind(params, memory, lengths)`` returns a
   seqjax `Cell` whose step attends over the encoder outputs ``memory``
   [B, Tk, Dm] (closed over; its query-independent projection is computed once
   in ``bind``). The bound cell runs under `seqjax.scan` (teacher forcing) and
   step by step (decoding) with the same params::

       dec = attention_decoder(seqjax.gru(128), attention="additive", memory_size=256)
       params = dec.init(key, input_size=32)
       cell = dec.bind(params, memory, lengths=src_lengths)
       carry = cell.initial_carry(params, (B,))                 # or a bridge from the encoder
       carry, ys = seqjax.scan(cell, params, embedded_targets, carry=carry)   # ys [B, T, H + Dm]

   One step (Bahdanau et al. 2015, with the query taken from the previous state)::

       q        = h_{t-1}                                  # the inner cell's output state
       c_t, a_t = attention(q, memory)                     # context [Dm], weights [Tk]
       carry_t, h_t = cell(carry_{t-1}, [x_t ; c_t])       # the context is part of the input
       y_t      = [h_t ; c_t]

   ``attention=None`` gives the plain decoder of Sutskever et al. (2014):
   ``y_t = h_t``, no memory, everything else identical.

2. **Decoding** over any step function ``step_fn(carry, tokens [N]) -> (carry,
   log_probs [N, V])``: `greedy_decode` and `beam_search` (batched,
   length-normalised, EOS-aware, a fixed number of steps so it compiles once).

3. **Models**: `seq2seq` (embedded tokens -> bidirectional encoder -> attention
   decoder) and `vec2seq` (a feature vector -> the same decoder), both returning
   a `Seq2Seq` bundle of pure functions: ``init``, ``encode``, ``logits``,
   ``loss`` (teacher forced, for `seqjax.make_train_step`), ``greedy`` and
   ``beam`` (jit-compiled with a static maximum length).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import attention as attn
from seqjax.cells.base import (Array, Cell, check_choice, check_positive_int, form_of, init_param, make_cell, matmul,
                               zeros_carry)
from seqjax.cells.gru import gru
from seqjax.cells.lstm import lstm
from seqjax.layers import bidirectional
from seqjax.losses import masked_cross_entropy
from seqjax.options import ScanOptions, resolve
from seqjax.runners import scan

__all__ = [
    "ATTENTIONS", "AttentionDecoder", "AttentionDecoderCarry", "AttentionDecoderParams", "attention_decoder",
    "greedy_decode", "beam_search", "tile_beams", "GreedyResult", "BeamResult", "Seq2Seq", "Seq2SeqBatch",
    "Seq2SeqParams", "Vec2SeqParams", "TokenDecoderParams", "seq2seq", "vec2seq", "Vocabulary",
    "exact_match",
]

ATTENTIONS = ("additive", "dot", "scaled_dot", None)


# ----------------------------------------------------------------------------
# the attention decoder cell
# ----------------------------------------------------------------------------


class AttentionDecoderParams(NamedTuple):
    """Params of an `attention_decoder`.

    Attributes:
      cell: the inner cell's params, built for input size ``I + Dm`` (the
        token input and the context vector, in that order).
      attention: `seqjax.attention.AdditiveParams` (Dq=H, Dk=Dm, A) for
        ``"additive"``; the query projection ``w_q`` [H, Dm] for ``"dot"`` and
        ``"scaled_dot"`` (``q = h W_q``); ``None`` without attention.
    """

    cell: Any
    attention: Any


class AttentionDecoderCarry(NamedTuple):
    """Carry of a bound attention decoder cell.

    Attributes:
      cell: the inner cell's carry (e.g. ``h`` [B, H] for a GRU).
      context: [B, Dm] the last context vector ([B, 0] without attention).
      weights: [B, Tk] the last attention weights ([B, 0] without attention).
    """

    cell: Any
    context: Array
    weights: Array


class AttentionDecoder(NamedTuple):
    """An attention decoder definition (build with `attention_decoder`).

    Attributes:
      init: ``(key, input_size) -> AttentionDecoderParams``.
      bind: ``(params, memory [B, Tk, Dm] | None, lengths [B] | None) -> Cell``:
        the seqjax cell attending over ``memory``.
      cell: the inner `Cell`.
      attention: "additive", "dot", "scaled_dot" or None.
      memory_size: Dm (0 without attention).
      output_size: O = H + Dm, the width of ``y``.
      hidden: ``(inner_carry) -> h [B, H]``, the state used as query.
      name: a short description.
    """

    init: Callable
    bind: Callable
    cell: Cell
    attention: str | None
    memory_size: int
    output_size: int
    hidden: Callable
    name: str


def _hidden_fn(cell: Cell) -> Callable:
    """``carry -> h``: the output state of a cell's carry (last layer of a stack)."""
    form = form_of(cell)
    if form is not None and form.layers is not None:
        last = _hidden_fn(form.layers[-1])
        return lambda carry: last(carry[-1])

    def hidden(carry):
        if hasattr(carry, "h"):
            return carry.h
        if isinstance(carry, jax.Array) or hasattr(carry, "shape"):
            return carry
        raise TypeError(f"seqjax.seq2seq.attention_decoder: cannot find the hidden state in the carry of {cell.name} "
                        f"({type(carry).__name__}); it needs an array carry or a carry with an `h` field")

    return hidden


def attention_decoder(cell: Cell, attention: str | None = "additive", *, memory_size: int | None = None,
                      attention_size: int | None = None, kernel_init=jax.nn.initializers.glorot_uniform(),
                      param_dtype=jnp.float32) -> AttentionDecoder:
    """A decoder cell whose every step attends over an encoder memory.

    Args:
      cell: the inner recurrent `Cell` (any seqjax cell or `seqjax.stack`).
      attention: "additive" (Bahdanau), "dot" (Luong's general: ``e = (h W_q) . m``),
        "scaled_dot" (``e = (h W_q) . m / sqrt(Dm)``) or None (no attention).
      memory_size: Dm, the width of the memory (required unless attention is None).
      attention_size: A for additive attention (default H).
      kernel_init: initialiser of the attention weights.
      param_dtype: dtype of the attention params.

    Returns:
      An `AttentionDecoder`; see the module docstring for the step equations.

    Example:
      >>> dec = seqjax.seq2seq.attention_decoder(seqjax.gru(64), "scaled_dot", memory_size=128)
      >>> params = dec.init(jax.random.key(0), input_size=16)
      >>> memory, lengths = jnp.ones((2, 7, 128)), jnp.array([7, 5])   # memory [B, Tk, 128]
      >>> cell = dec.bind(params, memory, lengths)
      >>> xs = jnp.ones((2, 4, 16))                                    # [B, T, 16]
      >>> carry, ys = seqjax.scan(cell, params, xs, carry=cell.initial_carry(params, (2,)))
    """
    call = "seqjax.seq2seq.attention_decoder"
    if not isinstance(cell, Cell):
        raise TypeError(f"{call}: cell must be a seqjax Cell (e.g. seqjax.gru(128)), got {type(cell).__name__}")
    check_choice(call, "attention", attention, ATTENTIONS)
    if attention is None:
        Dm = 0
    else:
        if memory_size is None:
            raise ValueError(f"{call}: memory_size (the encoder output width Dm) is required with attention="
                             f"{attention!r}")
        Dm = check_positive_int(call, "memory_size", memory_size)
    H = cell.output_size
    A = H if attention_size is None else check_positive_int(call, "attention_size", attention_size)
    hidden = _hidden_fn(cell)
    name = f"attention_decoder({cell.name}, attention={attention!r}, memory_size={Dm})"

    def init(key, input_size: int) -> AttentionDecoderParams:
        check_positive_int(call + ".init", "input_size", input_size)
        kc, ka = jax.random.split(key)
        cp = cell.init(kc, input_size + Dm)
        if attention == "additive":
            ap = attn.additive_init(ka, H, Dm, A, kernel_init=kernel_init, param_dtype=param_dtype)
        elif attention is None:
            ap = None
        else:
            ap = init_param(kernel_init, ka, (H, Dm), param_dtype)
        return AttentionDecoderParams(cp, ap)

    def bind(params: AttentionDecoderParams, memory: Array | None = None, lengths: Array | None = None) -> Cell:
        bcall = call + ".bind"
        if attention is None:
            memory, keys, mask, Tk = None, None, None, 0
        else:
            if memory is None:
                raise ValueError(f"{bcall}: attention={attention!r} needs a memory [B, Tk, Dm={Dm}]")
            if jnp.ndim(memory) != 3 or jnp.shape(memory)[-1] != Dm:
                raise ValueError(f"{bcall}: memory must have shape (B, Tk, Dm={Dm}), got {tuple(jnp.shape(memory))}")
            B, Tk = jnp.shape(memory)[:2]
            if Tk == 0:
                raise ValueError(f"{bcall}: the memory is empty (Tk=0)")
            mask = None
            if lengths is not None:
                if tuple(jnp.shape(lengths)) != (B,):
                    raise ValueError(f"{bcall}: lengths must have shape (B,)=({B},) to match memory "
                                     f"{tuple(jnp.shape(memory))}, got {tuple(jnp.shape(lengths))}")
                mask = attn.key_mask(lengths, Tk, call=bcall)[:, None, :]     # [B, 1, Tk]
            keys = attn.additive_project_keys(params.attention, memory) if attention == "additive" else memory

        def initial_carry(p, batch_shape=()):
            c = cell.initial_carry(p.cell, batch_shape)
            dtype = jax.tree.leaves(c)[0].dtype
            return AttentionDecoderCarry(c, zeros_carry(batch_shape, Dm, dtype), zeros_carry(batch_shape, Tk, dtype))

        def project(p, x):
            want = cell.input_size(p.cell) - Dm
            if jnp.shape(x)[-1:] != (want,):
                raise ValueError(f"{name}: x must have shape (..., {want}), got {tuple(jnp.shape(x))}")
            return x

        def step(p, carry: AttentionDecoderCarry, x):
            if attention is None:
                c, h = cell.apply(p.cell, carry.cell, x)
                return AttentionDecoderCarry(c, carry.context, carry.weights), h
            if jnp.ndim(x) != 2 or jnp.shape(x)[0] != jnp.shape(memory)[0]:
                raise ValueError(f"{name}: a cell bound to a memory of batch B={jnp.shape(memory)[0]} steps inputs "
                                 f"of shape (B, I), got {tuple(jnp.shape(x))}")
            q = hidden(carry.cell)[:, None, :]                                   # [B, 1, H]
            if attention == "additive":
                ctx, w = attn.attend(attn.additive_scores(p.attention, q, keys, projected=True), memory, mask=mask,
                                     call=name)
            else:
                qq = matmul(q, p.attention)                                      # [B, 1, Dm]
                scale = 1.0 / math.sqrt(Dm) if attention == "scaled_dot" else None
                ctx, w = attn.attend(attn.dot_scores(qq, keys, scale=scale), memory, mask=mask, call=name)
            ctx, w = ctx[:, 0].astype(x.dtype), w[:, 0].astype(x.dtype)
            c, h = cell.apply(p.cell, carry.cell, jnp.concatenate([x, ctx.astype(x.dtype)], axis=-1))
            return AttentionDecoderCarry(c, ctx, w), jnp.concatenate([h, ctx.astype(h.dtype)], axis=-1)

        return make_cell(init=init, initial_carry=initial_carry, project=project, step=step,
                         input_size=lambda p: cell.input_size(p.cell) - Dm, hidden_size=cell.hidden_size,
                         output_size=H + Dm, name=name)

    return AttentionDecoder(init, bind, cell, attention, Dm, H + Dm, hidden, name)


# ----------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------


class GreedyResult(NamedTuple):
    """Output of `greedy_decode`.

    Attributes:
      tokens: [B, L] int32; the EOS is included, positions after it hold ``pad_id``.
      lengths: [B] int32 number of generated tokens including the EOS (L if none).
      scores: [B] float32 sum of the log-probabilities of the generated tokens.
      trace: what ``collect(carry)`` returned at each step, stacked on axis 1
        ([B, L, ...] leaves), or None.
    """

    tokens: Array
    lengths: Array
    scores: Array
    trace: Any


class BeamResult(NamedTuple):
    """Output of `beam_search`; beams sorted best first.

    Attributes:
      tokens: [B, K, L] int32 (EOS included, ``pad_id`` after it).
      lengths: [B, K] int32 tokens including the EOS.
      scores: [B, K] float32 sum of log-probabilities.
      normalized_scores: [B, K] float32 ``scores / lengths ** length_penalty``
        (the ranking criterion).
    """

    tokens: Array
    lengths: Array
    scores: Array
    normalized_scores: Array

    @property
    def best(self) -> Array:
        """[B, L] the best hypothesis of each example."""
        return self.tokens[:, 0]


def _check_decode_args(call, *, bos_id, eos_id, pad_id, max_length, beam_width=1):
    check_positive_int(call, "max_length", max_length)
    if isinstance(beam_width, bool) or not isinstance(beam_width, (int, np.integer)) or beam_width < 1:
        raise ValueError(f"{call}: beam_width must be an int >= 1, got {beam_width!r}")
    for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{call}: {name} must be a non-negative int, got {v!r}")


def _batch_size(call, carry, batch_size):
    leaves = jax.tree.leaves(carry)
    sizes = {jnp.shape(a)[0] for a in leaves if jnp.ndim(a) >= 1}
    if sizes and sizes != {batch_size}:
        raise ValueError(f"{call}: every carry leaf must have leading batch dimension B={batch_size}, got {sorted(sizes)}")


def greedy_decode(step_fn: Callable, carry, batch_size: int, *, bos_id: int, eos_id: int, max_length: int,
                  pad_id: int = 0, collect: Callable | None = None) -> GreedyResult:
    """Greedy decoding: at each step feed back the most likely token.

    Equivalent loop::

        token = [bos] * B
        for t in range(max_length):
            carry, logp = step_fn(carry, token)       # logp [B, V]
            token = argmax(logp)                      # pad_id once the example has emitted EOS

    Runs ``max_length`` steps in one `jax.lax.scan` (a static shape: wrap the
    caller in `jax.jit` with ``max_length`` static).

    Args:
      step_fn: ``(carry, tokens [B] int32) -> (carry, log_probs [B, V])``.
      carry: initial carry, every leaf with leading dimension B.
      batch_size: B.
      bos_id, eos_id, pad_id: token ids.
      max_length: L, the number of decoding steps.
      collect: optional ``carry -> pytree`` recorded after each step (e.g. the
        attention weights ``lambda c: c.weights``).

    Returns:
      A `GreedyResult`.
    """
    call = "seqjax.seq2seq.greedy_decode"
    _check_decode_args(call, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_length=max_length)
    _batch_size(call, carry, batch_size)
    B = batch_size

    def body(state, t):
        carry, last, done, lengths, score = state
        carry, logp = step_fn(carry, last)
        logp = logp.astype(jnp.float32)
        tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        score = score + jnp.where(done, 0.0, lp)
        out = jnp.where(done, pad_id, tok)
        lengths = jnp.where(done, lengths, t + 1)
        done = done | (tok == eos_id)
        feed = jnp.where(done, eos_id, tok)
        rec = None if collect is None else collect(carry)
        return (carry, feed, done, lengths, score), (out, rec)

    init = (carry, jnp.full((B,), bos_id, jnp.int32), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
            jnp.zeros((B,), jnp.float32))
    (_, _, _, lengths, score), (toks, rec) = jax.lax.scan(body, init, jnp.arange(max_length, dtype=jnp.int32))
    trace = None if collect is None else jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), rec)
    return GreedyResult(toks.T, lengths, score, trace)


def tile_beams(tree, beam_width: int):
    """Repeats every leaf ``beam_width`` times along axis 0: [B, ...] -> [B*K, ...] (row b*K + k is beam k of b).

    Use it to give a step function the memory of each beam.
    """
    return jax.tree.map(lambda a: jnp.repeat(a, beam_width, axis=0), tree)


def beam_search(step_fn: Callable, carry, batch_size: int, *, beam_width: int, bos_id: int, eos_id: int,
                max_length: int, pad_id: int = 0, length_penalty: float = 1.0) -> BeamResult:
    """Batched beam search with length-normalised scores and EOS handling.

    Each example keeps K hypotheses. At step t every live hypothesis y is
    extended by every token v, a hypothesis that has emitted EOS only by itself
    (at no cost, its length frozen), and the K best candidates by

        normalized(y) = sum_t log p(y_t | y_<t, x) / len(y) ** length_penalty

    survive (len counts the EOS). After ``max_length`` steps the beams are
    returned sorted by that score; a hypothesis without EOS has length L.
    ``length_penalty=0`` ranks by the raw log-probability (which favours short
    outputs), 1 by the mean per-token log-probability. With K = 1 this is
    greedy decoding; with K at least the number of distinct hypotheses it is
    exhaustive.

    Args:
      step_fn: ``(carry, tokens [B*K] int32) -> (carry, log_probs [B*K, V])``;
        row ``b*K + k`` is beam k of example b (build it over memory tiled
        with `tile_beams`).
      carry: initial carry for batch B (every leaf [B, ...]); it is tiled here.
      batch_size: B.
      beam_width: K >= 1.
      bos_id, eos_id, pad_id: token ids.
      max_length: L, the number of steps (static).
      length_penalty: the exponent alpha above (>= 0).

    Returns:
      A `BeamResult` ([B, K, L] tokens, best first).
    """
    call = "seqjax.seq2seq.beam_search"
    _check_decode_args(call, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_length=max_length,
                       beam_width=beam_width)
    if not isinstance(length_penalty, (int, float)) or length_penalty < 0:
        raise ValueError(f"{call}: length_penalty must be a number >= 0, got {length_penalty!r}")
    _batch_size(call, carry, batch_size)
    B, K, L = batch_size, int(beam_width), max_length
    carry = tile_beams(carry, K)
    neg_inf = jnp.float32(-jnp.inf)

    def body(state, t):
        carry, tokens, scores, done, lengths, last = state
        carry, logp = step_fn(carry, last)
        V = logp.shape[-1]
        logp = logp.astype(jnp.float32).reshape(B, K, V)
        only_eos = jnp.where(jnp.arange(V) == eos_id, 0.0, neg_inf)
        logp = jnp.where(done[..., None], only_eos, logp)
        cand = scores[..., None] + logp                                   # [B, K, V]
        cand_len = jnp.where(done, lengths, t + 1).astype(jnp.float32)
        norm = cand / (cand_len ** length_penalty)[..., None]
        top, idx = jax.lax.top_k(norm.reshape(B, K * V), K)                # [B, K]
        beam, tok = idx // V, (idx % V).astype(jnp.int32)
        new_scores = jnp.take_along_axis(cand.reshape(B, K * V), idx, axis=1)
        parent_done = jnp.take_along_axis(done, beam, axis=1)
        new_lengths = jnp.where(parent_done, jnp.take_along_axis(lengths, beam, axis=1), t + 1)
        new_done = parent_done | (tok == eos_id)
        tokens = jnp.take_along_axis(tokens, beam[..., None], axis=1)
        tokens = tokens.at[:, :, t].set(jnp.where(parent_done, pad_id, tok))
        rows = (jnp.arange(B)[:, None] * K + beam).reshape(B * K)
        carry = jax.tree.map(lambda a: a[rows], carry)
        last = jnp.where(new_done, eos_id, tok).reshape(B * K)
        return (carry, tokens, new_scores, new_done, new_lengths, last), top

    scores0 = jnp.where(jnp.arange(K) == 0, 0.0, neg_inf)[None, :].repeat(B, 0).astype(jnp.float32)
    init = (carry, jnp.full((B, K, L), pad_id, jnp.int32), scores0, jnp.zeros((B, K), bool),
            jnp.zeros((B, K), jnp.int32), jnp.full((B * K,), bos_id, jnp.int32))
    (_, tokens, scores, _, lengths, _), tops = jax.lax.scan(body, init, jnp.arange(L, dtype=jnp.int32))
    return BeamResult(tokens, lengths, scores, tops[-1])


# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------


class Seq2SeqBatch(NamedTuple):
    """A training batch.

    Attributes:
      source: `seq2seq`: ``(tokens [B, S] int, lengths [B] int)``; `vec2seq`: features [B, F] float.
      target: [B, T] int, each row ending with EOS at ``target_lengths - 1``, padded after it.
      target_lengths: [B] int in [1, T], EOS included.
    """

    source: Any
    target: Array
    target_lengths: Array


class TokenDecoderParams(NamedTuple):
    """The token-level decoder shared by `seq2seq` and `vec2seq`.

    Attributes:
      embed: [V, E] target embeddings (row ``bos_id`` embeds the start token).
      bridge: tuple of ``(w [D, w_leaf], b [w_leaf])``, one per leaf of the inner
        cell's carry: ``leaf0 = tanh(summary W + b)`` initialises the decoder
        from the encoder summary [B, D].
      decoder: `AttentionDecoderParams`.
      readout: ``(w1 [O + E, R], b1 [R], w2 [R, V], b2 [V])``: the logits
        ``tanh([y_t ; x_t] W1 + b1) W2 + b2`` (a deep output, Bahdanau's A.2.2).
    """

    embed: Array
    bridge: tuple
    decoder: AttentionDecoderParams
    readout: tuple


class Seq2SeqParams(NamedTuple):
    """Params of `seq2seq`: source embeddings [Vs, E], the encoder layer's params, the token decoder."""

    src_embed: Array
    encoder: Any
    decoder: TokenDecoderParams


class Vec2SeqParams(NamedTuple):
    """Params of `vec2seq`: the feature encoder ``(w [F, D], b [D])`` and the token decoder."""

    encoder: tuple
    decoder: TokenDecoderParams


class Encoded(NamedTuple):
    """What ``encode`` returns: the decoder's initial carry, the memory [B, Tk, Dm] (or None) and its lengths."""

    carry: AttentionDecoderCarry
    memory: Array | None
    lengths: Array | None


class Seq2Seq(NamedTuple):
    """A functional encoder-decoder model (from `seq2seq` or `vec2seq`).

    Attributes:
      init: ``key -> params``.
      encode: ``(params, source) -> Encoded``.
      logits: ``(params, source, target [B, T], target_lengths [B]) -> [B, T, V]``,
        teacher forced: step t reads ``target[t-1]`` (BOS at t=0).
      loss: ``(params, Seq2SeqBatch) -> (loss, {"token_accuracy"})``: the masked
        cross-entropy over target tokens (use ``has_aux=True`` with `make_train_step`).
      greedy: ``(params, source, *, max_length) -> GreedyResult`` (jitted; its
        ``trace`` holds the attention weights [B, L, Tk]).
      beam: ``(params, source, *, max_length, beam_width, length_penalty=1.0) -> BeamResult`` (jitted).
      decoder: the `AttentionDecoder` (None for `seqjax.transformer.seq2seq`, which has no decoder cell).
      bos_id, eos_id, pad_id, vocab_size: the target's special ids and V.
    """

    init: Callable
    encode: Callable
    logits: Callable
    loss: Callable
    greedy: Callable
    beam: Callable
    decoder: AttentionDecoder
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int


def _dense_init(key, fan_in, fan_out, dtype=jnp.float32):
    return (jax.nn.initializers.glorot_uniform()(key, (fan_in, fan_out), dtype), jnp.zeros((fan_out,), dtype))


def _check_tokens(call: str, name: str, tokens, vocab_size: int, lengths=None):
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"{call}: {name} must be integer token ids, got dtype {jnp.result_type(tokens)}")
    if isinstance(tokens, jax.core.Tracer) or (lengths is not None and isinstance(lengths, jax.core.Tracer)):
        return
    t = np.asarray(tokens)
    if lengths is not None and t.ndim == 2:
        t = t[np.arange(t.shape[1])[None, :] < np.asarray(lengths)[:, None]]
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = t[(t < 0) | (t >= vocab_size)]
        raise ValueError(f"{call}: {name} contains unknown token ids {sorted(set(bad.tolist()))[:5]}; ids must lie "
                         f"in [0, V={vocab_size})")


def _token_decoder(call, decoder: AttentionDecoder, vocab_size, embed_size, readout_size, summary_size, *, bos_id,
                   eos_id, pad_id, options: ScanOptions):
    """The shared decoder half: init, teacher-forced logits, and a decoding step function."""
    V, E = vocab_size, embed_size
    template = jax.eval_shape(lambda: decoder.cell.initial_carry(decoder.cell.init(jax.random.key(0), E + max(
        decoder.memory_size, 0)), (1,)))
    widths = [a.shape[-1] for a in jax.tree.leaves(template)]
    treedef = jax.tree.structure(template)

    def init(key) -> TokenDecoderParams:
        ke, kb, kd, k1, k2 = jax.random.split(key, 5)
        embed = jax.random.normal(ke, (V, E)) * (1.0 / math.sqrt(E))
        bridge = tuple(_dense_init(k, summary_size, w) for k, w in zip(jax.random.split(kb, len(widths)), widths))
        return TokenDecoderParams(embed, bridge, decoder.init(kd, E),
                                  (*_dense_init(k1, decoder.output_size + E, readout_size),
                                   *_dense_init(k2, readout_size, V)))

    def initial_carry(params: TokenDecoderParams, summary, memory):
        B = summary.shape[0]
        leaves = [jnp.tanh(matmul(summary, w) + b) for (w, b) in params.bridge]
        inner = jax.tree.unflatten(treedef, leaves)
        Tk = 0 if (memory is None or decoder.attention is None) else memory.shape[1]
        dt = leaves[0].dtype
        return AttentionDecoderCarry(inner, jnp.zeros((B, decoder.memory_size), dt), jnp.zeros((B, Tk), dt))

    def readout(params, ys, xs):
        w1, b1, w2, b2 = params.readout
        r = jnp.tanh(matmul(jnp.concatenate([ys, xs], axis=-1), w1) + b1)
        return matmul(r, w2) + b2

    def logits(params: TokenDecoderParams, enc: Encoded, target, target_lengths):
        _check_tokens(call, "target", target, V, target_lengths)
        B, T = jnp.shape(target)
        prev = jnp.concatenate([jnp.full((B, 1), bos_id, jnp.int32), jnp.asarray(target[:, :-1], jnp.int32)], 1)
        xs = params.embed[prev]
        cell = decoder.bind(params.decoder, enc.memory, enc.lengths)
        _, ys = scan(cell, params.decoder, xs, carry=enc.carry, lengths=target_lengths, options=options)
        return readout(params, ys, xs)

    def step_fn(params: TokenDecoderParams, memory, lengths):
        """The decoding step; BOS and PAD are never generated (their log-probability is -inf)."""
        cell = decoder.bind(params.decoder, memory, lengths)

        never = jnp.zeros((V,), bool).at[bos_id].set(True).at[pad_id].set(pad_id != eos_id)

        def step(carry, tokens):
            x = params.embed[tokens]
            carry, y = cell.apply(params.decoder, carry, x)
            logits = jnp.where(never, -jnp.inf, readout(params, y, x).astype(jnp.float32))
            return carry, jax.nn.log_softmax(logits, axis=-1)

        return step

    return init, initial_carry, logits, step_fn


def _teacher_forced_loss(lg, batch: Seq2SeqBatch):
    """``(masked cross-entropy, {"token_accuracy"})`` of teacher-forced logits [B, T, V] against ``batch.target``."""
    ce = masked_cross_entropy(lg, batch.target, batch.target_lengths)
    T = batch.target.shape[1]
    valid = jnp.arange(T)[None, :] < batch.target_lengths[:, None]
    hit = (jnp.argmax(lg, -1) == batch.target) & valid
    return ce, {"token_accuracy": hit.sum() / jnp.maximum(valid.sum(), 1)}


def _assemble(call, encode_fn, dec_parts, decoder, vocab_size, *, bos_id, eos_id, pad_id, init, get_dec):
    """Builds the `Seq2Seq` bundle around an ``encode`` and the shared decoder half."""
    _, _, dec_logits, dec_step = dec_parts

    def logits(params, source, target, target_lengths):
        return dec_logits(get_dec(params), encode_fn(params, source), target, target_lengths)

    def loss(params, batch: Seq2SeqBatch):
        return _teacher_forced_loss(logits(params, batch.source, batch.target, batch.target_lengths), batch)

    def _greedy(params, source, max_length):
        enc = encode_fn(params, source)
        B = enc.carry.context.shape[0]
        step = dec_step(get_dec(params), enc.memory, enc.lengths)
        return greedy_decode(step, enc.carry, B, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                             max_length=max_length, collect=lambda c: c.weights)

    def _beam(params, source, max_length, beam_width, length_penalty):
        enc = encode_fn(params, source)
        B = enc.carry.context.shape[0]
        mem = None if enc.memory is None else tile_beams(enc.memory, beam_width)
        lens = None if enc.lengths is None else tile_beams(enc.lengths, beam_width)
        step = dec_step(get_dec(params), mem, lens)
        return beam_search(step, enc.carry, B, beam_width=beam_width, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                           max_length=max_length, length_penalty=length_penalty)

    greedy_jit = jax.jit(_greedy, static_argnames=("max_length",))
    beam_jit = jax.jit(_beam, static_argnames=("max_length", "beam_width", "length_penalty"))

    def greedy(params, source, *, max_length: int) -> GreedyResult:
        _check_decode_args(call + ".greedy", bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_length=max_length)
        encode_fn.check(source)
        return greedy_jit(params, source, max_length=max_length)

    def beam(params, source, *, max_length: int, beam_width: int, length_penalty: float = 1.0) -> BeamResult:
        _check_decode_args(call + ".beam", bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_length=max_length,
                           beam_width=beam_width)
        if not isinstance(length_penalty, (int, float)) or length_penalty < 0:
            raise ValueError(f"{call}.beam: length_penalty must be a number >= 0, got {length_penalty!r}")
        encode_fn.check(source)
        return beam_jit(params, source, max_length=max_length, beam_width=int(beam_width),
                        length_penalty=float(length_penalty))

    return Seq2Seq(init, encode_fn, logits, loss, greedy, beam, decoder, bos_id, eos_id, pad_id, vocab_size)


def _make_cell(call, cell, hidden_size):
    if isinstance(cell, Cell):
        return cell
    check_choice(call, "cell", cell, ("gru", "lstm"))
    return gru(hidden_size) if cell == "gru" else lstm(hidden_size)


def _check_specials(call, vocab_size, bos_id, eos_id, pad_id):
    check_positive_int(call, "vocab_size", vocab_size)
    for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < vocab_size:
            raise ValueError(f"{call}: {name} must be an int in [0, vocab_size={vocab_size}), got {v!r}")
    if bos_id == eos_id:
        raise ValueError(f"{call}: bos_id and eos_id must differ, got {bos_id}")


def _check_source(call: str, source, src_vocab_size: int):
    """Checks a token source ``(tokens [B, S] int, lengths [B] int in [1, S])``; errors name ``call``."""
    if not isinstance(source, (tuple, list)) or len(source) != 2:
        raise ValueError(f"{call}: source must be the pair (tokens [B, S] int, lengths [B] int), got "
                         f"{type(source).__name__}")
    tokens, lengths = source
    if jnp.ndim(tokens) != 2:
        raise ValueError(f"{call}: source tokens must have shape (B, S), got {tuple(jnp.shape(tokens))}")
    B, S = jnp.shape(tokens)
    if tuple(jnp.shape(lengths)) != (B,) or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(f"{call}: source lengths must be an int array of shape (B,)=({B},), got shape "
                         f"{tuple(jnp.shape(lengths))} dtype {jnp.result_type(lengths)}")
    if not isinstance(lengths, jax.core.Tracer) and B:
        values = np.asarray(lengths)    # numpy: jnp reductions inside a jit trace are staged, even on constants
        lo, hi = int(values.min()), int(values.max())
        if lo < 1 or hi > S:
            raise ValueError(f"{call}: source lengths must lie in [1, S={S}], got values in [{lo}, {hi}]; "
                             f"an empty source leaves nothing to encode or attend to")
    _check_tokens(call, "source tokens", tokens, src_vocab_size, lengths)


def seq2seq(src_vocab_size: int, tgt_vocab_size: int, *, embed_size: int = 32, hidden_size: int = 128,
            attention: str | None = "additive", attention_size: int | None = None, encoder_cell="gru",
            decoder_cell="gru", readout_size: int | None = None, bos_id: int = 1, eos_id: int = 2,
            pad_id: int = 0, options: ScanOptions | None = None) -> Seq2Seq:
    """A token-to-token encoder-decoder: bidirectional encoder + attention decoder (Bahdanau et al. 2015).

    Model::

        h_1..h_S   = bidirectional encoder over embedded source (padding-aware)   # memory [B, S, 2H]
        summary    = [final forward state ; final backward state]                 # [B, 2H]
        decoder carry_0 = tanh(summary W_bridge + b)                               # per carry leaf
        step t:    y_t = attention decoder(carry, embed(target[t-1]))  (BOS at t = 0)
                   logits_t = tanh([y_t ; x_t] W1 + b1) W2 + b2

    With ``attention=None`` the decoder sees the source only through carry_0
    (Sutskever et al. 2014's bottleneck).

    Args:
      src_vocab_size, tgt_vocab_size: Vs, V.
      embed_size: E (both embeddings). hidden_size: H (encoder per direction and decoder).
      attention: "additive", "dot", "scaled_dot" or None.
      attention_size: A for additive attention (default H).
      encoder_cell, decoder_cell: "gru", "lstm" or a `Cell` (the decoder's
        must have output size H... any size works; the encoder's output size
        sets Dm = 2 * its output size).
      readout_size: R (default H).
      bos_id, eos_id, pad_id: target special ids (source padding is given by lengths).
      options: the `seqjax.ScanOptions` of the encoder's and the teacher-forced decoder's scans.

    Returns:
      A `Seq2Seq`; ``source`` is ``(tokens [B, S] int, lengths [B] int in [1, S])``.

    Example:
      >>> model = seqjax.seq2seq.seq2seq(40, 13, attention="additive", embed_size=8, hidden_size=16)
      >>> params = model.init(jax.random.key(0))
      >>> step = seqjax.make_train_step(model.loss, optax.adam(1e-3), has_aux=True, clip_norm=1.0)
      >>> src, src_lengths = jnp.ones((2, 6), jnp.int32), jnp.array([6, 4])   # tokens [B, S], lengths [B]
      >>> out = model.beam(params, (src, src_lengths), max_length=12, beam_width=4)
    """
    call = "seqjax.seq2seq.seq2seq"
    check_positive_int(call, "src_vocab_size", src_vocab_size)
    _check_specials(call, tgt_vocab_size, bos_id, eos_id, pad_id)
    check_positive_int(call, "embed_size", embed_size)
    check_positive_int(call, "hidden_size", hidden_size)
    enc_cell = _make_cell(call, encoder_cell, hidden_size)
    dec_cell = _make_cell(call, decoder_cell, hidden_size)
    options = resolve(call, options)
    encoder = bidirectional(enc_cell, options=options)
    Dm = encoder.output_size
    decoder = attention_decoder(dec_cell, attention, memory_size=None if attention is None else Dm,
                                attention_size=attention_size)
    R = hidden_size if readout_size is None else check_positive_int(call, "readout_size", readout_size)
    parts = _token_decoder(call, decoder, tgt_vocab_size, embed_size, R, Dm, bos_id=bos_id, eos_id=eos_id,
                           pad_id=pad_id, options=options)
    dec_init, dec_carry = parts[0], parts[1]
    enc_hidden = _hidden_fn(enc_cell)

    def init(key) -> Seq2SeqParams:
        ks, ke, kd = jax.random.split(key, 3)
        return Seq2SeqParams(jax.random.normal(ks, (src_vocab_size, embed_size)) * (1.0 / math.sqrt(embed_size)),
                             encoder.init(ke, embed_size), dec_init(kd))

    def check(source):
        _check_source(call, source, src_vocab_size)

    def encode(params: Seq2SeqParams, source) -> Encoded:
        check(source)
        tokens, lengths = source
        xs = params.src_embed[jnp.asarray(tokens)]
        (cf, cb), ys = encoder.apply(params.encoder, xs, lengths=jnp.asarray(lengths))
        summary = jnp.concatenate([enc_hidden(cf), enc_hidden(cb)], axis=-1)
        memory = ys if attention is not None else None
        return Encoded(dec_carry(params.decoder, summary, memory), memory, jnp.asarray(lengths))

    encode.check = check
    return _assemble(call, encode, parts, decoder, tgt_vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                     init=init, get_dec=lambda p: p.decoder)


def vec2seq(feature_size: int, vocab_size: int, *, embed_size: int = 32, hidden_size: int = 128,
            attention: str | None = None, decoder_cell="gru", readout_size: int | None = None, bos_id: int = 1,
            eos_id: int = 2, pad_id: int = 0, options: ScanOptions | None = None) -> Seq2Seq:
    """A vector-to-sequence model (seed 000's captioning shape) sharing `seq2seq`'s decoder and decoding.

    Model::

        summary = tanh(features W + b)                  # [B, H]
        decoder carry_0 = tanh(summary W_bridge + b)
        (with attention, the memory is the single slot summary[:, None]: the
         vector is also read at every step, as in Show, Attend and Tell)

    Args:
      feature_size: F. vocab_size: V. embed_size: E. hidden_size: H.
      attention: None (default) or an `attention_decoder` kind over the one-slot memory.
      decoder_cell: "gru", "lstm" or a `Cell`. readout_size: R (default H).
      bos_id, eos_id, pad_id: special ids.

    Returns:
      A `Seq2Seq`; ``source`` is ``features [B, F]`` float.
    """
    call = "seqjax.seq2seq.vec2seq"
    check_positive_int(call, "feature_size", feature_size)
    _check_specials(call, vocab_size, bos_id, eos_id, pad_id)
    H = check_positive_int(call, "hidden_size", hidden_size)
    dec_cell = _make_cell(call, decoder_cell, H)
    decoder = attention_decoder(dec_cell, attention, memory_size=None if attention is None else H)
    R = H if readout_size is None else check_positive_int(call, "readout_size", readout_size)
    parts = _token_decoder(call, decoder, vocab_size, embed_size, R, H, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                           options=resolve(call, options))
    dec_init, dec_carry = parts[0], parts[1]

    def init(key) -> Vec2SeqParams:
        ke, kd = jax.random.split(key)
        return Vec2SeqParams(_dense_init(ke, feature_size, H), dec_init(kd))

    def check(source):
        if jnp.ndim(source) != 2 or jnp.shape(source)[-1] != feature_size:
            raise ValueError(f"{call}: source must be features of shape (B, F={feature_size}), got "
                             f"{tuple(jnp.shape(source))}")
        if not jnp.issubdtype(jnp.result_type(source), jnp.floating):
            raise ValueError(f"{call}: features must be floating point, got dtype {jnp.result_type(source)}")

    def encode(params: Vec2SeqParams, source) -> Encoded:
        check(source)
        w, b = params.encoder
        summary = jnp.tanh(matmul(source, w) + b)
        memory = None if attention is None else summary[:, None, :]
        return Encoded(dec_carry(params.decoder, summary, memory), memory, None)

    encode.check = check
    return _assemble(call, encode, parts, decoder, vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                     init=init, get_dec=lambda p: p.decoder)


# ----------------------------------------------------------------------------
# vocabulary and metrics
# ----------------------------------------------------------------------------


class Vocabulary:
    """A fixed symbol <-> id table with the special tokens first (pad=0, bos=1, eos=2).

    ``encode`` raises on a symbol outside the table (no silent <unk>).

    Example:
      >>> v = Vocabulary("0123456789-")
      >>> v.encode("12-3"), v.decode(v.encode("12-3") + [v.eos_id, v.pad_id])
      ([4, 5, 13, 6], '12-3')
    """

    specials = ("<pad>", "<bos>", "<eos>")

    def __init__(self, symbols: Sequence[str]):
        symbols = list(dict.fromkeys(symbols))
        clash = set(symbols) & set(self.specials)
        if clash:
            raise ValueError(f"seqjax.seq2seq.Vocabulary: symbols may not include the specials {sorted(clash)}")
        self.symbols = list(self.specials) + symbols
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, seq: Sequence[str], *, eos: bool = False) -> list[int]:
        """Ids of ``seq`` (a string: one symbol per character; or a list of symbols), optionally + EOS."""
        out = []
        for pos, s in enumerate(seq):
            i = self.index.get(s)
            if i is None or i < len(self.specials):
                raise ValueError(f"seqjax.seq2seq.Vocabulary.encode: unknown token {s!r} at position {pos} of "
                                 f"{seq!r}; the vocabulary has {len(self) - 3} symbols: "
                                 f"{''.join(self.symbols[3:]) if all(len(x) == 1 for x in self.symbols[3:]) else self.symbols[3:]!r}")
            out.append(i)
        return out + ([self.eos_id] if eos else [])

    def decode(self, ids, *, sep: str = "") -> str:
        """Symbols up to (not including) the first EOS; pads and BOS are skipped."""
        out = []
        for i in np.asarray(ids).tolist():
            if i == self.eos_id:
                break
            if i >= len(self.specials):
                out.append(self.symbols[i])
        return sep.join(out)

    def batch(self, seqs: Sequence[Sequence[str]], *, eos: bool = False, length: int | None = None):
        """Encodes and pads a list of sequences: ``(ids [B, T] int32, lengths [B] int32)``."""
        ids = [self.encode(s, eos=eos) for s in seqs]
        lengths = np.array([len(x) for x in ids], np.int32)
        T = int(lengths.max()) if length is None else length
        if lengths.size and lengths.max() > T:
            raise ValueError(f"seqjax.seq2seq.Vocabulary.batch: a sequence has {lengths.max()} tokens > length={T}")
        out = np.full((len(ids), T), self.pad_id, np.int32)
        for r, x in enumerate(ids):
            out[r, :len(x)] = x
        return out, lengths


def exact_match(tokens: Array, lengths: Array, target: Array, target_lengths: Array) -> Array:
    """Per-example exact-sequence match (EOS included): [B] bool.

    Args:
      tokens: [B, L] decoded ids; lengths: [B] their lengths (EOS included).
      target: [B, T] reference ids ending with EOS; target_lengths: [B].
    """
    tokens, target = np.asarray(tokens), np.asarray(target)
    lengths, target_lengths = np.asarray(lengths), np.asarray(target_lengths)
    T = max(tokens.shape[1], target.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=-1)
    tk, tg = pad(tokens), pad(target)
    valid = np.arange(T)[None, :] < target_lengths[:, None]
    same = np.where(valid, tk == tg, True).all(1)
    return same & (lengths == target_lengths)
