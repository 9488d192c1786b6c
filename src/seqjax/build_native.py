"""``python -m seqjax.build_native``: builds the CPU kernels ahead of time (or finds them cached) and prints where.

The AVX2 kernels (`seqjax.avx2`), their AVX-512 build where the CPU has AVX-512F,
and the oneDNN kernels (`seqjax.onednn`). Exits with status 1 and the reason when
one cannot be built (see `seqjax.native`).
"""
import functools
import sys

from seqjax.backends._library import NativeUnavailable, avx2_installed, load_avx2, load_onednn


def main() -> int:
    status = 0
    builds = [("AVX2", load_avx2)]
    if avx2_installed("avx512"):
        builds.append(("AVX-512", functools.partial(load_avx2, "avx512")))
    for what, load in (*builds, ("oneDNN", load_onednn)):
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
