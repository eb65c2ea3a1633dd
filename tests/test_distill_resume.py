"""Checkpoints and --resume of the distillation harness on the embedded digits problem: a run
killed (SIGKILL, at a random moment, or interrupted after a chosen checkpoint) and resumed ends
with the uninterrupted run's weights and metrics; every checkpoint a killed run leaves loads;
the learning-rate schedule of short runs; the presets read back from --dry-run; bad input."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from rcka_kernels.distill import checkpoint as C
from rcka_kernels.distill import main
from rcka_kernels.distill.train import Config, DistillError, run

ARGS = ["--epochs", "3", "--teacher-epochs", "3", "--max-steps", "6", "--methods", "kd,rcka+kd", "--seeds", "2",
        "--no-progress", "--no-plot", "--threads", "1"]
CFG = dict(epochs=3, teacher_epochs=3, max_steps=6, methods=["kd", "rcka+kd"], seeds=2, progress=False, plot=False, threads=1)
TIMING = ("images_per_s", "seconds", "peak_memory_mb")
FINAL = ("teacher/teacher.pt", "kd/student.pt", "kd/seed1/student.pt", "rcka+kd/student.pt", "rcka+kd/seed1/student.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(Config(out=str(out), **CFG))
    return out


def _history(path):
    h = json.loads(path.read_text())["history"]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in h]


def _assert_same_run(a, b):
    for f in FINAL:
        sa = torch.load(a / f, weights_only=True)["model"]
        sb = torch.load(b / f, weights_only=True)["model"]
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=f"{f}: {k}")
        assert _history(a / os.path.dirname(f) / "metrics.json") == _history(b / os.path.dirname(f) / "metrics.json"), f
    sa, sb = (json.loads((p / "summary.json").read_text())["summary"] for p in (a, b))
    for m in ("teacher", "kd", "rcka+kd"):
        assert sa[m]["test_acc"] == sb[m]["test_acc"] and sa[m].get("test_acc_std") == sb[m].get("test_acc_std"), m


def test_sigkill_at_a_random_moment_then_resume_matches(tmp_path, reference):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "rcka_kernels.distill", *ARGS, "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "teacher" / "last.pt").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        delay = random.uniform(0.0, 1.5)  # the rest of the run takes about that long: killed anywhere in it
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
        err = p.stderr.read().decode()
        p.stderr.close()
    assert p.returncode in (-signal.SIGKILL, 0), err[-2000:]
    for f in glob.glob(str(out / "**" / "*.pt"), recursive=True):  # every checkpoint left loads
        assert "model" in torch.load(f, weights_only=True), f
    run(Config(out=str(out), resume=True, **CFG))
    _assert_same_run(reference, out)
    assert not glob.glob(str(out / "**" / "*.partial"), recursive=True)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("after", [2, 5, 10])  # teacher mid-run, first student mid-run, a later seed mid-run
def test_interrupted_after_a_checkpoint_resumes_identically(tmp_path, monkeypatch, reference, after):
    out = tmp_path / "run"
    calls, real = [], C.save

    def save(obj, path):
        real(obj, path)
        if path.endswith("last.pt"):
            calls.append(path)
            if len(calls) == after:
                raise _Stop(path)

    monkeypatch.setattr(C, "save", save)
    with pytest.raises(_Stop):
        run(Config(out=str(out), **CFG))
    monkeypatch.setattr(C, "save", real)
    ck = torch.load(calls[-1], weights_only=True)
    assert ck["epoch"] < ck["epochs"] or after == 3  # stopped inside a run
    run(Config(out=str(out), resume=True, **CFG))
    _assert_same_run(reference, out)
    # the checkpoint holds what resuming needs, and best.pt the best epoch
    last = torch.load(out / "kd" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "schedule", "epoch", "history", "rng", "best", "fingerprint"} <= set(last)
    best = torch.load(out / "kd" / "best.pt", weights_only=True)
    assert best["history"][-1]["test_acc"] == max(r["test_acc"] for r in last["history"])


def test_seeds_mean_and_spread(reference):
    s = json.loads((reference / "summary.json").read_text())["summary"]
    for m in ("kd", "rcka+kd"):
        accs = [r["test_acc"] for r in s[m]["runs"]]
        assert s[m]["seeds"] == [0, 1] and len(accs) == 2
        assert s[m]["test_acc"] == pytest.approx(sum(accs) / 2)
        assert s[m]["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)  # sample std (n - 1)
        h = json.loads((reference / m / "seed1" / "metrics.json").read_text())["history"]
        assert h[-1]["test_acc"] == accs[1]
    csv_rows = (reference / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("run,model,n_seeds,seeds,test_acc_mean,test_acc_std") and len(csv_rows) == 4
    table = (reference / "summary.md").read_text()
    assert f"| kd | mlp_student | 0, 1 | {s['kd']['test_acc']:.2f} ± {s['kd']['test_acc_std']:.2f} |" in table


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_short_runs_record_their_lr_and_none_starts_decayed(tmp_path, epochs):
    out = tmp_path / "run"
    run(Config(out=str(out), methods=["ce"], epochs=epochs, max_steps=2, progress=False, plot=False, lr=0.05))
    h = json.loads((out / "ce" / "metrics.json").read_text())["history"]
    lrs = [r["lr"] for r in h]
    assert len(lrs) == epochs and lrs[0] == 0.05
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    want = {1: [0.05], 2: [0.05, 0.005], 3: [0.05, 0.005, 0.0005]}[epochs]
    assert lrs == pytest.approx(want, rel=1e-12)
    # the optimizer trained the last epoch at the recorded rate
    assert torch.load(out / "ce" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lrs[-1])


def _dry(capsys, argv):
    assert main([*argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


def test_presets_read_back_from_dry_run(capsys):
    c100 = _dry(capsys, ["--recipe", "cifar100"])
    cfg = c100["config"]
    assert (cfg["dataset"], cfg["epochs"], cfg["teacher_epochs"], cfg["batch_size"]) == ("cifar100", 240, 240, 64)
    assert (cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["milestones"]) == (0.05, 0.9, 5e-4, [150, 180, 210])
    assert (cfg["teacher"], cfg["student"], cfg["intra_weight"], cfg["inter_weight"]) == ("resnet56", "resnet20", 15.0, 15.0)
    assert c100["student_milestones"] == c100["teacher_milestones"] == [150, 180, 210]
    inet = _dry(capsys, ["--recipe", "imagenet"])["config"]
    assert (inet["dataset"], inet["epochs"], inet["batch_size"], inet["lr"]) == ("imagenet", 100, 256, 0.1)
    assert (inet["momentum"], inet["weight_decay"], inet["milestones"]) == (0.9, 1e-4, [30, 60, 90])
    assert (inet["teacher"], inet["student"]) == ("resnet34", "resnet18")
    # a flag overrides the preset's value, the others stay
    over = _dry(capsys, ["--recipe", "cifar100", "--lr", "0.1", "--epochs", "10", "--teacher-epochs", "10",
                         "--milestones", "5,8", "--student", "resnet8x4", "--teacher", "resnet32x4"])["config"]
    assert (over["lr"], over["epochs"], over["milestones"], over["student"], over["weight_decay"]) == (0.1, 10, [5, 8], "resnet8x4", 5e-4)
    # without a recipe: the default milestones of a 15-epoch digits run, none on the first epoch
    assert _dry(capsys, ["--epochs", "15", "--methods", "ce"])["student_milestones"] == [9, 11, 13]
    assert _dry(capsys, ["--epochs", "1", "--methods", "ce"])["student_milestones"] == []


def _error(capsys, argv, *match):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("rcka-distill: error:"), err
    for m in match:
        assert m in err[-1], err[-1]
    return err[-1]


QUICK = ["--epochs", "2", "--teacher-epochs", "2", "--max-steps", "3", "--no-progress", "--no-plot"]


def test_bad_input(tmp_path, capsys):
    _error(capsys, ["--recipe", "cifar100", "--epochs", "10", "--dry-run"], "150,180,210 (from --recipe cifar100)", "1..9")
    _error(capsys, [*QUICK, "--resume", "--out", str(tmp_path / "missing")], "does not exist", "nothing to resume")
    (tmp_path / "empty").mkdir()
    _error(capsys, [*QUICK, "--resume", "--out", str(tmp_path / "empty")], "is empty")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    _error(capsys, [*QUICK, "--resume", "--out", str(tmp_path / "foreign")], "no run.json")

    out = tmp_path / "run"
    assert main([*QUICK, "--methods", "kd,rcka", "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p: os.path.getmtime(p) for p in glob.glob(str(out / "**" / "*"), recursive=True)}
    _error(capsys, [*QUICK, "--methods", "kd,rcka", "--out", str(out)], "holds a finished run", "--resume")
    assert {p: os.path.getmtime(p) for p in glob.glob(str(out / "**" / "*"), recursive=True)} == before  # nothing touched
    _error(capsys, [*QUICK, "--methods", "kd,rcka", "--out", str(out), "--resume", "--student", "mlp_teacher"],
           "student: 'mlp_student' there, 'mlp_teacher' now")
    # a checkpoint of another method (copied in by hand) is refused, naming the difference
    shutil.copy(out / "kd" / "last.pt", out / "rcka" / "last.pt")
    _error(capsys, [*QUICK, "--methods", "kd,rcka", "--out", str(out), "--resume"], "rcka", "last.pt", "method: 'kd' there, 'rcka' now")
    # a corrupt checkpoint is named and kept, as is the best one
    final = torch.load(out / "kd" / "student.pt", weights_only=True)["model"]
    data = (out / "kd" / "last.pt").read_bytes()
    (out / "kd" / "last.pt").write_bytes(data[: len(data) // 2])
    _error(capsys, [*QUICK, "--methods", "kd", "--out", str(out), "--resume"], "kd", "last.pt", "is corrupt", "best.pt", "is intact")
    assert len((out / "kd" / "last.pt").read_bytes()) == len(data) // 2 and (out / "kd" / "best.pt").exists()
    # the best checkpoint is a full one: resumed from it, the run ends where it ended
    shutil.copy(out / "kd" / "best.pt", out / "kd" / "last.pt")
    assert main([*QUICK, "--methods", "kd", "--out", str(out), "--resume"]) == 0
    assert len(json.loads((out / "kd" / "metrics.json").read_text())["history"]) == 2
    again = torch.load(out / "kd" / "student.pt", weights_only=True)["model"]
    assert all(torch.allclose(final[k], again[k], rtol=0, atol=1e-6) for k in final)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "last.pt")
    C.save({"model": {"w": torch.ones(2)}}, path)

    def full_disk(f):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    with pytest.raises(DistillError, match="No space left on device; the previous version is kept"):
        C.atomic_write(path, full_disk)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["last.pt"]
