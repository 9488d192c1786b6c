"""Attention over a key/value memory: additive (Bahdanau), dot, scaled dot-product and multi-head.

Every function here is pure and works on batch-major arrays with the shape
letters of the rest of seqjax plus:

* ``Tq`` queries per example and ``Tk`` memory slots (keys/values) per example;
* ``Dq``, ``Dk``, ``Dv`` the query, key and value widths; ``A`` the width of
  the additive attention's hidden layer; ``N`` heads of width ``Dh``.

Queries are ``[B, Tq, Dq]``, keys ``[B, Tk, Dk]`` and values ``[B, Tk, Dv]``.
All of them compute, for each query ``q`` (Zhang/Hofmann's *key-value
attention* with a *softmax gating function*, seed 003)::

    e_j     = phi(q, k_j)                                  # energy, one per slot j
    alpha_j = exp(e_j) / sum_{l valid} exp(e_l)            # softmax over valid slots
    context = sum_j alpha_j v_j                            # [Dv]

and differ only in the compatibility function ``phi``:

* additive (Bahdanau et al. 2015): ``phi(q, k) = v^T tanh(W_q q + W_k k + b)``
* dot (Luong et al. 2015):          ``phi(q, k) = q^T k``
* scaled dot (Vaswani et al. 2017): ``phi(q, k) = q^T k / sqrt(Dk)``

Padding: ``lengths`` ``[B]`` marks slots ``j >= lengths[b]`` as padding; they
get exactly zero weight, so a padded memory gives the same result as the
unpadded one. An explicit boolean ``mask`` (True = may attend) broadcastable to
``[B, Tq, Tk]`` may be given as well (e.g. a causal mask); both are combined.
A query with no valid slot at all is an error when the mask is concrete
(``lengths == 0`` for example); under tracing such a row gets all-zero weights
and a zero context instead of NaN.

Example:
  >>> from seqjax.attention import additive_attention, additive_init
  >>> params = additive_init(jax.random.key(0), query_size=32, key_size=64, attention_size=48)
  >>> q, memory = jnp.ones((2, 3, 32)), jnp.ones((2, 7, 64))   # [B, Tq, 32], [B, Tk, 64]
  >>> ctx, w = additive_attention(params, q, memory, memory, lengths=jnp.array([7, 4]))
  >>> ctx.shape, w.shape    # [B, Tq, 64], [B, Tq, Tk]
  ((2, 3, 64), (2, 3, 7))
  >>> float(w[1, :, 4:].max())   # keys past a row's length get no weight
  0.0
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cells.base import Array, check_positive_int, init_param, matmul

__all__ = [
    "AdditiveParams", "MultiHeadParams", "additive_init", "additive_project_keys", "additive_scores",
    "additive_attention", "dot_scores", "dot_attention", "scaled_dot_attention", "multi_head_init",
    "multi_head_attention", "key_mask", "masked_softmax", "attend",
]


# ----------------------------------------------------------------------------
# checks and masks
# ----------------------------------------------------------------------------


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_qkv(call: str, queries, keys, values, key_size: int | None = None, query_size: int | None = None):
    """Ranks, batch sizes and Tk of (queries, keys, values); returns (B, Tq, Tk)."""
    names = (("queries", queries, "(B, Tq, Dq)"), ("keys", keys, "(B, Tk, Dk)"), ("values", values, "(B, Tk, Dv)"))
    for name, a, layout in names:
        if a is None:
            continue
        if jnp.ndim(a) != 3:
            raise ValueError(f"{call}: {name} must have rank 3 {layout}, got shape {tuple(jnp.shape(a))}; "
                             f"add a Tq axis of size 1 for a single query per example (x[:, None])")
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(f"{call}: {name} must be floating point, got dtype {jnp.result_type(a)}")
    B, Tq = jnp.shape(queries)[:2]
    Bk, Tk = jnp.shape(keys)[:2]
    if Bk != B:
        raise ValueError(f"{call}: keys must have the batch size B={B} of queries, got keys {tuple(jnp.shape(keys))} "
                         f"and queries {tuple(jnp.shape(queries))}")
    if values is not None and tuple(jnp.shape(values)[:2]) != (B, Tk):
        raise ValueError(f"{call}: values must have shape (B, Tk, Dv) with (B, Tk)=({B}, {Tk}) of keys; got keys "
                         f"{tuple(jnp.shape(keys))} and values {tuple(jnp.shape(values))} (mismatched key/value lengths)")
    if Tk == 0:
        raise ValueError(f"{call}: the memory is empty (Tk=0); attention needs at least one key")
    if key_size is not None and jnp.shape(keys)[-1] != key_size:
        raise ValueError(f"{call}: keys must have shape (B, Tk, Dk={key_size}), got {tuple(jnp.shape(keys))}")
    if query_size is not None and jnp.shape(queries)[-1] != query_size:
        raise ValueError(f"{call}: queries must have shape (B, Tq, Dq={query_size}), got {tuple(jnp.shape(queries))}")
    return B, Tq, Tk


def key_mask(lengths: Array, num_keys: int, *, call: str = "seqjax.attention.key_mask") -> Array:
    """The padding mask of a memory: ``mask[b, j] = j < lengths[b]``.

    Args:
      lengths: [B] int, valid slots per example, in [1, Tk].
      num_keys: Tk.

    Returns:
      [B, Tk] bool.

    Raises:
      ValueError: wrong shape/dtype, or (when ``lengths`` is concrete) a value
        outside [1, Tk]: a length of 0 leaves nothing to attend to.
    """
    if jnp.ndim(lengths) != 1 or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(f"{call}: lengths must be an integer array of shape (B,), got shape "
                         f"{tuple(jnp.shape(lengths))} dtype {jnp.result_type(lengths)}")
    if _is_concrete(lengths) and np.size(lengths):
        values = np.asarray(lengths)    # numpy: jnp reductions inside a jit trace are staged, even on constants
        lo, hi = int(values.min()), int(values.max())
        if lo < 1:
            raise ValueError(f"{call}: lengths must be >= 1, got a length of {lo}: a memory with no valid key "
                             f"masks everything, so there is nothing to attend to; drop empty examples or give "
                             f"them at least one (e.g. end-of-sequence) slot")
        if hi > num_keys:
            raise ValueError(f"{call}: lengths must lie in [1, Tk={num_keys}], got a length of {hi}")
    return jnp.arange(num_keys)[None, :] < jnp.asarray(lengths)[:, None]


def _combined_mask(call: str, B: int, Tq: int, Tk: int, lengths, mask):
    """[B, Tq, Tk] (or broadcastable) bool mask from lengths and/or mask; None if neither."""
    out = None
    if lengths is not None:
        if tuple(jnp.shape(lengths)) != (B,):
            raise ValueError(f"{call}: lengths must have shape (B,)=({B},), got {tuple(jnp.shape(lengths))}")
        out = key_mask(lengths, Tk, call=call)[:, None, :]
    if mask is not None:
        mask = jnp.asarray(mask)
        try:
            shape = jnp.broadcast_shapes(jnp.shape(mask), (B, Tq, Tk))
        except ValueError:
            shape = None
        if shape != (B, Tq, Tk):
            raise ValueError(f"{call}: mask must be broadcastable to (B, Tq, Tk)=({B}, {Tq}, {Tk}), got "
                             f"{tuple(jnp.shape(mask))}")
        mask = mask.astype(bool)
        out = mask if out is None else (out & mask)
    if out is not None and _is_concrete(out):
        full = np.broadcast_to(np.asarray(out), (B, Tq, Tk))
        empty = ~full.any(-1)
        if empty.any():
            b, q = map(int, np.argwhere(empty)[0])
            raise ValueError(f"{call}: the mask masks every key for query {q} of example {b} "
                             f"({int(empty.sum())} such queries); each query needs at least one valid key "
                             f"(check lengths >= 1 and the mask)")
    return None if out is None else jnp.broadcast_to(out, (B, Tq, Tk))


def masked_softmax(scores: Array, mask: Array | None = None) -> Array:
    """Softmax over the last axis restricted to ``mask``: masked entries get exactly 0.

    ``alpha_j = exp(e_j) / sum_{l: mask_l} exp(e_l)`` for ``mask_j``, else 0. A row
    with no valid entry gives all zeros (not NaN). Computed in float32 (or
    wider) and returned in the dtype of ``scores``.

    Args:
      scores: [..., Tk] float energies.
      mask: bool, broadcastable to ``scores``; True = valid. None = all valid.

    Returns:
      Weights, same shape and dtype as ``scores``.
    """
    dtype = scores.dtype
    s = scores.astype(jnp.promote_types(dtype, jnp.float32))
    if mask is None:
        return jax.nn.softmax(s, axis=-1).astype(dtype)
    mask = jnp.broadcast_to(mask, s.shape)
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.where(mask, w, 0.0).astype(dtype)


def attend(scores: Array, values: Array, *, lengths: Array | None = None, mask: Array | None = None,
           call: str = "seqjax.attention.attend"):
    """Softmax gating of energies, then the convex combination of values.

    ``alpha = masked_softmax(scores)``, ``context[b, i] = sum_j alpha[b, i, j] values[b, j]``.

    Args:
      scores: [B, Tq, Tk] energies.
      values: [B, Tk, Dv].
      lengths: optional [B] int valid slots per example.
      mask: optional bool broadcastable to [B, Tq, Tk] (True = attend).

    Returns:
      ``(context [B, Tq, Dv], weights [B, Tq, Tk])``.
    """
    if jnp.ndim(scores) != 3:
        raise ValueError(f"{call}: scores must have rank 3 (B, Tq, Tk), got {tuple(jnp.shape(scores))}")
    B, Tq, Tk = jnp.shape(scores)
    if jnp.ndim(values) != 3 or tuple(jnp.shape(values)[:2]) != (B, Tk):
        raise ValueError(f"{call}: values must have shape (B, Tk, Dv) with (B, Tk)=({B}, {Tk}), got "
                         f"{tuple(jnp.shape(values))} (mismatched key/value lengths)")
    m = _combined_mask(call, B, Tq, Tk, lengths, mask)
    weights = masked_softmax(scores, m)
    if lengths is not None:  # padding may hold anything (even NaN): never let it reach the context
        values = jnp.where(key_mask(lengths, Tk, call=call)[:, :, None], values, jnp.zeros((), values.dtype))
    context = jnp.einsum("bqk,bkd->bqd", weights.astype(values.dtype), values,
                         preferred_element_type=jnp.promote_types(values.dtype, jnp.float32))
    return context.astype(values.dtype), weights


# ----------------------------------------------------------------------------
# additive (Bahdanau)
# ----------------------------------------------------------------------------


class AdditiveParams(NamedTuple):
    """Parameters of additive attention ``e = v^T tanh(q W_q + k W_k + b)``.

    Attributes:
      w_q: [Dq, A] query weights (Bahdanau's W_a).
      w_k: [Dk, A] key weights (Bahdanau's U_a).
      b: [A] bias (zeros by default; Bahdanau's equation has none).
      v: [A] energy vector (Bahdanau's v_a).
    """

    w_q: Array
    w_k: Array
    b: Array
    v: Array


def additive_init(key, query_size: int, key_size: int, attention_size: int, *,
                  kernel_init=jax.nn.initializers.glorot_uniform(),
                  v_init=jax.nn.initializers.normal(0.1),
                  bias_init=jax.nn.initializers.zeros, param_dtype=jnp.float32) -> AdditiveParams:
    """Initialises `AdditiveParams`.

    Args:
      key: PRNG key.
      query_size: Dq. key_size: Dk. attention_size: A.
      kernel_init: initialiser of ``w_q`` and ``w_k`` (default Glorot uniform).
      v_init: initialiser of ``v`` [A] (default N(0, 0.1^2)).
      bias_init: initialiser of ``b`` (default zeros).
      param_dtype: dtype of every parameter.
    """
    call = "seqjax.attention.additive_init"
    for name, n in (("query_size", query_size), ("key_size", key_size), ("attention_size", attention_size)):
        check_positive_int(call, name, n)
    kq, kk, kb, kv = jax.random.split(key, 4)
    return AdditiveParams(init_param(kernel_init, kq, (query_size, attention_size), param_dtype),
                          init_param(kernel_init, kk, (key_size, attention_size), param_dtype),
                          init_param(bias_init, kb, (attention_size,), param_dtype),
                          init_param(v_init, kv, (attention_size,), param_dtype))


def additive_project_keys(params: AdditiveParams, keys: Array) -> Array:
    """The query-independent part ``k W_k + b``: [B, Tk, Dk] -> [B, Tk, A].

    It depends only on the memory, so a decoder computes it once per source
    sequence (Bahdanau's "U_a h_j can be pre-computed") and passes it to
    `additive_scores` with ``projected=True`` at every step.
    """
    if jnp.shape(keys)[-1] != params.w_k.shape[0]:
        raise ValueError(f"seqjax.attention.additive_project_keys: keys must have shape (B, Tk, Dk="
                         f"{params.w_k.shape[0]}), got {tuple(jnp.shape(keys))}")
    return matmul(keys, params.w_k) + params.b


def additive_scores(params: AdditiveParams, queries: Array, keys: Array, *, projected: bool = False) -> Array:
    """Additive energies ``e[b, i, j] = v^T tanh(q_i W_q + k_j W_k + b)``.

    Args:
      params: `AdditiveParams`.
      queries: [B, Tq, Dq].
      keys: [B, Tk, Dk], or [B, Tk, A] already passed through
        `additive_project_keys` when ``projected=True``.

    Returns:
      [B, Tq, Tk] energies (float32 or wider).
    """
    pk = keys if projected else additive_project_keys(params, keys)
    pq = matmul(queries, params.w_q)                                  # [B, Tq, A]
    hidden = jnp.tanh(pq[:, :, None, :] + pk[:, None, :, :].astype(pq.dtype))   # [B, Tq, Tk, A]
    return jnp.einsum("bqka,a->bqk", hidden, params.v.astype(hidden.dtype))


def additive_attention(params: AdditiveParams, queries: Array, keys: Array, values: Array | None = None, *,
                       lengths: Array | None = None, mask: Array | None = None, projected: bool = False):
    """Bahdanau's additive attention.

    Equations, for query ``q_i`` and memory slots ``(k_j, v_j)``::

        e_ij     = v^T tanh(W_q q_i + W_k k_j + b)
        alpha_ij = exp(e_ij) / sum_{l < lengths[b]} exp(e_il)     (0 for padded j)
        c_i      = sum_j alpha_ij v_j

    Args:
      params: `AdditiveParams` (Dq, Dk, A).
      queries: [B, Tq, Dq] float.
      keys: [B, Tk, Dk] float (or [B, Tk, A] with ``projected=True``).
      values: [B, Tk, Dv] float; default ``keys`` (Bahdanau: keys = values =
        the encoder annotations h_j).
      lengths: optional [B] int in [1, Tk]: slots at j >= lengths[b] are padding.
      mask: optional bool broadcastable to [B, Tq, Tk], True = may attend.
      projected: ``keys`` are `additive_project_keys` output (values must then be given).

    Returns:
      ``(context [B, Tq, Dv], weights [B, Tq, Tk])``; weights sum to 1 over valid slots.

    References:
      Bahdanau, Cho & Bengio (2015), Neural machine translation by jointly
      learning to align and translate, eq. (5)-(6) and appendix A.1.2.
    """
    call = "seqjax.attention.additive_attention"
    if values is None:
        if projected:
            raise ValueError(f"{call}: with projected=True pass values explicitly (keys are projected)")
        values = keys
    _check_qkv(call, queries, keys, values, key_size=params.w_k.shape[1] if projected else params.w_k.shape[0],
               query_size=params.w_q.shape[0])
    return attend(additive_scores(params, queries, keys, projected=projected), values, lengths=lengths, mask=mask,
                  call=call)


# ----------------------------------------------------------------------------
# dot and scaled dot-product
# ----------------------------------------------------------------------------


def dot_scores(queries: Array, keys: Array, *, scale: float | None = None) -> Array:
    """Dot-product energies ``e[b, i, j] = scale * q_i . k_j``: [B, Tq, D], [B, Tk, D] -> [B, Tq, Tk]."""
    acc = jnp.promote_types(jnp.result_type(queries, keys), jnp.float32)
    e = jnp.einsum("bqd,bkd->bqk", queries, keys, preferred_element_type=acc)
    return e if scale is None else e * scale


def dot_attention(queries: Array, keys: Array, values: Array | None = None, *, lengths: Array | None = None,
                  mask: Array | None = None, scale: float | None = None):
    """Dot-product (Luong "dot") attention.

    Equations::

        e_ij     = scale * q_i^T k_j          (scale = 1 unless given)
        alpha_ij = softmax_j(e_ij) over valid j
        c_i      = sum_j alpha_ij v_j

    Args:
      queries: [B, Tq, D] float. keys: [B, Tk, D] float (same D).
      values: [B, Tk, Dv] float; default ``keys``.
      lengths: optional [B] int in [1, Tk]. mask: optional bool broadcastable to [B, Tq, Tk].
      scale: optional multiplier of the energies.

    Returns:
      ``(context [B, Tq, Dv], weights [B, Tq, Tk])``.
    """
    call = "seqjax.attention.dot_attention"
    values = keys if values is None else values
    _check_qkv(call, queries, keys, values)
    if jnp.shape(queries)[-1] != jnp.shape(keys)[-1]:
        raise ValueError(f"{call}: queries and keys must have the same width D, got queries "
                         f"{tuple(jnp.shape(queries))} and keys {tuple(jnp.shape(keys))}")
    return attend(dot_scores(queries, keys, scale=scale), values, lengths=lengths, mask=mask, call=call)


def scaled_dot_attention(queries: Array, keys: Array, values: Array | None = None, *,
                         lengths: Array | None = None, mask: Array | None = None):
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1).

    Equations::

        e_ij     = q_i^T k_j / sqrt(D)
        alpha_ij = softmax_j(e_ij) over valid j
        c_i      = sum_j alpha_ij v_j         i.e.  softmax(Q K^T / sqrt(D)) V

    The 1/sqrt(D) keeps the energies at unit variance for unit-variance q and k
    (E[(q^T k)^2] = D), so the softmax does not saturate as D grows.

    Args:
      queries: [B, Tq, D]. keys: [B, Tk, D]. values: [B, Tk, Dv] (default keys).
      lengths: optional [B] int in [1, Tk]. mask: optional bool broadcastable to [B, Tq, Tk].

    Returns:
      ``(context [B, Tq, Dv], weights [B, Tq, Tk])``.
    """
    D = jnp.shape(keys)[-1] if jnp.ndim(keys) else 1
    ctx, w = dot_attention(queries, keys, values, lengths=lengths, mask=mask, scale=1.0 / math.sqrt(max(D, 1)))
    return ctx, w


# ----------------------------------------------------------------------------
# multi-head
# ----------------------------------------------------------------------------


class MultiHeadParams(NamedTuple):
    """Parameters of `multi_head_attention`, in `flax.nnx.MultiHeadAttention`'s layout.

    Attributes:
      w_q: [Dq, N, Dh]. b_q: [N, Dh] (or None without bias).
      w_k: [Dk, N, Dh]. b_k: [N, Dh] or None.
      w_v: [Dv, N, Dh]. b_v: [N, Dh] or None.
      w_o: [N, Dh, O]. b_o: [O] or None.

    With an ``nnx.MultiHeadAttention`` ``m``: ``w_q = m.query.kernel``,
    ``b_q = m.query.bias``, ..., ``w_o = m.out.kernel``, ``b_o = m.out.bias``.
    """

    w_q: Array
    b_q: Array | None
    w_k: Array
    b_k: Array | None
    w_v: Array
    b_v: Array | None
    w_o: Array
    b_o: Array | None


def multi_head_init(key, num_heads: int, query_size: int, key_size: int | None = None, value_size: int | None = None,
                    *, head_size: int | None = None, out_size: int | None = None, use_bias: bool = True,
                    kernel_init=jax.nn.initializers.lecun_normal(), bias_init=jax.nn.initializers.zeros,
                    param_dtype=jnp.float32) -> MultiHeadParams:
    """Initialises `MultiHeadParams`.

    Args:
      key: PRNG key.
      num_heads: N.
      query_size: Dq. key_size: Dk (default Dq). value_size: Dv (default Dk).
      head_size: Dh (default Dq // N, which must then divide evenly).
      out_size: O (default Dq).
      use_bias: add biases to the four projections.
      kernel_init, bias_init: initialisers (defaults LeCun normal, zeros, as flax).
      param_dtype: dtype of every parameter.
    """
    call = "seqjax.attention.multi_head_init"
    N = check_positive_int(call, "num_heads", num_heads)
    check_positive_int(call, "query_size", query_size)
    key_size = query_size if key_size is None else check_positive_int(call, "key_size", key_size)
    value_size = key_size if value_size is None else check_positive_int(call, "value_size", value_size)
    out_size = query_size if out_size is None else check_positive_int(call, "out_size", out_size)
    if head_size is None:
        if query_size % N:
            raise ValueError(f"{call}: query_size={query_size} is not divisible by num_heads={N}; pass head_size")
        head_size = query_size // N
    check_positive_int(call, "head_size", head_size)
    ks = jax.random.split(key, 8)

    def kernel(k, fan_in, shape):
        # fan-in is the input width (flax's LinearGeneral initialises the flattened [in, N*Dh] matrix)
        return init_param(kernel_init, k, (fan_in, int(np.prod(shape[1:]))), param_dtype).reshape(shape)

    def bias(k, shape):
        return init_param(bias_init, k, shape, param_dtype) if use_bias else None

    return MultiHeadParams(kernel(ks[0], query_size, (query_size, N, head_size)), bias(ks[1], (N, head_size)),
                           kernel(ks[2], key_size, (key_size, N, head_size)), bias(ks[3], (N, head_size)),
                           kernel(ks[4], value_size, (value_size, N, head_size)), bias(ks[5], (N, head_size)),
                           kernel(ks[6], N * head_size, (N * head_size, out_size)).reshape(N, head_size, out_size),
                           bias(ks[7], (out_size,)))


def multi_head_attention(params: MultiHeadParams, queries: Array, keys: Array, values: Array | None = None, *,
                         lengths: Array | None = None, mask: Array | None = None):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 4-5).

    Equations, for heads r = 1..N (seed 003, Definition 7)::

        Q_r = Q W_q[:, r] + b_q[r]      K_r = K W_k[:, r] + b_k[r]      V_r = V W_v[:, r] + b_v[r]
        head_r = softmax(Q_r K_r^T / sqrt(Dh)) V_r           (over valid keys)
        out = sum_r head_r W_o[r] + b_o   (= concat(head_1..head_N) W_o + b_o)

    Args:
      params: `MultiHeadParams`.
      queries: [B, Tq, Dq]. keys: [B, Tk, Dk]. values: [B, Tk, Dv] (default keys).
      lengths: optional [B] int in [1, Tk]. mask: optional bool broadcastable to
        [B, Tq, Tk] (shared by all heads).

    Returns:
      ``(out [B, Tq, O], weights [B, N, Tq, Tk])``.
    """
    call = "seqjax.attention.multi_head_attention"
    values = keys if values is None else values
    B, Tq, Tk = _check_qkv(call, queries, keys, values, key_size=params.w_k.shape[0], query_size=params.w_q.shape[0])
    if jnp.shape(values)[-1] != params.w_v.shape[0]:
        raise ValueError(f"{call}: values must have shape (B, Tk, Dv={params.w_v.shape[0]}), got "
                         f"{tuple(jnp.shape(values))}")
    m = _combined_mask(call, B, Tq, Tk, lengths, mask)
    if lengths is not None:  # keep whatever sits in the padding out of the result
        values = jnp.where(key_mask(lengths, Tk, call=call)[:, :, None], values, jnp.zeros((), values.dtype))
    acc = jnp.promote_types(params.w_q.dtype, jnp.float32)

    def proj(x, w, b):
        y = jnp.einsum("btd,dnh->bnth", x, w, preferred_element_type=acc)
        return y if b is None else y + b[None, :, None, :]

    q, k, v = proj(queries, params.w_q, params.b_q), proj(keys, params.w_k, params.b_k), proj(values, params.w_v,
                                                                                               params.b_v)
    Dh = params.w_q.shape[-1]
    scores = jnp.einsum("bnqh,bnkh->bnqk", q, k) / math.sqrt(Dh)
    weights = masked_softmax(scores, None if m is None else m[:, None])
    heads = jnp.einsum("bnqk,bnkh->bnqh", weights, v)
    out = jnp.einsum("bnqh,nho->bqo", heads, params.w_o, preferred_element_type=acc)
    if params.b_o is not None:
        out = out + params.b_o
    return out.astype(params.w_o.dtype), weights
