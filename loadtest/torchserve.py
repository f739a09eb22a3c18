"""What the load tests need from a TorchServe: its worker processes and their CPU time, its
Prometheus counters, model (re-)registration, and a private server of their own for the benchmarks.

Starting and stopping go through archive/server.py (what `make serve` uses), so a benchmark
server is found and stopped exactly like any other of this project's servers.
"""

from __future__ import annotations

import re
import resource
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import psutil

from archive import server as ts
from archive.build import MODEL_CONFIG, run_archiver

REPO = Path(__file__).resolve().parents[1]
NULL_HANDLER = REPO / "loadtest" / "null_handler.py"
NULL_MODEL = "null"
LATENCY_COUNTERS = {
    "inference_latency_ms": "ts_inference_latency_microseconds",
    "queue_latency_ms": "ts_queue_latency_microseconds",
}
REQUESTS_COUNTER = "ts_inference_requests_total"
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class NotReady(RuntimeError):
    """The server cannot take the load: the message says why and what to do."""


# ---------------------------------------------------------------------- processes


def describe(management: str, model: str) -> dict:
    """The batch settings and workers of `model` (for the reports)."""
    _, described = ts.http("GET", f"{management}/models/{model}", timeout=5)
    info = described[0]
    return {
        "model": model,
        "version": info.get("modelVersion"),
        "batch_size": info.get("batchSize"),
        "max_batch_delay_ms": info.get("maxBatchDelay"),
        "workers": len(info.get("workers") or []),
    }


def worker_pids(management: str, model: str) -> list[int]:
    """The model's worker processes; none while TorchServe cannot describe the model."""
    status, described = ts.http("GET", f"{management}/models/{model}", timeout=5)
    if status != 200 or not isinstance(described, list) or not described:
        return []
    return [int(w["pid"]) for w in described[0].get("workers") or [] if w.get("pid")]


