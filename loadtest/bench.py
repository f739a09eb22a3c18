"""The serving benchmarks, each on a private TorchServe of its own (free loopback ports,
the project's config.properties with the model API on, loopback only), each printing its
figures and writing JSON under bench/results/ (the batch grid, loadtest/grid.py, too):

    python -m loadtest.bench compare --artifact A   # ncf vs null handler: loadtest-compare.json
    python -m loadtest.bench soak    --artifact A   # 10 minutes, worker RSS: loadtest-soak.json
    python -m loadtest.bench kill    --artifact A   # kill -9 the worker: loadtest-kill.json

The NCF .mar is built from the artifact with archive/build.py (the project's
model-config.yaml), the null handler's with the same model-config.yaml; the null handler
is registered with the NCF model's batch settings and workers, so that the two differ only
in the handler. Each Locust run's own results (CSVs, plots, report.md) are kept under
loadtest/results/bench-<command>-<timestamp>/.

--torch-threads sets handler.threads of the .mar's model-config.yaml (default 1, as
shipped): on a 2-core machine shared with Locust and the Java frontend, a fixed single
intra-op thread per worker keeps runs comparable; torch's own default, a thread per core,
competes with both (see the README).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from archive import server as ts
from archive.build import build, model_config_with
from loadtest.run import (
    RESULTS,
    Load,
    Target,
    add_load_arguments,
    load_from,
    print_summary,
    run_load,
)
from loadtest.torchserve import (
    NULL_MODEL,
    CpuMeter,
    build_null_mar,
    describe,
    private_server,
    register,
    rss_mb,
    unregister,
    worker_pids,
)
from loadtest.workload import Workload

REPO = Path(__file__).resolve().parents[1]
BENCH_RESULTS = REPO / "bench" / "results"
P99_TARGET_MS = 25.0
RPS_RATIO_TARGET = 0.8
WARM_UP_REQUESTS = 30
SETTLE_S = 60  # soak: RSS growth is judged from here on


@dataclass
class Bench:
    server: ts.Server
    artifact: Path
    results: Path  # this command's Locust runs go in sub-folders


@contextmanager
def bench_server(artifact: Path, results: Path, torch_threads: int) -> Iterator[Bench]:
    with tempfile.TemporaryDirectory(prefix="ncf-bench-") as work:
        store = Path(work) / "store"
        # The handler sets its torch threads from handler.threads (an environment variable
        # such as OMP_NUM_THREADS would be overridden by it).
        model_config = model_config_with(
            {"handler": {"threads": torch_threads}}, Path(work) / "model-config.yaml"
        )
        build(artifact, store, model_config)
        build_null_mar(store, model_config)
        with private_server(store, Path(work) / "state") as server:
            yield Bench(server, artifact, results)


def target(bench: Bench, model: str) -> Target:
    server = bench.server
    return Target(server.inference, server.management, server.metrics, model)


def warm_up(bench: Bench, model: str, load: Load):
    """A few requests one at a time first, so that a freshly (re)registered worker's
    first-call costs (lazy allocations, caches) are not measured."""
    workload = Workload.from_artifact(bench.artifact, load.mix)
    rng = random.Random(0)
    for _ in range(WARM_UP_REQUESTS):
        status, answer = ts.http(
            "POST", f"{bench.server.inference}{load.path}", workload.next(rng).body, timeout=30
        )
        if status != 200:
            raise ts.ServerError(f"warm-up request to {model} answered {status}: {answer}")


def measure(bench: Bench, model: str, load: Load, results: Path) -> dict:
    """One constant load on `model` of the bench server: summary.json's figures, and the
    CPU time each part of the set-up spent per request."""
    warm_up(bench, model, load)
    workers = worker_pids(bench.server.management, model)
    cpu = CpuMeter(bench.server.pid, workers)
    summary = run_load(target(bench, model), load, bench.artifact, results, meter=cpu)
    return {**summary, "cpu_ms_per_request": cpu.per_request_ms(summary["requests"])}


def null_load(load: Load) -> Load:
    # The null handler's constant answer has no per-user items to check: 200 is the test.
    return replace(load, check="status", path=f"/predictions/{NULL_MODEL}")


def targets_met(ncf: dict, null: dict, p99_target_ms: float = P99_TARGET_MS) -> dict:
    ratio = ncf["rps"] / null["rps"] if null["rps"] else 0.0
    return {
        "no_failures": ncf["failures"] == 0,
        f"p99_le_{p99_target_ms:g}_ms": ncf["p99_ms"] is not None
        and ncf["p99_ms"] <= p99_target_ms,
        f"rps_ge_{RPS_RATIO_TARGET:g}_null": ratio >= RPS_RATIO_TARGET,
    }


def write_json(name: str, payload: dict) -> Path:
    BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
    path = BENCH_RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def context_of(args, bench: Bench) -> dict:
    """What a result depends on besides the load: the model, threads, the machine's load."""
    return {
        "artifact": str(args.artifact),
        "torch_threads": args.torch_threads,
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": describe(bench.server.management, "ncf"),
    }


