"""``python -m seqjax.build_native``: builds the CPU kernels ahead of time (or finds them cached) and prints where.

The AVX2 kernels (`seqjax.avx2`) and the oneDNN kernels (`seqjax.onednn`). Exits
with status 1 and the reason when either cannot be built (see `seqjax.native`).
"""
import sys

from seqjax.native import NativeUnavailable, load_avx2, load_onednn


def main() -> int:
    status = 0
    for what, load in (("AVX2", load_avx2), ("oneDNN", load_onednn)):
        try:
            library = load()
        except NativeUnavailable as e:
            print(f"seqjax.build_native: {e}", file=sys.stderr)
            status = 1
            continue
        version = f" {library.seqjax_onednn_version().decode()}" if what == "oneDNN" else ""
        print(f"{library._name}  ({what}{version})")
    return status


if __name__ == "__main__":
    sys.exit(main())
