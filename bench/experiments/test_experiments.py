"""The experiment scripts of bench/experiments/ still run (--quick); not part of the default test suite.

These scripts measured the levers that docs/design/performance.md records; they are kept to re-run those
measurements. Run their smoke tests with ``python -m pytest bench/experiments``.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(script, tmp_path, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "experiments", script), "--quick", "--out",
                           str(tmp_path), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_levers_quick(tmp_path):
    cands = "fused vjp,fused vjp hoist=True unroll=4,scan remat"
    ok(run_bench("levers.py", tmp_path, "--candidates", cands, "--default"))
    rows = json.loads((tmp_path / "levers.json").read_text())["rows"]
    names = {r["library"] for r in rows}
    assert names == set(cands.split(",")) | {"seqjax.scan (defaults)", "pytorch"}

def test_vjp_variants_quick(tmp_path):
    ok(run_bench("vjp_variants.py", tmp_path))
    rows = json.loads((tmp_path / "vjp_variants.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"peephole", "proj", "cifg", "gru_cho", "lstm_bf16", "gru_bf16"}
    for r in rows:
        assert r["ratio"] == pytest.approx(r["fused_ms"] / r["autodiff_ms"])

def test_loop_kernels_quick(tmp_path):
    proc = run_bench("loop_kernels.py", tmp_path, "--cells", "lstm,rnn", "--label", "probe")
    ok(proc)
    runs = json.loads((tmp_path / "loop_kernels.json").read_text())["runs"]
    rows = runs["probe"]["rows"]
    assert {(r["cell"], r["mode"]) for r in rows} == {(c, m) for c in ("lstm", "rnn") for m in ("fwd", "train")}
    for r in rows:
        # the forward is one loop; the train step (custom VJP) a forward and a backward loop
        assert len(r["loops"]) == (1 if r["mode"] == "fwd" else 2), r
        for loop in r["loops"]:
            assert loop["launches"] == sum(loop["ops"].values()) > 0
            assert any("dot" in op for op in loop["ops"]), loop  # the recurrent GEMM runs every step
        assert r["median_ms"] > 0

def test_pallas_probes_interpret(tmp_path):
    ok(run_bench("pallas_step.py", tmp_path, "--interpret", "--cells", "rnn,lstm,gru"))
    rows = json.loads((tmp_path / "pallas_step.json").read_text())["rows"]
    impls = {(r["cell"], r["impl"]): r for r in rows}
    for cell in ("rnn", "lstm", "gru"):
        assert impls[(cell, "pallas persistent")]["max_abs_diff"] < 1e-5
    for cell in ("rnn", "lstm"):
        assert impls[(cell, "pallas step")]["max_abs_diff"] < 1e-5
    assert impls[("lstm", "pallas grid-sync")]["max_abs_diff"] < 1e-5  # one program in the interpreter
    assert "the per-step probe covers rnn and lstm" in impls[("gru", "pallas step")]["failed"]
    assert "the grid-barrier probe covers the lstm" in impls[("rnn", "pallas grid-sync")]["failed"]

