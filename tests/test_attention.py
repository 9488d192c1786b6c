"""seqjax.attention against NumPy transcriptions of its equations and against flax.nnx.MultiHeadAttention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import attention as A

B, TQ, TK, DQ, DK, DV, AS = 3, 4, 6, 5, 7, 3, 8


def _data(seed=0):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, TQ, DQ)).astype(np.float32)
    k = r.normal(size=(B, TK, DK)).astype(np.float32)
    v = r.normal(size=(B, TK, DV)).astype(np.float32)
    return q, k, v


def _np_softmax_masked(e, valid):
    out = np.zeros_like(e)
    ex = np.exp(e[valid] - e[valid].max())
    out[valid] = ex / ex.sum()
    return out


def np_attention(energy, q, k, v, lengths):
    """NumPy transcription: e_ij = phi(q_i, k_j); alpha = softmax over j < length; c_i = sum_j alpha_ij v_j."""
    ctx = np.zeros((B, TQ, v.shape[-1]), np.float64)
    w = np.zeros((B, TQ, TK), np.float64)
    for b in range(B):
        valid = np.arange(TK) < lengths[b]
        for i in range(TQ):
            e = np.array([energy(q[b, i], k[b, j]) for j in range(TK)], np.float64)
            w[b, i] = _np_softmax_masked(e, valid)
            ctx[b, i] = w[b, i] @ v[b]
    return ctx, w


LENGTHS = np.array([6, 2, 4], np.int32)


@pytest.mark.parametrize("lengths", [None, LENGTHS])
def test_additive_matches_numpy(lengths):
    q, k, v = _data()
    p = A.additive_init(jax.random.key(0), DQ, DK, AS, bias_init=jax.nn.initializers.normal(0.5))
    wq, wk, b, vv = (np.asarray(a, np.float64) for a in p)
    energy = lambda qi, kj: vv @ np.tanh(wq.T @ qi + wk.T @ kj + b)
    ref_ctx, ref_w = np_attention(energy, q, k, v, np.full(B, TK) if lengths is None else lengths)
    ctx, w = A.additive_attention(p, q, k, v, lengths=None if lengths is None else jnp.asarray(lengths))
    np.testing.assert_allclose(ctx, ref_ctx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
    # projected keys (the decoder's precomputation) give the same answer
    ctx2, w2 = A.additive_attention(p, q, A.additive_project_keys(p, k), v, lengths=lengths, projected=True)
    np.testing.assert_allclose(ctx2, ctx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scaled", [False, True])
def test_dot_and_scaled_dot_match_numpy(scaled):
    q, k, v = _data(1)
    q = q[..., :DK - 2]
    k = k[..., :DK - 2]
    D = q.shape[-1]
    s = 1 / np.sqrt(D) if scaled else 1.0
    ref_ctx, ref_w = np_attention(lambda qi, kj: s * float(qi @ kj), q, k, v, LENGTHS)
    fn = A.scaled_dot_attention if scaled else A.dot_attention
    ctx, w = fn(q, k, v, lengths=jnp.asarray(LENGTHS))
    np.testing.assert_allclose(ctx, ref_ctx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)


def test_padded_keys_get_zero_weight_and_padded_equals_unpadded():
    q, k, v = _data(2)
    p = A.additive_init(jax.random.key(1), DQ, DK, AS)
    lengths = jnp.array([3, 3, 3])
    ctx, w = A.additive_attention(p, q, k, v, lengths=lengths)
    assert np.all(np.asarray(w)[:, :, 3:] == 0.0)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
    ctx_u, w_u = A.additive_attention(p, q, k[:, :3], v[:, :3])
    np.testing.assert_allclose(ctx, ctx_u, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w)[:, :, :3], w_u, rtol=1e-6, atol=1e-7)
    # garbage in padded slots changes nothing
    k2 = np.asarray(k).copy()
    v2 = np.asarray(v).copy()
    k2[:, 3:] = 1e3
    v2[:, 3:] = np.nan
    ctx2, _ = A.additive_attention(p, q, k2, v2, lengths=lengths)
    np.testing.assert_allclose(ctx2, ctx, rtol=1e-6, atol=1e-6)


def test_explicit_mask_combines_with_lengths():
    q, k, v = _data(3)
    causal = np.tril(np.ones((TQ, TK), bool), k=1)
    _, w = A.scaled_dot_attention(q[..., :DV], v, v, lengths=jnp.asarray(LENGTHS), mask=causal)
    allowed = causal[None] & (np.arange(TK)[None, None, :] < LENGTHS[:, None, None])
    assert np.all(np.asarray(w)[~allowed] == 0.0)


def test_multi_head_matches_flax_nnx():
    from flax import nnx
    r = np.random.default_rng(4)
    N, Din, Dkv, Dqkv, Dout = 2, 6, 5, 8, 4
    q = jnp.asarray(r.normal(size=(B, TQ, Din)), jnp.float32)
    kv = jnp.asarray(r.normal(size=(B, TK, Dkv)), jnp.float32)
    m = nnx.MultiHeadAttention(N, Din, qkv_features=Dqkv, out_features=Dout, in_kv_features=Dkv, decode=False,
                               bias_init=nnx.initializers.normal(0.3), rngs=nnx.Rngs(0))
    p = A.MultiHeadParams(m.query.kernel[...], m.query.bias[...], m.key.kernel[...], m.key.bias[...],
                          m.value.kernel[...], m.value.bias[...], m.out.kernel[...], m.out.bias[...])
    lengths = jnp.asarray(LENGTHS)
    mask = (jnp.arange(TK)[None, :] < lengths[:, None])[:, None, None, :]    # [B, 1, 1, Tk]
    ref = m(q, kv, kv, mask=mask, deterministic=True)
    out, w = A.multi_head_attention(p, q, kv, kv, lengths=lengths)
    assert out.shape == (B, TQ, Dout) and w.shape == (B, N, TQ, TK)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    ref_nomask = m(q, kv, kv, deterministic=True)
    np.testing.assert_allclose(A.multi_head_attention(p, q, kv)[0], ref_nomask, rtol=1e-5, atol=1e-5)


def test_multi_head_matches_numpy_heads():
    r = np.random.default_rng(5)
    q = r.normal(size=(B, TQ, 6)).astype(np.float32)
    k = r.normal(size=(B, TK, 5)).astype(np.float32)
    v = r.normal(size=(B, TK, 3)).astype(np.float32)
    p = A.multi_head_init(jax.random.key(2), 3, 6, 5, 3, head_size=4, out_size=2)
    P = [None if a is None else np.asarray(a, np.float64) for a in p]
    out = np.zeros((B, TQ, 2))
    for h in range(3):
        Q = q @ P[0][:, h] + P[1][h]
        K = k @ P[2][:, h] + P[3][h]
        Vh = v @ P[4][:, h] + P[5][h]
        ctx, _ = np_attention(lambda qi, kj: float(qi @ kj) / 2.0, Q, K, Vh, LENGTHS)
        out += ctx @ P[6][h]
    out += P[7]
    got, _ = A.multi_head_attention(p, q, k, v, lengths=jnp.asarray(LENGTHS))
    np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-5)


def test_jit_and_grad():
    q, k, v = _data(6)
    p = A.additive_init(jax.random.key(3), DQ, DK, AS)
    f = jax.jit(lambda p, q: A.additive_attention(p, q, k, v, lengths=jnp.asarray(LENGTHS))[0].sum())
    g = jax.grad(f)(p, q)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_fully_masked_row_under_jit_is_zero_not_nan():
    w = jax.jit(A.masked_softmax)(jnp.ones((2, 3)), jnp.array([[True, False, True], [False, False, False]]))
    np.testing.assert_allclose(w, [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])


def test_errors():
    q, k, v = _data(7)
    p = A.additive_init(jax.random.key(0), DQ, DK, AS)
    with pytest.raises(ValueError, match="mismatched key/value lengths"):
        A.additive_attention(p, q, k, v[:, :4])
    with pytest.raises(ValueError, match="lengths must be >= 1.*masks everything"):
        A.additive_attention(p, q, k, v, lengths=jnp.array([3, 0, 2]))
    with pytest.raises(ValueError, match="rank 3"):
        A.additive_attention(p, q[:, 0], k, v)
    with pytest.raises(ValueError, match="rank 3"):
        A.dot_attention(q[..., :DK], k[0], v)
    with pytest.raises(ValueError, match="masks every key"):
        A.scaled_dot_attention(k, k, v, mask=np.zeros((TK, TK), bool))
    with pytest.raises(ValueError, match="lengths must lie in"):
        A.dot_attention(k, k, v, lengths=jnp.array([1, 2, TK + 1]))
    with pytest.raises(ValueError, match="same width"):
        A.dot_attention(q, k, v)
    with pytest.raises(ValueError, match=r"Dk=7"):
        A.additive_attention(p, q, k[..., :3], v)
    with pytest.raises(ValueError, match="divisible"):
        A.multi_head_init(jax.random.key(0), 3, 8)
    with pytest.raises(ValueError, match="batch size"):
        A.dot_attention(k, k[:2], v[:2])
