"""The code stays within the project's lint rules, line width (110) included: ruff over src, tests and
bench passes, so a too-long line fails CI like a failing test does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _ruff() -> list[str]:
    """ruff from the running interpreter's environment, else the one on PATH, else ``python -m ruff``."""
    beside = Path(sys.executable).parent / "ruff"
    if beside.is_file():
        return [str(beside)]
    on_path = shutil.which("ruff")
    return [on_path] if on_path else [sys.executable, "-m", "ruff"]


def test_ruff_passes_on_src_tests_and_bench():
    proc = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", "src", "tests",
                           "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"ruff check src tests bench:\n{proc.stdout[-5000:]}{proc.stderr[-2000:]}"
