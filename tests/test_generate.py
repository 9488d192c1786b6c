"""seqjax.generate: greedy == hand stepping with cell.apply, top_k=1 == greedy, determinism, prompts, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax.generation import generate, sample_logits

V, E, H = 11, 4, 6
CELL = seqjax.stack([seqjax.lstm(H), seqjax.gru(H)])
K = jax.random.split(jax.random.key(0), 4)
PARAMS = CELL.init(K[0], E)
EMB = jax.random.normal(K[1], (V, E))
W = 2.0 * jax.random.normal(K[2], (H, V))
BIAS = 0.1 * jax.random.normal(K[3], (V,))
PROMPT = jnp.array([[1, 2, 3], [4, 0, 9]])


def hand_greedy(prompt, n):
    carry = CELL.initial_carry(PARAMS, (prompt.shape[0],))
    for t in range(prompt.shape[1]):
        carry, y = CELL.apply(PARAMS, carry, EMB[prompt[:, t]])
    out = []
    for _ in range(n):
        tok = jnp.argmax(y @ W + BIAS, -1)
        out.append(tok)
        carry, y = CELL.apply(PARAMS, carry, EMB[tok])
    return np.stack(out, 1)


def gen(prompt=PROMPT, key=jax.random.key(5), **kw):
    kw.setdefault("max_new_tokens", 8)
    return generate(CELL, PARAMS, prompt, key, embed=EMB, readout=(W, BIAS), **kw)


def test_greedy_equals_hand_stepping_and_top1():
    want = hand_greedy(PROMPT, 8)
    got = gen(greedy=True)
    assert got.shape == (2, 8) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(gen(top_k=1, temperature=0.7), want)
    # callable embed / readout give the same tokens
    got_fn = generate(CELL, PARAMS, PROMPT, jax.random.key(5), embed=lambda i: EMB[i],
                      readout=lambda y: y @ W + BIAS, max_new_tokens=8, greedy=True)
    np.testing.assert_array_equal(got_fn, want)
    # a 1-D prompt gives a 1-D result
    np.testing.assert_array_equal(gen(prompt=PROMPT[0], greedy=True), want[0])


def test_sampling_is_a_function_of_the_key():
    a = gen(key=jax.random.key(1), temperature=1.5, max_new_tokens=30)
    b = gen(key=jax.random.key(1), temperature=1.5, max_new_tokens=30)
    c = gen(key=jax.random.key(2), temperature=1.5, max_new_tokens=30)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < V


def test_prompt_conditioning_and_carry():
    # reading [a, b, c] equals starting from the carry after [a, b] with prompt [c]
    carry, _ = seqjax.scan(CELL, PARAMS, EMB[PROMPT[:, :2]])
    np.testing.assert_array_equal(gen(prompt=PROMPT[:, 2:], carry=carry, greedy=True), gen(greedy=True))
    toks, c = gen(greedy=True, return_carry=True, max_new_tokens=3)
    assert jax.tree.structure(c) == jax.tree.structure(carry)
    # the prompt matters
    assert not np.array_equal(gen(prompt=PROMPT[:, ::-1], greedy=True), gen(greedy=True))


def test_top_k_restricts_support():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.9, -1.0]] * 500)
    toks = np.asarray(sample_logits(jax.random.key(0), logits, top_k=2))
    assert set(toks.tolist()) == {1, 3}
    toks = np.asarray(sample_logits(jax.random.key(0), logits, temperature=100.0))
    assert set(toks.tolist()) == {0, 1, 2, 3, 4}


def test_errors():
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, V=11\).*\[1, 11\]"):
        gen(prompt=jnp.array([1, 11]))
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        gen(prompt=jnp.array([-1, 3]))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        gen(temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        gen(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, V=11\]"):
        gen(top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        gen(top_k=12)
    with pytest.raises(ValueError, match="P >= 1"):
        gen(prompt=jnp.zeros((2, 0), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        gen(prompt=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen(max_new_tokens=0)
    with pytest.raises(ValueError, match="embed has 5 rows"):
        generate(CELL, PARAMS, PROMPT, jax.random.key(0), embed=EMB[:5], readout=W, max_new_tokens=2)
