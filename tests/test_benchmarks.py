"""The benchmarks measure what they say: the naive and plain formulas agree with the float64
reference, the harness records time, memory, ops, out-of-memory, errors and timeouts, the
scripts write the one JSON format, and the README's tables are what the results give
(`python -m benchmarks.report --check`). No time is asserted."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness, efficient, naive, report  # noqa: E402
from rcka_kernels import reference  # noqa: E402


@pytest.fixture(autouse=True)
def _timing_allowed(monkeypatch):
    """Each test may time: the flag memory_mode() sets for good in a real run is reset after it."""
    monkeypatch.setattr(_harness, "_MEMORY_MODE", False)


def test_no_timing_after_a_memory_pass():
    """memory_mode() makes large allocations page-fault for the rest of the process, so a second
    interleaved() call (whose timing would include them) is refused: one call takes every case."""
    def make():
        return {"a": lambda: torch.ones(3), "b": lambda: torch.zeros(3)}
    recs = _harness.interleaved([("one", make), ("two", make)], "cpu", budget_s=0.0, min_reps=1)
    assert {(r["case"], r["status"]) for r in recs} == {("one", "ok"), ("two", "ok")}
    with pytest.raises(RuntimeError, match="after memory_mode"):
        _harness.interleaved([("three", make)], "cpu", budget_s=0.0, min_reps=1)


def _xy(n=40, p=7, q=5):
    x, y = _harness.inputs((n, p), q, "cpu")
    return x.detach().double(), y.double()


def test_official_formula_matches_reference():
    x, y = _xy()
    for l2 in (False, True):
        torch.testing.assert_close(naive.official_alignment(x, y, l2), reference.official_alignment(x, y, l2), rtol=1e-10, atol=0)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_textbook_and_centred_cka_match_reference(kernel):
    x, y = _xy()
    s2 = 1.3**2 if kernel == "rbf" else None
    sigma = 1.3 if kernel == "rbf" else None
    want = reference.cka(x, y, kernel, sigma)
    torch.testing.assert_close(naive.textbook_cka(x, y, kernel, s2), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(naive.centred_cka(x, y, kernel, False, s2), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(naive.centred_cka(x, y, kernel, True, s2), reference.cka(x, y, kernel, sigma, True), rtol=1e-10, atol=0)


@pytest.mark.parametrize("unbiased", [False, True])
def test_naive_mmd_matches_reference(unbiased):
    x, y = _xy(n=30, p=4, q=4)
    y = y[:23] + 0.3
    torch.testing.assert_close(naive.mmd2(x, y, 2.0**2, unbiased), reference.mmd(x, y, "rbf", 2.0, unbiased), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n", [20, 21])  # the median of an even and of an odd number of distances
def test_plain_rbf_formula_matches_reference(n):
    x, y = _xy(n=n)
    torch.testing.assert_close(efficient.rbf_cka(x, y), reference.cka(x, y, "rbf", "median"), rtol=1e-10, atol=0)
    torch.testing.assert_close(efficient.rbf_cka(x, y, 1.7), reference.cka(x, y, "rbf", 1.7), rtol=1e-10, atol=0)


def test_interleaved_records_time_memory_ops_and_failures():
    x = torch.randn(300, 200)

    def boom(exc):
        def call():
            raise exc
        return call

    make = lambda: {"matmul": lambda: x @ x.T, "oom": boom(MemoryError()), "bad": boom(ValueError("no"))}  # noqa: E731
    recs = {r["contender"]: r for r in _harness.interleaved([("case", make)], "cpu", budget_s=0.0, min_reps=3, ops=True)}
    ok = recs["matmul"]
    assert ok["status"] == "ok" and ok["reps"] == 3 and ok["time_s"] > 0 and ok["ops"] == 1
    assert ok["value"] == pytest.approx(float((x @ x.T).double().sum()), rel=1e-5)
    assert ok["peak_bytes"] >= 300 * 300 * 4  # the 300 x 300 float32 product shows
    assert recs["oom"]["status"] == "oom" and recs["bad"]["status"] == "error" and "ValueError" in recs["bad"]["error"]


def test_isolated_records_result_out_of_memory_and_timeout():
    target, kw = "benchmarks.bench_naive:contender", dict(name="official", family="linear CKA p=256")
    r = _harness.isolated(target, dict(kw, n=256, device="cpu"), "cpu", budget_s=0.0, reps=1, timeout_s=120, mem_cap_gb=2.0)
    assert r["status"] == "ok" and r["peak_bytes"] >= 256 * 256 * 4, r
    from benchmarks.bench_naive import reference_value

    assert r["value"] == pytest.approx(reference_value("linear CKA p=256", "official", 256), abs=1e-5)
    r = _harness.isolated(target, dict(kw, n=30000, device="cpu"), "cpu", timeout_s=120, mem_cap_gb=2.0)  # a 3.4 GiB Gram
    assert r["status"] == "oom", r
    assert _harness.isolated(target, dict(kw, n=256, device="cpu"), "cpu", timeout_s=0.5)["status"] == "timeout"


def test_efficient_benchmark_writes_the_one_format(tmp_path):
    from benchmarks import bench_efficient

    names = ["cka 64x100", "RBF cka 64x100 median"]
    bench_efficient.main(["--quick", "--only", ",".join(names), "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "efficient_cpu_quick.json").read_text())
    assert doc["benchmark"] == "efficient" and doc["config"]["quick"]
    assert {"device_name", "torch", "git_commit", "date", "loadavg_before", "loadavg_after", "OMP_WAIT_POLICY"} <= set(doc["meta"])
    assert [(r["case"], r["contender"]) for r in doc["results"]] == [(c, k) for c in names for k in ("rcka", "plain")]
    for case in names:
        ours, plain = (r for r in doc["results"] if r["case"] == case)
        assert ours["status"] == plain["status"] == "ok" and ours["ops"] > 0 and plain["peak_bytes"] >= 0
        assert ours["value"] == pytest.approx(plain["value"], rel=1e-4)


def test_compare_benchmark_cases():
    """The ResNet case is two ResNet-18s' 8 BasicBlocks (4096 to 512 features on 32x32 inputs);
    the MLP case runs end to end with values against the float64 definitions."""
    from benchmarks import bench_compare

    s = bench_compare.setup("resnet", 8, "cpu")
    assert bench_compare.widths(s, s["la"], s["lb"])[0] == [4096, 4096, 2048, 2048, 1024, 1024, 512, 512]
    recs = {r["contender"]: r for r in bench_compare.run_cases({"mlp": 100}, "cpu", reps=1)}
    for name in ("rcka minibatch", "rcka exact"):
        assert recs[name]["status"] == "ok" and recs[name]["max_abs_vs_definition"] < 1e-5, recs[name]
    assert recs["rcka exact"]["floor_madds"] > 0 and recs["float32 GEMM (b, P_A)^T (b, P_B)"]["madds"] > 0


def test_report_regenerates_and_checks(tmp_path):
    """Blocks between markers are rewritten from the results; --check fails when they differ."""
    res = tmp_path / "results"
    res.mkdir()
    meta = dict(_harness.env_info("cpu"), loadavg_after=[1.0, 1.0, 1.0])
    recs = [{"case": "cka 64x100", "contender": k, "status": "ok", "time_s": t, "ops": 3, "peak_bytes": 1024, "value": 0.5}
            for k, t in (("rcka", 1e-4), ("plain", 2e-4))]
    (res / "efficient_cpu.json").write_text(json.dumps({"benchmark": "efficient", "meta": meta, "config": {}, "results": recs}))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- report:efficient-cpu -->\nold\n<!-- /report:efficient-cpu -->\nb\n"
                      "<!-- report:naive-cpu -->\n<!-- /report:naive-cpu -->\n")
    args = ["--readme", str(readme), "--results", str(res)]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args) == 0
    assert report.main(args + ["--check"]) == 0
    text = readme.read_text()
    assert "| cka 64x100 | 0.1 ms | 0.2 ms | **0.50** | 3 vs 3 |" in text and "Not measured yet" in text
    readme.write_text(text.replace("**0.50**", "**0.40**"))
    assert report.main(args + ["--check"]) == 1


def test_readme_tables_match_the_committed_results():
    assert report.main(["--check"]) == 0
