"""The adding-problem and two-integer-comparison examples run end to end (--quick) and write results and plots."""
import pytest

from example_runs import check_plots, check_stats, run_quick


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
    seeds = res["config"]["seeds"]
    check_stats(res["test_accuracy"], seeds)
    assert len(res["runs"]) == seeds
    assert all(r["test_accuracy"] >= 0.99 for r in res["runs"])
    assert res["seeds_at_99pct"] == seeds
    check_plots(res, out)
