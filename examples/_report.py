"""What every example does last: write DIR/results.json (with the JAX version and backend) and say so."""
from __future__ import annotations

import json
import os
import time

import jax


def write_results(out: str, results: dict, written: list[str], t0: float) -> dict:
    """Adds ``jax_version``, ``backend`` and ``wall_seconds`` to ``results``, writes ``out/results.json``.

    Args:
      out: the example's output directory (it exists).
      results: the printed numbers and the settings that produced them (JSON-serialisable).
      written: the other files the example wrote into ``out`` (plots, checkpoints), for the message.
      t0: `time.perf_counter()` at the start of the run.

    Returns:
      ``results``, with the added fields.
    """
    results.setdefault("jax_version", jax.__version__)
    results.setdefault("backend", jax.default_backend())
    results.setdefault("wall_seconds", time.perf_counter() - t0)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {path}" + (f" and {', '.join(written)}" if written else "") +
          f" in {results['wall_seconds']:.0f}s")
    return results
