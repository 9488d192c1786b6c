"""A pytest plugin that lets ``kernel="auto"`` take seqjax's CUDA kernels (`seqjax.backends._cuda.AUTO = True`).

For the GPU run that decides whether to switch `AUTO` on for good: it routes
the whole suite's ``seqjax.scan`` calls through the kernels wherever they
apply. ``bash bench/gpu.sh OUT tests-cuda-auto`` runs it; by hand:
``PYTHONPATH=tests python -m pytest -p cuda_auto tests/test_runners.py``.
"""
import seqjax.backends._cuda


def pytest_configure(config):
    seqjax.backends._cuda.AUTO = True