def rss_mb(pids: list[int]) -> list[float]:
    """Resident memory of those of `pids` still alive (a restarted worker has a new pid)."""
    sizes = []
    for pid in pids:
        try:
            sizes.append(psutil.Process(pid).memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            pass
    return sizes


class CpuMeter:
    """CPU seconds spent during a load run by the frontend, the workers, Locust (a child
    process of ours, counted once it has been waited for) and the whole machine: where the
    cores went, per request. On a machine shared by all three this is what bounds RPS."""

    def __init__(self, frontend: int, workers: list[int]):
        self.pids = {"frontend": [frontend], "workers": list(workers)}

    @staticmethod
    def _process_seconds(pids: list[int]) -> dict[int, float]:
        """Own CPU (not the children's: the workers are the frontend's) of each live pid."""
        seconds = {}
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.NoSuchProcess:
                continue
            seconds[pid] = times.user + times.system
        return seconds

    @staticmethod
    def _children_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    @staticmethod
    def _machine_busy_seconds() -> float:
        # guest time is already inside user/nice on Linux; steal is other VMs' time, not
        # this machine's work; /proc/stat is the whole host's
        times = psutil.cpu_times()._asdict()
        idle = ("idle", "iowait", "steal", "guest", "guest_nice")
        return sum(v for name, v in times.items() if name not in idle)

    def _read(self) -> dict[str, dict]:
        readings = {name: self._process_seconds(pids) for name, pids in self.pids.items()}
        readings["locust"] = {"children": self._children_seconds()}
        readings["machine"] = {"busy": self._machine_busy_seconds()}
        return readings

    def __enter__(self) -> CpuMeter:
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        end = self._read()
        # Per pid: a process that was not there at both readings is left out.
        self.seconds = {
            name: sum(
                v - self.start[name][key] for key, v in reading.items() if key in self.start[name]
            )
            for name, reading in end.items()
        }

    def per_request_ms(self, requests: int) -> dict[str, float | None]:
        return {
            name: round(seconds * 1000 / requests, 3) if requests else None
            for name, seconds in self.seconds.items()
        }


# ---------------------------------------------------------------------- metrics


def scrape(metrics: str) -> dict[tuple[str, str], float]:
    """{(metric name, model name): value} of the Prometheus text at metrics/metrics, summed
    over the other labels (hostname, version)."""
    status, text = ts.http("GET", f"{metrics}/metrics", timeout=5)
    if status != 200 or not isinstance(text, str):
        raise OSError(f"{metrics}/metrics answered {status}")
    samples: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        key = (match["name"], labels.get("model_name") or labels.get("ModelName") or "")
        samples[key] = samples.get(key, 0.0) + float(match["value"])
    return samples


def server_latency(before: Mapping, after: Mapping, model: str) -> dict[str, float | None]:
    """Mean per-request latencies (ms) from two scrapes: the counters' growth over the
    number of requests TorchServe answered in between. None when there were none.

    TorchServe's inference latency runs from the request's arrival in the frontend to its
    answer, so it includes the queue latency (arrival to hand-over to a worker). Both count
    answered requests only, the request counter every request: with failures in the run,
    the means come out a little low."""
    requests = after.get((REQUESTS_COUNTER, model), 0.0) - before.get(
        (REQUESTS_COUNTER, model), 0.0
    )
    result: dict[str, float | None] = {}
    for key, counter in LATENCY_COUNTERS.items():
        grown = after.get((counter, model), 0.0) - before.get((counter, model), 0.0)
        result[key] = round(grown / requests / 1000, 4) if requests > 0 else None
    return result


# ---------------------------------------------------------------------- models


def register(
    management: str, model: str, mar: str, batch_size: int, max_batch_delay: int, workers: int
) -> None:
    """Register `mar` as `model` with these batch settings and `workers` READY workers.

    Needs enable_model_api=true. The registration's batch_size and max_batch_delay win over
    the .mar's model-config.yaml, but its minWorkers/maxWorkers win over initial_workers,
    hence the explicit scale afterwards."""
    query = urlencode({
        "url": mar, "model_name": model, "batch_size": batch_size,
        "max_batch_delay": max_batch_delay, "initial_workers": 1, "synchronous": "true",
    })  # fmt: skip
    status, answer = ts.http("POST", f"{management}/models?{query}", timeout=300)
    if status != 200:
        raise ts.ServerError(f"registering {model} from {mar}: {status} {answer}")
    query = urlencode({"min_worker": workers, "max_worker": workers, "synchronous": "true"})
    status, answer = ts.http("PUT", f"{management}/models/{model}?{query}", timeout=300)
    if status != 200:
        raise ts.ServerError(f"scaling {model} to {workers} workers: {status} {answer}")


def unregister(management: str, model: str) -> None:
    status, answer = ts.http("DELETE", f"{management}/models/{model}", timeout=120)
    if status not in (200, 404):
        raise ts.ServerError(f"unregistering {model}: {status} {answer}")


def build_null_mar(store: Path, model_config: Path = MODEL_CONFIG) -> Path:
    """store/null.mar: the null handler with the NCF model's model-config.yaml (same batch
    settings and workers), built by the real torch-model-archiver."""
    return run_archiver(NULL_MODEL, "1.0", NULL_HANDLER, model_config, store)


# ---------------------------------------------------------------------- a private server


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:  # bound together, so the ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def loopback_ports() -> dict[str, str]:
    """config.properties settings putting every TorchServe listener on a free loopback port.

    gRPC included: TorchServe opens its gRPC APIs on 7070/7071 unless told otherwise, and a
    second TorchServe on the machine would then fail to start."""
    return ts.loopback_config(*free_ports(5))


@contextmanager
def private_server(model_store: Path, state: Path) -> Iterator[ts.Server]:
    """A TorchServe of the project's config.properties serving model_store/ncf.mar, on free
    loopback ports and with the model API on (loopback only), so that benchmarks can
    register models with other batch settings; stopped, with its workers, on exit."""
    server = ts.start(model_store, state, {**loopback_ports(), "enable_model_api": "true"})
    try:
        yield server
    finally:
        ts.stop(state)
