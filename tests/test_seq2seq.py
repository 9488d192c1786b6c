"""seqjax.seq2seq: the attention decoder cell, teacher forcing, greedy and beam-search decoding."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax import attention as A
from seqjax import seq2seq as s2s

B, TK, DM, E, H, T = 3, 5, 6, 4, 8, 4


def _memory(seed=0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.normal(size=(B, TK, DM)), jnp.float32), jnp.array([5, 2, 3])


@pytest.mark.parametrize("kind", ["additive", "dot", "scaled_dot", None])
def test_decoder_cell_scan_equals_stepping_by_hand(kind):
    memory, lengths = _memory()
    dec = s2s.attention_decoder(seqjax.gru(H), kind, memory_size=None if kind is None else DM)
    params = dec.init(jax.random.key(0), E)
    cell = dec.bind(params, memory, lengths)
    xs = jax.random.normal(jax.random.key(1), (B, T, E))
    carry0 = cell.initial_carry(params, (B,))
    carry0 = carry0._replace(cell=jax.random.normal(jax.random.key(2), (B, H)))
    final, ys = seqjax.scan(cell, params, xs, carry=carry0)
    assert ys.shape == (B, T, dec.output_size) and dec.output_size == H + (0 if kind is None else DM)
    carry, outs = carry0, []
    apply = jax.jit(cell.apply)   # one compiled step, called T times by hand
    for t in range(T):
        carry, y = apply(params, carry, xs[:, t])
        outs.append(y)
    np.testing.assert_allclose(ys, jnp.stack(outs, 1), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(carry)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_decoder_step_equations_additive():
    """One step by hand: q = h_{t-1}; c = additive attention; h_t = GRU([x; c]); y = [h_t; c]."""
    memory, lengths = _memory(1)
    inner = seqjax.gru(H)
    dec = s2s.attention_decoder(inner, "additive", memory_size=DM, attention_size=7)
    params = dec.init(jax.random.key(3), E)
    cell = dec.bind(params, memory, lengths)
    h0 = jax.random.normal(jax.random.key(4), (B, H))
    x = jax.random.normal(jax.random.key(5), (B, E))
    carry, y = cell.apply(params, cell.initial_carry(params, (B,))._replace(cell=h0), x)
    ctx, w = A.additive_attention(params.attention, h0[:, None], memory, lengths=lengths)
    h1, _ = inner.apply(params.cell, h0, jnp.concatenate([x, ctx[:, 0]], -1))
    np.testing.assert_allclose(y, jnp.concatenate([h1, ctx[:, 0]], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry.weights, w[:, 0], rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(carry.weights)[1, 2:] == 0)


def test_decoder_with_stacked_lstm_and_padded_targets():
    memory, lengths = _memory(2)
    dec = s2s.attention_decoder(seqjax.stack([seqjax.lstm(H), seqjax.lstm(H)]), "scaled_dot", memory_size=DM)
    params = dec.init(jax.random.key(0), E)
    cell = dec.bind(params, memory, lengths)
    xs = jax.random.normal(jax.random.key(1), (B, T, E))
    tl = jnp.array([4, 2, 3])
    _, ys = seqjax.scan(cell, params, xs, lengths=tl)
    for b in range(B):
        _, yb = seqjax.scan(dec.bind(params, memory[b:b + 1], lengths[b:b + 1]), params, xs[b:b + 1, :int(tl[b])])
        np.testing.assert_allclose(ys[b, :int(tl[b])], yb[0], rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(ys)[b, int(tl[b]):] == 0)


@functools.lru_cache(maxsize=None)   # one model per kind, so its jitted greedy/beam compile once per module
def _tiny_model(kind="additive"):
    m = s2s.seq2seq(9, 7, embed_size=6, hidden_size=8, attention=kind)
    params = m.init(jax.random.key(7))
    # sharpen the output distribution a little so decoding is not a coin flip
    params = params._replace(decoder=params.decoder._replace(
        readout=tuple(a * 3 if i == 2 else a for i, a in enumerate(params.decoder.readout))))
    src = jnp.array([[3, 4, 5, 6, 7], [8, 3, 0, 0, 0], [4, 4, 6, 0, 0]])
    return m, params, (src, jnp.array([5, 2, 3]))


def test_beam_width_one_equals_greedy():
    m, params, source = _tiny_model("additive")
    g = m.greedy(params, source, max_length=5)
    b = m.beam(params, source, max_length=5, beam_width=1)
    np.testing.assert_array_equal(g.tokens, b.best)
    np.testing.assert_array_equal(g.lengths, b.lengths[:, 0])
    np.testing.assert_allclose(g.scores, b.scores[:, 0], rtol=1e-5, atol=1e-5)


def test_teacher_forced_logits_match_decoding_steps():
    """logits[:, t] under teacher forcing == the decoding step fed the same tokens."""
    m, params, source = _tiny_model()
    g = m.greedy(params, source, max_length=5)
    lg = m.logits(params, source, g.tokens, jnp.full((B,), 5))
    logp = jax.nn.log_softmax(lg.at[..., jnp.array([m.pad_id, m.bos_id])].set(-jnp.inf), -1)  # never generated
    picked = jnp.take_along_axis(logp, g.tokens[..., None], -1)[..., 0]
    valid = jnp.arange(5)[None] < g.lengths[:, None]
    np.testing.assert_allclose(jnp.where(valid, picked, 0).sum(1), g.scores, rtol=1e-4, atol=1e-4)
    assert g.trace.shape == (B, 5, 5)
    np.testing.assert_allclose(np.asarray(g.trace).sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(g.trace)[1, :, 2:] == 0)


V, EOS, BOS, L = 3, 1, 0, 4


def _toy_step():
    """A tiny recurrent 'model': carry h [N, 4]; tokens drive it; log-probs over V=3 tokens."""
    r = np.random.default_rng(0)
    W, Em, U = (jnp.asarray(r.normal(size=s), jnp.float32) for s in ((4, 4), (V, 4), (4, V)))

    def step(h, tok):
        h = jnp.tanh(h @ W + Em[tok])
        return h, jax.nn.log_softmax(1.5 * h @ U, -1)

    h0 = jnp.asarray(r.normal(size=(2, 4)), jnp.float32)
    return step, h0


def _brute_force(step, h0, alpha):
    best = []
    for b in range(h0.shape[0]):
        cands = []
        for n in range(1, L + 1):
            for seq in itertools.product(range(V), repeat=n):
                if EOS in seq[:-1] or (n < L and seq[-1] != EOS):
                    continue
                h, tok, score = h0[b:b + 1], jnp.array([BOS]), 0.0
                for s in seq:
                    h, lp = step(h, tok)
                    score += float(lp[0, s])
                    tok = jnp.array([s])
                cands.append((score / n ** alpha, seq, score))
        best.append(max(cands))
    return best


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_finds_best_sequence_by_brute_force(alpha):
    step, h0 = _toy_step()
    res = jax.jit(lambda h: s2s.beam_search(step, h, 2, beam_width=16, bos_id=BOS, eos_id=EOS, max_length=L,
                                            pad_id=BOS, length_penalty=alpha))(h0)
    for b, (norm, seq, score) in enumerate(_brute_force(step, h0, alpha)):
        n = len(seq)
        assert int(res.lengths[b, 0]) == n
        np.testing.assert_array_equal(np.asarray(res.tokens[b, 0, :n]), seq)
        np.testing.assert_allclose(float(res.normalized_scores[b, 0]), norm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(res.scores[b, 0]), score, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(np.asarray(res.normalized_scores), axis=1) <= 1e-6)   # sorted best first


def test_small_beam_never_below_greedy_score_on_toy():
    step, h0 = _toy_step()
    g = s2s.greedy_decode(step, h0, 2, bos_id=BOS, eos_id=EOS, max_length=L)
    b = s2s.beam_search(step, h0, 2, beam_width=3, bos_id=BOS, eos_id=EOS, max_length=L, length_penalty=0.0)
    assert np.all(np.asarray(b.scores[:, 0]) >= np.asarray(g.scores) - 1e-6)


def test_training_step_runs_and_vec2seq_shares_decoding():
    import optax
    m, params, source = _tiny_model("scaled_dot")
    tgt = jnp.array([[3, 4, 2, 0], [5, 2, 0, 0], [6, 6, 6, 2]])
    batch = s2s.Seq2SeqBatch(source, tgt, jnp.array([3, 2, 4]))
    opt = optax.adam(1e-2)
    step = seqjax.make_train_step(m.loss, opt, has_aux=True, clip_norm=1.0)
    state = seqjax.init_state(params, opt)
    losses = []
    for _ in range(2):
        state, met = step(state, batch)
        losses.append(float(met["loss"]))
    assert losses[-1] < losses[0]
    v = s2s.vec2seq(5, 7, hidden_size=8, embed_size=4)
    vp = v.init(jax.random.key(0))
    feats = jnp.ones((2, 5))
    g = v.greedy(vp, feats, max_length=4)
    b = v.beam(vp, feats, max_length=4, beam_width=1)
    np.testing.assert_array_equal(g.tokens, b.best)


def test_vocabulary_and_exact_match():
    voc = s2s.Vocabulary("0123456789-")
    ids, lens = voc.batch(["12-3", "7"], eos=True)
    assert ids.shape == (2, 5) and list(lens) == [5, 2] and voc.decode(ids[0]) == "12-3"
    ok = s2s.exact_match(ids, lens, ids, lens)
    assert ok.all()
    ids2 = ids.copy()
    ids2[1, 0] = voc.index["8"]
    assert list(s2s.exact_match(ids2, lens, ids, lens)) == [True, False]


def test_errors():
    m, params, (src, sl) = _tiny_model()
    with pytest.raises(ValueError, match="beam_width must be an int >= 1"):
        m.beam(params, (src, sl), max_length=4, beam_width=0)
    step, h0 = _toy_step()
    with pytest.raises(ValueError, match="beam_width"):
        s2s.beam_search(step, h0, 2, beam_width=0, bos_id=0, eos_id=1, max_length=3)
    with pytest.raises(ValueError, match="unknown token ids \\[9\\]"):
        m.greedy(params, (src.at[0, 1].set(9), sl), max_length=5)
    with pytest.raises(ValueError, match="unknown token"):
        m.loss(params, s2s.Seq2SeqBatch((src, sl), jnp.array([[3, 2], [7, 2], [99, 2]]), jnp.array([2, 2, 2])))
    with pytest.raises(ValueError, match="unknown token 'x'"):
        s2s.Vocabulary("0123").encode("12x")
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, S=5\]"):
        m.greedy(params, (src, jnp.array([5, 0, 3])), max_length=5)
    with pytest.raises(ValueError, match="max_length"):
        m.greedy(params, (src, sl), max_length=0)
    dec = s2s.attention_decoder(seqjax.gru(4), "additive", memory_size=DM)
    p = dec.init(jax.random.key(0), 3)
    memory, _ = _memory()
    with pytest.raises(ValueError, match="masks everything"):
        dec.bind(p, memory, jnp.array([2, 0, 1]))
    with pytest.raises(ValueError, match="memory must have shape"):
        dec.bind(p, memory[..., :2])
    with pytest.raises(ValueError, match="memory_size"):
        s2s.attention_decoder(seqjax.gru(4), "dot")
    with pytest.raises(ValueError, match="attention must be one of"):
        s2s.attention_decoder(seqjax.gru(4), "luong", memory_size=3)
