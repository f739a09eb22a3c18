"""Locust's CSVs -> summary.json, PNG plots and report.md, in the run's results folder.

    python -m loadtest.report loadtest/results/latest    # regenerate from the recorded CSVs

loadtest/run.py calls `generate` after each run; the CLI redraws a recorded run (its CSVs
and run.json, which holds what the CSVs do not: the run's settings and the server-side
latencies). Files read, from Locust's --csv PREFIX --csv-full-history:
    PREFIX_stats.csv          totals per request name and "Aggregated"
    PREFIX_stats_history.csv  one row per second per name: RPS and the percentiles of the
                              last 10 s, plus running totals
    PREFIX_final.json         the final totals (loadtest/locustfile.py --final-stats)
Locust keeps response times below 100 ms rounded to whole milliseconds for its
percentiles; the exact means, and TorchServe's own sub-millisecond figures, are reported
beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PREFIX = "locust"
AGGREGATED = "Aggregated"
PERCENTILES = ("50%", "90%", "99%")
OVER_TIME_PNG = "over_time.png"
KNEE_PNG = "knee.png"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):  # "N/A" before the first answer
        return None


def read_totals(results: Path, prefix: str = PREFIX) -> dict:
    """The run's final Aggregated figures: PREFIX_final.json (written by the locustfile at
    exit) if there, else the Aggregated row of PREFIX_stats.csv, which Locust last rewrote
    up to a second before the end."""
    final = results / f"{prefix}_final.json"
    if final.is_file():
        return json.loads(final.read_text())
    with open(results / f"{prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == AGGREGATED:
                return row
    raise ValueError(f"{results / f'{prefix}_stats.csv'}: no {AGGREGATED} row")


def read_history(results: Path, prefix: str = PREFIX) -> list[dict[str, float | None]]:
    """The Aggregated rows of PREFIX_stats_history.csv, as numbers, in time order."""
    with open(results / f"{prefix}_stats_history.csv", newline="") as f:
        rows = [
            {key: _number(value) for key, value in row.items() if key not in ("Type", "Name")}
            for row in csv.DictReader(f)
            if row["Name"] == AGGREGATED
        ]
    return sorted(rows, key=lambda r: r["Timestamp"])


def summarize(totals: dict[str, str], users: int, server: dict) -> dict:
    """summary.json: the run's throughput and latency, Locust's and TorchServe's."""
    requests, rps = int(totals["Request Count"]), float(totals["Requests/s"])
    return {
        "rps": round(rps, 2),
        "p50_ms": _number(totals["50%"]),
        "p90_ms": _number(totals["90%"]),
        "p99_ms": _number(totals["99%"]),
        "requests": requests,
        "failures": int(totals["Failure Count"]),
        "users": users,
        # Locust's RPS is requests over the time from the first to the last request.
        "duration_s": round(requests / rps, 2) if rps else 0.0,
        "server": {
            "inference_latency_ms": server.get("inference_latency_ms"),
            "queue_latency_ms": server.get("queue_latency_ms"),
        },
    }


def steps(history: list[dict]) -> list[dict]:
    """Per user count of a step load: RPS and failures from the running totals over the
    step, and the percentiles Locust reported at its end (they cover the last 10 s)."""
    table, previous = [], None
    for row in history:
        users = int(row["User Count"] or 0)
        if users == 0:  # before the first user, or after the stop
            continue
        if not table or table[-1]["users"] != users:
            start = previous or row
            table.append({"users": users, "start": start, "end": row})
        table[-1]["end"] = row
        previous = row
    result = []
    for step in table:
        start, end = step["start"], step["end"]
        seconds = end["Timestamp"] - start["Timestamp"]
        requests = end["Total Request Count"] - start["Total Request Count"]
        result.append({
            "users": step["users"],
            "rps": round(requests / seconds, 1) if seconds > 0 else None,
            "p50_ms": end["50%"],
            "p99_ms": end["99%"],
            "failures": int(end["Total Failure Count"] - start["Total Failure Count"]),
        })  # fmt: skip
    return result


