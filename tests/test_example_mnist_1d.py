"""The MNIST-1D example runs end to end (--quick) and writes results, step times and plots."""
import math

import pytest

from example_runs import check_plots, run_quick


@pytest.mark.slow
def test_mnist_1d_quick(tmp_path):
    out, res, stdout = run_quick(tmp_path, "mnist_1d")
    assert "MNIST-1D test accuracy" in stdout and "published (regular)" in stdout
    assert res["mode"] == "quick" and res["data_seed"] == 42
    cells, seeds = res["config"]["cells"], res["config"]["seeds"]
    study = res["study"]["regular"]
    assert list(study) == cells == ["gru", "min_gru"]
    for kind, r in study.items():
        s = r["test_accuracy"]
        assert len(s["per_seed"]) == seeds and 0.0 <= s["min"] <= s["median"] <= s["max"] <= 1.0
        assert len(r["test_curve"]) == seeds and len(r["test_curve"][0]) == len(r["eval_steps"])
        assert r["eval_steps"][-1] == res["config"]["steps"]
        assert 40_000 < r["params"] < 70_000           # about equal parameter counts
        assert s["median"] > 0.3                        # well above chance (10 %) after 100 steps
    t = res["timing"]["results"]
    assert set(t) == {"gru", "min_gru"} and set(t["min_gru"]) == {"sequential", "associative"}
    for methods in t.values():
        for m in methods.values():
            assert m["median_ms"] > 0 and math.isfinite(m["vs_gru"]) and m["compile_s"] > 0
    assert t["gru"]["sequential"]["vs_gru"] == 1.0
    check_plots(res, out)
