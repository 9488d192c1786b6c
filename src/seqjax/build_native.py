"""``python -m seqjax.build_native``: which native kernels this install has, and whether each loads here.

The kernels are built when seqjax is installed (CMakeLists.txt; nothing is compiled at run time).
For each library ("avx2", "avx512", "onednn", "cuda") this prints its file and size, or the reason it
is not usable and what fixes it (`seqjax.backends._library.unavailable`), and the build's details from
its manifest. Exits with status 1 if a library the install built does not load (a damaged file), else 0.

After editing ``src/seqjax/csrc/``, rebuild with the install command (the build tree in ``build/``
makes it incremental; README, Development) and run this to see the result.
"""
from __future__ import annotations

import sys

from seqjax.backends import _library as native


def main() -> int:
    status = 0
    try:
        folder, manifest = native._manifest()
    except native.NativeUnavailable as e:
        print(f"seqjax.build_native: {e}")
        return 0
    details = ", ".join(f"{k} {manifest[k]}" for k in ("jax", "cxx", "nvcc", "onednn") if manifest.get(k))
    print(f"{folder}  ({details})")
    for name in native.LIBRARIES:
        why = native.unavailable(name)
        entry = manifest["libraries"].get(name)
        if why is None:
            library = native._load(name)
            extra = f", oneDNN {library.seqjax_onednn_version().decode()}" if name == "onednn" else ""
            print(f"  {name:7s} loads      {entry['file']} ({entry['size']:,} bytes{extra})")
        else:
            built = entry is not None
            wrong_cpu = name in native._X86_BUILDS and native._cpu_blocker(name) is not None
            label = "not here" if wrong_cpu else "FAILS" if built else "absent"
            print(f"  {name:7s} {label:10s} {why}")
            status |= built and not wrong_cpu  # built, for this CPU, and does not load: a damaged install
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