def plot_over_time(history: list[dict], path: Path, title: str):
    t0 = history[0]["Timestamp"] if history else 0
    seconds = [r["Timestamp"] - t0 for r in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    top.plot(seconds, [r["Requests/s"] for r in history], label="requests/s")
    top.plot(seconds, [r["Failures/s"] for r in history], label="failures/s", color="tab:red")
    top.set_ylabel("per second")
    users = top.twinx()
    users.plot(seconds, [r["User Count"] for r in history], color="grey", ls=":", label="users")
    users.set_ylabel("users")
    top.legend(loc="upper left")
    for name in PERCENTILES:
        bottom.plot(seconds, [r[name] for r in history], label=f"p{name.rstrip('%')}")
    bottom.set_ylabel("response time, ms (last 10 s)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left")
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_knee(table: list[dict], path: Path, title: str):
    users = [s["users"] for s in table]
    fig, left = plt.subplots(figsize=(8, 4.5))
    left.plot(users, [s["rps"] for s in table], "o-", label="requests/s")
    left.set_xscale("log", base=2)
    left.set_xticks(users, [str(u) for u in users])
    left.set_xlabel("users (requests in flight)")
    left.set_ylabel("requests/s")
    right = left.twinx()
    right.plot(users, [s["p99_ms"] for s in table], "s--", color="tab:red", label="p99 ms")
    right.set_ylabel("p99, ms")
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], loc="upper left")
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_ms(value) -> str:
    return "n/a" if value is None else f"{value:g}"


def markdown(summary: dict, totals: dict, meta: dict, table: list[dict] | None) -> str:
    server = summary["server"]
    lines = [
        f"# Load test {meta.get('started', '')}",
        "",
        f"Target: {meta.get('target', '?')}; shape: {meta.get('shape', '?')}; "
        f"users: {summary['users']}; mix: {json.dumps(meta.get('mix', {}))}.",
    ]
    if meta.get("model"):
        lines.append(f"Model: {json.dumps(meta['model'])}.")
    lines += [
        "",
        "| requests | failures | RPS | p50 ms | p90 ms | p99 ms | mean ms | duration s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary['requests']} | {summary['failures']} | {summary['rps']:g} | "
        f"{fmt_ms(summary['p50_ms'])} | {fmt_ms(summary['p90_ms'])} | {fmt_ms(summary['p99_ms'])} | "
        f"{float(totals['Average Response Time']):.2f} | {summary['duration_s']:g} |",
        "",
        "Server side (TorchServe metrics, mean per request): inference "
        f"{fmt_ms(server['inference_latency_ms'])} ms, of which queue "
        f"{fmt_ms(server['queue_latency_ms'])} ms. Locust's percentiles are whole milliseconds "
        "below 100 ms; its mean and the server's figures are not rounded.",
    ]
    if table:
        lines += [
            "",
            "| users | RPS | p50 ms | p99 ms | failures |",
            "|---:|---:|---:|---:|---:|",
            *(
                f"| {s['users']} | {fmt_ms(s['rps'])} | {fmt_ms(s['p50_ms'])} | {fmt_ms(s['p99_ms'])} | "
                f"{s['failures']} |"
                for s in table
            ),
            "",
            f"![p99 and RPS against users]({KNEE_PNG})",
        ]
    lines += ["", f"![RPS and latency over time]({OVER_TIME_PNG})", ""]
    return "\n".join(lines)


def generate(results: Path, meta: dict) -> dict:
    """Write summary.json, the plots and report.md from the CSVs in `results`; return the
    summary. `meta` is the run's run.json: shape, users, target, mix, model, server."""
    totals = read_totals(results)
    history = read_history(results)
    step = meta.get("shape") == "step"
    table = steps(history) if step else None
    users = max((s["users"] for s in table), default=0) if step else meta["users"]
    summary = summarize(totals, users, meta.get("server") or {})
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{meta.get('target', '')} — {meta.get('shape', '')} load"
    plot_over_time(history, results / OVER_TIME_PNG, title)
    if table:
        plot_knee(table, results / KNEE_PNG, title)
        (results / "steps.json").write_text(json.dumps(table, indent=2) + "\n")
    (results / "report.md").write_text(markdown(summary, totals, meta, table))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", type=Path, help="a results folder of loadtest/run.py")
    args = p.parse_args(argv)
    try:
        meta = json.loads((args.results / "run.json").read_text())
        summary = generate(args.results, meta)
    except (OSError, ValueError, KeyError) as error:
        print(f"loadtest.report: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
