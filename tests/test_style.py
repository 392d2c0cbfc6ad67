"""ruff keeps the code clean: lint and format checks are part of the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff() -> list[str]:
    exe = Path(sys.executable).parent / "ruff"
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -r requirements-dev.txt)")


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    dirs = ["captioning", "dashboard", "tests", "docs"]
    out = subprocess.run([*ruff(), *args, *dirs], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
