"""`python -m loadtest.run` (what `make loadtest` runs): short real headless Locust runs
against a real TorchServe started here (archive/server.py, free ports) serving a .mar
built by the real torch-model-archiver from a small synthetic artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from archive import server as ts
from archive.build import MODEL_CONFIG, build
from loadtest import report
from loadtest.torchserve import free_ports, loopback_ports
from model.artifact import save_artifact
from tests.synthetic_artifacts import make_artifact

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "rps", "p50_ms", "p90_ms", "p99_ms", "requests", "failures", "users", "duration_s", "server",
}  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("loadtest")
    synthetic = make_artifact("neumf")
    artifact = save_artifact(root / "artifact", synthetic.model, synthetic.catalog, {})
    build(artifact, root / "store")
    state = root / "state"
    server = ts.start(root / "store", state, loopback_ports())  # the project's config otherwise
    try:
        yield server, artifact, root
    finally:
        ts.stop(state)


def loadtest(served, out: Path, *args, management=None):
    server, artifact, _ = served
    command = [
        sys.executable, "-m", "loadtest.run", "--artifact", str(artifact), "--out", str(out),
        "--host", server.inference, "--management", management or server.management,
        "--metrics", server.metrics, *args,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_constant_load_writes_the_report(served, tmp_path):
    done = loadtest(served, tmp_path, "--users", "4", "--duration", "4", "--multi-share", "0.3")
    assert done.returncode == 0, done.stdout + done.stderr
    latest = tmp_path / "latest"
    assert latest.is_symlink() and (tmp_path / os.readlink(latest)).is_dir()
    summary = json.loads((latest / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert set(summary["server"]) == {"inference_latency_ms", "queue_latency_ms"}
    assert summary["failures"] == 0 and summary["requests"] > 20 and summary["users"] == 4
    assert summary["rps"] > 0 and 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]
    # Server-side figures come from TorchServe's counters, unrounded, queue within inference.
    server = summary["server"]
    assert 0 < server["queue_latency_ms"] < server["inference_latency_ms"]
    assert (latest / report.OVER_TIME_PNG).read_bytes()[:4] == b"\x89PNG"
    for name in ("locust_stats.csv", "locust_stats_history.csv", "report.md", "run.json"):
        assert (latest / name).is_file(), name
    run = json.loads((latest / "run.json").read_text())
    config = yaml.safe_load(MODEL_CONFIG.read_text())
    assert run["model"]["batch_size"] == config["batchSize"]
    assert run["model"]["max_batch_delay_ms"] == config["maxBatchDelay"]
    assert run["mix"]["multi_share"] == 0.3
    # The summary holds the whole run (Locust's stats CSV misses its last second): the count
    # of Locust's own end-of-run table.
    log = (latest / "locust.log").read_text().splitlines()
    aggregated = next(line.split() for line in log if line.split()[:1] == ["Aggregated"])
    assert int(aggregated[1]) == summary["requests"]


def test_step_load_plots_the_knee(served, tmp_path):
    done = loadtest(
        served, tmp_path, "--shape", "step", "--step-time", "2", "--step-max-users", "4"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    latest = tmp_path / "latest"
    steps = json.loads((latest / "steps.json").read_text())
    assert [s["users"] for s in steps] == [1, 2, 4]
    assert all(s["rps"] > 0 and s["failures"] == 0 for s in steps)
    assert json.loads((latest / "summary.json").read_text())["users"] == 4
    assert (latest / report.KNEE_PNG).read_bytes()[:4] == b"\x89PNG"


def test_wrong_answers_count_as_failures(served, tmp_path):
    # The server is READY, but a model that does not exist answers 404 to every request.
    done = loadtest(
        served, tmp_path, "--users", "2", "--duration", "2", "--path", "/predictions/nope"
    )
    assert done.returncode == 1
    summary = json.loads((tmp_path / "latest" / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == summary["requests"]
    failures = (tmp_path / "latest" / "locust_failures.csv").read_text()
    assert "HTTP 404" in failures


def test_invocations_path(served, tmp_path):
    done = loadtest(served, tmp_path, "--users", "2", "--duration", "2", "--path", "/invocations")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "latest" / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["requests"] > 0


def test_a_server_that_is_not_ready_is_reported_before_any_load(served, tmp_path):
    (closed,) = free_ports(1)
    done = loadtest(served, tmp_path, "--duration", "2", management=f"http://127.0.0.1:{closed}")
    assert done.returncode == 2
    assert "the server is not ready" in done.stderr and "management API" in done.stderr
    assert not (tmp_path / "latest").exists()
