"""Runs an example script with --quick and checks what it wrote (shared by the example tests)."""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(tmp_path, name, args=()):
    """Runs ``examples/<name>.py --quick *args --out tmp_path/name``: ``(out_dir, results.json as dict, stdout)``."""
    out = tmp_path / name
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), "--quick", *args,
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def check_plots(res, out):
    """Every file in ``res["plots"]`` is a PNG of more than 1 kB in ``out``."""
    assert res["plots"]
    for name in res["plots"].values():
        path = out / name
        assert path.exists() and path.stat().st_size > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def check_stats(s, n):
    """A min/mean/max/per_seed summary over ``n`` seeds is ordered and complete."""
    assert 0.0 <= s["min"] <= s["mean"] <= s["max"]
    assert len(s["per_seed"]) == n


def load_example(name):
    """Imports ``examples/<name>.py`` as the module ``example_<name>`` (with ``examples/`` importable meanwhile)."""
    folder = os.path.join(ROOT, "examples")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module
