import os
import sys

# The tests import their helpers (reference.py, registry.py, example_runs.py) by module name. The XLA flags the
# tests run with are set in the repository's top-level conftest.py.
sys.path.insert(0, os.path.dirname(__file__))
