"""The GPU check's plan, its time-boxing and its summary, checked on the CPU (no GPU needed):
the commands it runs are replaced by small stand-ins."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

HAVE = {"xdist", "pytest_timeout"}  # the GPU machine's plugins


def test_dry_run_prints_each_stage_with_budgets_and_files_and_names_only_what_exists(capsys):
    """CI checks the GPU check's plan: every stage's steps, budgets, commands and files, and
    that the test files, benchmark options, build switches and marker they name exist."""
    assert gpu_check.main(["--dry-run", "--out", "/tmp/gpu-out"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for stage in gpu_check.STAGES:
        assert f"[{stage}] at most {gpu_check.BUDGET[stage]} s -> /tmp/gpu-out/{stage}.json, /tmp/gpu-out/{stage}.log" in out
    for flag in ("RCKA_FORCE_CUDA=1", "RCKA_FORCE_NATIVE=1", "RCKA_REQUIRE_CUDA=1", "RCKA_REQUIRE_NATIVE=1", "--timeout=",
                 "-n 8", "PYTORCH_NO_CUDA_MEMORY_CACHING=1", "--tool memcheck", "--no-index", "benchmarks.bench_efficient --quick",
                 "benchmarks.bench_compare --quick --device cuda --case resnet", "tests/test_autocast.py"):
        assert flag in out, flag
    assert " -x " not in out and "tests/test_smoke.py" in out and "budget 145 s, ends by 285 s" in out


def test_the_two_commands_fit_seven_minutes():
    """Each stage's steps add up to its budget, which leaves room under its command limit
    (the docstring's timeout_s: 300 and 120 s, 7 minutes together) for the report after a stop."""
    limits = {"test": 300, "bench": 120}
    assert sum(limits.values()) <= 7 * 60
    for stage, limit in limits.items():
        steps = gpu_check.plan(stage, "python", "90", HAVE, "/scratch")
        assert sum(s.budget_s for s in steps) == gpu_check.BUDGET[stage]
        assert gpu_check.BUDGET[stage] + gpu_check.GRACE_S + 5 <= limit
        assert f"timeout_s={limit})" in gpu_check.__doc__
        assert all(s.budget_s > 0 for s in steps if not s.skip)
    for wheel in gpu_check.PEER_WHEELS:  # the carried wheel the docstring names is the pinned one
        assert wheel.replace("-", "_").replace("==", "-") + "-py3-none-any.whl" in gpu_check.__doc__


def test_bench_stage_builds_again_only_when_the_build_is_gone():
    warm = gpu_check.plan("bench", "python", "90", HAVE, "/scratch")
    cold = gpu_check.plan("bench", "python", "90", HAVE, "/scratch", rebuild="_rcka_cuda")
    assert warm[0].key == cold[0].key == "build" and warm[0].skip and not cold[0].skip
    assert [s.key for s in warm] == ["build", "peers", "efficient", "compare", "memcheck"]


def _sh(script: str):
    return (["sh", "-c", script], {})


def test_a_step_past_its_deadline_is_stopped_and_keeps_its_output(tmp_path):
    step = gpu_check.Step("slow", "slow", 1, [_sh("echo started; exec sleep 60")])
    with open(tmp_path / "log", "a") as log:
        t0 = time.monotonic()
        rec = gpu_check.run_step(step, time.monotonic() + 3, log, {})
    assert time.monotonic() - t0 < 3 + gpu_check.GRACE_S + 5
    assert rec["status"] == "timeout" and "started" in rec["tail"]


def test_concurrent_commands_a_missing_sanitizer_and_a_refused_device(tmp_path):
    with open(tmp_path / "log", "a") as log:
        both = gpu_check.run_step(gpu_check.Step("b", "b", 9, [_sh("echo one"), _sh("echo two; exit 3")]), time.monotonic() + 60, log, {})
        missing = gpu_check.run_step(gpu_check.Step("m", "m", 9, [(["/nonexistent/compute-sanitizer"], {})], sanitizer=True),
                                     time.monotonic() + 60, log, {})
        refused = gpu_check.run_step(gpu_check.Step("r", "r", 9, [_sh("echo '========= Device not supported'; exit 3")], sanitizer=True),
                                     time.monotonic() + 60, log, {})
        found = gpu_check.run_step(gpu_check.Step("f", "f", 9, [_sh("echo '========= Invalid __global__ write'; exit 3")], sanitizer=True),
                                   time.monotonic() + 60, log, {})
        late = gpu_check.run_step(gpu_check.Step("l", "l", 9, [_sh("echo never")]), time.monotonic(), log, {})
    assert both["status"] == "failed" and both["exit_codes"] == [0, 3] and "one" in both["tail"] and "two" in both["tail"]
    assert missing["status"] == refused["status"] == "unsupported" and found["status"] == "failed"
    assert late["status"] == "not run"


TESTS = '''
import pytest

@pytest.mark.parametrize("env", ["torch-cuda", "cuda", "triton-cuda"])
def test_value(env):
    assert env != "triton-cuda", "wrong value"

def test_only_a_gpu_shows():
    pytest.skip("needs something")
'''


def test_a_stage_records_each_test_as_it_finishes_and_sums_them_per_environment(tmp_path, monkeypatch):
    """The plugin's lines, the per-environment counts, the failed tests, the benchmarks' files
    copied under the limits of a leased machine, and ok."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_cuda_gpu.py").write_text(TESTS)
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check",
                  "--rootdir", str(tmp_path), str(tmp_path / "tests" / "test_cuda_gpu.py")]
    write = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
             "[(d / n).write_text('{}') for n in ('plot.png', 'efficient.md', 'efficient_cuda_quick.json', 'a+b.json', 'x.txt')]")
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    out.mkdir()
    steps = [gpu_check.Step("gpu-tests", "tests", 60, [(pytest_cmd, {})], tests=True),
             gpu_check.Step("efficient", "bench", 30, [([sys.executable, "-c", write, str(scratch / "results")], {})], collect=True)]
    monkeypatch.setattr(gpu_check, "MAX_FILES", 5)  # room for two of the benchmark's files
    assert not gpu_check.run_stage("test", steps, out, {"device_name": "cpu"}, time.monotonic(), 100, scratch)
    summary = json.loads((out / "test.json").read_text())
    # the test file's default environment is cuda (GPU_TESTS), the ids name the others
    assert summary["per_backend"] == {"cuda": {"passed": 1, "failed": 0, "skipped": 1},
                                      "torch-cuda": {"passed": 1, "failed": 0, "skipped": 0},
                                      "triton-cuda": {"passed": 0, "failed": 1, "skipped": 0}}
    assert [f["test"] for f in summary["failed_tests"]] == ["tests/test_cuda_gpu.py::test_value[triton-cuda]"]
    assert "wrong value" in summary["failed_tests"][0]["message"] and not summary["ok"]
    assert [s["status"] for s in summary["steps"]] == ["failed", "passed"]
    # JSON first, then markdown, while there is room; names a leased machine sends back only
    assert summary["steps"][1]["files"] == ["efficient_cuda_quick.json", "efficient.md"]
    assert sorted(summary["steps"][1]["left_out"]) == ["a+b.json", "plot.png", "x.txt"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(summary["files"]) and len(names) == 5
    assert all(gpu_check.SAFE_NAME.match(n) for n in names)
    lines = [json.loads(x) for x in (out / "test.jsonl").read_text().splitlines()]
    assert {x["step"] for x in lines} == {"gpu-tests"} and len(lines) == 4
    assert gpu_check.failed_tests(out / "test.json") == gpu_check.failed_tests(out / "test.jsonl") == [
        "tests/test_cuda_gpu.py::test_value[triton-cuda]"]


@pytest.mark.parametrize("test,where", [
    ("tests/test_parity.py::test_cka[torch-cuda-5-3-2-float32]", "torch-cuda"),
    ("tests/test_parity.py::test_cka[cuda-5-3-2-float32]", "cuda"),
    ("tests/test_catalogue.py::test_mixed_devices[triton-cuda]", "triton-cuda"),
    ("tests/test_triton_gpu.py::test_deterministic", "triton-cuda"),
    ("tests/test_linear.py::test_cuda_graph_capture_of_the_loss", "torch-cuda"),
    ("tests/test_parity.py::test_contract_linear[cuda-emulated-5-3-2-float32]", "cuda-emulated"),
    ("tests/test_autocast.py::test_loss_under_autocast", "other"),
])
def test_each_test_is_counted_under_its_environment(test, where):
    """The environment its id names (the longest match: torch-cuda is not cuda), else its file's."""
    assert gpu_check._environment(test) == where


def test_the_memcheck_selection_is_a_valid_expression(tmp_path):
    """pytest parses the sanitizer's -k expression (an id fragment such as 64-40-8 is a keyword)."""
    (tmp_path / "test_k.py").write_text("import pytest\n@pytest.mark.parametrize('c', ['cuda-2-64-40-8-float32', 'x'])\n"
                                        "def test_contract_linear(c):\n    pass\n")
    k = gpu_check.SANITIZED[gpu_check.SANITIZED.index("-k") + 1]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "-k", k, str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "1/2 tests collected" in res.stdout, res.stdout + res.stderr


def test_a_sanitizer_that_refuses_the_device_is_no_failure(tmp_path):
    """compute-sanitizer refusing the device (the tests under it then fail at the first
    allocation) is recorded as unsupported, and those tests' failures are not counted."""
    line = json.dumps({"step": "memcheck", "test": "tests/test_parity.py::test_contract_linear[cuda-2-64-40-8-float32]",
                       "when": "call", "outcome": "failed", "message": "CUDA error 999"})
    script = f"echo '========= Device not supported'; echo '{line}' >> \"${gpu_check.RESULTS_ENV}\"; exit 1"
    steps = [gpu_check.Step("memcheck", "memcheck", 20, [_sh(script)], tests=True, sanitizer=True)]
    assert gpu_check.run_stage("bench", steps, tmp_path, {}, time.monotonic(), 30, tmp_path / "scratch")
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["steps"][0]["status"] == "unsupported" and summary["failed_tests"] == [] and summary["ok"]
    assert "CUDA error 999" in (tmp_path / "bench.jsonl").read_text()
