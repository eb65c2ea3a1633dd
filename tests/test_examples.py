"""The README's example script runs (make demo's first step), and its values agree with the float64 oracle."""

import importlib.util
from pathlib import Path


def test_demo_runs(capsys):
    path = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--quick"]) == 0
    out = capsys.readouterr().out
    worst = float(out.split("largest |value - float64 reference| = ")[1].split(";")[0])
    assert worst < 1e-4 and "rcka_kernels.cka_loss" in out and "error" not in out
