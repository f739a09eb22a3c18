"""docker/entrypoint.py without a container: `train` and `serve` run on this machine with
the /opt/ml root moved to a temporary folder (NCF_OPT_ML), exactly as in the image.

The training hyperparameters come from deploy.train_job, so these tests also hold the
entrypoint to what `make train-job` and the pipeline send.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import yaml
from ports import free_ports
from sagemaker_job import opt_ml_for_training, ping, request, wait_for_ping

from archive.build import build
from deploy.train_job import hyperparameters

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.py"
sys.path.insert(0, str(ENTRYPOINT.parent))
entrypoint = importlib.import_module("entrypoint")
health_gate = importlib.import_module("health_gate")

DATASET = "ml-100k"  # any name whose raw format (u.data) the training data loader reads


# ---------------------------------------------------------------------- helpers


def clean_env(**extra) -> dict[str, str]:
    """This environment without SageMaker's variables, plus `extra`, one thread for torch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def serve_env(tmp_path: Path, **extra) -> tuple[dict[str, str], int, int]:
    """(environment, public port, management port) of a `serve` under tmp_path."""
    base = free_ports(6)
    env = clean_env(
        NCF_OPT_ML=str(tmp_path / "opt_ml"),
        TMPDIR=str(tmp_path / "tmp"),  # TorchServe's processes then carry tmp_path in argv
        SAGEMAKER_BIND_TO_PORT=str(base),
        SAGEMAKER_SAFE_PORT_RANGE=f"{base + 1}-{base + 5}",
        **extra,
    )
    (tmp_path / "tmp").mkdir()
    return env, base, base + 2  # the range holds inference, management, metrics, gRPC x2


def wait_for_serve(port: int, process: subprocess.Popen, log: Path) -> list:
    return wait_for_ping(
        port,
        lambda: process.poll() is None,
        lambda: f"exit status {process.returncode}:\n{log.read_text()[-3000:]}",
        timeout=120,
    )


def processes_under(path: Path) -> list[psutil.Process]:
    """Live processes whose command line mentions `path` (TorchServe's carry its TMPDIR)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(path) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def start_serve(tmp_path: Path, **extra):
    env, public, management = serve_env(tmp_path, **extra)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ENTRYPOINT), "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, public, management, log


def stop(process: subprocess.Popen, tmp_path: Path) -> None:
    """End what a failed test left running: SIGTERM first (the entrypoint stops TorchServe),
    SIGKILL for what remains."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for leftover in processes_under(tmp_path):
        leftover.kill()


