"""seqjax.transformer against a NumPy transcription of its equations, and its invariants (padding, causality, jit)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import transformer as tf
from seqjax.seq2seq import Seq2SeqBatch

B, T, I, D, N, F = 3, 7, 5, 8, 2, 12
LENGTHS = np.array([7, 3, 1], np.int32)


# ----------------------------------------------------------------------------
# NumPy transcription (float64, loops over examples and heads)
# ----------------------------------------------------------------------------


def np_ln(p, x, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p.scale, np.float64) + np.asarray(p.bias, np.float64)


def np_mha(p, q_in, kv_in, allowed):
    """One example: q_in [Tq, D], kv_in [Tk, Dm], allowed [Tq, Tk] bool -> [Tq, O]."""
    f = lambda a: np.asarray(a, np.float64)
    out = np.zeros((q_in.shape[0], f(p.w_o).shape[-1]))
    for r in range(f(p.w_q).shape[1]):
        q = q_in @ f(p.w_q)[:, r] + f(p.b_q)[r]
        k = kv_in @ f(p.w_k)[:, r] + f(p.b_k)[r]
        v = kv_in @ f(p.w_v)[:, r] + f(p.b_v)[r]
        e = q @ k.T / np.sqrt(q.shape[-1])
        e = np.where(allowed, e, -np.inf)
        a = np.exp(e - e.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        out += (a @ v) @ f(p.w_o)[r]
    return out + f(p.b_o)


def np_ff(p, x):
    f = lambda a: np.asarray(a, np.float64)
    return np.maximum(x @ f(p.w1) + f(p.b1), 0) @ f(p.w2) + f(p.b2)


def np_encoder_block(p, x, length, causal=False):
    Tx = x.shape[0]
    allowed = np.broadcast_to(np.arange(Tx)[None, :] < length, (Tx, Tx))
    if causal:
        allowed = allowed & np.tril(np.ones((Tx, Tx), bool))
    x = x + np_mha(p.attention, np_ln(p.ln1, x), np_ln(p.ln1, x), allowed)
    return x + np_ff(p.ff, np_ln(p.ln2, x))


def np_positions(Tx, Dx):
    pe = np.zeros((Tx, Dx))
    for t in range(Tx):
        for j in range(Dx):
            freq = 10000.0 ** (-(j - j % 2) / Dx)
            pe[t, j] = np.sin(t * freq) if j % 2 == 0 else np.cos(t * freq)
    return pe


def np_encoder(params, xs, lengths):
    out = np.zeros(xs.shape[:2] + (D,))
    w, b = (np.asarray(a, np.float64) for a in params.input)
    for e in range(xs.shape[0]):
        L = lengths[e]
        x = xs[e, :L] @ w + b + np_positions(L, D)
        for blk in params.blocks:
            x = np_encoder_block(blk, x, L)
        out[e, :L] = np_ln(params.final_ln, x)
    return out


def np_decoder_block(p, x, memory, mem_length):
    Tx, S = x.shape[0], memory.shape[0]
    x = x + np_mha(p.self_attention, np_ln(p.ln1, x), np_ln(p.ln1, x), np.tril(np.ones((Tx, Tx), bool)))
    allowed = np.broadcast_to(np.arange(S)[None, :] < mem_length, (Tx, S))
    x = x + np_mha(p.cross_attention, np_ln(p.ln2, x), memory, allowed)
    return x + np_ff(p.ff, np_ln(p.ln3, x))


def _randomise(params, key, scale=0.3):
    """Params with every leaf random (layer-norm gains and biases included), so nothing is tested at zero/one."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [a + scale * jax.random.normal(k, a.shape, a.dtype)
                                        for a, k in zip(leaves, keys)])


