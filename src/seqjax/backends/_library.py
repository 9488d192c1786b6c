"""Builds and loads seqjax's native kernels (`seqjax/csrc/`) and registers them with XLA's FFI.

The libraries are each compiled on first use into a cache folder (``$SEQJAX_CACHE_DIR``,
default ``~/.cache/seqjax``), keyed by the source, the compiler command and the
versions involved; later processes load the cached library.

**oneDNN (CPU).** The kernels link against oneDNN, installed with ``pip install 'seqjax[onednn]'``
(the ``onednn-cpu-gomp`` library and ``onednn-devel-cpu-gomp`` headers). They are
compiled with the system C++ compiler (``$CXX``, default ``g++``) on first use,
about 10 s. ``python -m seqjax.build_native`` builds it ahead of time and prints where it is.

**AVX2 and AVX-512 (x86 CPUs).** `seqjax.avx2`'s kernels (``cpu_rnn.cc``) need only a C++
compiler (``$CXX``, default ``g++``), 20–35 s per build on a 2-core machine (measured: AVX2 18 s,
AVX-512 33 s with g++ 12), and a CPU with AVX2 and FMA
(the ``"avx2"`` build) or AVX-512F (the ``"avx512"`` build, from the same source).

**CUDA (Hopper GPUs).** `seqjax.cuda`'s persistent kernels (``cuda_rnn.cu``) are
compiled with ``nvcc`` for sm_90 (about a minute) and need nothing beyond the CUDA
toolkit's compiler: ``$SEQJAX_NVCC``, ``$CUDA_HOME/bin/nvcc``, ``nvcc`` on
``PATH`` or ``/usr/local/cuda/bin/nvcc``, in that order.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import site
import subprocess
import sys
from pathlib import Path

import jax

__all__ = ["NativeUnavailable", "avx2_installed", "avx2_usable", "build_avx2", "build_cuda", "cuda_installed",
           "cuda_usable", "load_avx2", "load_cuda", "load_onednn", "nvcc_location", "onednn_installed",
           "onednn_location", "onednn_usable"]

_SOURCE = Path(__file__).parent.parent / "csrc" / "onednn_rnn.cc"
_CUDA_SOURCE = Path(__file__).parent.parent / "csrc" / "cuda_rnn.cu"
_AVX2_SOURCE = Path(__file__).parent.parent / "csrc" / "cpu_rnn.cc"
_INSTALL_HINT = "install it with: pip install 'seqjax[onednn]'"


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here (oneDNN, a C++ compiler or nvcc missing, or the build failed)."""


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


