"""H&S 1997's long runs: adding.py at T = 500 / 1000 (per-T defaults, chrono forget bias) and temporal_order.py 6b."""
import math
import os
import sys

import numpy as np
import pytest

from example_runs import ROOT, check_plots, check_stats, run_quick

sys.path.insert(0, os.path.join(ROOT, "examples"))
import adding  # noqa: E402  (examples/adding.py)


def test_adding_per_t_defaults():
    cfg, s = adding.resolve_config()
    assert cfg == dict(T=100, seeds=3, cells=("lstm", "gru", "rnn"), budget=160_000) and s["forget_bias"] == 3.0
    for T, hs in ((500, 209_000), (1000, 853_000)):
        cfg, s = adding.resolve_config(T=T)
        assert cfg == dict(T=T, seeds=3, cells=("lstm",), budget=2 * hs) and s["forget_bias"] == "chrono"
    cfg, s = adding.resolve_config(T=1000, seeds=5, budget=9_600, cells="lstm,gru", forget_bias="4")
    assert cfg == dict(T=1000, seeds=5, cells=("lstm", "gru"), budget=9_600) and s["forget_bias"] == 4.0
    cfg, s = adding.resolve_config(quick=True)
    assert cfg["T"] == 50 and s["forget_bias"] == 3.0
    cfg, s = adding.resolve_config(quick=True, T=500)
    assert cfg == dict(adding.QUICK_AT_T, T=500) and s["forget_bias"] == "chrono"
    assert all(v == s[k] for k, v in adding.SETTINGS.items() if k != "forget_bias")


def test_adding_chrono_forget_bias_in_the_model():
    T, H = 500, adding.SETTINGS["hidden"]
    s = dict(adding.SETTINGS, forget_bias="chrono")
    b = np.asarray(adding.build_model("lstm", 1, s, T).rnn.get_params()[0].b)     # gate columns (i, f, g, o)
    b_f = b[H:2 * H]
    assert np.all(b_f >= 0.0) and np.all(b_f <= math.log(T + T // 10 - 2)) and np.ptp(b_f) > 1.0
    np.testing.assert_allclose(b[:H], adding.SETTINGS["input_gate_bias"])
    np.testing.assert_allclose(b[2 * H:], 0.0)
    b3 = np.asarray(adding.build_model("lstm", 1, adding.SETTINGS, T).rnn.get_params()[0].b)
    np.testing.assert_allclose(b3[H:2 * H], 3.0)


@pytest.mark.slow
def test_adding_quick_at_t500(tmp_path):
    out, res, stdout = run_quick(tmp_path, "adding", ("--T", "500"))
    assert "Adding problem T=500" in stdout and "209,000" in stdout
    assert res["T"] == 500 and res["lengths"] == [500, 550] and res["settings"]["forget_bias"] == "chrono"
    assert res["hs_reference"]["sequences"] == 209_000 and set(res["results"]) == {"lstm"}
    sm, seeds = res["results"]["lstm"], res["config"]["seeds"]
    assert len(sm["sequences_to_criterion"]) == seeds and sm["trained_sequences"] == [3_200] * seeds
    check_stats(sm["test_mse"], seeds)
    check_stats(sm["test_wrong"], seeds)
    assert all(np.isfinite(c).all() and len(c) == 1 for c in sm["test_mse_curve"])
    check_plots(res, out)


@pytest.mark.slow
def test_temporal_order_6b_quick(tmp_path):
    out, res, stdout = run_quick(tmp_path, "temporal_order", ("--experiment", "6b"))
    assert res["experiment"] == "6b" and res["hs_reference_sequences"] == 571_100
    assert "H&S 1997 LSTM: 571,100" in stdout and res["verdicts"][0].startswith("6B: LSTM")
    assert list(res["like"]) == ["6B"] and set(res["like"]["6B"]) == {"lstm"} and not res["nyu"]
    c, seeds, budget = res["like"]["6B"]["lstm"], res["config"]["like_seeds"], res["config"]["like_budget"]
    check_stats(c["test_final"], seeds)
    assert c["test_final"]["max"] <= 1.0 and c["seeds"] == seeds
    assert len(c["sequences_to_hs_criterion"]) == seeds
    assert all(q is None or 2000 <= q <= budget for q in c["sequences_to_hs_criterion"])
    assert c["eval_sequences"][-1] <= budget and np.isfinite(c["test_curve"]).all()
    assert c["test_final"]["mean"] > 0.5      # eight classes: chance is 0.125
    check_plots(res, out)