def _xs(seed=0, shape=(B, T, I)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _encoder(num_layers=2):
    enc = tf.encoder(num_layers, D, N, F)
    return enc, _randomise(enc.init(jax.random.key(0), I), jax.random.key(1))


# ----------------------------------------------------------------------------
# numerics against the transcription
# ----------------------------------------------------------------------------


def test_sinusoidal_positions_match_formula():
    np.testing.assert_allclose(tf.sinusoidal_positions(11, 6), np_positions(11, 6), atol=1e-6)
    np.testing.assert_allclose(tf.sinusoidal_positions(4, 5), np_positions(4, 5), atol=1e-6)   # odd width


@pytest.mark.parametrize("causal", [False, True])
def test_encoder_block_matches_numpy(causal):
    enc, params = _encoder(1)
    blk = params.blocks[0]
    x = _xs(2, (B, T, D))
    mask = tf.causal_mask(T) if causal else None
    got = jax.jit(tf.encoder_block)(blk, jnp.asarray(x), lengths=jnp.asarray(LENGTHS), mask=mask)
    for e in range(B):
        ref = np_encoder_block(blk, x[e].astype(np.float64), LENGTHS[e], causal=causal)
        L = LENGTHS[e]   # steps past the length are padding: only the valid ones are specified
        np.testing.assert_allclose(got[e, :L], ref[:L], rtol=2e-5, atol=2e-5)


def test_encoder_matches_numpy_and_zeroes_padding():
    enc, params = _encoder(2)
    xs = _xs(3)
    got = enc.apply(params, jnp.asarray(xs), lengths=jnp.asarray(LENGTHS))
    np.testing.assert_allclose(got, np_encoder(params, xs.astype(np.float64), LENGTHS), rtol=2e-5, atol=2e-5)
    assert got.shape == (B, T, D) and got.dtype == jnp.float32
    full = enc.apply(params, jnp.asarray(xs))          # no lengths: every step valid
    np.testing.assert_allclose(full, np_encoder(params, xs.astype(np.float64), np.full(B, T)), rtol=2e-5, atol=2e-5)


def test_decoder_block_matches_numpy():
    blk = _randomise(tf.DecoderBlockParams(
        tf._ln_init(D, jnp.float32), tf.attn.multi_head_init(jax.random.key(2), N, D),
        tf._ln_init(D, jnp.float32), tf.attn.multi_head_init(jax.random.key(3), N, D, key_size=6),
        tf._ln_init(D, jnp.float32), tf._ff_init(jax.random.key(4), D, F, jnp.float32)), jax.random.key(5))
    x, memory = _xs(4, (B, 5, D)), _xs(5, (B, T, 6))
    got, w = jax.jit(tf.decoder_block)(blk, jnp.asarray(x), jnp.asarray(memory), memory_lengths=jnp.asarray(LENGTHS))
    assert w.shape == (B, N, 5, T)
    for e in range(B):
        ref = np_decoder_block(blk, x[e].astype(np.float64), memory[e].astype(np.float64), LENGTHS[e])
        np.testing.assert_allclose(got[e], ref, rtol=2e-5, atol=2e-5)
    assert float(jnp.abs(w[2, :, :, 1:]).max()) == 0.0   # example 2 has one valid memory slot


# ----------------------------------------------------------------------------
# invariants
# ----------------------------------------------------------------------------


def test_encoder_padded_equals_unpadded_and_padding_never_leaks():
    enc, params = _encoder()
    xs = _xs(6)
    xs_nan = xs.copy()
    for e, L in enumerate(LENGTHS):
        xs_nan[e, L:] = np.nan                             # whatever sits in the padding
    apply = jax.jit(enc.apply)
    got = apply(params, jnp.asarray(xs_nan), lengths=jnp.asarray(LENGTHS))
    for e, L in enumerate(LENGTHS):
        alone = apply(params, jnp.asarray(xs[e:e + 1, :L]))
        np.testing.assert_allclose(got[e, :L], alone[0], rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(got[e, L:]).sum()) == 0.0
    grads = jax.jit(jax.grad(lambda p: enc.apply(p, jnp.asarray(xs_nan), lengths=jnp.asarray(LENGTHS)).sum()))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_encoder_jit_equals_eager_and_vmap_over_params():
    enc, params = _encoder()
    xs, lengths = jnp.asarray(_xs(7)), jnp.asarray(LENGTHS)
    eager = enc.apply(params, xs, lengths=lengths)
    jitted = jax.jit(enc.apply)
    np.testing.assert_allclose(jitted(params, xs, lengths=lengths), eager, rtol=1e-6, atol=1e-6)
    params2 = _randomise(params, jax.random.key(9))
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, params2)
    both = jax.jit(jax.vmap(lambda p: enc.apply(p, xs, lengths=lengths)))(stacked)
    np.testing.assert_allclose(both[0], eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], jitted(params2, xs, lengths=lengths), rtol=1e-5, atol=1e-5)


def _s2s(num_layers=1):
    model = tf.seq2seq(13, 9, model_size=D, num_heads=N, num_layers=num_layers, decoder_layers=2, ff_size=F)
    return model, _randomise(model.init(jax.random.key(0)), jax.random.key(1), scale=0.5)


def _source():
    r = np.random.default_rng(8)
    tokens = r.integers(0, 13, (B, T)).astype(np.int32)
    return tokens, LENGTHS


def test_seq2seq_decoder_is_causal():
    model, params = _s2s()
    src = _source()
    target = np.random.default_rng(9).integers(3, 9, (B, 6)).astype(np.int32)
    lengths = np.full(B, 6, np.int32)
    logits = jax.jit(model.logits)
    base = logits(params, src, jnp.asarray(target), jnp.asarray(lengths))
    for k in range(6):
        changed = target.copy()
        changed[:, k:] = 3 + (changed[:, k:] - 2) % 6          # a different token at every later position
        got = logits(params, src, jnp.asarray(changed), jnp.asarray(lengths))
        # logits at step t read target[:t] only (BOS at t=0): steps <= k are untouched
        np.testing.assert_allclose(got[:, :k + 1], base[:, :k + 1], rtol=1e-5, atol=1e-5)
        if k < 5:
            assert float(jnp.abs(got[:, k + 1:] - base[:, k + 1:]).max()) > 1e-3


