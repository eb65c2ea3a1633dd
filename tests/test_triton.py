"""Runs the interpreter suite (tests/test_triton_interp.py) in a subprocess with
TRITON_INTERPRET=1, which must be set before triton is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter suite runs in this session directly")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("RCKA_TRITON_MAX_BLOCK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_interp.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "no tests ran" not in proc.stdout