def register_null_like_ncf(bench: Bench):
    """The null handler with the NCF model's batch settings and workers."""
    ncf = describe(bench.server.management, "ncf")
    register(
        bench.server.management, NULL_MODEL, "null.mar",
        ncf["batch_size"], ncf["max_batch_delay_ms"], ncf["workers"],
    )  # fmt: skip


# ---------------------------------------------------------------------- commands


def compare(args, bench: Bench) -> dict:
    """The target load on the NCF model and on the null handler, one after the other."""
    load = load_from(args)
    context = context_of(args, bench)
    register_null_like_ncf(bench)
    ncf = measure(bench, "ncf", load, bench.results / "ncf")
    null = measure(bench, NULL_MODEL, null_load(load), bench.results / "null")
    unregister(bench.server.management, NULL_MODEL)
    print("ncf:  ", end="")
    print_summary(ncf)
    print("null: ", end="")
    print_summary(null)
    ratio = round(ncf["rps"] / null["rps"], 3) if null["rps"] else None
    for name, summary in (("ncf", ncf), ("null", null)):
        print(f"{name} CPU ms per request: {summary['cpu_ms_per_request']}")
    result = {**context, "ncf": ncf, "null_handler": null, "ratio_to_null": ratio}
    result["targets"] = targets_met(ncf, null)
    print(f"RPS ratio to the null handler: {ratio}; targets: {result['targets']}")
    return result


class RssSampler(threading.Thread):
    """The workers' RSS every `interval` seconds while the load runs."""

    def __init__(self, pids: list[int], interval: float):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.samples: list[dict] = []
        self.stopped = threading.Event()
        self.started_at = time.monotonic()

    def sample(self):
        elapsed = round(time.monotonic() - self.started_at, 1)
        self.samples.append({"t_s": elapsed, "rss_mb": [round(x, 1) for x in rss_mb(self.pids)]})

    def run(self):
        while not self.stopped.wait(self.interval):
            self.sample()


def rss_figures(samples: list[dict]) -> dict:
    """Start, settled, end and max RSS of the workers (summed), and the growth from the start
    and from the settled value: the first samples of a load hold one-off allocations (the
    first full batches' buffers, allocator pools), a leak shows as growth after them."""
    totals = [(s["t_s"], sum(s["rss_mb"])) for s in samples]
    start, end = totals[0][1], totals[-1][1]
    settled = next((mb for t, mb in totals if t >= SETTLE_S), end)
    return {
        "rss_start_mb": round(start, 1),
        "rss_settled_mb": round(settled, 1),
        "rss_end_mb": round(end, 1),
        "rss_max_mb": round(max(mb for _, mb in totals), 1),
        "rss_growth_pct": round(100 * (end - start) / start, 2),
        "rss_growth_after_settle_pct": round(100 * (end - settled) / settled, 2),
    }


def soak(args, bench: Bench) -> dict:
    """The target load for --duration seconds (10 minutes), sampling the workers' RSS."""
    load = load_from(args)
    context = context_of(args, bench)
    warm_up(bench, "ncf", load)
    pids = worker_pids(bench.server.management, "ncf")
    sampler = RssSampler(pids, args.rss_interval)
    sampler.sample()  # the start: after the warm-up, as the load begins
    sampler.start()
    try:
        summary = run_load(target(bench, "ncf"), load, bench.artifact, bench.results / "soak")
    finally:
        sampler.stopped.set()
        sampler.join()
    sampler.sample()  # the end
    restarted = worker_pids(bench.server.management, "ncf") != pids
    memory = rss_figures(sampler.samples)
    result = {
        **context,
        "summary": summary,
        "worker_pids": pids,
        "worker_restarted": restarted,
        **memory,
        "rss_samples": sampler.samples,
    }
    result["targets"] = {
        "no_failures": summary["failures"] == 0,
        "memory_flat_within_5pct": abs(memory["rss_growth_after_settle_pct"]) <= 5
        and not restarted,
    }
    print_summary(summary)
    print(
        f"worker RSS {memory['rss_start_mb']} MB at the start, {memory['rss_settled_mb']} MB "
        f"after {SETTLE_S:g} s, {memory['rss_end_mb']} MB at the end "
        f"({memory['rss_growth_after_settle_pct']:+.2f} % since {SETTLE_S:g} s, "
        f"{memory['rss_growth_pct']:+.2f} % in all), max {memory['rss_max_mb']} MB; "
        f"targets: {result['targets']}"
    )
    return result


