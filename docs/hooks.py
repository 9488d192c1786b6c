"""mkdocs hooks: the API pages must cover the public surface, and the committed result plots are part of the site.

``undocumented(docs_dir)`` lists the public names (every ``__all__`` of the modules in ``PUBLIC_MODULES``) that no
``::: identifier`` line of ``docs/api/*.md`` documents; the build fails on any (tests/test_docs.py checks the same).
The PNGs under ``examples/results/`` and ``bench/results/`` are added to the site at the same paths, so pages link
them as ``examples/results/...`` from the site's root without copying them into ``docs/``.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

PUBLIC_MODULES = ("seqjax", "seqjax.attention", "seqjax.backends", "seqjax.diagnostics", "seqjax.losses",
                  "seqjax.nnx", "seqjax.seq2seq", "seqjax.tasks", "seqjax.tbptt", "seqjax.sharding", "seqjax.checkpoint",
                  "seqjax.transformer")
RESULT_FOLDERS = ("examples/results", "bench/results")
_DIRECTIVE = re.compile(r"^::: *([\w.]+)", re.MULTILINE)


def documented(docs_dir) -> set[str]:
    """The identifiers the API pages render (``::: seqjax.x.y`` lines)."""
    return {m for page in sorted(Path(docs_dir, "api").glob("*.md")) for m in _DIRECTIVE.findall(page.read_text())}


def undocumented(docs_dir) -> list[str]:
    """Public names without an API entry. A public submodule counts as documented when its own names are."""
    have = documented(docs_dir)
    missing = []
    for module in PUBLIC_MODULES:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            ident = f"{module}.{name}"
            if ident in have or (ident in PUBLIC_MODULES and any(h.startswith(ident + ".") for h in have)):
                continue
            missing.append(ident)
    return missing


def on_pre_build(config):
    from mkdocs.exceptions import PluginError

    missing = undocumented(config["docs_dir"])
    if missing:
        raise PluginError("public names missing from docs/api/*.md (add a '::: name' line): " + ", ".join(missing))


def on_files(files, config):
    from mkdocs.structure.files import File

    root = Path(config["docs_dir"]).parent
    for folder in RESULT_FOLDERS:
        for png in sorted((root / folder).rglob("*.png")):
            files.append(File(png.relative_to(root).as_posix(), str(root), config["site_dir"],
                              config["use_directory_urls"]))
    return files
