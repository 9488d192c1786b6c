"""The char LM's dropout study (--study dropout --quick) runs end to end and writes its results and plot."""
import json
import os
import subprocess
import sys

import pytest

from example_runs import ROOT, check_plots


@pytest.mark.slow
def test_char_lm_dropout_study_quick(tmp_path):
    out = tmp_path / "char_lm_dropout"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "char_lm.py"), "--study", "dropout",
                           "--quick", "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "quick" and res["study"] == "dropout"
    runs = res["runs"]
    assert list(runs) == ["none", "between-layer (Zaremba)", "variational recurrent"]
    assert (runs["none"]["dropout"], runs["none"]["recurrent_dropout"]) == (0.0, 0.0)
    assert runs["between-layer (Zaremba)"]["dropout"] > 0 == runs["between-layer (Zaremba)"]["recurrent_dropout"]
    assert runs["variational recurrent"]["recurrent_dropout"] > 0 == runs["variational recurrent"]["dropout"]
    steps = res["config"]["train_steps"]
    for r in runs.values():   # the same step budget and evaluation points for every variant
        assert r["updates"] == steps
        assert [row["step"] for row in r["curve"]] == [row["step"] for row in runs["none"]["curve"]]
        assert 0 < r["valid_bpc"] < 8 and 0 < r["train_bpc"] < 8
    # different regularisers from the same initialisation and windows give different models
    assert len({round(r["valid_bpc"], 6) for r in runs.values()}) == 3
    # one seed in the quick run: the summary is that seed's numbers, the paired difference to "none" its own
    assert res["seeds"] == [0] and list(res["summary"]) == list(runs)
    for name, s in res["summary"].items():
        assert s["valid_bpc"]["per_seed"] == [runs[name]["valid_bpc"]] and s["valid_bpc"]["std"] == 0.0
        assert s["vs_none"]["mean"] == runs[name]["valid_bpc"] - runs["none"]["valid_bpc"]
        assert [r["valid_bpc"] for r in res["per_seed"][name]] == [runs[name]["valid_bpc"]]
    assert "Dropout study" in proc.stdout and "variational recurrent" in proc.stdout
    check_plots(res, out)
