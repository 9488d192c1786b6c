"""Loads seqjax's native kernels from the installed package and registers them with XLA's FFI.

The kernels (``src/seqjax/csrc/``) are compiled when seqjax is installed (``pip install .`` or
``pip install -e .``; ``CMakeLists.txt``, built by scikit-build-core) into the package's ``_native/``
folder, with a ``manifest.json`` that lists each library built (file, size, SHA-256) and the reason
for each one not built. Nothing is compiled at run time and nothing is written anywhere: a library
that is absent, damaged or unusable on this machine is reported by `unavailable` (the reason and the
fix in one sentence), refused by the ``load_*`` functions with `NativeUnavailable` (the same
sentence), and ``kernel="auto"`` runs XLA's loop instead.

* ``"avx2"`` and ``"avx512"``: `seqjax.avx2`'s kernels (``cpu_rnn.cc``), built for every x86-64
  install with explicit ISA flags (AVX2+FMA; AVX-512F); the one this CPU can run is picked at run
  time from ``/proc/cpuinfo`` (`_cpu_flags`).
* ``"onednn"``: `seqjax.onednn`'s kernels (``onednn_rnn.cc``), built on request
  (``-C seqjax.onednn=true``), run with oneDNN's library from ``pip install 'seqjax[onednn]'``.
* ``"cuda"``: `seqjax.cuda`'s kernels (``cuda_rnn.cu``, sm_90), built where the install finds nvcc.

Every library's file is checked before ``ctypes`` opens it (an ELF shared object of the recorded
size and hash), so a truncated or overwritten file raises `NativeUnavailable` naming it instead of
crashing the process. ``$SEQJAX_NATIVE_DIR`` points the loader at another folder (for tests).
``python -m seqjax.build_native`` prints what is installed and what loads.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import site
import sys
from pathlib import Path

import jax

__all__ = ["LIBRARIES", "NativeUnavailable", "avx2_installed", "avx2_usable", "cuda_installed", "cuda_usable",
           "load_avx2", "load_cuda", "load_onednn", "native_dir", "nvcc_location", "onednn_installed",
           "onednn_location", "onednn_usable", "unavailable"]

#: The native libraries, by the names `unavailable` takes.
LIBRARIES = ("avx2", "avx512", "onednn", "cuda")
MANIFEST = "manifest.json"
#: The environment variable that points the loader at another folder than the installed ``seqjax/_native``.
DIR_ENV = "SEQJAX_NATIVE_DIR"
_ONEDNN_HINT = "install it with: pip install 'seqjax[onednn]'"
_REINSTALL = "reinstall seqjax from source with a C++ compiler on PATH (in its repository: pip install -e .)"
#: What a reinstall needs to build each library that the install skipped.
_BUILD_HINT = {
    "avx2": _REINSTALL,
    "avx512": _REINSTALL,
    "onednn": "reinstall with them: pip install -e '.[onednn]' -C seqjax.onednn=true (or SEQJAX_ONEDNN=1)",
    "cuda": "reinstall where nvcc (CUDA >= 12) is on PATH or in $CUDA_HOME/bin: pip install -e . -C seqjax.cuda=ON",
}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here: not installed, damaged, or not for this CPU (the message says
    which and how to fix it)."""


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


#: seqjax.avx2's builds of cpu_rnn.cc (CMakeLists.txt): the CPU flags each needs and its handlers' symbol
#: prefix (the FFI targets are ``seqjax_<isa>_rnn_forward/backward/weight_grads``).
_X86_BUILDS = {
    "avx2": (("avx2", "fma"), "SeqjaxAvx2Rnn"),
    "avx512": (("avx512f", "avx2", "fma"), "SeqjaxAvx512Rnn"),
}


def _x86_build(isa: str) -> tuple:
    if isa not in _X86_BUILDS:
        raise ValueError(f"seqjax.native: isa must be one of {list(_X86_BUILDS)}, got {isa!r}")
    return _X86_BUILDS[isa]


def _cpu_blocker(isa: str) -> str | None:
    """Why this CPU cannot run `seqjax.avx2`'s ``isa`` build, or None."""
    needs = _x86_build(isa)[0]
    missing = set(needs) - _cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or missing:
        what = "AVX2 and FMA" if isa == "avx2" else "AVX-512F"
        other = "kernel='avx2' or 'xla'" if isa == "avx512" else "kernel='xla' (kernel='auto' does)"
        return (f"seqjax.avx2's {isa} kernels need an x86-64 CPU with {what}; this one is {platform.machine()}"
                f"{' without ' + ', '.join(sorted(missing)) if missing else ''}, so use {other}")
    return None


# --- where the libraries are, and the manifest --------------------------------------------------------------

