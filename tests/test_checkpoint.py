"""`seqjax.checkpoint` and `seqjax.tbptt.fit(checkpoint=...)`: a run stopped after any window and resumed from its
latest Orbax checkpoint ends with the same bits as the run that was never stopped."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import seqjax
from seqjax import tbptt
from seqjax.checkpoint import Checkpoints

pytest.importorskip("orbax.checkpoint")

H, VOCAB, B = 8, 7, 4
CELL = seqjax.gru(H)


def model(params, carry, x, *, resets=None, key=None):
    inputs = params["embed"][x]
    if key is not None:  # noise that depends on the window's key: the PRNG state must resume too
        inputs = inputs + 0.1 * jax.random.normal(key, inputs.shape)
    carry, hs = seqjax.scan(CELL, params["cell"], inputs, carry=carry, resets=resets, time_major=True)
    return carry, hs @ params["out"]


def loss_fn(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def setup(k1, k2):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"cell": CELL.init(k[0], input_size=5), "embed": jax.random.normal(k[1], (VOCAB, 5)),
              "out": 0.3 * jax.random.normal(k[2], (H, VOCAB))}
    opt = optax.adam(1e-2)
    step = tbptt.make_step(model, loss_fn, opt, k1=k1, k2=k2)
    stream = tbptt.batchify(np.random.default_rng(0).integers(0, VOCAB, B * 30), B)  # [30, 4]: 4-6 windows an epoch
    return step, (lambda: seqjax.init_state(params, opt)), tbptt.Stream(stream)


def run(step, fresh, stream, directory=None, stop_at=None, log_path=None, every=2):
    ckpt = None if directory is None else Checkpoints(directory, every=every, keep=2)
    seen = []

    def stop(gstep, state, metrics):
        seen.append(gstep)
        return gstep == stop_at
    out = tbptt.fit(step, fresh(), stream, initial_carry=jnp.zeros((B, H)), num_epochs=3, key=jax.random.key(7),
                    eval_fn=lambda s: {"w": jnp.sum(s.params["out"])}, callback=stop, callback_every=1,
                    checkpoint=ckpt, log_path=log_path)
    steps = None
    if ckpt is not None:
        steps = ckpt.all_steps()
        ckpt.close()
    return out, steps, seen


def same_bits(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("k1, k2, stop_at", [(5, 5, 7), (3, 5, 12)])
def test_resume_is_bit_exact(tmp_path, k1, k2, stop_at):
    step, fresh, stream = setup(k1, k2)
    (state, carry, history), _, _ = run(step, fresh, stream)
    (_, _, stopped), kept, _ = run(step, fresh, stream, tmp_path / "ckpt", stop_at=stop_at, log_path=tmp_path / "log")
    assert stopped.stop_reason == "callback" and stopped.train[-1]["step"] == stop_at
    assert kept == ([stop_at - 2, stop_at] if stop_at % 2 == 0 else [stop_at - 3, stop_at - 1])  # every=2, keep=2
    # mid-epoch: the stop is not at an epoch's end
    windows = (29 - k2) // k1 + 1
    assert stop_at % windows != 0
    (state2, carry2, history2), _, seen = run(step, fresh, stream, tmp_path / "ckpt", log_path=tmp_path / "log")
    assert seen[0] == kept[-1] + 1 and seen[-1] == history.train[-1]["step"]  # it resumed after the checkpoint
    same_bits((state2, carry2), (state, carry))
    assert history2.train == history.train and history2.eval == history.eval
    with open(tmp_path / "log.json") as f:  # the history file holds the rows from before the stop too
        assert json.load(f)["train"] == history.train


def test_checkpoints_errors(tmp_path):
    with pytest.raises(ValueError, match="seqjax.checkpoint.Checkpoints: every must be a positive int, got 0"):
        Checkpoints(tmp_path, every=0)
    ckpt = Checkpoints(tmp_path / "empty", every=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint saved"):
        ckpt.restore({"a": jnp.zeros(2)})
    ckpt.save(3, {"a": jnp.arange(3.0), "k": jax.random.key(1)}, {"x": 1})
    arrays, meta = ckpt.restore({"a": jnp.zeros(3), "k": jax.random.key(0)})
    assert meta == {"x": 1} and ckpt.latest() == 3
    same_bits(arrays["a"], jnp.arange(3.0))
    same_bits(jax.random.key_data(arrays["k"]), jax.random.key_data(jax.random.key(1)))
    ckpt.close()
    step, fresh, stream = setup(5, 5)
    with pytest.raises(ValueError, match="seqjax.tbptt.fit: checkpoint= saves between windows"):
        tbptt.fit(step, fresh(), stream, initial_carry=jnp.zeros((B, H)), scan_epoch=True,
                  checkpoint=Checkpoints(tmp_path / "scan", every=1))
