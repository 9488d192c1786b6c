"""Builds and loads seqjax's native CPU kernels (`seqjax/csrc/*.cc`) and registers them with XLA's FFI.

The kernels link against oneDNN, installed with ``pip install 'seqjax[onednn]'``
(the ``onednn-cpu-gomp`` library and ``onednn-devel-cpu-gomp`` headers). They are
compiled with the system C++ compiler (``$CXX``, default ``g++``) on first use,
about 10 s, into a cache folder (``$SEQJAX_CACHE_DIR``, default
``~/.cache/seqjax``), keyed by the source, the compiler command and the
versions of jax and oneDNN; later processes load the cached library.
``python -m seqjax.build_native`` builds it ahead of time and prints where it is.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import site
import subprocess
import sys
import warnings
from pathlib import Path

import jax

__all__ = ["NativeUnavailable", "load_onednn", "onednn_installed", "onednn_location", "onednn_usable"]

_SOURCE = Path(__file__).with_name("csrc") / "onednn_rnn.cc"
_INSTALL_HINT = "install it with: pip install 'seqjax[onednn]'"


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here (oneDNN or a C++ compiler missing, or the build failed)."""


def onednn_location() -> tuple[Path, Path]:
    """``(include_dir, lib_dir)`` of the oneDNN installation the kernels build against.

    Looks in ``$SEQJAX_ONEDNN_ROOT`` if set, else where pip puts the
    ``onednn-cpu-gomp`` wheels' ``include/`` and ``lib/``: this environment's
    prefix, the user base (``pip install --user``), the base interpreter's prefix.

    Raises:
      NativeUnavailable: no ``oneapi/dnnl/dnnl.hpp`` and ``libdnnl.so`` there.
    """
    root = os.environ.get("SEQJAX_ONEDNN_ROOT")
    roots = [Path(root)] if root else [Path(sys.prefix), Path(site.getuserbase()), Path(sys.base_prefix)]
    for r in roots:
        inc, lib = r / "include", r / "lib"
        if (inc / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and any(lib.glob("libdnnl.so*")):
            return inc, lib
    where = "$SEQJAX_ONEDNN_ROOT=" + root if root else " or ".join(str(r) for r in roots)
    raise NativeUnavailable(f"oneDNN not found (looked for include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so in "
                            f"{where}); {_INSTALL_HINT}")


def _cache_dir() -> Path:
    base = os.environ.get("SEQJAX_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "seqjax"


def _toolchain() -> tuple[str, Path, Path]:
    """``(compiler, oneDNN include dir, oneDNN lib dir)``; raises `NativeUnavailable` naming what is missing."""
    inc, lib = onednn_location()
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise NativeUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX); it builds the oneDNN kernels")
    return cxx, inc, lib


def _compile_command(toolchain: tuple[str, Path, Path], out: Path) -> list[str]:
    cxx, inc, lib = toolchain
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", str(_SOURCE),
            "-isystem", jax.ffi.include_dir(), "-isystem", str(inc), f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}",
            "-o", str(out)]


def _build() -> Path:
    """The path of the compiled kernel library, compiling it first if the cache lacks it."""
    toolchain = _toolchain()
    probe = _compile_command(toolchain, Path("OUT"))
    version_header = toolchain[1] / "oneapi" / "dnnl" / "dnnl_version.h"
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(probe).encode(), jax.__version__.encode(),
                 version_header.read_bytes() if version_header.is_file() else b""):
        key.update(part)
    cache = _cache_dir()
    target = cache / f"onednn_rnn-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process compiles, the others wait and reuse its result
        if target.is_file():
            return target
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = _compile_command(toolchain, tmp)
        print(f"seqjax.native: compiling the oneDNN kernels into {target} (once, ~10 s)", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise NativeUnavailable(f"compiling {_SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        os.replace(tmp, target)
    return target


@functools.cache
def load_onednn() -> ctypes.CDLL:
    """The oneDNN kernel library, built if needed, with its FFI targets registered for the CPU.

    Registers ``seqjax_onednn_rnn_forward`` and ``seqjax_onednn_rnn_backward``.

    Raises:
      NativeUnavailable: oneDNN or the compiler is missing, or the build failed.
    """
    lib = ctypes.CDLL(str(_build()))
    lib.seqjax_onednn_workspace_bytes.restype = ctypes.c_int64
    lib.seqjax_onednn_workspace_bytes.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_int] * 3 + [
        ctypes.c_char_p, ctypes.c_int64]
    lib.seqjax_onednn_version.restype = ctypes.c_char_p
    for name, symbol in [("seqjax_onednn_rnn_forward", lib.SeqjaxOnednnRnnForward),
                         ("seqjax_onednn_rnn_backward", lib.SeqjaxOnednnRnnBackward)]:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return lib


@functools.cache
def onednn_installed() -> bool:
    """Whether oneDNN and a C++ compiler are here, so `load_onednn` can build (checked once per process)."""
    try:
        _toolchain()
    except NativeUnavailable:
        return False
    return True


@functools.cache
def onednn_usable() -> bool:
    """Whether `load_onednn` succeeds; a failure is reported once as a warning (``kernel="auto"`` falls back)."""
    try:
        load_onednn()
    except NativeUnavailable as e:
        warnings.warn(f"seqjax: the oneDNN kernels are installed but unusable, using XLA's loop instead: {e}",
                      RuntimeWarning, stacklevel=2)
        return False
    return True
