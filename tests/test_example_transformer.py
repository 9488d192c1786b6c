"""The Transformer-vs-LSTM example runs end to end (--quick) and writes results and plots."""
import math

import pytest

from example_runs import check_plots, check_stats, run_quick


@pytest.mark.slow
def test_transformer_quick(tmp_path):
    out, res, stdout = run_quick(tmp_path, "transformer")
    assert "Transformer vs LSTM" in stdout and "Verdict" in stdout
    assert res["mode"] == "quick"
    cfg = res["config"]
    assert list(res["order"]) == cfg["order_levels"] == ["HARD"]
    for level, models in res["order"].items():
        assert set(models) == {"lstm", "transformer"}
        for name, m in models.items():
            check_stats(m["test_final"], cfg["order_seeds"])
            assert m["seeds"] == len(m["steps_to_target"]) == len(m["test_curve"]) == cfg["order_seeds"]
            assert m["eval_steps"][-1] == cfg["order_steps"][level]
            for s in m["steps_to_target"]:
                assert s is None or s in m["eval_steps"]
            assert all(math.isfinite(x) for x in m["loss_curve"])
        # about equal size: within 15 % of each other
        a, b = models["lstm"]["n_params"], models["transformer"]["n_params"]
        assert abs(a - b) < 0.15 * max(a, b)
    assert list(res["dates"]) == cfg["date_models"]
    for m in res["dates"].values():
        check_stats(m["test_exact"], cfg["dates_seeds"])
        assert m["eval_steps"][-1] == cfg["dates_steps"]
    for task in ("HARD", "dates"):
        for v in res["timing"][task].values():
            assert v["median_ms"] > 0 and len(v["per_round"]) == cfg["timing_rounds"]
    assert len(res["table"]) == 2 + len(cfg["date_models"]) and len(res["verdicts"]) == 2
    check_plots(res, out)
    assert set(res["plots"]) == {"curves", "step_time"}