def _wait_for_new_workers(bench: Bench, old: set[int], timeout: float) -> float | None:
    """Seconds until the model is READY again on workers other than `old`."""
    start, management = time.monotonic(), bench.server.management
    while time.monotonic() - start < timeout:
        # READY on other pids than the killed ones: TorchServe may still report those for a while.
        try:
            pids = set(worker_pids(management, "ncf"))
            if pids and not pids & old and ts.readiness_problem(management, "ncf") is None:
                return time.monotonic() - start
        except OSError:
            pass  # the frontend is busy replacing the worker: ask again
        time.sleep(0.05)
    return None


def outage(requests_csv: Path, killed_at: float) -> dict:
    """From the per-request log: failures after the kill, and the time from the kill to the
    first success that followed the last of them (to the first success, if none failed)."""
    with open(requests_csv, newline="") as f:
        rows = [
            (float(r["time"]), r["success"] == "1", float(r["response_ms"]))
            for r in csv.DictReader(f)
        ]
    after = [r for r in rows if r[0] >= killed_at]
    failures = [r for r in after if not r[1]]
    last_failure = max((r[0] for r in failures), default=killed_at)
    recovered = min((r[0] for r in after if r[1] and r[0] >= last_failure), default=None)
    before = [r for r in rows if r[0] < killed_at]
    return {
        "requests_before_kill": len(before),
        "failures_before_kill": sum(not r[1] for r in before),
        "failures_after_kill": len(failures),
        "first_failure_after_s": round(failures[0][0] - killed_at, 3) if failures else None,
        "last_failure_after_s": round(last_failure - killed_at, 3) if failures else None,
        "recovered_after_s": round(recovered - killed_at, 3) if recovered else None,
        "max_response_ms_after_kill": round(max((r[2] for r in after), default=0.0), 1),
    }


def kill(args, bench: Bench) -> dict:
    """The target load; --kill-at seconds in, SIGKILL to the model's worker(s)."""
    load = replace(load_from(args), request_log=True)
    context = context_of(args, bench)
    warm_up(bench, "ncf", load)
    pids = worker_pids(bench.server.management, "ncf")
    restart: dict = {}

    def killer():
        time.sleep(args.kill_at)
        restart["killed_at"] = time.time()
        for pid in pids:  # our own server's workers, by the pid its management API gives
            os.kill(pid, signal.SIGKILL)
        restart["worker_ready_after_s"] = _wait_for_new_workers(bench, set(pids), args.duration)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    results = bench.results / "kill"
    summary = run_load(
        target(bench, "ncf"), load, bench.artifact, results, {"kill_at_s": args.kill_at}
    )
    thread.join(timeout=5)
    if "killed_at" not in restart:
        raise RuntimeError("the load ended before the kill; give a --kill-at below --duration")
    gap = outage(results / "requests.csv", restart["killed_at"])
    ready = restart.get("worker_ready_after_s")
    result = {
        **context,
        "summary": summary,
        "killed_pids": pids,
        "new_pids": worker_pids(bench.server.management, "ncf"),
        "kill_at_s": args.kill_at,
        "worker_ready_after_s": None if ready is None else round(ready, 3),
        **gap,
    }
    result["targets"] = {
        "worker_restarted": ready is not None,
        "requests_succeed_again": gap["recovered_after_s"] is not None,
    }
    print_summary(summary)
    print(
        f"killed worker {pids} at {args.kill_at:g} s: TorchServe had a new worker READY after "
        f"{result['worker_ready_after_s']} s; requests succeeded again after "
        f"{gap['recovered_after_s']} s; {gap['failures_after_kill']} failed in between "
        f"(slowest answer after the kill {gap['max_response_ms_after_kill']} ms)"
    )
    return result


COMMANDS = {
    "compare": (compare, "loadtest-compare.json", 60.0),
    "soak": (soak, "loadtest-soak.json", 600.0),
    "kill": (kill, "loadtest-kill.json", 60.0),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, output, duration) in COMMANDS.items():
        c = sub.add_parser(name, help=f"-> bench/results/{output}")
        add_bench_arguments(c, duration)
        if name == "soak":
            c.add_argument("--rss-interval", type=float, default=15, help="seconds")
        if name == "kill":
            c.add_argument(
                "--kill-at", type=float, default=20, help="seconds after the load is started"
            )
    args = p.parse_args(argv)
    command, output, _ = COMMANDS[args.command]
    return run_command(args.command, command, args, output)


def add_bench_arguments(p: argparse.ArgumentParser, duration: float):
    add_load_arguments(p, users=32, duration=duration)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the workers (handler.threads)",
    )


def run_command(name: str, command, args, output: str) -> int:
    """`command(args, bench)` on a fresh bench server; its result to bench/results/output."""
    results = RESULTS / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        with bench_server(args.artifact, results, args.torch_threads) as bench:
            result = command(args, bench)
    except (ts.ServerError, RuntimeError, OSError) as error:
        print(f"loadtest.bench {name}: {error}", file=sys.stderr)
        return 1
    result["locust_results"] = str(results)
    print(f"wrote {write_json(output, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
