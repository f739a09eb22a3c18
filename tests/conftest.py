"""Shared fixtures. Benchmark data is optional: tests that need it skip without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def benchmark_data_dir() -> Path | None:
    """$NCF_DATA_DIR if set, else ../shared/data beside the checkout (this machine's copy)."""
    for candidate in (os.environ.get("NCF_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = benchmark_data_dir()
    if root is None:
        pytest.skip("no benchmark data (set NCF_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def demo_data():
    from training.data import make_demo

    return make_demo()
