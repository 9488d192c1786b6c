"""The adding-problem and two-integer-comparison examples run end to end (--quick) and write results and plots."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _run(script, out):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text())


def _check_plots(res, out):
    assert res["plots"]
    for name in res["plots"].values():
        path = out / name
        assert path.exists() and path.stat().st_size > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _check_stats(s, n):
    assert 0.0 <= s["min"] <= s["mean"] <= s["max"]
    assert len(s["per_seed"]) == n


@pytest.mark.slow
def test_adding_quick(tmp_path):
    out = tmp_path / "adding"
    proc, res = _run("adding.py", out)
    assert "Adding problem T=" in proc.stdout
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
        _check_stats(sm["test_mse"], seeds)
        _check_stats(sm["test_wrong"], seeds)
        assert sm["test_wrong"]["max"] <= 2560
        assert sm["n_params"] > 0
        assert len(sm["test_mse_curve"]) == seeds and len(sm["test_mse_curve"][0]) == len(sm["eval_sequences"])
    # the LSTM learns the task within the quick budget (well below the 0.042 MSE of predicting the mean)
    assert res["results"]["lstm"]["test_mse"]["min"] < 0.01
    _check_plots(res, out)


@pytest.mark.slow
def test_compare_quick(tmp_path):
    out = tmp_path / "compare"
    proc, res = _run("compare.py", out)
    assert "Two-integer comparison" in proc.stdout
    assert res["mode"] == "quick"
    assert res["splits"] == [8000, 4000, 4000]
    assert 0.5 < res["majority_baseline_test_accuracy"] < 0.62
    seeds = res["config"]["seeds"]
    _check_stats(res["test_accuracy"], seeds)
    assert len(res["runs"]) == seeds
    assert all(r["test_accuracy"] >= 0.99 for r in res["runs"])
    assert res["seeds_at_99pct"] == seeds
    _check_plots(res, out)
