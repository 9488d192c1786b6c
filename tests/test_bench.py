"""The benchmark scripts run end to end (--quick) and write the results they document.

Only structure and invariants are checked (never timings): rows for every candidate and mode,
positive medians, ratios to PyTorch consistent with the medians, plots that are PNGs.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, tmp_path, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--quick", "--out", str(tmp_path),
                           *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_peers_quick_with_variants(tmp_path):
    proc = run_bench("peers.py", tmp_path, "--variants", "autodiff,unroll=1")
    ok(proc)
    res = json.loads((tmp_path / "peers.json").read_text())
    assert res["environment"]["backend"] == "cpu" and res["reps"] == 3
    libs = {(r["library"], r["mode"]) for r in res["rows"]}
    for lib in ("seqjax", "seqjax autodiff", "seqjax unroll=1", "pytorch"):
        assert {(lib, "fwd"), (lib, "train")} <= libs, lib
    assert ("matmul floor", "fwd") in libs and ("matmul floor", "train") not in libs
    torch_ms = {r["mode"]: r["median_ms"] for r in res["rows"] if r["library"] == "pytorch"}
    for r in res["rows"]:
        assert 0 < r["min_ms"] <= r["median_ms"] and r["n"] == 3
        assert r["ratio_to_pytorch"] == pytest.approx(r["median_ms"] / torch_ms[r["mode"]])
        if r["library"] != "pytorch":
            assert r["compile_s"] > 0 and r["memory"]["temp_bytes"] >= 0
    assert "jax.experimental.rnn: skipped" in proc.stdout  # GPU-only peer, said so on CPU
    assert is_png(tmp_path / "peers.png")
    assert "| seqjax autodiff |" in proc.stdout


def test_lengths_quick(tmp_path):
    proc = run_bench("lengths.py", tmp_path)
    ok(proc)
    res = json.loads((tmp_path / "lengths.json").read_text())
    libs = {(r["library"], r["mode"]) for r in res["rows"]}
    for lib in ("seqjax", "seqjax, sorted batch", "seqjax, no lengths", "seqjax kernel=xla", "flax.linen nn.RNN",
                "pytorch packed", "pytorch packed, sorted", "pytorch, no lengths"):
        assert {(lib, "fwd"), (lib, "train")} <= libs, lib
    packed = {r["mode"]: r["median_ms"] for r in res["rows"] if r["library"] == "pytorch packed"}
    for r in res["rows"]:
        assert 0 < r["min_ms"] <= r["median_ms"] and r["n"] == 3 and 0.5 <= r["fill"] <= 1.0
        assert r["ratio_to_pytorch_packed"] == pytest.approx(r["median_ms"] / packed[r["mode"]])
    assert is_png(tmp_path / "lengths.png")
    assert "| seqjax, sorted batch |" in proc.stdout


def test_bidirectional_quick(tmp_path):
    proc = run_bench("bidirectional.py", tmp_path)
    ok(proc)
    res = json.loads((tmp_path / "bidirectional.json").read_text())
    assert res["layers"] == 2
    libs = {(r["library"], r["mode"]) for r in res["rows"]}
    for lib in ("seqjax", "seqjax kernel=xla", "flax.linen nn.Bidirectional", "pytorch"):
        assert {(lib, "fwd"), (lib, "train")} <= libs, lib
    ref = {r["mode"]: r["median_ms"] for r in res["rows"] if r["library"] == "pytorch"}
    for r in res["rows"]:
        assert 0 < r["min_ms"] <= r["median_ms"] and r["n"] == 3 and r["gflops"] > 0
        assert r["ratio_to_pytorch"] == pytest.approx(r["median_ms"] / ref[r["mode"]])
    assert is_png(tmp_path / "bidirectional.png")
    assert "2 bidirectional layers" in proc.stdout and "| flax.linen nn.Bidirectional |" in proc.stdout


def test_lstm_variants_quick(tmp_path):
    proc = run_bench("lstm_variants.py", tmp_path, "--variants", "vanilla,NP,CIFG")
    ok(proc)
    res = json.loads((tmp_path / "lstm_variants.json").read_text())
    libs = {(r["library"], r["mode"]) for r in res["rows"]}
    for lib in ("vanilla", "vanilla kernel=xla", "vanilla kernel=xla, autodiff", "NP", "NP kernel=xla", "CIFG",
                "CIFG kernel=xla"):
        assert {(lib, "fwd"), (lib, "train")} <= libs, lib
    plain = {r["mode"]: r["median_ms"] for r in res["rows"] if r["library"] == "NP"}
    for r in res["rows"]:
        assert 0 < r["min_ms"] <= r["median_ms"] and r["n"] == 3
        assert r["ratio_to_plain"] == pytest.approx(r["median_ms"] / plain[r["mode"]])
    assert is_png(tmp_path / "lstm_variants.png")
    assert "| tiny | CIFG kernel=xla |" in proc.stdout


def test_peers_rejects_unknown_variant(tmp_path):
    proc = run_bench("peers.py", tmp_path, "--variants", "turbo")
    assert proc.returncode != 0 and "unknown variants: ['turbo']" in proc.stderr



def test_scan_vs_unroll_quick(tmp_path):
    proc = run_bench("scan_vs_unroll.py", tmp_path, "--unrolled-max-T", "5")
    ok(proc)
    res = json.loads((tmp_path / "scan_vs_unroll.json").read_text())
    assert res["grid"]["T"] == [5, 10] and res["grid"]["unrolled_max_T"] == 5
    runners = {(r["runner"], r["mode"], r["T"]) for r in res["rows"]}
    assert ("unrolled", "train", 5) in runners and ("unrolled", "train", 10) not in runners
    assert {("scan u=4", "train", 10), ("scan default", "train", 10), ("scan remat", "train", 10)} <= runners
    for r in res["rows"]:
        assert r["compile_s"] > 0 and r["median_ms"] > 0 and r["memory"]["temp_bytes"] >= 0
    assert is_png(tmp_path / "scan_vs_unroll.png")


def test_parallel_scan_quick(tmp_path):
    ok(run_bench("parallel_scan.py", tmp_path, "--cells", "min_gru,gru16", "--T", "4,16", "--name", "ps"))
    res = json.loads((tmp_path / "ps.json").read_text())
    got = {(r["cell"], r["method"], r["mode"], r["T"]) for r in res["rows"]}
    assert got == {(c, m, mode, T) for c, m in [("min_gru", "sequential"), ("min_gru", "associative"),
                                                ("gru16", "kernel=auto")]
                   for mode in ("fwd", "train") for T in (4, 16)}
    assert all(r["median_ms"] > 0 and r["params"] > 0 for r in res["rows"])
    assert {(c["cell"], c["mode"]) for c in res["crossovers"]} == {("min_gru", "fwd"), ("min_gru", "train")}
    assert is_png(tmp_path / "ps.png")


def test_fit_loop_quick(tmp_path):
    proc = run_bench("fit_loop.py", tmp_path)
    ok(proc)
    res = json.loads((tmp_path / "fit_loop.json").read_text())
    names = [r["candidate"] for r in res["rows"]]
    assert names[0] == "fit k=1" and len(names) == 4 and res["environment"]["backend"] == "cpu"
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["run_steps"] in (r["steps"], 5 * r["steps"])
        assert abs(r["run_steps_per_s"] - r["run_steps"] / (r["median_ms"] / 1e3)) < 1e-6 * r["run_steps_per_s"]
    assert is_png(tmp_path / "fit_loop.png")


def test_sharded_quick(tmp_path):
    proc = run_bench("sharded.py", tmp_path)
    ok(proc)
    res = json.loads((tmp_path / "sharded.json").read_text())
    assert res["devices"] == 2 and len(res["environment"]["devices"]) == 2
    rows = res["rows"]
    assert [r["library"] for r in rows] == ["sharded", "replicated", "one device"]
    replicated = rows[1]["median_ms"]
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"] and r["n"] == 3
        assert r["ratio_to_replicated"] == pytest.approx(r["median_ms"] / replicated)
        assert r["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)  # the same step, placed three ways
    if rows[0]["backend"] in ("avx2", "avx512"):  # the kernels run on B/2 rows of the tiny shape's B=4
        forward = next(c for c in rows[0]["hlo_kernel_calls"] if c.endswith("_rnn_forward"))
        assert forward.startswith("(f32[2,12,16]")
    assert rows[0]["hlo_all_gather"] is False
    assert is_png(tmp_path / "sharded.png")


def test_long_sequences_quick(tmp_path):
    proc = run_bench("long_sequences.py", tmp_path, "--Ts", "200", "--policies", "all,sqrt")
    ok(proc)
    res = json.loads((tmp_path / "long_sequences.json").read_text())
    points = {(r["T"], r["policy"]): r for r in res["points"]}
    assert set(points) == {(200, "all"), (200, "sqrt")}
    for r in points.values():
        assert r["ran"] and r["peak_rss_bytes"] > 0 and r["memory"]["temp_bytes"] > 0
    # XLA's temporaries: "sqrt" keeps less than "all" at the longer T
    assert points[(200, "sqrt")]["memory"]["temp_bytes"] < points[(200, "all")]["memory"]["temp_bytes"]
    assert [r["T"] for r in res["pairs"] if r["interleaved"]] == [200]
    assert all(r["run"][p]["median_ms"] > 0 for r in res["pairs"] for p in ("all", "sqrt"))
    assert is_png(tmp_path / "long_sequences.png")


def test_newton_quick(tmp_path):
    ok(run_bench("newton.py", tmp_path, "--cells", "gru", "--H", "4", "--T", "4", "--name", "nw"))
    res = json.loads((tmp_path / "nw.json").read_text())
    got = {(r["cell"], r["method"], r["mode"], r["T"]) for r in res["rows"]}
    assert got == {("gru", m, mode, 4) for m in ("kernel=auto", "kernel=xla", "newton") for mode in ("fwd", "train")}
    assert all(r["median_ms"] > 0 and r["vs_xla"] > 0 for r in res["rows"])
    # after T iterations the trajectory is exact, so T=4 converges within T + 1 iterations
    assert [(i["converged"], i["iterations"] <= 5) for i in res["iterations"]] == [(True, True)]
    assert is_png(tmp_path / "nw.png")
