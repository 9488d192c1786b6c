"""The native kernels' loader (seqjax.backends._library): kernels absent, damaged files, the ISA choice, and that
nothing is compiled or written at run time. The kernels themselves are built by the install (CMakeLists.txt)."""
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

import seqjax
from seqjax.backends import _library as native, _table, _x86

INSTALLED = native.native_dir()
needs_avx2_library = pytest.mark.skipif(not native.avx2_installed(), reason="needs the installed avx2 kernels and "
                                        "a CPU with AVX2 and FMA")


@pytest.fixture
def fresh_loader():
    """A loader that has found and loaded nothing yet in this process; forgets the test's findings after it."""
    native._reset()
    yield
    native._reset()


def _scan_targets(cell, params, xs, **kw):
    return str(jax.make_jaxpr(lambda p, x: seqjax.scan(cell, p, x, **kw)[1])(params, xs))


def _lstm(hidden=16):
    cell = seqjax.lstm(hidden)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    return cell, params, xs


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a crash there is its exit status, not this process's)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_kernels_absent_auto_runs_xla_and_explicit_kernels_name_the_reason(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path))  # an empty folder: no manifest, no libraries
    cell, params, xs = _lstm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loader never warns (the dispatch table does, once per process)
        reasons = {name: native.unavailable(name) for name in native.LIBRARIES}
    monkeypatch.setattr(_table, "_warned", set())
    with pytest.warns(RuntimeWarning, match="seqjax's avx2 kernels would run this call but are not available"):
        carry, ys = seqjax.scan(cell, params, xs)
    assert "seqjax_" not in _scan_targets(cell, params, xs)
    want_carry, want_ys = seqjax.scan(cell, params, xs, kernel="xla")
    np.testing.assert_array_equal(ys, want_ys)
    np.testing.assert_array_equal(carry.h, want_carry.h)
    for name, reason in reasons.items():
        if name == "avx512" and native._cpu_blocker("avx512"):
            assert "need an x86-64 CPU with AVX-512F" in reason
            continue
        assert f"no native kernels in {tmp_path} (no manifest.json; ${native.DIR_ENV} points there); reinstall" \
               in reason, reason
    assert not native.avx2_installed() and not native.onednn_installed() and not native.cuda_installed()
    assert not native.avx2_usable() and not native.onednn_usable() and not native.cuda_usable()
    for kernel, load in (("avx2", native.load_avx2), ("onednn", native.load_onednn)):
        if kernel == "avx2" and native._cpu_blocker("avx2"):
            continue
        with pytest.raises(native.NativeUnavailable, match=f"no native kernels in {tmp_path}"):
            seqjax.scan(cell, params, xs, kernel=kernel)
        with pytest.raises(native.NativeUnavailable, match="reinstall seqjax from source with a C\\+\\+ compiler"):
            load()
    with pytest.raises(native.NativeUnavailable, match=f"no native kernels in {tmp_path}"):
        native.load_cuda()


def test_an_install_without_kernels_says_so_and_how_to_fix_it(fresh_loader, monkeypatch):
    monkeypatch.delenv(native.DIR_ENV, raising=False)
    monkeypatch.setattr(native, "native_dir", lambda: None)
    reason = native.unavailable("avx2" if not native._cpu_blocker("avx2") else "onednn")
    assert reason.startswith("seqjax was installed without its native kernels (SEQJAX_NATIVE=OFF: no manifest.json in ")
    assert reason.endswith("; reinstall seqjax from source with a C++ compiler on PATH (in its repository: "
                           "pip install -e .)")


def test_a_library_the_install_skipped_names_the_build_option(fresh_loader, monkeypatch, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": 1, "libraries": {},
        "skipped": {"onednn": "SEQJAX_ONEDNN=OFF, the default", "cuda": "no working CUDA compiler found"}}))
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path))
    assert native.unavailable("onednn") == (
        "seqjax was installed without its onednn kernels (SEQJAX_ONEDNN=OFF, the default); reinstall with them: "
        "pip install -e '.[onednn]' -C seqjax.onednn=true (or SEQJAX_ONEDNN=1)")
    assert native.unavailable("cuda").startswith("seqjax was installed without its cuda kernels (no working CUDA "
                                                 "compiler found); reinstall where nvcc")
    assert not native.onednn_installed() and not native.cuda_installed()


def test_an_unreadable_manifest_is_a_reason(fresh_loader, monkeypatch, tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"\x00garbage")
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path))
    assert "manifest.json is unreadable (" in native.unavailable("cuda")


