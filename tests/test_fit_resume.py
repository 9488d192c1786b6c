"""`seqjax.fit(checkpoint=...)`: a run killed right after a saved step and started again with the same arguments ends
with the same bits as the run that was never stopped (state, history, history file), for callable batches and
iterators, one step or several per call, one run or runs in lockstep."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import seqjax
from seqjax.checkpoint import Checkpoints

pytest.importorskip("orbax.checkpoint")

B, T, I, H = 4, 5, 3, 6
CELL = seqjax.gru(H)
OPT = optax.adam(3e-2)


class Preempted(Exception):
    pass


class KilledAfter(Checkpoints):
    """Checkpoints that stop the process (raise) right after saving step ``kill_at``."""

    def __init__(self, directory, kill_at, **kw):
        super().__init__(directory, **kw)
        self.kill_at = kill_at

    def save(self, step, arrays, meta):
        super().save(step, arrays, meta)
        if step == self.kill_at:
            raise Preempted(step)


def loss_fn(params, batch):
    x, y = batch
    _, hs = seqjax.scan(CELL, params["cell"], x)
    return jnp.mean((hs[:, -1] @ params["w"] - y) ** 2)


def draw(key):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (B, T, I)), jax.random.normal(ky, (B,))


def fresh(num_runs=None):
    def one(key):
        k1, k2 = jax.random.split(key)
        return seqjax.init_state({"cell": CELL.init(k1, input_size=I), "w": 0.3 * jax.random.normal(k2, (H,))}, OPT)
    if num_runs is None:
        return one(jax.random.key(0))
    return jax.vmap(one)(jax.random.split(jax.random.key(0), num_runs))


def stream(num_runs=None):
    """A fresh iterator over seeded batches (stacked [S, ...] for runs in lockstep)."""
    for i in range(1000):
        batch = draw(jax.random.key(100 + i))
        if num_runs is not None:
            batch = jax.tree.map(lambda a: jnp.stack([a, -a][:num_runs]), batch)
        yield batch


STEP = seqjax.make_train_step(loss_fn, OPT)
CASES = {  # name: (steps_per_call, num_runs, iterator)
    "loop-callable": (1, None, False),
    "loop-iterator": (1, None, True),
    "compiled-callable": (2, None, False),
    "compiled-iterator": (2, None, True),
    "lockstep-iterator": (2, 2, True),
}


def run(case, ckpt=None, log_path=None):
    k, num_runs, iterator = CASES[case]
    evaluate = lambda s: {"w": jnp.sum(s.params["w"])}
    return seqjax.fit(STEP, fresh(num_runs), stream(num_runs) if iterator else draw, num_steps=10, eval_fn=evaluate,
                      eval_every=4, progress=False, seed=3, num_runs=num_runs, steps_per_call=k, checkpoint=ckpt,
                      log_path=log_path)


def same_bits(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def rows(history):
    return [(h.train, h.eval, h.stop_reason) for h in (history if isinstance(history, list) else [history])]


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_fit_is_bit_exact(tmp_path, case):
    state, history = run(case)
    directory = tmp_path / "ckpt"
    with pytest.raises(Preempted):
        run(case, KilledAfter(directory, kill_at=6, every=2, keep=2), tmp_path / "log")
    ckpt = Checkpoints(directory, every=2, keep=2)
    assert ckpt.all_steps() == [4, 6]
    with open(tmp_path / ("log.run0.json" if CASES[case][1] else "log.json")) as f:
        assert len(json.load(f)["train"]) == 6     # the history file was written at the checkpoint
    state2, history2 = run(case, ckpt, tmp_path / "log")
    assert int(np.max(state2.step)) == 10
    same_bits(state2, state)
    assert rows(history2) == rows(history)
    assert ckpt.all_steps() == [8, 10]
    with open(tmp_path / ("log.run0.json" if CASES[case][1] else "log.json")) as f:
        assert json.load(f)["train"] == rows(history)[0][0]    # the rows before the kill are in the file too
    # started once more with the same arguments: the run is already complete, nothing trains
    state3, history3 = run(case, ckpt)
    same_bits(state3, state)
    assert rows(history3) == rows(history)


def test_resume_checks_what_it_resumes(tmp_path):
    with pytest.raises(ValueError, match=r"seqjax.train.fit: checkpoint.every \(3\) must be a multiple of "
                                         r"steps_per_call \(2\)"):
        seqjax.fit(STEP, fresh(), draw, num_steps=4, steps_per_call=2, progress=False,
                   checkpoint=Checkpoints(tmp_path / "a", every=3))
    with pytest.raises(TypeError, match="seqjax.train.fit: checkpoint must be a seqjax.checkpoint.Checkpoints"):
        seqjax.fit(STEP, fresh(), draw, num_steps=4, progress=False, checkpoint=str(tmp_path))
    ckpt = Checkpoints(tmp_path / "b", every=2)
    seqjax.fit(STEP, fresh(), draw, num_steps=2, progress=False, seed=1, checkpoint=ckpt)
    with pytest.raises(ValueError, match="saved with seed=1, got seed=2"):
        seqjax.fit(STEP, fresh(), draw, num_steps=4, progress=False, seed=2, checkpoint=ckpt)
    with pytest.raises(ValueError, match="were a callable; this call's are not"):
        seqjax.fit(STEP, fresh(), stream(), num_steps=4, progress=False, seed=1, checkpoint=ckpt)


def test_nnx_pair_resumes(tmp_path):
    from flax import nnx

    def make():
        model = seqjax.nnx.SequenceClassifier(seqjax.nnx.GRU(I, H, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def nnx_loss(model, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(model(x), (y > 0).astype(jnp.int32)).mean()

    step = seqjax.make_nnx_train_step(nnx_loss)
    (model, opt), history = seqjax.fit(step, make(), draw, num_steps=4, progress=False)
    with pytest.raises(Preempted):
        seqjax.fit(step, make(), draw, num_steps=4, progress=False, checkpoint=KilledAfter(tmp_path, 2, every=2))
    (model2, opt2), history2 = seqjax.fit(step, make(), draw, num_steps=4, progress=False,
                                          checkpoint=Checkpoints(tmp_path, every=2))
    same_bits(nnx.state((model2, opt2)), nnx.state((model, opt)))
    assert history2.train == history.train
