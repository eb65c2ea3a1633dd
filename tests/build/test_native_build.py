"""The native ops on a plain ``pip install``: where no prebuilt library loads, the first
call compiles the shipped source into a cache per PyTorch version and Python ABI
(rcka_kernels/_native.py), once across processes, saying so in one line; where it cannot be
built, one warning and the Python path. One test compiles (into a fresh cache, from two
processes at once); the others compile nothing."""

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import _native, reference

ROOT = Path(__file__).resolve().parents[2]
BUILDING = "rcka-kernels: building the native ops"

# A process as a plain install starts: no prebuilt library; rk.cka's first call builds or loads the op.
FIRST_CALL = """
import json, sys
sys.modules["rcka_kernels._rcka_native"] = None  # no library built at install time
import torch, rcka_kernels as rk
from rcka_kernels import _native, reference
loaded_at_import = _native._load.cache_info().currsize  # 0: importing neither builds nor loads the op
x, y = torch.randn(9, 4, dtype=torch.float64, requires_grad=True), torch.randn(9, 5, dtype=torch.float64)
value = rk.cka(x, y)
value.backward()
print(json.dumps({
    "loaded_at_import": loaded_at_import,
    "available": rk.native_status().available, "reason": rk.native_status().reason,
    "native_ran": _native.op() is not None and type(value.grad_fn).__name__ == "CppFunction",
    "libraries": sorted(torch.ops.loaded_libraries),
    "error": abs(float(value) - float(reference.cka(x.detach(), y, "linear", None, False))),
}))
"""


def _can_build():
    compiler = os.environ.get("CXX", "c++")
    missing = [tool for tool in (compiler, "ninja") if shutil.which(tool) is None and not (Path(sys.executable).parent / tool).exists()]
    if missing:
        if os.environ.get("RCKA_REQUIRE_NATIVE") == "1":
            pytest.fail(f"RCKA_REQUIRE_NATIVE=1 but the native op cannot be built here: {missing} not found")
        pytest.skip(f"cannot build the native op here: {missing} not found")


def _start(cache):
    env = {k: v for k, v in os.environ.items() if k != "RCKA_NATIVE"}
    env.update(RCKA_NATIVE_CACHE=str(cache), PYTHONPATH=os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep)))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(FIRST_CALL)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_first_call_builds_the_op_once_across_processes(tmp_path):
    """The one compile of the suite: two processes make their first call at once on an empty
    cache holding a lock file left by a killed build (cpp_extension alone would wait on it forever)."""
    _can_build()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "lock").touch()
    both = [_finish(p) for p in [_start(cache), _start(cache)]]
    for result, err in both:
        assert result["available"] and result["reason"] is None, result["reason"]
        assert result["native_ran"] and result["error"] < 1e-12
        assert result["loaded_at_import"] == 0
        assert [Path(p).parent.parent for p in result["libraries"]] == [cache], result["libraries"]
    # one built it and said so; the other waited and loaded it from the cache, silently
    assert sorted(err.count(BUILDING) for _, err in both) == [0, 1], [err for _, err in both]


def test_cache_is_per_torch_version_and_python_abi(monkeypatch, tmp_path):
    monkeypatch.setenv("RCKA_NATIVE_CACHE", str(tmp_path))
    here = _native.cache_dir()
    abi = os.path.splitext(sysconfig.get_config_var("EXT_SUFFIX"))[0].strip(".")
    assert Path(here).parent == tmp_path and Path(here).name == f"torch-{torch.__version__}-{abi}"
    monkeypatch.setattr(torch, "__version__", "99.0.0+upgraded")
    assert _native.cache_dir() != here and "99.0.0+upgraded" in _native.cache_dir()
    monkeypatch.delenv("RCKA_NATIVE_CACHE")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert Path(_native.cache_dir()).parent == tmp_path / "ext" / "rcka_native"


def _uncached_load(monkeypatch, tmp_path, error):
    """_native._load runs again as at a first call, with no prebuilt library (``error`` on importing it)
    and the first-use build pointed at an empty cache."""
    real = _native.importlib.import_module

    def import_module(name, *args):
        if name == "rcka_kernels._rcka_native":
            raise error
        return real(name, *args)

    monkeypatch.setattr(_native.importlib, "import_module", import_module)
    monkeypatch.setenv("RCKA_NATIVE_CACHE", str(tmp_path))
    _native._load.cache_clear()


@pytest.mark.parametrize("error,why", [
    (ModuleNotFoundError("No module named 'rcka_kernels._rcka_native'", name="rcka_kernels._rcka_native"), "not built at install time"),
    (ImportError("_rcka_native.so: undefined symbol: _ZN2at4_ops"), "built against another PyTorch"),
])
def test_a_build_that_cannot_run_warns_once_and_the_python_path_runs(error, why, monkeypatch, tmp_path):
    _uncached_load(monkeypatch, tmp_path, error)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))  # fails before anything compiles
    try:
        x, y = torch.randn(9, 4, dtype=torch.float64, requires_grad=True), torch.randn(9, 5, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = [rk.cka(x, y), rk.cka(x, y), rk.hsic(x, y)]
            status = rk.native_status()
        assert len(caught) == 1 and caught[0].category is RuntimeWarning, [str(w.message) for w in caught]
        message = str(caught[0].message)
        assert "native ops are unavailable" in message and "no C++ compiler" in message and "pip install" in message
        assert not status.available and why in status.reason and "no C++ compiler" in status.reason
        assert type(values[0].grad_fn).__name__ == "_LinearAlignmentBackward"  # the Python Function ran
        torch.testing.assert_close(values[0], reference.cka(x.detach(), y, "linear", None, False).to(values[0]))
        assert not any(tmp_path.iterdir())
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()


def test_turned_off_neither_builds_nor_warns(monkeypatch, tmp_path):
    _uncached_load(monkeypatch, tmp_path, ModuleNotFoundError("no", name="rcka_kernels._rcka_native"))
    monkeypatch.setenv("RCKA_NATIVE", "0")
    monkeypatch.setattr(_native, "_build", lambda: pytest.fail("built although RCKA_NATIVE=0"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _native.op() is None and "RCKA_NATIVE=0" in rk.native_status().reason
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()


def test_a_compile_error_is_summarised_in_the_reason():
    log = ("Error building extension 'rcka_native': [1/2] c++ -MMD -MF native.o.d -O3 -c native.cpp\n"
           "FAILED: native.o\nnative.cpp:3:1: error: 'boom' was not declared\nninja: build stopped")
    assert _native._summary(RuntimeError(log)) == (
        "RuntimeError: Error building extension 'rcka_native' ... native.cpp:3:1: error: 'boom' was not declared")


def test_the_source_ships_inside_the_package():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rcka_kernels"]
    relative = Path(_native.SOURCE).relative_to(Path(rk.__file__).parent).as_posix()
    assert Path(_native.SOURCE).is_file() and any(fnmatch.fnmatch(relative, p) for p in patterns)
