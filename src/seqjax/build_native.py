"""``python -m seqjax.build_native``: builds the oneDNN kernels ahead of time (or finds them cached) and prints where.

Exits with status 1 and the reason when they cannot be built (see `seqjax.native`).
"""
import sys

from seqjax.native import NativeUnavailable, load_onednn


def main() -> int:
    try:
        library = load_onednn()
    except NativeUnavailable as e:
        print(f"seqjax.build_native: {e}", file=sys.stderr)
        return 1
    print(f"{library._name}  (oneDNN {library.seqjax_onednn_version().decode()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