def test_unavailable_never_raises_and_decides_once(fresh_loader, monkeypatch):
    assert native.unavailable("cudnn") == "unknown native library 'cudnn': seqjax has avx2, avx512, onednn, cuda"
    calls = []

    def broken(name):
        calls.append(name)
        raise ZeroDivisionError("a bug in this test")
    monkeypatch.setattr(native, "_open", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = native.unavailable("cuda")
        assert native.unavailable("cuda") == first
    assert first.startswith("seqjax's cuda kernels do not load (ZeroDivisionError: a bug in this test); reinstall")
    with pytest.raises(native.NativeUnavailable, match="ZeroDivisionError"):
        native.load_cuda()
    assert calls == ["cuda"]


@needs_avx2_library
def test_damaged_libraries_are_refused_without_a_crash(tmp_path):
    """Truncated to 4 KiB, to half its size, overwritten with garbage (same size, with and without an ELF header):
    refused before ctypes maps the file, in a fresh process that must exit normally (no SIGBUS)."""
    entry = json.loads((INSTALLED / "manifest.json").read_text())["libraries"]["avx2"]
    good = (INSTALLED / entry["file"]).read_bytes()
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 256, len(good), dtype=np.uint8).tobytes()
    cases = {"intact": good, "4k": good[:4096], "half": good[:len(good) // 2], "garbage": garbage,
             "elf_garbage": good[:64] + garbage[64:]}
    for case, data in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        shutil.copy(INSTALLED / "manifest.json", folder)
        (folder / entry["file"]).write_bytes(data)
    done = _run(f"""
        import os
        from seqjax.backends import _library as native
        for case in {list(cases)!r}:
            os.environ[native.DIR_ENV] = os.path.join({str(tmp_path)!r}, case)
            native._reset()
            print(case, "->", native.unavailable("avx2"), flush=True)
            try:
                native.load_avx2()
            except native.NativeUnavailable as e:
                print(case, "raises", e, flush=True)
        """)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    lines = dict(line.split(" -> ", 1) for line in done.stdout.splitlines() if " -> " in line)
    assert lines["intact"] == "None"
    path = lambda case: tmp_path / case / entry["file"]  # noqa: E731
    size = entry["size"]
    assert lines["4k"].startswith(f"{path('4k')} is damaged: 4096 bytes where the install wrote {size}; reinstall")
    assert lines["half"].startswith(f"{path('half')} is damaged: {size // 2} bytes where the install wrote {size}")
    assert lines["garbage"].startswith(f"{path('garbage')} is damaged: not an ELF file; reinstall")
    assert lines["elf_garbage"].startswith(f"{path('elf_garbage')} is damaged: ")
    for case in ("4k", "half", "garbage", "elf_garbage"):
        assert f"{case} raises {lines[case]}" in done.stdout


def test_elf_checks_catch_a_truncated_file_without_a_manifest():
    header = bytearray(64)
    header[:4], header[4], header[5] = b"\x7fELF", 2, 1
    header[16:18] = (3).to_bytes(2, "little")
    header[18:20] = native._ELF_MACHINES.get(platform.machine().lower(), 62).to_bytes(2, "little")
    header[40:48] = (10_000).to_bytes(8, "little")  # section headers at 10,000 bytes
    header[58:60], header[60:62] = (64).to_bytes(2, "little"), (10).to_bytes(2, "little")
    assert native._elf_problem(bytes(header), 10_640) is None
    assert "truncated (4096 bytes" in native._elf_problem(bytes(header), 4096)
    header[16:18] = (2).to_bytes(2, "little")
    assert "not an ELF shared object" in native._elf_problem(bytes(header), 10_640)


@needs_avx2_library
def test_a_cpu_without_avx512_takes_the_avx2_build(fresh_loader, monkeypatch):
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma"})
    assert _x86.auto_isa(32) == "avx2" and not native.avx2_installed("avx512")
    assert "need an x86-64 CPU with AVX-512F; this one is x86_64 without avx512f" in native.unavailable("avx512")
    cell, params, xs = _lstm(32)
    jaxpr = _scan_targets(cell, params, xs)
    assert "seqjax_avx2_rnn_forward" in jaxpr and "seqjax_avx512" not in jaxpr
    with pytest.raises(native.NativeUnavailable, match="AVX-512F"):
        seqjax.scan(cell, params, xs, kernel="avx512")
    # the same install on a CPU with AVX-512F picks that build (decided, not run: this CPU may lack it)
    if native._entry("avx512") is not None:
        native._reset()
        monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma", "avx512f"})
        assert _x86.auto_isa(32) == "avx512" and _x86.auto_isa(24) == "avx2"


@needs_avx2_library
def test_nothing_is_compiled_or_written_at_run_time(tmp_path):
    """A default scan in a fresh process with a home folder that does not exist and no compiler on PATH."""
    home = tmp_path / "no-home"
    bin_dir = tmp_path / "bin"  # an empty PATH: no compiler to find
    bin_dir.mkdir()
    done = _run("""
        import jax, jax.numpy as jnp, seqjax
        cell = seqjax.lstm(16)
        params = cell.init(jax.random.key(0), 8)
        xs = jnp.ones((4, 20, 8))
        seqjax.scan(cell, params, xs)[1].block_until_ready()
        print(jax.make_jaxpr(lambda p, x: seqjax.scan(cell, p, x))(params, xs))
        """, HOME=str(home), PATH=str(bin_dir), CXX="/bin/false", XDG_CACHE_HOME=str(home / "cache"))
    assert done.returncode == 0, done.stderr
    assert "seqjax_avx2_rnn_forward" in done.stdout or "seqjax_avx512_rnn_forward" in done.stdout
    assert not home.exists() and "compil" not in done.stderr
