"""Fixtures of the DICOM unit tests: test volumes and the dicom3tools validators."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

#: dciodvfy/dcentvfy warnings accepted (docs/dicom.md explains each one).
ACCEPTED_WARNINGS = (
    # no BodyPartExamined in the header: laterality is "actually unknown", sent empty
    "is only permitted to be empty when actually unknown",
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package dicom3tools (make deps)")
    return path


def run_validator(tool: str, files: list[Path], accept: tuple[str, ...] = ()) -> list[str]:
    """Run dciodvfy (one file) or dcentvfy (a series); return Error/unaccepted Warning lines."""
    proc = subprocess.run([_tool(tool), *map(str, files)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    problems = [ln for ln in lines if ln.startswith("Error")]
    problems += [
        ln
        for ln in lines
        if ln.startswith("Warning") and not any(ok in ln for ok in ACCEPTED_WARNINGS + accept)
    ]
    return problems


@pytest.fixture(scope="session")
def validate():
    """validate(files): dciodvfy on every file and dcentvfy on the set; asserts no problems."""

    def check(files: list[Path], accept: tuple[str, ...] = ()) -> None:
        assert files, "no files to validate"
        for path in files:
            problems = run_validator("dciodvfy", [path], accept)
            assert not problems, f"dciodvfy {path.name}: {problems}"
        problems = run_validator("dcentvfy", files, accept)
        assert not problems, f"dcentvfy: {problems}"

    return check
