"""`make loadtest`: a headless Locust run against a TorchServe or a SageMaker endpoint, and
its report.

    python -m loadtest.run --artifact artifacts/ml-1m-neumf [--host http://127.0.0.1:8080]
        [--users 32] [--duration 60] [--shape constant|step] [--endpoint NAME] ...

Without --host, the server of `make serve` (logs/server.json) is used. Before any load it
checks that the model's workers are READY (the endpoint InService) and stops with the
reason if not. It reads TorchServe's Prometheus counters before and after the run for the
server-side latencies, and writes loadtest/results/<timestamp>/ (Locust's CSVs and log,
run.json, summary.json, plots, report.md) with loadtest/results/latest pointing at it.
Exit status: 0 without failures, 1 with failures, 2 when the server is not ready.

`run_load` is the whole run as a function; loadtest/grid.py and loadtest/bench.py
measure with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from archive import server as ts
from loadtest import report
from loadtest.torchserve import NotReady, describe, scrape, server_latency
from loadtest.workload import Mix, format_k_weights, parse_k_weights, user_levels

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
SHAPEFILE = REPO / "loadtest" / "shape.py"
RESULTS = REPO / "loadtest" / "results"
# TorchServe's default ports, for a --host that is not this project's `make serve`.
DEFAULT_PORTS = {"management": 8081, "metrics": 8082}


@dataclass
class Target:
    """What is loaded: a TorchServe (host, with its management and metrics APIs for the
    readiness check and server-side figures) or a SageMaker endpoint."""

    host: str | None = None
    management: str | None = None
    metrics: str | None = None
    model: str = "ncf"
    endpoint: str | None = None
    region: str | None = None

    def describe(self) -> str:
        return f"SageMaker endpoint {self.endpoint}" if self.endpoint else f"TorchServe {self.host}"


@dataclass
class Load:
    users: int = 32
    spawn_rate: float | None = None  # default: all users within a second
    duration_s: float = 60
    shape: str = "constant"  # or "step": 1, 2, 4 ... step_max_users users
    step_time_s: float = 15
    step_max_users: int = 64
    path: str = "/predictions/ncf"
    check: str = "items"
    think_time_s: float = 0.0
    mix: Mix = field(default_factory=Mix)
    request_log: bool = False  # every request's time and outcome, for the kill -9 run

    def expected_seconds(self) -> float:
        if self.shape == "step":
            return self.step_time_s * len(user_levels(self.step_max_users))
        return self.duration_s


def check_ready(target: Target) -> None:
    """Raise NotReady, with the reason, unless the target can take the load."""
    if target.endpoint:
        try:
            client = boto3.client("sagemaker", region_name=target.region)
            status = client.describe_endpoint(EndpointName=target.endpoint)["EndpointStatus"]
        except (BotoCoreError, ClientError) as error:
            raise NotReady(f"cannot describe endpoint {target.endpoint}: {error}") from None
        if status != "InService":
            raise NotReady(f"endpoint {target.endpoint} is {status}, not InService")
        return
    problem = ts.readiness_problem(target.management, target.model)
    if problem:
        raise NotReady(problem)


def locust_command(target: Target, load: Load, artifact: Path, results: Path) -> list[str]:
    files = f"{LOCUSTFILE},{SHAPEFILE}" if load.shape == "step" else str(LOCUSTFILE)
    command = [
        sys.executable, "-m", "locust", "-f", files,
        "SageMakerUser" if target.endpoint else "TorchServeUser",
        "--headless", "--only-summary", "--loglevel", "WARNING",
        "--csv", str(results / report.PREFIX), "--csv-full-history",
        "--final-stats", str(results / f"{report.PREFIX}_final.json"),
        "--artifact", str(artifact), "--path", load.path, "--check", load.check,
        "--cold-share", str(load.mix.cold_share), "--multi-share", str(load.mix.multi_share),
        "--multi-users", str(load.mix.multi_users),
        "--k-mix", format_k_weights(load.mix.k_weights),
        "--think-time", str(load.think_time_s),
    ]  # fmt: skip
    if target.endpoint:
        command += ["--endpoint-name", target.endpoint]
        if target.region:
            command += ["--region", target.region]
    else:
        command += ["--host", target.host]
    if load.shape == "step":
        command += ["--step-time", str(load.step_time_s)]
        command += ["--step-max-users", str(load.step_max_users)]
    else:
        spawn_rate = load.spawn_rate or load.users
        command += ["-u", str(load.users), "-r", str(spawn_rate), "-t", f"{load.duration_s:g}s"]
    if load.request_log:
        command += ["--request-log", str(results / "requests.csv")]
    return command


def _scrape(target: Target) -> dict | None:
    if target.endpoint or not target.metrics:
        return None
    try:
        return scrape(target.metrics)
    except OSError:
        return None  # reported as n/a: the load figures stand on their own


def run_load(
    target: Target,
    load: Load,
    artifact: Path,
    results: Path,
    meta: dict | None = None,
    meter: contextlib.AbstractContextManager | None = None,
) -> dict:
    """Check readiness, run Locust, write the report into `results`; return summary.json.
    `meter` (a CpuMeter) is entered around the Locust run alone, not the checks or report."""
    check_ready(target)
    results.mkdir(parents=True, exist_ok=True)
    model = None if target.endpoint else describe(target.management, target.model)
    command = locust_command(target, load, artifact, results)
    before = _scrape(target)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(results / "locust.log", "w") as log, meter or contextlib.nullcontext():
        # Locust exits 1 when any request failed: that is a result, not an error here.
        done = subprocess.run(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            timeout=load.expected_seconds() + 120,
        )  # fmt: skip
    after = _scrape(target)
    if not (results / f"{report.PREFIX}_stats.csv").is_file():
        tail = (results / "locust.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"Locust exited {done.returncode} without statistics:\n{tail}")
    server = {"inference_latency_ms": None, "queue_latency_ms": None}
    if before is not None and after is not None:
        server = server_latency(before, after, target.model)
    run = {
        "started": started,
        "target": target.describe(),
        "shape": load.shape,
        "users": load.users,
        "load": {k: v for k, v in asdict(load).items() if k != "mix"},
        "mix": load.mix.describe(),
        "artifact": str(artifact),
        "model": model,
        "server": server,
        "command": command,
        **(meta or {}),
    }
    (results / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return report.generate(results, run)


def new_results_dir(root: Path = RESULTS) -> Path:
    """root/<timestamp>/, with root/latest pointing at it."""
    results = root / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while results.exists():  # two runs in one second
        results = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
        suffix += 1
    results.mkdir(parents=True)
    latest = root / "latest"
    staged = root / f".latest-{os.getpid()}"
    staged.unlink(missing_ok=True)
    staged.symlink_to(results.name)  # relative: the folder can move
    os.replace(staged, latest)  # atomic: `latest` is never missing
    return results


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"{parts.hostname}:{port}", "", "", ""))


def resolve_target(args) -> Target:
    if args.endpoint:
        return Target(endpoint=args.endpoint, region=args.region)
    served = ts.Server.file(ts.STATE)
    local = json.loads(served.read_text()) if served.is_file() else None
    host = (args.host or (local or {}).get("inference") or "").rstrip("/")
    if not host:
        raise NotReady("no HOST given and no `make serve` server running (logs/server.json)")
    if local and local["inference"].rstrip("/") == host:
        defaults = {"management": local["management"], "metrics": local["metrics"]}
    else:
        defaults = {key: _with_port(host, port) for key, port in DEFAULT_PORTS.items()}
    return Target(
        host=host,
        management=(args.management or defaults["management"]).rstrip("/"),
        metrics=(args.metrics or defaults["metrics"]).rstrip("/"),
        model=args.model,
    )


def add_load_arguments(p: argparse.ArgumentParser, users: int = 32, duration: float = 60):
    """The load options, shared with loadtest/grid.py and loadtest/bench.py."""
    p.add_argument("--artifact", type=Path, required=True, help="artifact of the served model")
    p.add_argument("--users", type=int, default=users, help="concurrent users (constant)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all)")
    p.add_argument("--duration", type=float, default=duration, help="seconds (constant)")
    p.add_argument("--cold-share", type=float, default=Mix.cold_share)
    p.add_argument("--multi-share", type=float, default=Mix.multi_share)
    p.add_argument("--multi-users", type=int, default=Mix.multi_users)
    p.add_argument("--k-mix", type=parse_k_weights, default=Mix().k_weights, help="K:W,...")
    p.add_argument("--think-time", type=float, default=0.0, help="seconds between requests")


def load_from(args, **changes) -> Load:
    mix = Mix(args.cold_share, args.multi_share, args.multi_users, args.k_mix)
    settings = {
        "users": args.users,
        "spawn_rate": args.spawn_rate,
        "duration_s": args.duration,
        "think_time_s": args.think_time,
        "mix": mix,
    }
    return Load(**{**settings, **changes})


def print_summary(summary: dict, where: Path | None = None):
    server = summary["server"]
    print(
        f"{summary['requests']} requests, {summary['failures']} failures, "
        f"{summary['rps']:g} RPS, p50 {report.fmt_ms(summary['p50_ms'])} ms, "
        f"p90 {report.fmt_ms(summary['p90_ms'])} ms, p99 {report.fmt_ms(summary['p99_ms'])} ms; "
        f"server: inference {report.fmt_ms(server['inference_latency_ms'])} ms, "
        f"queue {report.fmt_ms(server['queue_latency_ms'])} ms"
        + (f"\n  report: {where / 'report.md'}" if where else "")
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", help="TorchServe inference URL (default: make serve's)")
    p.add_argument("--endpoint", help="load a SageMaker endpoint instead (SageMakerUser)")
    p.add_argument("--region", default=os.environ.get("AWS_REGION"), help="its AWS region")
    p.add_argument("--management", help="management API (default: host's port 8081)")
    p.add_argument("--metrics", help="metrics API (default: host's port 8082)")
    p.add_argument("--model", default="ncf", help="TorchServe model name")
    p.add_argument("--path", default="/predictions/ncf", help="or /invocations")
    p.add_argument("--shape", choices=("constant", "step"), default="constant")
    p.add_argument("--step-time", type=float, default=15, help="step load: seconds per step")
    p.add_argument("--step-max-users", type=int, default=64, help="step load: last step")
    p.add_argument("--out", type=Path, default=RESULTS, help="results root")
    add_load_arguments(p)
    args = p.parse_args(argv)
    load = load_from(
        args, shape=args.shape, step_time_s=args.step_time,
        step_max_users=args.step_max_users, path=args.path,
    )  # fmt: skip
    try:
        target = resolve_target(args)
        check_ready(target)  # before the results folder: no empty run is left behind
        results = new_results_dir(args.out)
        print(f"{load.shape} load on {target.describe()} for ~{load.expected_seconds():g} s")
        summary = run_load(target, load, args.artifact, results)
    except NotReady as error:
        print(f"loadtest: the server is not ready: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 1
    print_summary(summary, results)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
