"""The distillation harness end to end on the embedded digits problem: logs,
backend parity, same loss curve with either backend, one-line errors, DDP."""

import json
import os
import subprocess
import sys

import torch

from rcka_kernels.distill import main
from rcka_kernels.distill import models as M
from rcka_kernels.distill.train import Config, run

from .utils import free_port

QUICK = dict(epochs=2, teacher_epochs=2, max_steps=6, progress=False, threads=1)


def test_digits_run_writes_logs(tmp_path):
    out = tmp_path / "run"
    summary = run(Config(out=str(out), **QUICK))
    assert set(summary) == {"teacher", "ce", "kd", "rcka"}
    for m in ("teacher", "ce", "kd", "rcka"):
        h = json.loads((out / m / "metrics.json").read_text())["history"]
        assert len(h) == 2
        for k in ("train_loss", "test_acc", "images_per_s", "peak_memory_mb"):
            assert k in h[-1] and h[-1][k] == h[-1][k]  # present and not NaN
        assert (out / m / "metrics.csv").read_text().startswith("epoch,")
        assert (out / m / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curves.png").exists() and (out / "teacher" / "teacher.pt").exists()
    # the teacher learned something (10 classes: chance is 10%)
    assert summary["teacher"]["test_acc"] > 30


def test_parity_and_same_curve_with_either_backend(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(M.build("mlp_teacher", 10).state_dict(), ckpt)
    runs = {}
    for backend in ("reference", "torch"):
        cfg = Config(out=str(tmp_path / backend), methods=["rcka"], backend=backend, parity=True, inter_weight=2.0,
                     teacher_ckpt=str(ckpt), **QUICK)
        runs[backend] = run(cfg)
        h = json.loads((tmp_path / backend / "rcka" / "metrics.json").read_text())["history"]
        assert all(r["parity_max_rel_err"] < 1e-4 for r in h)
        assert all(r["loss_ms_reference"] > 0 and r["loss_ms_torch"] > 0 for r in h)
        runs[backend] = h
    for a, b in zip(runs["reference"], runs["torch"]):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-4 * abs(a["train_loss"])
        assert abs(a["test_loss"] - b["test_loss"]) <= 1e-4 * abs(a["test_loss"])


def _one_line_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("rcka-distill: error:") and match in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_bad_input_errors(tmp_path, capsys):
    _one_line_error(capsys, ["--data", str(tmp_path / "missing")], "does not exist")
    _one_line_error(capsys, ["--dataset", "cifar100"], "--data PATH is needed")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00corrupt")
    _one_line_error(capsys, ["--teacher-ckpt", str(bad), "--out", str(tmp_path / "o")], "cannot read teacher checkpoint")
    other = tmp_path / "c100.pt"
    torch.save(M.build("mlp_teacher", 100).state_dict(), other)
    _one_line_error(capsys, ["--teacher-ckpt", str(other), "--out", str(tmp_path / "o")], "100 classes but the data set has 10")
    _one_line_error(capsys, ["--student", "resnet18"], "does not fit the digits data")
    _one_line_error(capsys, ["--l2-norm"], "needs --official")
    _one_line_error(capsys, ["--methods", "ce,foo"], "unknown method")


def test_cli_process_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rcka_kernels.distill", "--data", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_torchrun_ddp_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "rcka_kernels.distill", "--distributed", "--methods", "rcka",
           "--epochs", "1", "--teacher-epochs", "1", "--max-steps", "3", "--no-progress", "--no-plot", "--parity",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["meta"]["world_size"] == 2
    assert s["summary"]["rcka"]["parity_max_rel_err"] < 1e-4
