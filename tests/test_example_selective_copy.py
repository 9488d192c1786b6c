"""The selective-copying example runs end to end (--quick) and writes results and a plot."""
import pytest

from example_runs import check_plots, run_quick


@pytest.mark.slow
def test_selective_copy_quick(tmp_path):
    out, res, stdout = run_quick(tmp_path, "selective_copy")
    assert "Selective copying, T=" in stdout
    task = res["config"]["task"]
    assert res["T"] == task["num_noise"] + 2 * task["num_tokens"]
    assert set(res["results"]) == {"1", "3"}
    for r in res["results"].values():
        s = r["test_accuracy"]
        assert len(s["per_seed"]) == res["config"]["seeds"] and 0.0 <= s["min"] <= s["median"] <= s["max"] <= 1.0
        assert r["eval_steps"][-1] == res["config"]["steps"]
    assert res["results"]["3"]["params"] > res["results"]["1"]["params"]
    check_plots(res, out)
