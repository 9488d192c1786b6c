"""examples/char_lm.py --devices 2: data-parallel TBPTT over two emulated CPU devices, then --resume from its
training checkpoint."""
import json
import os
import subprocess
import sys

import pytest

from example_runs import ROOT


def char_lm(out, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "char_lm.py"), "--quick", "--devices", "2",
                           "--checkpoint-every", "10", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.slow
def test_char_lm_on_two_devices_resumes(tmp_path):
    out = tmp_path / "char_lm"
    first, _ = char_lm(out, "--steps", "20")
    assert first["devices"] == 2 and first["updates"] == 20 and first["resumed_from_update"] is None
    assert sorted(os.listdir(out / "train_state")) == ["10", "20"]
    again, log = char_lm(out, "--steps", "30", "--resume")
    assert "resuming from update 20" in log
    assert again["devices"] == 2 and again["updates"] == 30 and again["resumed_from_update"] == 20
    assert again["lstm_valid_bpc"] < first["ngram_valid_bpc"]["1"]["bits_per_char"]   # it trained: better than unigram counts
