"""Shared test configuration: seeds; the environments every backend is tested in
(tests/utils.py), generated only where they run; the `gpu` tests deselected without a
CUDA device and the `slow` ones unless a marker expression (-m) is given; the
`interpreter` marker's tests run in Triton's interpreter; the CUDA emulation's build."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from .utils import ENVIRONMENTS, KERNEL_ENVIRONMENTS, REQUIRE, build_cache, case_id, cxx, generated, lacks, make_env, require


def pytest_configure(config):
    config.addinivalue_line("markers", "grid(argnames, cases, admit): a test's cases in every environment (tests/utils.py: grid)")


def pytest_collection_modifyitems(config, items):
    """Deselect what cannot or should not run here: the `gpu` tests without a CUDA device,
    the `slow` ones unless -m says which markers to run (`-m slow`, `-m "slow or not slow"`).
    The interpreter's child pytest runs exactly the tests it is given."""
    if os.environ.get(_REPORT):
        return
    gpu = not torch.cuda.is_available()
    slow = not config.option.markexpr
    drop = [it for it in items if (gpu and it.get_closest_marker("gpu")) or (slow and it.get_closest_marker("slow"))]
    if drop:
        dropped = set(drop)
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it not in dropped]


def pytest_generate_tests(metafunc):
    """A test with the `env` or `kernel_env` fixture runs in each environment generated here
    (tests/utils.py: generated), crossed with its `grid` cases where the environment admits
    them, marked `slow` where they are not their code path's representative."""
    fixture = next((f for f in ("kernel_env", "env") if f in metafunc.fixturenames), None)
    if fixture is None:
        return
    envs = [e for e in (KERNEL_ENVIRONMENTS if fixture == "kernel_env" else ENVIRONMENTS) if generated(e)]
    mark = metafunc.definition.get_closest_marker("grid")
    if mark is None:
        metafunc.parametrize(fixture, envs, indirect=True)
        return
    argnames, cases, admit, fast = mark.args
    names = argnames.split(",")
    params = []
    for e in envs:
        for case in cases:
            kw = dict(zip(names, case), env=e.values[0][0])
            if admit is None or admit(**kw):
                marks = [*e.marks] + ([] if fast is None or fast(**kw) else [pytest.mark.slow])
                params.append(pytest.param(e.values[0], *case, marks=marks, id="-".join([e.id, *map(case_id, case)])))
    metafunc.parametrize([fixture, *names], params, indirect=[fixture])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------- Triton's interpreter
# TRITON_INTERPRET=1 must be set before triton is imported, and a normal session imports
# triton for the real JIT (tests/build/test_triton_aot.py). So the tests marked `interpreter`
# are collected here like any other, each its own test in the summary, but their bodies run
# in one child pytest with TRITON_INTERPRET=1, started at the first of them for every one
# selected; each then reports the child's outcome for its own node id (pass, the failure's
# text, or the skip's reason). With TRITON_INTERPRET=1 already set, they run here directly.

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
_REPORT = "RCKA_INTERPRETER_REPORT"  # in the child: the JSON file its outcomes go to
_child_outcomes = {}  # in the child: {nodeid: {"outcome": ..., "text": ...}}


def pytest_runtest_logreport(report):
    path = os.environ.get(_REPORT)
    if not path:
        return
    rec = _child_outcomes.setdefault(report.nodeid, {"outcome": None, "text": ""})
    if rec["outcome"] in ("failed", "skipped"):
        return
    if report.failed:
        rec.update(outcome="failed", text=f"[{report.when}] {report.longreprtext}")
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        rec.update(outcome="skipped", text=reason.removeprefix("Skipped: "))
    elif report.when == "call":
        rec["outcome"] = "passed"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:  # after every report: what ran survives a crash of the child
        json.dump(_child_outcomes, f)
    os.replace(tmp, path)


def _run_interpreter_child(session) -> dict:
    """{nodeid: outcome} of every selected `interpreter` test, run in one child pytest."""
    ids = [it.nodeid for it in session.items if it.get_closest_marker("interpreter") is not None]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "outcomes.json")
        env = dict(os.environ, TRITON_INTERPRET="1", **{_REPORT: path})
        env.pop("RCKA_TRITON_MAX_BLOCK", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *ids]
        try:
            proc = subprocess.run(cmd, cwd=session.config.rootpath, env=env, capture_output=True, text=True, timeout=1800)
            tail = proc.stdout[-3000:] + proc.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            tail = f"the interpreter run timed out after {e.timeout} s"
        outcomes = {}
        if os.path.exists(path):
            with open(path) as f:
                outcomes = json.load(f)
    return {"outcomes": outcomes, "tail": tail}


def pytest_pyfunc_call(pyfuncitem):
    if INTERPRETER or pyfuncitem.get_closest_marker("interpreter") is None:
        return None
    session = pyfuncitem.session
    if not hasattr(session, "_rcka_interpreter"):
        session._rcka_interpreter = _run_interpreter_child(session)
    run = session._rcka_interpreter
    rec = run["outcomes"].get(pyfuncitem.nodeid) or {"outcome": None}
    if rec["outcome"] == "failed":
        pytest.fail(f"in Triton's interpreter (TRITON_INTERPRET=1):\n{rec['text']}", pytrace=False)
    if rec["outcome"] == "skipped":
        pytest.skip(rec["text"])
    if rec["outcome"] != "passed":
        pytest.fail(f"no outcome from the interpreter run for this test; its output ended with:\n{run['tail']}", pytrace=False)
    return True


# ----------------------------------------------------------------------------- CUDA C++ emulated on the CPU

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "build" / "cuda_host" / "emu.h"
SOURCES = [ROOT / "csrc" / "module.cpp", EMU.parent / "emu_launchers.cpp"]
DEPS = SOURCES + [EMU, *sorted((ROOT / "csrc").glob("*.cuh")), ROOT / "csrc" / "api.h"]


@pytest.fixture(scope="session")
def cuda_emulation():
    """The cuda backend's library compiled for the CPU against tests/build/cuda_host/emu.h
    (see tests/test_cuda_emulated.py), or a skip with the reason it cannot be built."""
    require(REQUIRE["cuda-emulated"], lacks("cuda-emulated"))
    import pybind11

    compiler = cxx()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256(b"".join(p.read_bytes() for p in DEPS) + f"{compiler} {version} {pybind11.__version__}".encode()).hexdigest()[:16]
    out_dir = build_cache("cuda-emu") / h
    so = out_dir / ("_rcka_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"tmp{os.getpid()}.so"
        cmd = [compiler, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-include", str(EMU),
               f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
               *map(str, SOURCES), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 and "std::barrier" in res.stderr:
            require(REQUIRE["cuda-emulated"], f"the CUDA emulation: {compiler} lacks C++20 std::barrier")
        assert res.returncode == 0, f"building the emulation failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
        os.replace(tmp, so)
    spec = importlib.util.spec_from_file_location("_rcka_cuda", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- environments


@pytest.fixture
def env(request, monkeypatch):
    """Every backend in every environment, the reference included (tests/utils.py;
    parametrised by pytest_generate_tests)."""
    return make_env(request, monkeypatch, request.param)


@pytest.fixture
def kernel_env(request, monkeypatch):
    """Every backend in every environment that is held to the reference (tests/utils.py;
    parametrised by pytest_generate_tests)."""
    return make_env(request, monkeypatch, request.param)
