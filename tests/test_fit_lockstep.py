"""`seqjax.fit` with several runs in lockstep (``num_runs``) and several steps per call (``steps_per_call``).

The reference is the plain loop (one run, one step per host round trip): lockstep runs must equal
separate runs, k steps per call must equal one step per call, on the data, the updates, the
histories, early stopping and the non-finite stop.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seqjax.train import NonFiniteLossError, fit, init_state, make_nnx_train_step, make_train_step

W_TRUE = np.array([[1.5], [-2.0], [0.5]], np.float32)


def loss_fn(params, batch):
    x, y = batch
    err = x @ params["w"] + params["b"] - y
    return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}


def batches(key):
    x = jax.random.normal(key, (16, 3))
    return x, x @ W_TRUE + 0.25


def params0(scale=0.0):
    return {"w": jnp.full((3, 1), scale), "b": jnp.zeros((1,))}


OPT = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
STEP = make_train_step(loss_fn, OPT, has_aux=True)


def state_with_lr(lr, scale=0.0):
    s = init_state(params0(scale), OPT)
    s.opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return s


def stacked(lrs, scales=None):
    scales = scales or [0.0] * len(lrs)
    states = [state_with_lr(lr, sc) for lr, sc in zip(lrs, scales)]
    return jax.tree.map(lambda *a: jnp.stack(a), *states)


def run_of(states, r):
    return jax.tree.map(lambda a: a[r], states)


def assert_histories_close(a, b, rtol=1e-6):
    assert [r["step"] for r in a.train] == [r["step"] for r in b.train]
    for ra, rb in zip(a.train, b.train):
        assert ra.keys() == rb.keys()
        np.testing.assert_allclose([ra[k] for k in ra], [rb[k] for k in rb], rtol=rtol, atol=1e-7)
    assert [r["step"] for r in a.eval] == [r["step"] for r in b.eval]
    for ra, rb in zip(a.eval, b.eval):
        np.testing.assert_allclose([ra[k] for k in ra], [rb[k] for k in rb], rtol=rtol, atol=1e-7)
    assert a.stop_reason == b.stop_reason


def assert_states_close(a, b, rtol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


def eval_fn(state):
    x, y = batches(jax.random.key(123))
    return {"mse": loss_fn(state.params, (x, y))[0]}


@pytest.mark.parametrize("k", [1, 4, 7])
def test_steps_per_call_equals_one_step_per_call(k):
    ref, href = fit(STEP, state_with_lr(0.05), batches, num_steps=20, eval_fn=eval_fn, eval_every=4 if k < 7 else 7,
                    progress=False, seed=3)
    got, hgot = fit(STEP, state_with_lr(0.05), batches, num_steps=20, eval_fn=eval_fn,
                    eval_every=4 if k < 7 else 7, progress=False, seed=3, steps_per_call=k)
    assert_states_close(got, ref)
    assert_histories_close(hgot, href)
    assert int(got.step) == 20 and len(hgot.train) == 20
    assert hgot.eval[-1]["step"] == 20  # the final evaluation after a partial last call


def test_steps_per_call_with_an_iterator_of_batches():
    data = [batches(jax.random.key(i)) for i in range(10)]
    ref, href = fit(STEP, state_with_lr(0.05), iter(data), num_steps=12, progress=False)
    got, hgot = fit(STEP, state_with_lr(0.05), iter(data), num_steps=12, progress=False, steps_per_call=4)
    assert href.stop_reason == hgot.stop_reason == "data_exhausted"
    assert len(hgot.train) == 10
    assert_states_close(got, ref)
    assert_histories_close(hgot, href)


def test_lockstep_runs_equal_separate_runs():
    lrs, scales = [0.01, 0.05, 0.1], [0.0, 0.3, -0.2]
    got, hists = fit(STEP, stacked(lrs, scales), batches, num_steps=12, eval_fn=eval_fn, eval_every=6,
                     progress=False, seed=5, num_runs=3, steps_per_call=3)
    assert isinstance(hists, list) and len(hists) == 3
    for r, (lr, sc) in enumerate(zip(lrs, scales)):
        ref, href = fit(STEP, state_with_lr(lr, sc), batches, num_steps=12, eval_fn=eval_fn, eval_every=6,
                        progress=False, seed=5 + r)
        assert_states_close(run_of(got, r), ref)
        assert_histories_close(hists[r], href)


def test_lockstep_with_stacked_batches_takes_row_r_for_run_r():
    data = [batches(jax.random.key(i)) for i in range(8)]
    stacked_data = [jax.tree.map(lambda a: jnp.stack([a, 2 * a]), b) for b in data]
    got, hists = fit(STEP, stacked([0.05, 0.05]), iter(stacked_data), num_steps=8, progress=False,
                     num_runs=2, steps_per_call=1)
    for r in range(2):
        rows = [jax.tree.map(lambda a: a[r], b) for b in stacked_data]
        ref, href = fit(STEP, state_with_lr(0.05), iter(rows), num_steps=8, progress=False)
        assert_states_close(run_of(got, r), ref, rtol=1e-5)  # vmapped arithmetic: float32 rounding
        assert_histories_close(hists[r], href, rtol=1e-5)


def test_each_run_stops_on_its_own_eval_target_and_keeps_its_state():
    lrs = [0.2, 0.05, 0.0]
    target = ("mse", 0.05)
    got, hists = fit(STEP, stacked(lrs), batches, num_steps=60, eval_fn=eval_fn, eval_every=5, target=target,
                     progress=False, num_runs=3, steps_per_call=5)
    for r, lr in enumerate(lrs):
        ref, href = fit(STEP, state_with_lr(lr), batches, num_steps=60, eval_fn=eval_fn, eval_every=5,
                        target=target, progress=False, seed=r)
        assert_states_close(run_of(got, r), ref)
        assert_histories_close(hists[r], href)
    assert hists[0].stop_reason == "target" and hists[2].stop_reason == "num_steps"
    assert len(hists[0].train) < len(hists[1].train) < len(hists[2].train) == 60


def test_a_train_target_stops_a_run_right_after_the_step_that_reaches_it():
    target = ("mae", 0.8)
    got, hist = fit(STEP, state_with_lr(0.1), batches, num_steps=50, target=target, progress=False,
                    steps_per_call=8)
    ref, href = fit(STEP, state_with_lr(0.1), batches, num_steps=50, target=target, progress=False)
    assert href.stop_reason == "target" and len(href.train) % 8 != 0
    assert_states_close(got, ref)
    assert_histories_close(hist, href)


def nan_at(data, index):
    x, y = data[index]
    data[index] = (x, y.at[0, 0].set(jnp.nan))
    return data


def test_a_non_finite_step_inside_a_call_raises_naming_it_with_the_state_before():
    data = nan_at([batches(jax.random.key(i)) for i in range(12)], 6)
    with pytest.raises(NonFiniteLossError, match="step 7") as err:
        fit(STEP, state_with_lr(0.05), iter(data), num_steps=12, progress=False, steps_per_call=4)
    before, _ = fit(STEP, state_with_lr(0.05), iter(data[:6]), num_steps=6, progress=False)
    assert err.value.step == 7 and err.value.run is None
    assert not np.isfinite(err.value.metrics["loss"])
    assert len(err.value.history.train) == 6 and err.value.history.stop_reason == "non_finite"
    assert_states_close(err.value.state, before)


def test_a_non_finite_run_in_lockstep_raises_naming_the_run_and_no_run_applies_that_step():
    data = [batches(jax.random.key(i)) for i in range(8)]
    stacked_data = [jax.tree.map(lambda a: jnp.stack([a, a, a]), b) for b in data]
    x, y = stacked_data[5]
    stacked_data[5] = (x, y.at[1, 0, 0].set(jnp.inf))
    with pytest.raises(NonFiniteLossError, match="step 6 of run 1") as err:
        fit(STEP, stacked([0.05] * 3), iter(stacked_data), num_steps=8, progress=False, num_runs=3,
            steps_per_call=3)
    before, _ = fit(STEP, state_with_lr(0.05), iter(data[:5]), num_steps=5, progress=False)
    assert err.value.run == 1 and err.value.step == 6
    for r in range(3):
        assert_states_close(run_of(err.value.state, r), before)
        assert len(err.value.history[r].train) == 5


def test_stop_run_lets_the_other_runs_go_on():
    data = [batches(jax.random.key(i)) for i in range(8)]
    stacked_data = [jax.tree.map(lambda a: jnp.stack([a, a]), b) for b in data]
    x, y = stacked_data[3]
    stacked_data[3] = (x, y.at[0, 0, 0].set(jnp.nan))
    got, hists = fit(STEP, stacked([0.05, 0.05]), iter(stacked_data), num_steps=8, progress=False, num_runs=2,
                     steps_per_call=4, on_non_finite="stop_run")
    three, _ = fit(STEP, state_with_lr(0.05), iter(data[:3]), num_steps=3, progress=False)
    full, _ = fit(STEP, state_with_lr(0.05), iter(data), num_steps=8, progress=False)
    assert hists[0].stop_reason == "non_finite" and len(hists[0].train) == 3
    assert hists[1].stop_reason == "num_steps" and len(hists[1].train) == 8
    assert_states_close(run_of(got, 0), three)
    assert_states_close(run_of(got, 1), full)


def test_log_path_writes_one_history_per_run(tmp_path):
    _, hists = fit(STEP, stacked([0.05, 0.1]), batches, num_steps=4, progress=False, num_runs=2,
                   steps_per_call=2, log_path=tmp_path / "log")
    for r in range(2):
        assert (tmp_path / f"log.run{r}.json").exists() and (tmp_path / f"log.run{r}.csv").exists()


def test_jit_under_vmap_of_a_traced_batch_function_sees_the_same_keys_as_eager():
    """Batches drawn inside the jitted call are the ones the plain loop draws eagerly (same keys)."""
    def record(state, batch):
        return state, {"loss": jnp.sum(batch[0])}

    _, h = fit(record, {"p": jnp.zeros(())}, batches, num_steps=3, progress=False, seed=9, steps_per_call=3)
    for i, row in enumerate(h.train):
        x, _ = batches(jax.random.fold_in(jax.random.key(9), i))
        np.testing.assert_allclose(row["loss"], float(jnp.sum(x)), rtol=1e-6)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def test_eval_every_must_be_a_multiple_of_steps_per_call():
    with pytest.raises(ValueError, match=r"eval_every \(5\) must be a multiple of steps_per_call \(4\)"):
        fit(STEP, state_with_lr(0.05), batches, num_steps=8, eval_fn=eval_fn, eval_every=5, steps_per_call=4,
            progress=False)


def test_num_runs_needs_the_run_axis_on_every_leaf():
    with pytest.raises(ValueError, match=r"num_runs=3 .* state.*has shape"):
        fit(STEP, stacked([0.1, 0.2]), batches, num_steps=2, num_runs=3, progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(num_runs=0), "num_runs must be a positive int"),
    (dict(num_runs=True), "num_runs must be a positive int"),
    (dict(steps_per_call=0), "steps_per_call must be a positive int"),
    (dict(steps_per_call=2.0), "steps_per_call must be a positive int"),
    (dict(on_non_finite="skip"), "on_non_finite must be 'raise' or 'stop_run'"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        fit(STEP, state_with_lr(0.05), batches, num_steps=2, progress=False, **kw)


def test_an_nnx_pair_state_is_refused_by_the_compiled_loop_with_the_way_out():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    step = make_nnx_train_step(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2))
    with pytest.raises(TypeError, match="pytree of arrays.*nnx.split"):
        fit(step, (model, opt), batches, num_steps=4, steps_per_call=2, progress=False)