def test_seq2seq_source_padding_does_not_matter():
    model, params = _s2s()
    tokens, lengths = _source()
    other = tokens.copy()
    for e, L in enumerate(lengths):
        other[e, L:] = (other[e, L:] + 5) % 13
    target, tl = jnp.array([[4, 5, 2], [6, 2, 0], [7, 8, 2]], jnp.int32), jnp.array([3, 2, 3], jnp.int32)
    logits = jax.jit(model.logits)
    a = logits(params, (tokens, lengths), target, tl)
    b = logits(params, (other, lengths), target, tl)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    e = 1   # example 1 alone, without the padding
    alone = logits(params, (tokens[e:e + 1, :lengths[e]], lengths[e:e + 1]), target[e:e + 1], tl[e:e + 1])
    np.testing.assert_allclose(a[e:e + 1], alone, rtol=1e-5, atol=1e-5)


def test_greedy_matches_teacher_forcing_and_beam_of_one():
    model, params = _s2s()
    src = _source()
    L = 6
    g = model.greedy(params, src, max_length=L)
    assert g.tokens.shape == (B, L) and g.trace.shape == (B, L, T)
    tokens, lengths = np.asarray(g.tokens), np.asarray(g.lengths)
    assert lengths.min() >= 1
    # teacher forcing on greedy's own output gives greedy's choices and scores
    lg = model.logits(params, src, jnp.asarray(tokens), jnp.asarray(lengths))
    never = np.zeros(9, bool)
    never[[model.bos_id, model.pad_id]] = True
    logp = jax.nn.log_softmax(jnp.where(never, -jnp.inf, lg), -1)
    for e in range(B):
        n = lengths[e]
        np.testing.assert_array_equal(np.argmax(logp[e, :n], -1), tokens[e, :n])
        np.testing.assert_allclose(float(logp[e, np.arange(n), tokens[e, :n]].sum()), float(g.scores[e]), rtol=1e-5,
                                   atol=1e-5)
    # cross-attention weights: a distribution over the valid source tokens
    w = np.asarray(g.trace)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert w[2, :, 1:].max() == 0.0
    b1 = model.beam(params, src, max_length=L, beam_width=1)
    np.testing.assert_array_equal(b1.best, g.tokens)


def test_seq2seq_loss_and_gradients_jit_equal_eager():
    model, params = _s2s()
    src = _source()
    target = jnp.array([[4, 5, 2], [6, 2, 0], [7, 8, 2]], jnp.int32)
    batch = Seq2SeqBatch(src, target, jnp.array([3, 2, 3], jnp.int32))
    grad = jax.value_and_grad(model.loss, has_aux=True)
    (eager, aux), g_eager = grad(params, batch)
    (jitted, aux_j), g_jit = jax.jit(grad)(params, batch)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    np.testing.assert_allclose(aux_j["token_accuracy"], aux["token_accuracy"])
    for a, b in zip(jax.tree.leaves(g_jit), jax.tree.leaves(g_eager)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(optax_norm(g_eager)) > 0


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(tree)))


def test_errors_name_the_call_and_argument():
    enc, params = _encoder()
    with pytest.raises(ValueError, match=r"seqjax.transformer.encoder: model_size=10 must be divisible by num_heads=4"):
        tf.encoder(1, 10, 4)
    with pytest.raises(ValueError, match=r"seqjax.transformer.encoder: num_layers must be a positive int"):
        tf.encoder(0, 8, 2)
    with pytest.raises(ValueError, match=r"encoder\(\.\.\.\)\.apply: xs must be a float array of shape \(B, T, I\)"):
        enc.apply(params, jnp.ones((T, I)))
    with pytest.raises(ValueError, match=r"encoder\(\.\.\.\)\.apply: xs must have shape \(B, T, I=5\)"):
        enc.apply(params, jnp.ones((B, T, 4)))
    with pytest.raises(ValueError, match=r"encoder\(\.\.\.\)\.apply: lengths must lie in \[1, T=7\], got values in \[0, 7\]"):
        enc.apply(params, jnp.ones((B, T, I)), lengths=jnp.array([7, 0, 2]))
    with pytest.raises(ValueError, match=r"encoder\(\.\.\.\)\.apply: lengths must be an int array of shape \(B,\)=\(3,\)"):
        enc.apply(params, jnp.ones((B, T, I)), lengths=jnp.array([7.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match=r"params must be the EncoderParams"):
        enc.apply({"w": 1}, jnp.ones((B, T, I)))
    model, p = _s2s()
    with pytest.raises(ValueError, match=r"seqjax.transformer.seq2seq: source lengths must lie in \[1, S=7\]"):
        model.greedy(p, (jnp.ones((B, T), jnp.int32), jnp.array([7, 8, 1])), max_length=4)
    with pytest.raises(ValueError, match=r"seqjax.transformer.seq2seq: target contains unknown token ids \[9\]"):
        model.logits(p, _source(), jnp.full((B, 3), 9, jnp.int32), jnp.full((B,), 3, jnp.int32))
    with pytest.raises(ValueError, match=r"seqjax.transformer.seq2seq.greedy: max_length must be a positive int"):
        model.greedy(p, _source(), max_length=0)
    with pytest.raises(ValueError, match=r"seqjax.transformer.seq2seq: bos_id and eos_id must differ"):
        tf.seq2seq(5, 5, model_size=8, num_heads=2, bos_id=2, eos_id=2)
