"""Static checks: ruff lint, ruff format and mypy (settings in pyproject.toml) must be clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGETS = ["qlimage", "tests", "dodo.py"]


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN} (pip install -e '.[test]')")
    return str(path)


def check(*cmd: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )


def test_ruff_check() -> None:
    check(tool("ruff"), "check", *TARGETS)


def test_ruff_format() -> None:
    check(tool("ruff"), "format", "--check", *TARGETS)


def test_mypy() -> None:
    check(tool("mypy"))
