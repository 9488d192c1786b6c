"""One process of a data-parallel `seqjax.fit` under `jax.distributed` (launched twice by tests/test_multiprocess.py).

Usage: ``python tests/multiprocess_fit.py PROCESS_ID NUM_PROCESSES PORT OUT.json CKPT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: each process brings 2 CPU devices, the mesh spans all of them,
and the processes exchange gradients with Gloo's CPU collectives. Each process passes the same global batches. The
runs are the cases of tests/sharded_fit_checks.py, plus one killed after step 4 (a checkpoint written by every
process with Orbax) and resumed; process 0 writes the params and losses to OUT.json.
"""
from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, num_processes: int, port: int, out_path: str, ckpt_dir: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes, process_id=process_id,
                               initialization_timeout=120)
    import numpy as np
    from jax.sharding import AxisType

    import sharded_fit_checks as checks  # next to this script
    from seqjax.checkpoint import Checkpoints

    leaves = lambda tree: [np.asarray(a).tolist() for a in jax.tree.leaves(tree)]  # replicated: read locally
    mesh = jax.make_mesh((jax.device_count(),), ("b",), axis_types=(AxisType.Auto,))
    out = {"process_count": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count()}
    for case in ("loop-callable", "compiled-iterator"):
        state, history = checks.fit(case, mesh)
        out[case] = {"params": leaves(state.params),
                     "losses": checks.losses(history)}
    checks.fit("compiled-iterator", mesh, num_steps=4, checkpoint=Checkpoints(ckpt_dir, every=2))
    state, history = checks.fit("compiled-iterator", mesh, checkpoint=Checkpoints(ckpt_dir, every=2))
    out["resumed"] = {"params": leaves(state.params),
                      "losses": checks.losses(history)}
    if process_id == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
