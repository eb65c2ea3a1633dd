"""The GPU check's plan and its summary, checked on the CPU (no GPU needed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def test_gpu_check_dry_run_names_only_what_exists(capsys):
    """CI checks the GPU check's plan: every stage's commands, with the scripts and test files they name."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--dry-run", "--out", "/tmp/gpu-out"]) == 0
    out = capsys.readouterr().out
    for stage in gpu_check.STAGES:
        assert f"[{stage}]" in out
    assert "RCKA_FORCE_CUDA=1" in out and "RCKA_REQUIRE_CUDA=1" in out and "--no-index" in out
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in out and " -x " not in out


def test_gpu_check_counts_tests_per_environment(tmp_path):
    """The per-environment summary: the environment a parametrised test's id names (the
    longest match: torch-cuda is not cuda), else its file's; nested packages (tests/build/) too."""
    from benchmarks import gpu_check

    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_parity" name="test_cka_hsic[cuda-float32-5-3-2]"/>'
        '<testcase classname="tests.test_parity" name="test_mmd[torch-cuda-False-rbf]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_catalogue" name="test_mixed_devices[triton-cuda]"><skipped message="y"/></testcase>'
        '<testcase classname="tests.test_cuda_gpu" name="test_runs_on_the_current_stream"/>'
        '<testcase classname="tests.test_triton_gpu" name="test_deterministic"/>'
        '<testcase classname="tests.build.test_cuda_import" name="d"/>'
        "</testsuite></testsuites>"
    )
    assert gpu_check._test_file("tests.build.test_cuda_import") == "tests/build/test_cuda_import.py"
    assert gpu_check._junit_counts([xml]) == {
        "cuda": {"passed": 2, "failed": 0, "skipped": 0},
        "torch-cuda": {"passed": 0, "failed": 1, "skipped": 0},
        "triton-cuda": {"passed": 1, "failed": 0, "skipped": 1},
        "other": {"passed": 1, "failed": 0, "skipped": 0},
    }
