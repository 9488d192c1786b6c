"""The adding-problem and two-integer-comparison examples run end to end (--quick) and write results and plots."""
import math

import jax
import numpy as np
import pytest

from example_runs import check_plots, check_stats, load_example, run_quick


@pytest.mark.slow
def test_adding_quick(tmp_path):
    out, res, stdout = run_quick(tmp_path, "adding")
    assert "Adding problem T=" in stdout
    assert res["mode"] == "quick"
    T, seeds = res["T"], res["config"]["seeds"]
    assert res["lengths"] == [T, T + T // 10]
    assert res["test_size"] == 2560 and res["tolerance"] == 0.04
    assert "lstm" in res["results"] and set(res["results"]) == set(res["config"]["cells"])
    for kind, sm in res["results"].items():
        assert len(sm["sequences_to_criterion"]) == seeds
        assert sm["solved"] == sum(q is not None for q in sm["sequences_to_criterion"])
        for q in sm["sequences_to_criterion"]:
            assert q is None or 2000 <= q <= res["config"]["budget"]
        check_stats(sm["test_mse"], seeds)
        check_stats(sm["test_wrong"], seeds)
        assert sm["test_wrong"]["max"] <= 2560
        assert sm["n_params"] > 0
        assert len(sm["test_mse_curve"]) == len(sm["eval_sequences"]) == seeds
        for curve, at, trained in zip(sm["test_mse_curve"], sm["eval_sequences"], sm["trained_sequences"]):
            assert len(curve) == len(at) and at[-1] == trained <= res["config"]["budget"] + 3200
    # the LSTM learns the task within the quick budget (well below the 0.042 MSE of predicting the mean)
    assert res["results"]["lstm"]["test_mse"]["min"] < 0.01
    check_plots(res, out)


@pytest.mark.slow
def test_compare_quick(tmp_path):
    out, res, stdout = run_quick(tmp_path, "compare")
    assert "Two-integer comparison" in stdout
    assert res["mode"] == "quick"
    assert res["splits"] == [8000, 4000, 4000]
    assert 0.5 < res["majority_baseline_test_accuracy"] < 0.62
    assert abs(res["majority_entropy"] - 0.6870) < 1e-3
    seeds, budget = res["config"]["seeds"], res["config"]["max_iterations"]
    assert set(res["results"]) == set(res["config"]["setups"])
    assert {"lstm_fair", "rnn_fair", "lstm_published_grads", "lstm_tutorial"} <= set(res["results"])
    for name, s in res["results"].items():
        check_stats(s["test_accuracy"], seeds)
        assert len(s["runs"]) == seeds and len(s["iterations"]) == seeds
        for r in s["runs"]:
            assert 0 < r["iterations"] <= budget
            assert len(r["eval_steps"]) == len(r["eval"]["valid_accuracy"]) == len(r["eval"]["logit_spread"]) > 0
            assert all(math.isfinite(v) for k in ("valid_ce", "logit_spread", "cell_norm", "head_norm")
                       for v in r["eval"][k])
            assert math.isfinite(r["final_train_ce"])
    # the correct setups learn the task; the published gradients carry no label, so the model ignores its input
    for name in ("lstm_fair", "rnn_fair"):
        assert res["results"][name]["test_accuracy"]["min"] >= 0.99, name
    pub = res["results"]["lstm_published_grads"]
    assert pub["logit_spread"]["max"] < 1e-2
    assert all(r["eval"]["valid_ce"][-1] > res["majority_entropy"] for r in pub["runs"])   # uniform: ln 2
    assert {"vanilla_rnn_does_not_work", "lstm_published_grads_stall", "lstm_tutorial_settings"} <= set(res["verdicts"])
    assert set(res["plots"]) == {"learning_curves", "as_published"}
    check_plots(res, out)


def test_published_surrogate_gradient_is_the_published_one():
    """The surrogate's logit gradient is krikos's ``dloss[indices, y] -= 1`` with labels of shape (N, 1)."""
    published_surrogate = load_example("compare").published_surrogate
    rng = np.random.default_rng(0)
    for y in (rng.integers(0, 2, 16), np.zeros(16, int)):
        logits = rng.normal(size=(16, 2)).astype(np.float32)
        # the published backward, transcribed with NumPy (labels of shape (N, 1), as its loader makes them)
        norm = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        dloss = norm.copy()
        dloss[np.arange(16), y[:, None]] -= 1
        got = np.asarray(jax.grad(published_surrogate)(logits, y))
        np.testing.assert_allclose(got, dloss, rtol=1e-5, atol=1e-6)
    # the gradient does not depend on which row has which label
    g1 = np.asarray(jax.grad(published_surrogate)(logits, y := rng.integers(0, 2, 16)))
    np.testing.assert_allclose(g1, np.asarray(jax.grad(published_surrogate)(logits, rng.permutation(y))), atol=1e-6)