def run_train(root: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), "train"],
        env=clean_env(NCF_OPT_ML=str(root), **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An /opt/ml root after `train` ran in it (a one-epoch GMF)."""
    hp = hyperparameters(DATASET, "gmf", {"epochs": 1, "batch-size": 1024})
    root = opt_ml_for_training(tmp_path_factory.mktemp("train") / "opt_ml", hp)
    result = run_train(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def mar(trained, tmp_path_factory) -> Path:
    """ncf.mar of the trained artifact, as `make package` uploads it."""
    return build(trained / "model", tmp_path_factory.mktemp("store"))


# ---------------------------------------------------------------------- train


def test_hyperparameters_become_training_options():
    hp = hyperparameters("ml-1m", "neumf", {"epochs": 3, "batch-size": 512}, distributed=True)
    hp |= {"resume": "true", "quiet": "False", "sagemaker_region": "eu-west-1"}
    assert entrypoint.hyperparameter_args(hp) == [
        "--dataset", "ml-1m", "--model", "neumf", "--batch-size", "512", "--epochs", "3",
        "--resume",
    ]  # fmt: skip


def test_multi_node_training_runs_torchrun_across_the_hosts():
    hosts = ["algo-1", "algo-2", "algo-3"]
    command = entrypoint.training_command(["--epochs", "2"], True, hosts, "algo-2", gpus=4)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=3", "--node_rank=1", "--nproc_per_node=4", "--master_addr=algo-1"} <= set(
        command
    )
    assert command[-4:] == ["-m", "training.train", "--epochs", "2"]
    single = entrypoint.training_command([], False, ["algo-1"], "algo-1", gpus=1)
    assert single == [sys.executable, "-m", "training.train"]


def test_train_writes_the_artifact_to_opt_ml_model(trained):
    model = trained / "model"
    for name in ("model.safetensors", "catalog.safetensors", "metadata.json"):
        assert (model / name).is_file(), name
    metadata = json.loads((model / "metadata.json").read_text())
    # The data came from the train channel (SM_CHANNEL_TRAIN, derived from /opt/ml).
    assert metadata["dataset"]["name"] == DATASET
    assert metadata["dataset"]["num_users"] == 300
    assert list((trained / "output" / "data").glob("metrics-*.json"))  # SM_OUTPUT_DATA_DIR
    assert not (trained / "output" / "failure").exists()


def test_a_failed_training_leaves_its_reason_in_the_failure_file(tmp_path):
    hp = hyperparameters(DATASET, "gmf", {"epochs": 0})
    root = opt_ml_for_training(tmp_path / "opt_ml", hp)
    result = run_train(root)
    assert result.returncode == 2
    failure = (root / "output" / "failure").read_text()
    assert "--epochs must be at least 1" in failure
    assert "--epochs must be at least 1" in result.stderr  # and the log still shows it


@pytest.mark.slow
def test_distributed_training_starts_one_process_per_gpu(tmp_path):
    # SM_NUM_GPUS stands in for two GPUs: torchrun starts two ranks (gloo on the CPU).
    hp = hyperparameters(DATASET, "gmf", {"epochs": 1, "batch-size": 1024}, distributed=True)
    root = opt_ml_for_training(tmp_path / "opt_ml", hp)
    result = run_train(root, SM_NUM_GPUS="2")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [line for line in result.stdout.splitlines() if line.startswith("rank=")]
    assert sorted(line.split()[0] for line in ranks) == ["rank=0", "rank=1"]
    assert len({line.split("weights=")[1] for line in ranks}) == 1  # the ranks agree
    assert (root / "model" / "metadata.json").is_file()


# ---------------------------------------------------------------------- serve


def test_sagemaker_settings_go_into_the_mar(mar, tmp_path):
    copy = tmp_path / "ncf.mar"
    assert entrypoint.copy_mar(mar, copy, workers=3, timeout=45) == 45
    with zipfile.ZipFile(mar) as original, zipfile.ZipFile(copy) as copied:
        assert sorted(original.namelist()) == sorted(copied.namelist())
        config = yaml.safe_load(copied.read("model-config.yaml"))
        before = yaml.safe_load(original.read("model-config.yaml"))
        for name in original.namelist():
            if name != "model-config.yaml":
                assert original.read(name) == copied.read(name), name
    assert (config["minWorkers"], config["maxWorkers"], config["responseTimeout"]) == (3, 3, 45)
    assert config["handler"] == before["handler"]  # the rest is kept
    # Without SAGEMAKER_MODEL_SERVER_TIMEOUT the archive's own timeout stays.
    assert entrypoint.copy_mar(mar, tmp_path / "b.mar", 1, None) == before["responseTimeout"]


def test_serve_a_mar_with_sagemakers_settings_and_stop_on_sigterm(mar, tmp_path):
    (tmp_path / "opt_ml" / "model").mkdir(parents=True)
    (tmp_path / "opt_ml" / "model" / "ncf.mar").write_bytes(mar.read_bytes())
    # Another `handler` package on PYTHONPATH must not shadow the one packed in the .mar.
    (tmp_path / "shadow" / "handler").mkdir(parents=True)
    (tmp_path / "shadow" / "handler" / "__init__.py").write_text("raise ImportError('shadow')")
    process, public, management, log = start_serve(
        tmp_path,
        SAGEMAKER_MODEL_SERVER_WORKERS="2",
        SAGEMAKER_MODEL_SERVER_TIMEOUT="45",
        PYTHONPATH=str(tmp_path / "shadow"),
    )
    try:
        seen = wait_for_serve(public, process, log)
        assert 503 in seen  # /ping refused while the workers were loading
        status, described = request(management, "GET", "/models/ncf")
        assert status == 200
        workers = described[0]["workers"]
        assert [w["status"] for w in workers] == ["READY", "READY"]  # both, before the first 200
        assert described[0]["responseTimeout"] == 45

        status, answer = request(public, "POST", "/invocations", {"user_id": 7, "k": 3})
        assert status == 200 and len(answer["items"]) == 3
        status, answer = request(public, "POST", "/predictions/ncf", {"user_ids": [1, 2]})
        assert status == 200
        status, answer = request(public, "POST", "/invocations", {"user_id": "seven"})
        assert status == 400 and "error" in answer  # TorchServe's answer, passed through

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        print(f"SIGTERM to exit: {time.monotonic() - started:.1f} s")
        assert processes_under(tmp_path) == []  # no Java, no worker left behind
    finally:
        stop(process, tmp_path)
    output = log.read_text()
    assert "ACCESS_LOG" in output and "/invocations" in output  # TorchServe logs to stdout
    assert '"GET /models/ncf' not in output  # but not the gate's own polling


def test_serve_packs_an_artifact_and_ping_follows_the_worker(trained, tmp_path):
    # A training job's model.tar.gz is the artifact folder: served without a .mar.
    (tmp_path / "opt_ml").mkdir()
    (tmp_path / "opt_ml" / "model").symlink_to(trained / "model")
    process, public, _, log = start_serve(tmp_path)
    try:
        wait_for_serve(public, process, log)
        version = json.loads((trained / "model" / "metadata.json").read_text())["version"]
        status, answer = request(public, "POST", "/invocations", {"user_id": 1, "k": 2})
        assert status == 200 and answer["model"]["version"] == version

        # A worker that dies makes /ping fail until TorchServe has a READY one again.
        (worker,) = [
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "model_service_worker" in " ".join(p.cmdline())
        ]
        worker.kill()
        deadline = time.monotonic() + 10
        while ping(public) == 200:
            assert time.monotonic() < deadline, "/ping stayed 200 without a worker"
            time.sleep(0.05)
        wait_for_serve(public, process, log)

        # If TorchServe itself dies, the entrypoint exits with an error, leaving nothing.
        (java,) = [p for p in psutil.Process(process.pid).children() if p.name() == "java"]
        java.kill()
        assert process.wait(timeout=15) == 1
        assert processes_under(tmp_path) == []
    finally:
        stop(process, tmp_path)
    assert "TorchServe exited" in log.read_text()


def test_serve_without_a_model_fails_with_one_line(tmp_path):
    (tmp_path / "opt_ml" / "model").mkdir(parents=True)
    env, *_ = serve_env(tmp_path)
    result = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "serve"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"entrypoint: error: {tmp_path}/opt_ml/model: neither a .mar nor an artifact "
        "(metadata.json)"
    ]


class Echo(BaseHTTPRequestHandler):
    """Stands in for TorchServe's inference API: answers 201 with what it received."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        seen = {"path": self.path, "body": body.decode(), "headers": dict(self.headers)}
        data = json.dumps(seen).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


def test_gate_passes_requests_through_and_answers_ping_itself():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    readiness = health_gate.Readiness(management_port=1, model="ncf", workers=1)  # not started
    gate = health_gate.GateServer(
        0, readiness, health_gate.Upstream(upstream.server_port, timeout=5), max_body=1000
    )
    for server in (upstream, gate):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    connection = http.client.HTTPConnection("127.0.0.1", gate.server_port, timeout=5)
    try:
        connection.request("GET", "/ping")
        response = connection.getresponse()
        assert response.status == 503
        assert json.loads(response.read())["reason"] == "TorchServe is starting"

        # Same connection (keep-alive); a chunked body arrives whole, with its headers.
        chunks = iter([b'{"user_id":', b" 1}"])
        headers = {"Transfer-Encoding": "chunked", "X-Amzn-SageMaker-Custom-Attributes": "a=1"}
        connection.request("POST", "/invocations?x=1", chunks, headers, encode_chunked=True)
        response = connection.getresponse()
        seen = json.loads(response.read())
        assert response.status == 201
        assert (seen["path"], seen["body"]) == ("/invocations?x=1", '{"user_id": 1}')
        assert seen["headers"]["X-Amzn-SageMaker-Custom-Attributes"] == "a=1"
        assert "Transfer-Encoding" not in seen["headers"]  # hop-by-hop, not forwarded

        connection.request("POST", "/invocations", b"x" * 1001)
        response = connection.getresponse()
        assert (response.status, response.getheader("Connection")) == (413, "close")
    finally:
        connection.close()
        for server in (gate, upstream):
            server.shutdown()
            server.server_close()


def test_safe_port_range_must_hold_torchserves_ports(monkeypatch):
    monkeypatch.setenv("SAGEMAKER_SAFE_PORT_RANGE", "9000-9005")
    assert entrypoint.loopback_ports(9001) == (9000, 9002, 9003, 9004, 9005)
    monkeypatch.setenv("SAGEMAKER_SAFE_PORT_RANGE", "9000-9002")
    with pytest.raises(entrypoint.ConfigError, match="5 ports needed"):
        entrypoint.loopback_ports(8080)


# ---------------------------------------------------------------------- anything else


def test_other_commands_are_executed_as_given(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "sh", "-c", "echo $0 $1; exit 3", "a", "b"],
        capture_output=True,
        text=True,
    )
    assert (result.returncode, result.stdout) == (3, "a b\n")
    missing = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "no-such-command"], capture_output=True, text=True
    )
    assert missing.returncode == 127 and "no-such-command" in missing.stderr


def test_readiness_waits_for_every_worker_then_needs_one(monkeypatch):
    readiness = health_gate.Readiness(management_port=1, model="ncf", workers=2)  # not started
    answers = iter([None, 1, 2, 1, 0, None])
    monkeypatch.setattr(readiness, "ready_workers", lambda: next(answers))
    seen = []
    for _ in range(6):
        readiness.refresh()
        seen.append(readiness.state()[0])
    # not up / loading (1 of 2) / all READY / one still READY / none / management down
    assert seen == [False, False, True, True, False, False]
    assert readiness.state()[1] == "TorchServe's management API does not answer"
