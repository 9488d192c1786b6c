"""The documentation's promises: importing any seqjax module is free of side effects (so that collecting the
docstring examples loads nothing), and the documentation site's API pages cover the public surface."""
import importlib.util
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import seqjax

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


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("seqjax_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_an_api_entry(tmp_path):
    """The check `mkdocs build` runs (docs/hooks.py): no public name is missing from docs/api/, and a page without
    one of them is caught."""
    hooks = _hooks()
    assert hooks.undocumented(DOCS) == []
    (tmp_path / "api").mkdir()
    for page in (DOCS / "api").glob("*.md"):
        text = page.read_text().replace("::: seqjax.unrolled\n", "").replace("::: seqjax.tbptt.windows\n", "")
        (tmp_path / "api" / page.name).write_text(text)
    assert hooks.undocumented(tmp_path) == ["seqjax.unrolled", "seqjax.tbptt.windows"]
    assert set(hooks.PUBLIC_MODULES) - {"seqjax"} == {f"seqjax.{n}" for n in seqjax.__all__
                                                       if isinstance(getattr(seqjax, n), types.ModuleType)}


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


GUIDES = sorted(p for p in DOCS.rglob("*.md") if _python_blocks(p)) + [ROOT / "README.md"]


@pytest.mark.parametrize("page", GUIDES, ids=[p.relative_to(ROOT).as_posix() for p in GUIDES])
def test_the_guides_code_runs(page):
    """Every ```python block of a documentation page (and of the README) runs, in order, in one namespace per page (their asserts
    check what the text around them says)."""
    if "import torch" in page.read_text():
        pytest.importorskip("torch")
    namespace = {"__name__": f"docs_{page.stem}"}
    for block in _python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)