def _compiler(what: str) -> str:
    """The C++ compiler, ``$CXX`` or ``g++``; raises `NativeUnavailable` if it is not on PATH."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise NativeUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX); it builds {what}")
    return cxx


def _toolchain() -> tuple[str, Path, Path]:
    """``(compiler, oneDNN include dir, oneDNN lib dir)``; raises `NativeUnavailable` naming what is missing."""
    inc, lib = onednn_location()
    return _compiler("the oneDNN kernels"), inc, lib


def _compile_command(toolchain: tuple[str, Path, Path], out: Path) -> list[str]:
    cxx, inc, lib = toolchain
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", str(_SOURCE),
            "-isystem", jax.ffi.include_dir(), "-isystem", str(inc), f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}",
            "-o", str(out)]


def _build() -> Path:
    """The path of the compiled oneDNN kernel library, compiling it first if the cache lacks it."""
    toolchain = _toolchain()
    version_header = toolchain[1] / "oneapi" / "dnnl" / "dnnl_version.h"
    return _cached_build("onednn_rnn", _SOURCE, lambda out: _compile_command(toolchain, out),
                         version_header.read_bytes() if version_header.is_file() else b"", "the oneDNN kernels", "~10 s")


def _cached_build(stem: str, source: Path, command, version: bytes, what: str, duration: str) -> Path:
    """Compiles ``source`` with ``command(out_path)`` into the cache unless it holds the result already.

    The cache key covers the source, the command, jax's version and ``version``
    (the versions of what the library builds against).
    """
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(command(Path("OUT"))).encode(), jax.__version__.encode(), version):
        key.update(part)
    cache = _cache_dir()
    target = cache / f"{stem}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process compiles, the others wait and reuse its result
        if target.is_file():
            return target
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = command(tmp)
        print(f"seqjax.native: compiling {what} into {target} (once, {duration})", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise NativeUnavailable(f"compiling {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        os.replace(tmp, target)
    return target


def _register(lib: ctypes.CDLL, target: str, symbol: str, platform: str,
              steps: tuple = ("forward", "backward")) -> ctypes.CDLL:
    """Registers ``lib``'s handlers ``<symbol>Forward``, ``<symbol>Backward``, ... as the FFI targets
    ``<target>_forward``, ``<target>_backward``, ... (one per entry of ``steps``, e.g. "weight_grads" ->
    ``<symbol>WeightGrads``)."""
    for step in steps:
        handler = getattr(lib, symbol + "".join(word.capitalize() for word in step.split("_")))
        jax.ffi.register_ffi_target(f"{target}_{step}", jax.ffi.pycapsule(handler), platform=platform)
    return lib


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
    return _register(lib, "seqjax_onednn_rnn", "SeqjaxOnednnRnn", "cpu")


@functools.cache
def onednn_installed() -> bool:
    """Whether oneDNN and a C++ compiler are here, so `load_onednn` can build (checked once per process)."""
    try:
        _toolchain()
    except NativeUnavailable:
        return False
    return True


def _usable(load, what: str) -> bool:
    """Whether ``load()`` succeeds."""
    try:
        load()
    except NativeUnavailable:
        return False
    return True


@functools.cache
def onednn_usable() -> bool:
    """Whether `load_onednn` succeeds; a failure is reported once as a warning (``kernel="auto"`` falls back)."""
    return _usable(load_onednn, "the oneDNN kernels are installed but")


def nvcc_location() -> str:
    """The CUDA compiler that builds `seqjax.cuda`'s kernels.

    ``$SEQJAX_NVCC``, else ``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else
    ``nvcc`` on ``PATH``, else ``/usr/local/cuda/bin/nvcc``.

    Raises:
      NativeUnavailable: none of them exists.
    """
    given = os.environ.get("SEQJAX_NVCC")
    if given:
        if shutil.which(given) is None:
            raise NativeUnavailable(f"$SEQJAX_NVCC={given!r} is not an executable")
        return shutil.which(given)
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    for cand in [str(Path(h) / "bin" / "nvcc") for h in homes if h] + ["nvcc", "/usr/local/cuda/bin/nvcc"]:
        found = shutil.which(cand)
        if found:
            return found
    raise NativeUnavailable("no CUDA compiler: nvcc is not in $CUDA_HOME/bin, on PATH or in /usr/local/cuda/bin "
                            "(set $SEQJAX_NVCC); it builds seqjax.cuda's kernels")


def _cuda_compile_command(nvcc: str, out: Path) -> list[str]:
    return [nvcc, "-O3", "-std=c++17", "-arch=sm_90", "--shared", "-Xcompiler", "-fPIC", str(_CUDA_SOURCE),
            "-isystem", jax.ffi.include_dir(), "-o", str(out)]


def build_cuda() -> Path:
    """The path of the compiled CUDA kernel library, compiling it first if the cache lacks it (no GPU needed)."""
    nvcc = nvcc_location()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode()
    return _cached_build("cuda_rnn", _CUDA_SOURCE, lambda out: _cuda_compile_command(nvcc, out), version,
                         "the CUDA kernels", "~1 min")


@functools.cache
def load_cuda() -> ctypes.CDLL:
    """The CUDA kernel library, built if needed, with its FFI targets registered for CUDA.

    Registers ``seqjax_cuda_rnn_forward`` and ``seqjax_cuda_rnn_backward``.

    Raises:
      NativeUnavailable: nvcc is missing or the build failed.
    """
    lib = ctypes.CDLL(str(build_cuda()))
    for planner in (lib.seqjax_cuda_plan, lib.seqjax_cuda_plan_model):
        planner.restype = ctypes.c_int
        planner.argtypes = [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int64]
    return _register(lib, "seqjax_cuda_rnn", "SeqjaxCudaRnn", "CUDA")


@functools.cache
def cuda_usable() -> bool:
    """Whether `load_cuda` succeeds; a failure is reported once as a warning (``kernel="auto"`` falls back)."""
    return _usable(load_cuda, "nvcc is here but the CUDA kernels are")


@functools.cache
def cuda_installed() -> bool:
    """Whether nvcc is here, so `load_cuda` can build (checked once per process)."""
    try:
        nvcc_location()
    except NativeUnavailable:
        return False
    return True


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: seqjax.avx2's builds of cpu_rnn.cc: the CPU flags each needs, its compiler flags and its handlers' symbol
#: prefix (the FFI targets are ``seqjax_<isa>_rnn_forward/backward``). GCC 12's avx512fintrin.h trips its own
#: -Wmaybe-uninitialized (``__m512 __Y = __Y``), hence the two -Wno flags.
_X86_BUILDS = {
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma"), "SeqjaxAvx2Rnn"),
    "avx512": (("avx512f", "avx2", "fma"), ("-mavx512f", "-mavx2", "-mfma", "-DSEQJAX_AVX512",
                                            "-Wno-uninitialized", "-Wno-maybe-uninitialized"), "SeqjaxAvx512Rnn"),
}


def _x86_build(isa: str) -> tuple:
    if isa not in _X86_BUILDS:
        raise ValueError(f"seqjax.native: isa must be one of {list(_X86_BUILDS)}, got {isa!r}")
    return _X86_BUILDS[isa]


def _avx2_toolchain(isa: str = "avx2") -> str:
    """The C++ compiler for `seqjax.avx2`'s ``isa`` build; raises `NativeUnavailable` if it or a CPU feature is missing."""
    needs = _x86_build(isa)[0]
    missing = set(needs) - _cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or missing:
        what = "AVX2 and FMA" if isa == "avx2" else "AVX-512F"
        raise NativeUnavailable(f"seqjax.avx2's {isa} kernels need an x86-64 CPU with {what}; this one is "
                                f"{platform.machine()}{' without ' + ', '.join(sorted(missing)) if missing else ''}")
    return _compiler("seqjax.avx2's kernels")