def native_dir() -> Path | None:
    """The folder the kernels load from: ``$SEQJAX_NATIVE_DIR`` if set, else the installed package's ``_native/``
    that holds a manifest (in an editable install, the install tree's, which ``seqjax.__path__`` lists beside
    the source tree); None where there is none."""
    given = os.environ.get(DIR_ENV)
    if given:
        return Path(given)
    import seqjax
    for entry in getattr(seqjax, "__path__", ()):
        folder = Path(entry) / "_native"
        if (folder / MANIFEST).is_file():
            return folder
    return None


@functools.cache
def _manifest() -> tuple[Path, dict]:
    """``(folder, manifest)``; raises `NativeUnavailable` where there is none or it cannot be read."""
    folder = native_dir()
    if folder is None:
        import seqjax
        where = " or ".join(str(Path(p) / "_native") for p in getattr(seqjax, "__path__", ()))
        raise NativeUnavailable(f"seqjax was installed without its native kernels (SEQJAX_NATIVE=OFF: no {MANIFEST} "
                                f"in {where}); {_REINSTALL}")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("libraries"), dict):
            raise ValueError("no 'libraries' table")
    except FileNotFoundError:
        raise NativeUnavailable(f"no native kernels in {folder} (no {MANIFEST}"
                                f"{'; $' + DIR_ENV + ' points there' if os.environ.get(DIR_ENV) else ''}); "
                                f"{_REINSTALL}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise NativeUnavailable(f"{path} is unreadable ({e}); {_REINSTALL}") from None
    return folder, manifest


def _entry(name: str) -> tuple[Path, dict] | None:
    """``(path, manifest entry)`` of library ``name`` if the install built it, else None (no validation)."""
    try:
        folder, manifest = _manifest()
    except NativeUnavailable:
        return None
    entry = manifest["libraries"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return None
    return folder / entry["file"], entry


_ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "ppc64le": 21, "s390x": 22}


def _check_file(path: Path, entry: dict) -> None:
    """Raises `NativeUnavailable` naming ``path`` unless it is the shared object the install recorded: its size and
    SHA-256 in the manifest, an ELF header for this machine, and its headers' tables inside the file.

    ``ctypes.CDLL`` maps the file: a truncated one kills the process with SIGBUS when the loader touches a page
    past its end, and a garbage one may do anything; neither reaches it.
    """
    fix = "reinstall seqjax (pip install --force-reinstall --no-deps, or pip install -e . in its repository)"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NativeUnavailable(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    size, digest = entry.get("size"), entry.get("sha256")
    if len(data) != size:
        raise NativeUnavailable(f"{path} is damaged: {len(data)} bytes where the install wrote {size}; {fix}")
    problem = _elf_problem(data[:64], len(data))
    if problem:
        raise NativeUnavailable(f"{path} is damaged: {problem}; {fix}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise NativeUnavailable(f"{path} is damaged: its SHA-256 differs from the one the install recorded; {fix}")


def _elf_problem(data: bytes, size: int) -> str | None:
    """What makes a file of ``size`` bytes that starts with ``data`` (at least its first 64 bytes) not a 64-bit
    little-endian ELF shared object for this machine, or None."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return "not an ELF file"
    if data[4] != 2 or data[5] != 1:
        return "not a 64-bit little-endian ELF file"
    e_type, e_machine = int.from_bytes(data[16:18], "little"), int.from_bytes(data[18:20], "little")
    if e_type != 3:
        return f"not an ELF shared object (e_type {e_type})"
    want = _ELF_MACHINES.get(platform.machine().lower())
    if want is not None and e_machine != want:
        return f"built for ELF machine {e_machine}, not this {platform.machine()} ({want})"
    phoff, shoff = int.from_bytes(data[32:40], "little"), int.from_bytes(data[40:48], "little")
    phentsize, phnum = int.from_bytes(data[54:56], "little"), int.from_bytes(data[56:58], "little")
    shentsize, shnum = int.from_bytes(data[58:60], "little"), int.from_bytes(data[60:62], "little")
    if phoff + phentsize * phnum > size or shoff + shentsize * shnum > size:
        return f"truncated ({size} bytes: its ELF header tables reach past the end)"
    return None


# --- loading ----------------------------------------------------------------------------------------------

_loaded: dict[str, ctypes.CDLL | NativeUnavailable] = {}


def _open(name: str) -> ctypes.CDLL:
    """Library ``name``, checked and opened (not registered); raises `NativeUnavailable` with the reason and fix."""
    if name in _X86_BUILDS:
        blocker = _cpu_blocker(name)
        if blocker:
            raise NativeUnavailable(blocker)
    folder, manifest = _manifest()
    found = _entry(name)
    if found is None:
        reason = manifest.get("skipped", {}).get(name, f"{MANIFEST} in {folder} lists no {name!r} library")
        raise NativeUnavailable(f"seqjax was installed without its {name} kernels ({reason}); {_BUILD_HINT[name]}")
    path, entry = found
    _check_file(path, entry)
    if name == "onednn":
        # onednn_rnn.so needs libdnnl.so.3 (by soname, no rpath): open the environment's first, globally, so that
        # the dynamic loader resolves it to that one.
        dnnl = _dnnl_library()
        try:
            with open(dnnl, "rb") as f:
                problem = _elf_problem(f.read(64), os.fstat(f.fileno()).st_size)
            if problem:
                raise NativeUnavailable(f"oneDNN's library {dnnl} is damaged: {problem}; reinstall it: "
                                        f"pip install --force-reinstall 'seqjax[onednn]'")
            ctypes.CDLL(str(dnnl), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise NativeUnavailable(f"oneDNN's library {dnnl} does not load ({e}); {_ONEDNN_HINT}") from None
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"{path} does not load ({e}); {_BUILD_HINT[name]}") from None


def _register(lib: ctypes.CDLL, target: str, symbol: str, platform: str,
              steps: tuple = ("forward", "backward")) -> ctypes.CDLL:
    """Registers ``lib``'s handlers ``<symbol>Forward``, ``<symbol>Backward``, ... as the FFI targets
    ``<target>_forward``, ``<target>_backward``, ... (one per entry of ``steps``, e.g. "weight_grads" ->
    ``<symbol>WeightGrads``)."""
    for step in steps:
        handler = getattr(lib, symbol + "".join(word.capitalize() for word in step.split("_")))
        jax.ffi.register_ffi_target(f"{target}_{step}", jax.ffi.pycapsule(handler), platform=platform)
    return lib


def _setup(name: str, lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares ``lib``'s plain C functions and registers its FFI targets."""
    if name in _X86_BUILDS:
        return _register(lib, f"seqjax_{name}_rnn", _x86_build(name)[1], "cpu", ("forward", "backward", "weight_grads"))
    if name == "onednn":
        lib.seqjax_onednn_workspace_bytes.restype = ctypes.c_int64
        lib.seqjax_onednn_workspace_bytes.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_int] * 3 + [
            ctypes.c_char_p, ctypes.c_int64]
        lib.seqjax_onednn_version.restype = ctypes.c_char_p
        return _register(lib, "seqjax_onednn_rnn", "SeqjaxOnednnRnn", "cpu")
    for planner in (lib.seqjax_cuda_plan, lib.seqjax_cuda_plan_model):
        planner.restype = ctypes.c_int
        planner.argtypes = [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int64]
    return _register(lib, "seqjax_cuda_rnn", "SeqjaxCudaRnn", "CUDA")


def _load(name: str) -> ctypes.CDLL:
    """Library ``name`` with its FFI targets registered, opened once per process; a failure is remembered too and
    raised again (`NativeUnavailable`)."""
    if name not in _loaded:
        try:
            _loaded[name] = _setup(name, _open(name))
        except NativeUnavailable as e:
            _loaded[name] = e
        except Exception as e:  # noqa: BLE001  e.g. a library of an older build without a handler
            _loaded[name] = NativeUnavailable(f"seqjax's {name} kernels do not load ({type(e).__name__}: {e}); "
                                              f"{_BUILD_HINT[name]}")
    got = _loaded[name]
    if isinstance(got, NativeUnavailable):
        raise NativeUnavailable(str(got))
    return got


def unavailable(library: str) -> str | None:
    """None if the ``library`` kernels ("avx2", "avx512", "onednn" or "cuda") load here, else why not and what
    fixes it, in one sentence (e.g. ``"seqjax was installed without its native kernels (...); reinstall ..."``).

    Decided once per process (it loads the library); never raises, never warns. For "cuda" None means the
    library loads, not that a GPU is here.
    """
    if library not in LIBRARIES:
        return f"unknown native library {library!r}: seqjax has {', '.join(LIBRARIES)}"
    try:
        _load(library)
    except NativeUnavailable as e:
        return str(e)
    except Exception as e:  # noqa: BLE001  (never raises: any other failure is a reason too)
        return f"seqjax's {library} kernels do not load ({type(e).__name__}: {e}); {_BUILD_HINT[library]}"
    return None


def _reset() -> None:
    """Forgets what this process loaded or found (for tests that change `_cpu_flags` or ``$SEQJAX_NATIVE_DIR``).
    Libraries stay open and their FFI targets registered."""
    _loaded.clear()
    for cached in (_manifest, onednn_installed, onednn_usable, cuda_installed, cuda_usable, avx2_installed,
                   avx2_usable):
        cached.cache_clear()


# --- oneDNN ------------------------------------------------------------------------------------------------

def onednn_location() -> tuple[Path, Path]:
    """``(include_dir, lib_dir)`` of the oneDNN installation the kernels run with (``include_dir`` need not
    exist: only the library is needed at run time).

    Looks in ``$SEQJAX_ONEDNN_ROOT`` if set, else where pip puts the ``onednn-cpu-gomp`` wheel's
    ``lib/``: this environment's prefix, the user base (``pip install --user``), the base interpreter's prefix.

    Raises:
      NativeUnavailable: no ``lib/libdnnl.so*`` there.
    """
    root = os.environ.get("SEQJAX_ONEDNN_ROOT")
    roots = [Path(root)] if root else [Path(sys.prefix), Path(site.getuserbase()), Path(sys.base_prefix)]
    for r in roots:
        if any((r / "lib").glob("libdnnl.so*")):
            return r / "include", r / "lib"
    where = "$SEQJAX_ONEDNN_ROOT=" + root if root else " or ".join(str(r) for r in roots)
    raise NativeUnavailable(f"oneDNN not found (looked for lib/libdnnl.so in {where}); {_ONEDNN_HINT}")


def _dnnl_library() -> Path:
    lib = onednn_location()[1]
    return lib / "libdnnl.so.3" if (lib / "libdnnl.so.3").is_file() else sorted(lib.glob("libdnnl.so*"))[0]


def load_onednn() -> ctypes.CDLL:
    """The oneDNN kernel library, with its FFI targets registered for the CPU (opened once per process).

    Registers ``seqjax_onednn_rnn_forward`` and ``seqjax_onednn_rnn_backward``.

    Raises:
      NativeUnavailable: the install did not build them, oneDNN's library is missing, or a file is damaged.
    """
    return _load("onednn")


@functools.cache
def onednn_installed() -> bool:
    """Whether the install built the oneDNN kernels and oneDNN's library is here (no file is opened)."""
    if _entry("onednn") is None:
        return False
    try:
        onednn_location()
    except NativeUnavailable:
        return False
    return True


def _usable(load) -> bool:
    """Whether ``load()`` succeeds (no warning: `unavailable` says why not)."""
    try:
        load()
    except NativeUnavailable:
        return False
    return True


@functools.cache
def onednn_usable() -> bool:
    """Whether `load_onednn` succeeds (decided once per process)."""
    return _usable(load_onednn)


# --- CUDA --------------------------------------------------------------------------------------------------

def nvcc_location() -> str:
    """The CUDA compiler an install from source would find (for `seqjax.build_native`'s report; the kernels are
    built by the install, see CMakeLists.txt).

    ``$SEQJAX_NVCC``, else ``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else ``nvcc`` on ``PATH``, else
    ``/usr/local/cuda/bin/nvcc``.

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
                            "(set $SEQJAX_NVCC)")


def load_cuda() -> ctypes.CDLL:
    """The CUDA kernel library, with its FFI targets registered for CUDA (opened once per process; no GPU needed).

    Registers ``seqjax_cuda_rnn_forward`` and ``seqjax_cuda_rnn_backward``.

    Raises:
      NativeUnavailable: the install did not build them (no nvcc there), or the file is damaged.
    """
    return _load("cuda")


@functools.cache
def cuda_installed() -> bool:
    """Whether the install built the CUDA kernels (no file is opened)."""
    return _entry("cuda") is not None


@functools.cache
def cuda_usable() -> bool:
    """Whether `load_cuda` succeeds (decided once per process)."""
    return _usable(load_cuda)


# --- AVX2 and AVX-512 --------------------------------------------------------------------------------------

def load_avx2(isa: str = "avx2") -> ctypes.CDLL:
    """`seqjax.avx2`'s kernel library for ``isa``, with its FFI targets registered for the CPU (opened once per
    process).

    Registers ``seqjax_<isa>_rnn_forward``, ``seqjax_<isa>_rnn_backward`` and ``seqjax_<isa>_rnn_weight_grads``.

    Raises:
      ValueError: ``isa`` is neither "avx2" nor "avx512".
      NativeUnavailable: the CPU lacks the instructions, the install did not build them, or the file is damaged.
    """
    _x86_build(isa)
    return _load(isa)


@functools.cache
def avx2_installed(isa: str = "avx2") -> bool:
    """Whether this CPU has the instructions of ``isa`` and the install built its library (no file is opened)."""
    return _cpu_blocker(isa) is None and _entry(isa) is not None


@functools.cache
def avx2_usable(isa: str = "avx2") -> bool:
    """Whether ``load_avx2(isa)`` succeeds (decided once per process)."""
    return _usable(functools.partial(load_avx2, isa))
