"""A small pre-LN Transformer: encoder, encoder-decoder and greedy/beam decoding, built on `seqjax.attention`.

The baseline the recurrent models are compared against (Vaswani et al. 2017;
seed 003's scaled dot-product and multi-head attention). Everything is a pure
function over explicit parameter pytrees (`NamedTuple`s), batch-major, with the
shape letters of the rest of seqjax plus ``D`` (the model width), ``F`` (the
feed-forward width), ``N`` heads and ``V`` a vocabulary.

One **pre-LN** block (Xiong et al. 2020: the layer norm inside each residual
branch, a final layer norm after the last block; it trains without a warm-up)::

    x = x + MultiHead(LN1(x), LN1(x), LN1(x); key mask, [causal mask])     # self-attention
    x = x + MultiHead(LN2(x), memory, memory; memory mask)                  # decoder only: cross-attention
    x = x + W2 relu(W1 LN3(x) + b1) + b2                                     # feed-forward

Inputs get fixed sinusoidal positions (Vaswani et al. 2017, sec. 3.5)::

    PE[t, 2i] = sin(t / 10000^(2i / D))     PE[t, 2i + 1] = cos(t / 10000^(2i / D))

Padding follows the recurrent layers: ``lengths`` [B] marks steps
``t >= lengths[b]`` of a **right-padded** batch as padding. Padded steps are
never attended to, are zeroed on the way in (so NaN or garbage there cannot
reach the result or the gradients) and give zero outputs, so a padded batch
gives the unpadded sequences' outputs.

* `encoder` builds ``init(key, input_size) -> EncoderParams`` and
  ``apply(params, xs [B, T, I], *, lengths=None) -> ys [B, T, D]``.
* `seq2seq` builds a token-to-token encoder-decoder returning the same
  `seqjax.seq2seq.Seq2Seq` bundle as the recurrent `seqjax.seq2seq.seq2seq`
  (``init``, ``encode``, ``logits``, ``loss``, ``greedy``, ``beam``), so the
  same training step, decoding and metrics apply to both.

There is no dropout (the studies here train on fresh samples every step).

Example:
  >>> enc = seqjax.transformer.encoder(num_layers=2, model_size=16, num_heads=2, ff_size=32)
  >>> params = enc.init(jax.random.key(0), input_size=8)
  >>> xs = jnp.ones((3, 10, 8))                                   # [B, T, I]
  >>> ys = enc.apply(params, xs, lengths=jnp.array([10, 7, 1]))   # [B, T, D]
  >>> ys.shape, float(jnp.abs(ys[1, 7:]).max())                   # padded steps give zeros
  ((3, 10, 16), 0.0)
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import attention as attn
from seqjax.cells.base import Array, check_positive_int, init_param, matmul
from seqjax.seq2seq import (Encoded, GreedyResult, BeamResult, Seq2Seq, Seq2SeqBatch, _check_decode_args,
                            _check_source, _check_specials, _check_tokens, beam_search, greedy_decode,
                            _teacher_forced_loss, tile_beams)

__all__ = [
    "LayerNormParams", "FeedForwardParams", "EncoderBlockParams", "DecoderBlockParams", "EncoderParams",
    "Seq2SeqParams", "DecodeCarry", "Encoder", "sinusoidal_positions", "causal_mask", "layer_norm",
    "feed_forward", "encoder_block", "decoder_block", "encoder", "seq2seq",
]


# ----------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------


class LayerNormParams(NamedTuple):
    """Layer norm ``scale * (x - mean) / sqrt(var + eps) + bias`` over the last axis: scale [D], bias [D]."""

    scale: Array
    bias: Array


class FeedForwardParams(NamedTuple):
    """The position-wise feed-forward net ``relu(x W1 + b1) W2 + b2``: w1 [D, F], b1 [F], w2 [F, D], b2 [D]."""

    w1: Array
    b1: Array
    w2: Array
    b2: Array


class EncoderBlockParams(NamedTuple):
    """One pre-LN encoder block: ``ln1``, ``attention`` (a `seqjax.attention.MultiHeadParams`, D -> D), ``ln2``, ``ff``."""

    ln1: LayerNormParams
    attention: attn.MultiHeadParams
    ln2: LayerNormParams
    ff: FeedForwardParams


class DecoderBlockParams(NamedTuple):
    """One pre-LN decoder block: causal ``self_attention``, ``cross_attention`` over the memory, ``ff``.

    Attributes:
      ln1, ln2, ln3: `LayerNormParams` [D] before the three branches.
      self_attention: `seqjax.attention.MultiHeadParams` (D -> D).
      cross_attention: `seqjax.attention.MultiHeadParams` (queries D, memory Dm -> D).
      ff: `FeedForwardParams`.
    """

    ln1: LayerNormParams
    self_attention: attn.MultiHeadParams
    ln2: LayerNormParams
    cross_attention: attn.MultiHeadParams
    ln3: LayerNormParams
    ff: FeedForwardParams


class EncoderParams(NamedTuple):
    """Params of an `encoder`.

    Attributes:
      input: ``(w [I, D], b [D])``, the input projection, or None when the
        inputs already have width D (``input_size=None``).
      blocks: tuple of `EncoderBlockParams`, one per layer.
      final_ln: `LayerNormParams` [D] after the last block.
    """

    input: tuple | None
    blocks: tuple
    final_ln: LayerNormParams


class Seq2SeqParams(NamedTuple):
    """Params of the Transformer `seq2seq`.

    Attributes:
      src_embed: [Vs, D] source token embeddings.
      encoder: `EncoderParams` (no input projection).
      tgt_embed: [V, D] target token embeddings (row ``bos_id`` embeds the start token).
      blocks: tuple of `DecoderBlockParams`.
      final_ln: `LayerNormParams` [D] after the last decoder block.
      out: ``(w [D, V], b [V])``, the output projection to logits.
    """

    src_embed: Array
    encoder: EncoderParams
    tgt_embed: Array
    blocks: tuple
    final_ln: LayerNormParams
    out: tuple


class DecodeCarry(NamedTuple):
    """What the Transformer's decoding step carries (every leaf has the batch first, so beams can reorder it).

    Attributes:
      tokens: [B, L] int32, the decoder's input tokens so far (BOS first); later slots hold ``pad_id``.
      position: [B] int32, the slot the next input token goes to.
      weights: [B, Tk], the last block's cross-attention weights (mean over heads) at the last step.
    """

    tokens: Array
    position: Array
    weights: Array


class Encoder(NamedTuple):
    """A Transformer encoder (build with `encoder`).

    Attributes:
      init: ``(key, input_size: int | None) -> EncoderParams``.
      apply: ``(params, xs [B, T, I], *, lengths=None) -> ys [B, T, D]``.
      output_size: D.
      name: a short description.
    """

    init: Callable
    apply: Callable
    output_size: int
    name: str


# ----------------------------------------------------------------------------
# the pieces
# ----------------------------------------------------------------------------


def sinusoidal_positions(length: int, size: int, *, dtype=jnp.float32) -> Array:
    """Fixed sinusoidal position encodings (Vaswani et al. 2017, sec. 3.5): [T, D].

    ``PE[t, 2i] = sin(t / 10000^(2i/D))``, ``PE[t, 2i+1] = cos(t / 10000^(2i/D))``
    (for odd D the last column is a sine). Computed in float64 with NumPy and
    cast to ``dtype``.

    Args:
      length: T >= 1.
      size: D >= 1.
      dtype: the result's dtype.

    Returns:
      [T, D] array of ``dtype``, entries in [-1, 1].
    """
    call = "seqjax.transformer.sinusoidal_positions"
    check_positive_int(call, "length", length)
    check_positive_int(call, "size", size)
    t = np.arange(length, dtype=np.float64)[:, None]
    i = np.arange(0, size, 2, dtype=np.float64)[None, :]
    angle = t / np.power(10000.0, i / size)
    pe = np.zeros((length, size), np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : size // 2])
    return jnp.asarray(pe, dtype)


def causal_mask(length: int) -> Array:
    """``mask[i, j] = j <= i``: [T, T] bool, True where query i may attend to key j (no later step)."""
    check_positive_int("seqjax.transformer.causal_mask", "length", length)
    return jnp.tril(jnp.ones((length, length), bool))


def layer_norm(params: LayerNormParams, x: Array, *, eps: float = 1e-5) -> Array:
    """Layer norm over the last axis (Ba et al. 2016): [..., D] -> [..., D], statistics in >= float32."""
    dt = x.dtype
    xf = x.astype(jnp.promote_types(dt, jnp.float32))
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * params.scale + params.bias).astype(dt)


def feed_forward(params: FeedForwardParams, x: Array) -> Array:
    """``relu(x W1 + b1) W2 + b2``: [..., D] -> [..., D]."""
    return matmul(jax.nn.relu(matmul(x, params.w1) + params.b1), params.w2) + params.b2


def encoder_block(params: EncoderBlockParams, x: Array, *, lengths: Array | None = None,
                  mask: Array | None = None) -> Array:
    """One pre-LN encoder block: [B, T, D] -> [B, T, D].

    ``x += MultiHead(LN1(x)); x += FF(LN2(x))``, self-attention over the valid
    steps (``lengths``) and ``mask`` (bool broadcastable to [B, T, T], e.g.
    `causal_mask`). Padded steps are computed like any other (their values do
    not reach valid steps); `encoder` zeroes them.
    """
    h = layer_norm(params.ln1, x)
    a, _ = attn.multi_head_attention(params.attention, h, h, h, lengths=lengths, mask=mask)
    x = x + a.astype(x.dtype)
    return x + feed_forward(params.ff, layer_norm(params.ln2, x)).astype(x.dtype)


def decoder_block(params: DecoderBlockParams, x: Array, memory: Array, *, memory_lengths: Array | None = None):
    """One pre-LN decoder block: ``(x [B, T, D], memory [B, Tk, Dm]) -> (x [B, T, D], weights [B, N, T, Tk])``.

    ``x += MultiHead(LN1(x); causal); x += MultiHead(LN2(x), memory; memory_lengths); x += FF(LN3(x))``.
    Step t of the output depends on ``x[:, :t + 1]`` and the memory only.
    ``weights`` are the cross-attention weights.
    """
    T = x.shape[1]
    h = layer_norm(params.ln1, x)
    a, _ = attn.multi_head_attention(params.self_attention, h, h, h, mask=causal_mask(T))
    x = x + a.astype(x.dtype)
    c, w = attn.multi_head_attention(params.cross_attention, layer_norm(params.ln2, x), memory, memory,
                                     lengths=memory_lengths)
    x = x + c.astype(x.dtype)
    return x + feed_forward(params.ff, layer_norm(params.ln3, x)).astype(x.dtype), w


def _ln_init(size, dtype):
    return LayerNormParams(jnp.ones((size,), dtype), jnp.zeros((size,), dtype))


def _dense(key, fan_in, fan_out, dtype, init=jax.nn.initializers.glorot_uniform()):
    return init_param(init, key, (fan_in, fan_out), dtype), jnp.zeros((fan_out,), dtype)


def _ff_init(key, D, F, dtype):
    k1, k2 = jax.random.split(key)
    return FeedForwardParams(*_dense(k1, D, F, dtype), *_dense(k2, F, D, dtype))


def _check_sizes(call, num_layers, model_size, num_heads, ff_size):
    check_positive_int(call, "num_layers", num_layers)
    check_positive_int(call, "model_size", model_size)
    check_positive_int(call, "num_heads", num_heads)
    if model_size % num_heads:
        raise ValueError(f"{call}: model_size={model_size} must be divisible by num_heads={num_heads} "
                         f"(each head has width model_size // num_heads)")
    return 4 * model_size if ff_size is None else check_positive_int(call, "ff_size", ff_size)


def _valid(lengths, T):
    """[B, T] bool: step t < lengths[b]."""
    return jnp.arange(T)[None, :] < jnp.asarray(lengths)[:, None]


def _check_lengths(call, lengths, B, T):
    if tuple(jnp.shape(lengths)) != (B,) or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(f"{call}: lengths must be an int array of shape (B,)=({B},), got shape "
                         f"{tuple(jnp.shape(lengths))} dtype {jnp.result_type(lengths)}")
    if not isinstance(lengths, jax.core.Tracer) and B:
        values = np.asarray(lengths)
        lo, hi = int(values.min()), int(values.max())
        if lo < 1 or hi > T:
            raise ValueError(f"{call}: lengths must lie in [1, T={T}], got values in [{lo}, {hi}]; a sequence with "
                             f"no valid step leaves nothing to attend to")


# ----------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------


def encoder(num_layers: int = 2, model_size: int = 64, num_heads: int = 4, ff_size: int | None = None, *,
            param_dtype=jnp.float32) -> Encoder:
    """A pre-LN Transformer encoder with sinusoidal positions.

    Model::

        x_0 = xs W_in + b_in + PE[:T]          (or xs + PE[:T] without an input projection)
        x_l = encoder_block(x_{l-1}; lengths)  l = 1..num_layers
        ys  = LN(x_L), zero at padded steps

    Args:
      num_layers: number of blocks.
      model_size: D (divisible by ``num_heads``).
      num_heads: N (head width D // N).
      ff_size: F (default 4 D).
      param_dtype: dtype of every parameter.

    Returns:
      An `Encoder`. ``init(key, input_size)`` with ``input_size`` I, or None
      for inputs that already have width D (e.g. token embeddings). ``apply(params,
      xs [B, T, I] float, *, lengths=None [B] int in [1, T]) -> ys [B, T, D]``
      (dtype of the params).

    Example:
      >>> enc = seqjax.transformer.encoder(1, 8, 2)
      >>> enc.apply(enc.init(jax.random.key(0), 3), jnp.ones((2, 5, 3))).shape
      (2, 5, 8)
    """
    call = "seqjax.transformer.encoder"
    F = _check_sizes(call, num_layers, model_size, num_heads, ff_size)
    D = model_size

    def init(key, input_size: int | None) -> EncoderParams:
        ki, kb = jax.random.split(key)
        inp = None
        if input_size is not None:
            check_positive_int(call + "(...).init", "input_size", input_size)
            inp = _dense(ki, input_size, D, param_dtype, jax.nn.initializers.lecun_normal())
        blocks = []
        for k in jax.random.split(kb, num_layers):
            ka, kf = jax.random.split(k)
            blocks.append(EncoderBlockParams(_ln_init(D, param_dtype),
                                             attn.multi_head_init(ka, num_heads, D, param_dtype=param_dtype),
                                             _ln_init(D, param_dtype), _ff_init(kf, D, F, param_dtype)))
        return EncoderParams(inp, tuple(blocks), _ln_init(D, param_dtype))

    def apply(params: EncoderParams, xs: Array, *, lengths: Array | None = None) -> Array:
        c = call + "(...).apply"
        if not isinstance(params, EncoderParams):
            raise TypeError(f"{c}: params must be the EncoderParams from init, got {type(params).__name__}")
        if jnp.ndim(xs) != 3 or not jnp.issubdtype(jnp.result_type(xs), jnp.floating):
            raise ValueError(f"{c}: xs must be a float array of shape (B, T, I), got shape {tuple(jnp.shape(xs))} "
                             f"dtype {jnp.result_type(xs)}")
        B, T, I = jnp.shape(xs)
        want = D if params.input is None else params.input[0].shape[0]
        if I != want:
            raise ValueError(f"{c}: xs must have shape (B, T, I={want}) for these params, got {tuple(jnp.shape(xs))}")
        if T == 0:
            raise ValueError(f"{c}: xs has no time steps (T=0)")
        valid = None
        if lengths is not None:
            _check_lengths(c, lengths, B, T)
            valid = _valid(lengths, T)[:, :, None]
            xs = jnp.where(valid, xs, jnp.zeros((), xs.dtype))   # nothing from the padding reaches the gradients
        return _encode(params, xs, lengths, valid)

    return Encoder(init, apply, D, f"transformer_encoder({num_layers}x{D}, heads={num_heads}, ff={F})")


def _encode(params: EncoderParams, xs, lengths, valid):
    dtype = params.final_ln.scale.dtype
    x = xs.astype(dtype) if params.input is None else (matmul(xs, params.input[0]) + params.input[1]).astype(dtype)
    x = x + sinusoidal_positions(xs.shape[1], x.shape[-1], dtype=dtype)
    for block in params.blocks:
        x = encoder_block(block, x, lengths=lengths)
    y = layer_norm(params.final_ln, x)
    return y if valid is None else jnp.where(valid, y, jnp.zeros((), y.dtype))


# ----------------------------------------------------------------------------
# encoder-decoder
# ----------------------------------------------------------------------------


def seq2seq(src_vocab_size: int, tgt_vocab_size: int, *, model_size: int = 64, num_heads: int = 4,
            num_layers: int = 2, decoder_layers: int | None = None, ff_size: int | None = None, bos_id: int = 1,
            eos_id: int = 2, pad_id: int = 0, param_dtype=jnp.float32) -> Seq2Seq:
    """A token-to-token pre-LN Transformer encoder-decoder, as a `seqjax.seq2seq.Seq2Seq` bundle.

    Model::

        memory   = encoder(embed_src(source) + PE; source lengths)          # [B, S, D]
        x_0      = embed_tgt([BOS, target[:-1]]) + PE                       # teacher forcing
        x_l      = decoder_block(x_{l-1}, memory; source lengths)           # causal self-attention
        logits   = LN(x_L) W_out + b_out                                     # [B, T, V]

    Decoding (``greedy``/``beam``) feeds back its own tokens: the carry is a
    `DecodeCarry` holding the tokens so far, and each step re-runs the decoder
    over that prefix (there is no key/value cache; O(L^2) per sequence, fine for
    short targets) and reads the logits at the newest position. By the causal
    mask these are the teacher-forced logits of the same prefix. BOS and PAD
    are never generated.

    Args:
      src_vocab_size, tgt_vocab_size: Vs, V.
      model_size: D. num_heads: N. num_layers: encoder blocks.
      decoder_layers: decoder blocks (default ``num_layers``).
      ff_size: F (default 4 D).
      bos_id, eos_id, pad_id: target special ids (the source's padding is given by its lengths).
      param_dtype: dtype of every parameter.

    Returns:
      A `seqjax.seq2seq.Seq2Seq` with `Seq2SeqParams`; ``source`` is ``(tokens
      [B, S] int, lengths [B] int in [1, S])``; its ``decoder`` field is None
      (there is no recurrent decoder cell); ``greedy``'s trace holds the last
      block's cross-attention weights (mean over heads) [B, L, S].

    Example:
      >>> model = seqjax.transformer.seq2seq(40, 13, model_size=16, num_heads=2, num_layers=1)
      >>> params = model.init(jax.random.key(0))
      >>> step = seqjax.make_train_step(model.loss, optax.adam(1e-3), has_aux=True)
      >>> src, src_lengths = jnp.ones((2, 6), jnp.int32), jnp.array([6, 4])   # tokens [B, S], lengths [B]
      >>> model.greedy(params, (src, src_lengths), max_length=5).tokens.shape
      (2, 5)
    """
    call = "seqjax.transformer.seq2seq"
    check_positive_int(call, "src_vocab_size", src_vocab_size)
    _check_specials(call, tgt_vocab_size, bos_id, eos_id, pad_id)
    F = _check_sizes(call, num_layers, model_size, num_heads, ff_size)
    L_dec = num_layers if decoder_layers is None else check_positive_int(call, "decoder_layers", decoder_layers)
    D, V = model_size, tgt_vocab_size
    enc = encoder(num_layers, D, num_heads, F, param_dtype=param_dtype)
    embed_init = jax.nn.initializers.normal(1.0)

    def init(key) -> Seq2SeqParams:
        ks, ke, kt, kd, ko = jax.random.split(key, 5)
        blocks = []
        for k in jax.random.split(kd, L_dec):
            ka, kc, kf = jax.random.split(k, 3)
            blocks.append(DecoderBlockParams(_ln_init(D, param_dtype),
                                             attn.multi_head_init(ka, num_heads, D, param_dtype=param_dtype),
                                             _ln_init(D, param_dtype),
                                             attn.multi_head_init(kc, num_heads, D, param_dtype=param_dtype),
                                             _ln_init(D, param_dtype), _ff_init(kf, D, F, param_dtype)))
        return Seq2SeqParams(init_param(embed_init, ks, (src_vocab_size, D), param_dtype), enc.init(ke, None),
                             init_param(embed_init, kt, (V, D), param_dtype), tuple(blocks), _ln_init(D, param_dtype),
                             _dense(ko, D, V, param_dtype))

    def check(source):
        _check_source(call, source, src_vocab_size)

    def encode(params: Seq2SeqParams, source) -> Encoded:
        """``(params, source) -> Encoded(carry=None, memory [B, S, D], lengths [B])``."""
        check(source)
        tokens, lengths = source
        lengths = jnp.asarray(lengths)
        xs = params.src_embed[jnp.asarray(tokens)]
        memory = _encode(params.encoder, xs, lengths, _valid(lengths, xs.shape[1])[:, :, None])
        return Encoded(None, memory, lengths)

    encode.check = check

    def decode(params: Seq2SeqParams, prev, memory, memory_lengths):
        """Decoder over input tokens ``prev`` [B, T]: (hidden [B, T, D], last block's cross weights [B, N, T, S])."""
        x = params.tgt_embed[prev] + sinusoidal_positions(prev.shape[1], D, dtype=params.tgt_embed.dtype)
        w = None
        for block in params.blocks:
            x, w = decoder_block(block, x, memory, memory_lengths=memory_lengths)
        return layer_norm(params.final_ln, x), w

    def project(params, h):
        return matmul(h, params.out[0]) + params.out[1]

    def logits(params: Seq2SeqParams, source, target, target_lengths):
        _check_tokens(call, "target", target, V, target_lengths)
        e = encode(params, source)
        B = jnp.shape(target)[0]
        prev = jnp.concatenate([jnp.full((B, 1), bos_id, jnp.int32), jnp.asarray(target, jnp.int32)[:, :-1]], 1)
        h, _ = decode(params, prev, e.memory, e.lengths)
        return project(params, h)

    def loss(params, batch: Seq2SeqBatch):
        return _teacher_forced_loss(logits(params, batch.source, batch.target, batch.target_lengths), batch)

    never = jnp.zeros((V,), bool).at[bos_id].set(True).at[pad_id].set(pad_id != eos_id)

    def step_fn(params, memory, memory_lengths):
        def step(carry: DecodeCarry, tokens):
            L = carry.tokens.shape[1]
            here = jnp.arange(L)[None, :] == carry.position[:, None]                  # [B, L]
            prev = jnp.where(here, tokens[:, None], carry.tokens)
            h, w = decode(params, prev, memory, memory_lengths)
            h_t = jnp.sum(jnp.where(here[:, :, None], h, 0.0), axis=1)                # [B, D]
            w_t = jnp.sum(jnp.where(here[:, None, :, None], w, 0.0), axis=2).mean(1)  # [B, S]
            lg = jnp.where(never, -jnp.inf, project(params, h_t).astype(jnp.float32))
            return DecodeCarry(prev, carry.position + 1, w_t.astype(carry.weights.dtype)), jax.nn.log_softmax(lg, -1)

        return step

    def start(memory, max_length):
        B, S = memory.shape[:2]
        return DecodeCarry(jnp.full((B, max_length), pad_id, jnp.int32), jnp.zeros((B,), jnp.int32),
                           jnp.zeros((B, S), memory.dtype))

    def _greedy(params, source, max_length):
        e = encode(params, source)
        carry = start(e.memory, max_length)
        return greedy_decode(step_fn(params, e.memory, e.lengths), carry, carry.tokens.shape[0], bos_id=bos_id,
                             eos_id=eos_id, pad_id=pad_id, max_length=max_length, collect=lambda c: c.weights)

    def _beam(params, source, max_length, beam_width, length_penalty):
        e = encode(params, source)
        carry = start(e.memory, max_length)
        step = step_fn(params, tile_beams(e.memory, beam_width), tile_beams(e.lengths, beam_width))
        return beam_search(step, carry, carry.tokens.shape[0], beam_width=beam_width, bos_id=bos_id, eos_id=eos_id,
                           pad_id=pad_id, max_length=max_length, length_penalty=length_penalty)

    greedy_jit = jax.jit(_greedy, static_argnames=("max_length",))
    beam_jit = jax.jit(_beam, static_argnames=("max_length", "beam_width", "length_penalty"))

    def greedy(params, source, *, max_length: int) -> GreedyResult:
        _check_decode_args(call + ".greedy", bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_length=max_length)
        check(source)
        return greedy_jit(params, source, max_length=max_length)

    def beam(params, source, *, max_length: int, beam_width: int, length_penalty: float = 1.0) -> BeamResult:
        _check_decode_args(call + ".beam", bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_length=max_length,
                           beam_width=beam_width)
        if not isinstance(length_penalty, (int, float)) or length_penalty < 0:
            raise ValueError(f"{call}.beam: length_penalty must be a number >= 0, got {length_penalty!r}")
        check(source)
        return beam_jit(params, source, max_length=max_length, beam_width=int(beam_width),
                        length_penalty=float(length_penalty))

    return Seq2Seq(init, encode, logits, loss, greedy, beam, None, bos_id, eos_id, pad_id, V)