def _avx2_compile_command(cxx: str, out: Path, isa: str = "avx2") -> list[str]:
    return [cxx, "-O3", "-std=c++17", *_x86_build(isa)[1], "-shared", "-fPIC", "-Wall", str(_AVX2_SOURCE),
            "-isystem", jax.ffi.include_dir(), "-o", str(out)]


def build_avx2(isa: str = "avx2") -> Path:
    """The path of the compiled kernel library of `seqjax.avx2` for ``isa`` ("avx2" or "avx512"), compiling it
    first if the cache lacks it."""
    cxx = _avx2_toolchain(isa)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode()
    return _cached_build(f"cpu_rnn_{isa}", _AVX2_SOURCE, lambda out: _avx2_compile_command(cxx, out, isa), version,
                         f"the {isa} kernels", "20-35 s on 2 cores")


@functools.cache
def load_avx2(isa: str = "avx2") -> ctypes.CDLL:
    """`seqjax.avx2`'s kernel library for ``isa``, built if needed, with its FFI targets registered for the CPU.

    Registers ``seqjax_<isa>_rnn_forward``, ``seqjax_<isa>_rnn_backward`` and ``seqjax_<isa>_rnn_weight_grads``.

    Raises:
      ValueError: ``isa`` is neither "avx2" nor "avx512".
      NativeUnavailable: the CPU lacks the instructions, the compiler is missing, or the build failed.
    """
    return _register(ctypes.CDLL(str(build_avx2(isa))), f"seqjax_{isa}_rnn", _x86_build(isa)[2], "cpu",
                     ("forward", "backward", "weight_grads"))


@functools.cache
def avx2_installed(isa: str = "avx2") -> bool:
    """Whether this CPU has the instructions of ``isa`` and a C++ compiler is here, so `load_avx2` can build."""
    try:
        _avx2_toolchain(isa)
    except NativeUnavailable:
        return False
    return True


@functools.cache
def avx2_usable(isa: str = "avx2") -> bool:
    """Whether ``load_avx2(isa)`` succeeds; a failure is reported once as a warning (``kernel="auto"`` falls back)."""
    return _usable(functools.partial(load_avx2, isa), f"the {isa} kernels could be built but")


_LOADERS = {"avx2": lambda: load_avx2("avx2"), "avx512": lambda: load_avx2("avx512"), "onednn": lambda: load_onednn(),
            "cuda": lambda: load_cuda()}
_PRECHECKS = {"avx2": lambda: _avx2_toolchain("avx2"), "avx512": lambda: _avx2_toolchain("avx512"),
              "onednn": _toolchain, "cuda": nvcc_location}


@functools.cache
def unavailable(library: str) -> str | None:
    """None if ``library`` ("avx2", "avx512", "onednn" or "cuda") loads here, else why not; never raises."""
    try:
        _PRECHECKS[library]()
        _LOADERS[library]()
    except (NativeUnavailable, OSError) as e:
        return str(e)
    return None
