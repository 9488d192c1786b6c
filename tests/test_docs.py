"""The documentation's promises: importing any seqjax module is free of side effects (so that collecting the
docstring examples loads nothing), and the documentation site's API pages cover the public surface."""
import subprocess
import sys
import textwrap

_IMPORT_EVERY_MODULE = textwrap.dedent("""
    import importlib, pkgutil, sys, warnings
    warnings.simplefilter("error")
    import seqjax
    names = [m.name for m in pkgutil.walk_packages(seqjax.__path__, "seqjax.")]
    for name in names:
        importlib.import_module(name)
    with open("/proc/self/maps") as f:
        maps = f.read()
    from jax._src import xla_bridge
    print(len(names), "native" if "cpu_rnn" in maps or "onednn_rnn" in maps or "cuda_rnn" in maps else "-",
          "torch" if "torch" in sys.modules else "-", len(xla_bridge._backends))
""")


def test_importing_every_module_loads_nothing_and_warns_nothing():
    """Every module under seqjax imports (with warnings as errors) without loading a native library, importing
    torch or initialising a JAX backend: the kernels load on first use only."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_MODULE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, native, torch, backends = out.stdout.split()
    assert int(count) >= 30  # the walk found the package's modules
    assert (native, torch, backends) == ("-", "-", "0")
