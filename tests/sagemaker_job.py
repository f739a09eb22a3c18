"""What a SageMaker container is given and asked, for the entrypoint and container tests:
a small data set, the /opt/ml layout of a training job, requests and the /ping wait."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from archive.server import http


def write_u_data(folder: Path, users=300, items=150, per_user=20, seed=0) -> None:
    """A small implicit-feedback data set in ml-100k's raw format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = []
    for user in range(1, users + 1):
        for timestamp, item in enumerate(rng.choice(items, per_user, replace=False) + 1):
            lines.append(f"{user}\t{item}\t5\t{timestamp}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")


def opt_ml_for_training(root: Path, hp: dict, hosts=("algo-1",)) -> Path:
    """The /opt/ml layout SageMaker gives a training container, with write_u_data's data."""
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hp))
    resources = {"current_host": hosts[0], "hosts": list(hosts), "network_interface_name": "eth0"}
    (config / "resourceconfig.json").write_text(json.dumps(resources))
    write_u_data(root / "input" / "data" / "train")
    return root


def request(port: int, method: str, path: str, body=None, timeout: float = 10):
    """(status, decoded JSON or text) of one request to 127.0.0.1:port; OSError when
    nothing listens."""
    return http(method, f"http://127.0.0.1:{port}{path}", body, timeout=timeout)


def ping(port: int) -> int | None:
    try:
        return request(port, "GET", "/ping", timeout=2)[0]
    except OSError:
        return None


def wait_for_ping(
    port: int, running: Callable[[], bool], logs: Callable[[], str], timeout: float
) -> list:
    """Poll /ping until 200; return every status seen before (None: not listening yet).
    Fails the test with logs() when the server stops running or the timeout passes."""
    seen = []
    deadline = time.monotonic() + timeout
    while (status := ping(port)) != 200:
        if not running():
            pytest.fail(f"the server stopped before /ping was 200:\n{logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"/ping not 200 after {timeout} s:\n{logs()}")
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.1)
    return seen
