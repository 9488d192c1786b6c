"""The pooling example (last relevant output vs mean pooling) runs end to end (--quick) and writes results and plots."""
import math

import numpy as np
import pytest

from example_runs import check_plots, check_stats, load_example, run_quick


@pytest.mark.slow
def test_pooling_quick(tmp_path):
    out, res, stdout = run_quick(tmp_path, "pooling")
    assert "Last relevant output vs mean pooling" in stdout
    assert res["mode"] == "quick"
    seeds, levels = res["config"]["seeds"], res["config"]["levels"]
    assert set(res["results"]) == set(levels) == set(res["levels"])
    for level in levels:
        lo, hi = res["levels"][level]["length"]
        assert lo < hi                                   # the lengths vary
        assert set(res["results"][level]) == {"rnn", "gru", "lstm"}
        for kind, pools in res["results"][level].items():
            assert set(pools) == {"last", "mean"}
            for pooling, c in pools.items():
                check_stats(c["test_final"], seeds)
                assert c["seeds"] == seeds and 0 <= c["seeds_solved"] <= seeds
                assert c["seeds_solved"] == sum(a >= 0.99 for a in c["test_final"]["per_seed"])
                assert len(c["test_curve"]) == seeds
                assert all(len(curve) == len(c["eval_sequences"]) for curve in c["test_curve"])
                assert c["eval_sequences"][-1] == res["steps"] * res["settings"]["batch"]
                assert np.allclose([curve[-1] for curve in c["test_curve"]], c["test_final"]["per_seed"])
                bins = c["test_by_length"]
                assert len(bins) == 4
                assert int(next(iter(bins)).split("-")[0]) == lo and int(list(bins)[-1].split("-")[1]) == hi
                for s in bins.values():
                    check_stats(s, seeds)
            v = res["verdicts"][f"{level} {kind}"]
            assert isinstance(v["same"], bool) and math.isfinite(v["mean_minus_last"]) and v["se"] >= 0
            assert kind.upper() in v["line"]
    # the quick budget is enough for the gated cells at NORMAL with either pooling (chance is 25 %)
    for kind in ("gru", "lstm"):
        for pooling in ("last", "mean"):
            assert res["results"]["NORMAL"][kind][pooling]["test_final"]["mean"] > 0.5, (kind, pooling)
    check_plots(res, out)


def test_length_bins_cover_the_level():
    pooling = load_example("pooling")
    for level, lv in pooling.TASK_LEVELS.items():
        bins = pooling.length_bins(level)
        assert bins[0][0] == lv.length[0] and bins[-1][1] == lv.length[1]
        assert all(a <= b for a, b in bins)
        assert all(b + 1 == a for (_, b), (a, _) in zip(bins[:-1], bins[1:]))


def test_same_verdict():
    pooling = load_example("pooling")
    stats = pooling.stats
    near = pooling.same_verdict(dict(test_final=stats([0.99, 1.0, 1.0])), dict(test_final=stats([1.0, 1.0, 0.995])))
    assert near["same"]
    far = pooling.same_verdict(dict(test_final=stats([0.30, 0.32, 0.31])), dict(test_final=stats([0.9, 0.92, 0.91])))
    assert not far["same"] and far["mean_minus_last"] > 0.5
    noisy = pooling.same_verdict(dict(test_final=stats([0.3, 1.0, 0.3])), dict(test_final=stats([1.0, 0.3, 1.0])))
    assert noisy["same"]                                 # a difference within two standard errors
