"""The benchmark suite runs and measures what it says: naive baselines and peer
adapters agree with the float64 reference, and the harness records results,
out-of-memory, timeouts and skips. No time is asserted."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness, naive, providers  # noqa: E402
from rcka_kernels import reference  # noqa: E402


def _xy(n=40, p=7, q=5, seed=0):
    cfg = dict(op="cka", n=n, p=p, q=q, kernel="linear", dtype="float64", seed=seed)
    return providers.make_inputs(cfg, requires_grad=False)


def test_official_formula_matches_reference():
    x, y = _xy()
    for l2 in (False, True):
        torch.testing.assert_close(naive.official_alignment(x, y, l2), reference.official_alignment(x, y, l2), rtol=1e-10, atol=0)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_textbook_and_centred_cka_match_reference(kernel):
    x, y = _xy()
    s2 = float(reference.bandwidth(x, 1.3)) if kernel == "rbf" else None
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


def _provider_value(name, cfg):
    prov = providers.registry()[name]
    assert prov.supports(cfg) is None, prov.supports(cfg)
    x, y = providers.make_inputs(cfg, requires_grad=prov.grad)
    out = prov.make(cfg, x, y)()
    if prov.grad:
        out.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    return providers.provider_value(prov, cfg, out)


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("rcka[torch]", dict(op="cka", n=64, p=9, q=6, kernel="rbf", debiased=True)),
        ("rcka-official[torch]", dict(op="cka", n=64, p=9, q=6, kernel="linear")),
        ("official", dict(op="cka", n=64, p=9, q=6, kernel="linear")),
        ("textbook", dict(op="cka", G=3, n=20, p=9, q=6, kernel="linear")),
        ("naive-centred", dict(op="cka", n=64, p=9, q=6, kernel="rbf", sigma=3.0, debiased=True)),
        ("rcka-mmd[torch]", dict(op="mmd", n=50, m=37, p=5, kernel="rbf", sigma=2.0, debiased=True)),
        ("naive-mmd", dict(op="mmd", n=50, m=37, p=5, kernel="rbf", sigma=2.0)),
        ("RCKALoss[torch]", dict(op="rcka", B=32, classes=10, n=32)),
        ("RCKALoss-official[torch]", dict(op="rcka", B=32, classes=10, n=32)),
        ("official-rcka", dict(op="rcka", B=32, classes=10, n=32)),
        ("PCKALoss[torch]", dict(op="pcka", B=2, C=3, H=20, W=36, patch=8, n=15, inter=True)),
        ("official-pcka", dict(op="pcka", B=2, C=3, H=20, W=36, patch=8, n=15)),
        ("textbook-pcka", dict(op="pcka", B=2, C=3, H=20, W=36, patch=8, n=15, inter=True)),
    ],
)
def test_providers_agree_with_oracle(name, cfg):
    cfg = dict(cfg, dtype="float64", seed=1)
    got = _provider_value(name, cfg)
    want, kind = providers.oracle(providers.registry()[name].quantity, cfg, ref_max_n=4096)
    assert kind == "reference-fp64"
    assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), (got, want)


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("torch-cka", dict(op="cka", n=48, p=9, q=6, kernel="linear", debiased=True, dtype="float32")),
        ("ckatorch", dict(op="cka", n=48, p=9, q=6, kernel="linear", dtype="float64")),
        ("ckatorch-fro", dict(op="cka", n=48, p=9, q=6, kernel="linear", debiased=True, dtype="float64")),
        ("cka-pytorch", dict(op="cka", n=48, p=9, q=6, kernel="linear", debiased=True, dtype="float64")),
    ],
)
def test_peer_adapters_compute_cka(name, cfg):
    module = {"torch-cka": "torch_cka", "cka-pytorch": "cka_pytorch"}.get(name, "ckatorch")
    if importlib.util.find_spec(module) is None:  # optional: pip install --no-deps torch-cka ckatorch cka-pytorch
        pytest.skip(f"{name} is not installed")
    got = _provider_value(name, cfg)
    want, _ = providers.oracle("cka", cfg, ref_max_n=4096)
    tol = 1e-5 if cfg["dtype"] == "float32" else 1e-9
    assert abs(got - want) <= tol, (got, want)


def test_geomloss_adapter_is_mmd():
    if importlib.util.find_spec("geomloss") is None:
        pytest.skip("geomloss is not installed")
    cfg = dict(op="mmd", n=40, m=30, p=3, kernel="rbf", sigma=1.5, dtype="float64")
    want, _ = providers.oracle("mmd", cfg, ref_max_n=4096)
    assert abs(_provider_value("geomloss", cfg) - want) <= 1e-9


def _args(**kw):
    args = _harness.add_common_args(argparse.ArgumentParser()).parse_args([])
    args.repeats, args.time_budget = 2, 5.0
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_worker_records_time_memory_value():
    spec = {"provider": "official", "config": dict(op="cka", n=256, p=16, q=8, kernel="linear", dtype="float32"),
            "warmup": 1, "repeats": 2, "mem_cap_gb": 8}
    r = _harness.run_case(spec, timeout_s=120)
    assert r["status"] == "ok", r
    assert r["mode"] == "fwd+bwd" and len(r["times_ms"]) >= 1 and r["time_ms"] > 0
    # the official formula holds several 256 x 256 float32 matrices: at least one of them shows
    assert r["peak_mem_bytes"] >= 256 * 256 * 4
    want, _ = providers.oracle("official", spec["config"], 4096)
    assert abs(r["value"] - want) < 1e-5


def test_out_of_memory_and_timeout_are_results():
    big = {"provider": "official", "config": dict(op="cka", n=30000, p=4, q=4, kernel="linear", dtype="float32"),
           "mem_cap_gb": 2.5}  # one 30000^2 float32 Gram is 3.4 GiB
    r = _harness.run_case(big, timeout_s=120)
    assert r["status"] == "oom", r
    # the cap counts from what the worker had mapped (torch loaded), whatever the size of the
    # torch build: below it, the same case runs
    small = dict(big, config=dict(big["config"], n=256), warmup=0, repeats=1)
    r = _harness.run_case(small, timeout_s=120)
    assert r["status"] == "ok", r
    slow = {"provider": "textbook", "config": dict(op="cka", n=3000, p=8, q=8, kernel="linear", dtype="float32")}
    r = _harness.run_case(slow, timeout_s=0.5)
    assert r["status"] == "timeout", r


def test_sweep_skips_after_failure_and_writes_tagged_results(tmp_path, monkeypatch):
    """A provider that fails at some n is not run at larger n. The failure is injected
    (official at n = 24000 reports an out-of-memory without running), so the test does
    not depend on memory limits; test_out_of_memory_and_timeout_are_results covers those."""
    run_case, ran = _harness.run_case, []

    def failing_at_24000(spec, timeout_s, isolation="auto"):
        key = (spec.get("provider"), spec["config"]["n"])
        ran.append(key)
        if key == ("official", 24000):
            return {"status": "oom", "error": "MemoryError: injected by the test", "wall_s": 0.0}
        return run_case(spec, timeout_s, isolation)

    monkeypatch.setattr(_harness, "RESULTS", tmp_path)
    monkeypatch.setattr(_harness, "run_case", failing_at_24000)
    bench = _harness.Bench("unit", _args(timeout=60))
    base = dict(op="cka", p=4, q=4, kernel="linear", debiased=False, dtype="float32")
    bench.sweep(["rcka[torch]", "official"], base, [48000, 64, 24000], verbose=False)
    status = {(r["provider"], r["config"]["n"]): r["status"] for r in bench.records}
    assert status[("official", 64)] == "ok"
    assert status[("official", 24000)] == "oom"
    assert status[("official", 48000)] == "skipped" and ("official", 48000) not in ran
    assert status[("rcka[torch]", 48000)] == "ok"
    path = bench.write("t")
    data = json.loads(path.read_text())
    for key in ("device_name", "torch", "triton", "date", "git_commit"):
        assert data["meta"][key] is not None
    assert {r["config"]["n"] for r in data["records"]} == {64, 24000, 48000}
    ok = [r for r in data["records"] if r["status"] == "ok"]
    assert all(r["abs_err"] < 1e-4 for r in ok)
    assert (tmp_path / "unit_t_cpu.md").read_text().count("\n| cka linear") == len(data["records"])
    png = _harness.plot(data["records"], tmp_path / "unit.png", "unit")
    assert png is not None and png.stat().st_size > 1000


def test_efficient_benchmark_records_ratios_ops_and_memory(tmp_path):
    """bench_efficient measures each case against the plain-PyTorch formula with the same
    values, and records ratio, op counts and memory with the environment (no time asserted)."""
    from benchmarks import bench_efficient

    names = ["cka 64x100", "debiased cka 64x100", "RCKALoss official 64x100"]
    bench_efficient.main(["--only", ",".join(names), "--time-budget", "0", "--min-reps", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "efficient_cpu.json").read_text())
    assert {"torch", "date", "git_commit", "device_name", "loadavg_start", "loadavg_end", "OMP_WAIT_POLICY"} <= set(data["meta"])
    assert [r["case"] for r in data["records"]] == names
    for r in data["records"]:
        assert r["value_rel_diff"] < 1e-4, r
        assert r["reps"] >= 2 and r["ratio"] > 0
        assert r["ops"]["ours"] > 0 and r["ops"]["baseline"] > 0
        assert set(r["peak_extra_bytes"]) == {"ours", "baseline"}
    assert (tmp_path / "efficient_cpu.md").read_text().count("| cka 64x100 |") == 1


def test_compare_benchmark_records_time_memory_and_values(tmp_path):
    """bench_compare on a small case, rcka only: the default call's estimator, time, both memory
    figures, values against the oracle, the batch-size sweep and the memory case (no time asserted)."""
    from benchmarks import bench_compare

    bench_compare.main(["--n", "300", "--memory-n", "2000", "--rounds", "1", "--only", "rcka default,rcka minibatch",
                        "--out", str(tmp_path)])
    data = json.loads((tmp_path / "compare_cpu.json").read_text())
    recs = {r["provider"]: r for r in data["records"]}
    assert set(recs) == {"rcka default", "rcka minibatch"}
    # 12 x 256 and 10 x 192 features on batches of 256: exact would cost 6.8 M multiply-adds per sample, minibatch 1.3 M
    assert recs["rcka default"]["estimator"] == "minibatch"
    for r in recs.values():
        assert r["status"] == "ok" and r["time_s"] > 0 and r["max_abs_vs_nguyen"] < 1e-5
        assert r["peak_mem_bytes"] > 0 and r["first_call_mem_bytes"] > 0
    assert {(r["provider"], r["bs"]) for r in data["batch_size_sweep"]} == {("rcka minibatch", 64), ("rcka minibatch", 1024)}
    assert data["memory_case"]["status"] == "ok"
    assert data["meta"]["OMP_WAIT_POLICY"] and "| rcka default | ok (minibatch) |" in (tmp_path / "compare_cpu.md").read_text()
