"""The LSTM-variant study (Greff et al. 2017) runs end to end (--quick): nine variants, two tasks, tests, plots."""
import math

import pytest

from example_runs import check_plots, run_quick

VARIANTS = ["vanilla", "NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR"]


@pytest.mark.slow
def test_lstm_variants_quick(tmp_path):
    out, res, stdout = run_quick(tmp_path, "lstm_variants")
    assert res["mode"] == "quick"
    assert res["variants"] == VARIANTS
    assert set(res["tasks"]) == {"temporal_order", "char_lm"}
    for tname, task in res["tasks"].items():
        cfg = task["config"]
        S, lrs = cfg["seeds"], cfg["lrs"]
        assert list(task["variants"]) == VARIANTS
        assert set(task["vs_vanilla"]) == set(VARIANTS) - {"vanilla"}
        for name, v in task["variants"].items():
            t = v["test"]
            assert len(t["per_seed"]) == S and all(math.isfinite(a) for a in t["per_seed"])
            assert t["min"] <= t["mean"] <= t["max"] and t["std"] >= 0
            assert float(v["lr"]) in lrs and len(v["by_lr"]) == len(lrs)
            assert len(v["test_curve"]) == S and all(len(c) == len(v["eval_steps"]) for c in v["test_curve"])
            assert v["eval_steps"][-1] == cfg["steps"]
            assert t["per_seed"] == [c[-1] for c in v["test_curve"]]
            assert v["n_params"] > 0
            if tname == "temporal_order":
                assert all(0.0 <= a <= 100.0 for a in t["per_seed"])     # test error %
            else:
                assert all(0.0 < a for a in t["per_seed"])               # bits/char
            if name != "vanilla":
                c = task["vs_vanilla"][name]
                assert 0.0 <= c["p_value"] <= 1.0
                assert c["verdict"] in ("worse", "better", "no significant difference")
                assert c["difference"] == pytest.approx(t["mean"] - task["variants"]["vanilla"]["test"]["mean"])
        # parameter counts follow the variants' definitions: CIFG, NIG, NFG, NOG drop one gate block; FGR adds w_gates
        n = {k: v["n_params"] for k, v in task["variants"].items()}
        assert n["CIFG"] == n["NIG"] == n["NFG"] == n["NOG"] < n["vanilla"] == n["NIAF"] == n["NOAF"] < n["FGR"]
        assert n["NP"] == n["vanilla"] - 3 * cfg["hidden"]
        assert set(task["conclusions"]) == {"no_variant_beats_vanilla", "nfg_and_noaf_hurt_most",
                                            "cifg_and_np_as_good_as_vanilla"}
        assert all(isinstance(c["holds"], bool) for c in task["conclusions"].values())
    # the bits/char of the LM are below the uniform distribution's after training
    lm = res["tasks"]["char_lm"]
    assert lm["variants"]["vanilla"]["test"]["mean"] < lm["chance"]
    assert len(res["verdicts"]) == 6 and "Greff et al.'s conclusions" in stdout
    assert set(res["plots"]) == {"distributions", "curves", "learning_rates"}
    check_plots(res, out)


def test_lstm_variants_merge_reproduces_committed_report(tmp_path):
    """--merge of the committed single-task runs gives the committed combined report (tasks, verdicts, plots)."""
    import json
    import os
    import subprocess
    import sys

    from example_runs import ROOT

    res_dir = os.path.join(ROOT, "examples", "results", "lstm_variants")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "lstm_variants.py"), "--merge",
                           os.path.join(res_dir, "temporal_order"), os.path.join(res_dir, "char_lm"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "results.json").read_text())
    with open(os.path.join(res_dir, "results.json")) as f:
        committed = json.load(f)
    assert got["tasks"] == committed["tasks"] and got["verdicts"] == committed["verdicts"]
    assert got["tasks_run"] == ["temporal_order", "char_lm"] and got["mode"] == "full"
    check_plots(got, tmp_path)
