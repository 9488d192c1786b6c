"""The registry of tests/registry.py covers every public cell factory and variant."""
import inspect

import seqjax
from registry import CELLS, FACTORIES


def test_registry_covers_public_cells():
    public_cells = set()
    for name in seqjax.__all__:
        obj = getattr(seqjax, name)
        if inspect.isfunction(obj) and inspect.signature(obj).return_annotation in ("Cell", seqjax.Cell):
            public_cells.add(name)
    assert public_cells == set(FACTORIES), f"register these cell factories in tests/registry.py: " \
                                           f"{public_cells ^ set(FACTORIES)}"
    for entries in FACTORIES.values():
        assert set(entries) <= set(CELLS)
    assert {f"lstm_{v}" for v in seqjax.GREFF_VARIANTS} <= set(CELLS)


def test_every_registered_cell_builds():
    for name, make in CELLS.items():
        assert isinstance(make(), seqjax.Cell), name
