"""loadtest/ without a server: the request mix, the answer check, the step levels, the
report generator on recorded Locust CSVs, the Prometheus arithmetic and the kill -9
outage arithmetic."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from loadtest import report
from loadtest.bench import outage, rss_figures
from loadtest.run import Load, Target, locust_command
from loadtest.torchserve import CpuMeter, server_latency
from loadtest.workload import (
    Mix,
    Workload,
    check_answer,
    format_k_weights,
    parse_k_weights,
    user_levels,
)

USERS = [101, 202, 303, 404]
ACTIVITY = [1, 1, 2, 96]  # user 404 is busy
NUM_ITEMS = 100


def workload(**mix) -> Workload:
    return Workload(USERS, ACTIVITY, NUM_ITEMS, Mix(**mix))


def test_users_are_drawn_by_activity():
    w = workload(cold_share=0.0, multi_share=0.0)
    rng = random.Random(1)
    drawn = Counter(w.next(rng).body["user_id"] for _ in range(5000))
    assert set(drawn) == set(USERS)
    assert 0.93 < drawn[404] / 5000 < 0.99  # 96 % of the activity
    assert drawn[303] > drawn[101]


def test_cold_start_share_uses_unknown_ids():
    w = workload(cold_share=0.3, multi_share=0.0)
    rng = random.Random(2)
    ids = [w.next(rng).body["user_id"] for _ in range(4000)]
    cold = [u for u in ids if u not in USERS]
    assert 0.27 < len(cold) / len(ids) < 0.33
    assert all(u > max(USERS) for u in cold)


def test_k_mix_and_multi_user_requests():
    w = workload(cold_share=0.0, multi_share=0.25, multi_users=3, k_weights={5: 1, 50: 3})
    rng = random.Random(3)
    requests = [w.next(rng) for _ in range(4000)]
    many = [r for r in requests if r.many]
    assert 0.22 < len(many) / len(requests) < 0.28
    assert all(2 <= len(r.body["user_ids"]) <= 3 and r.name == "user_ids" for r in many)
    ks = Counter(r.body["k"] for r in requests)
    assert set(ks) == {5, 50} and 2.6 < ks[50] / ks[5] < 3.4
    # User 404 has seen 96 of 100 items: with exclude_seen it can get 4, not 50.
    expected = dict(e for r in requests if r.body["k"] == 50 for e in r.expected)
    assert expected[404] == 4 and expected[101] == 50


def test_k_mix_parsing():
    assert parse_k_weights("10:0.6,5:0.4") == {10: 0.6, 5: 0.4}
    assert parse_k_weights(format_k_weights({10: 0.6, 20: 0.4})) == {10: 0.6, 20: 0.4}
    for bad in ("10:x", "0:1", "10:0"):
        with pytest.raises(ValueError):
            parse_k_weights(bad)


def answer(user, count):
    return {"user_id": user, "items": [{"item_id": i} for i in range(count)], "fallback": None}


def test_check_answer():
    w = workload(cold_share=0.0, multi_share=0.0, k_weights={3: 1})
    single = w.next(random.Random(4))
    user = single.body["user_id"]
    assert check_answer(200, json.dumps(answer(user, 3)), single) is None
    assert check_answer(200, json.dumps(answer(user, 3)).encode(), single) is None
    assert "2 items, expected 3" in check_answer(200, json.dumps(answer(user, 2)), single)
    assert check_answer(503, b'{\n  "code": 503\n}', single) == 'HTTP 503: { "code": 503 }'
    assert check_answer(200, "<html>", single) == "answer is not JSON"
    assert "out of order" in check_answer(200, json.dumps(answer(user + 1, 3)), single)

    many = workload(cold_share=0.0, multi_share=1.0, k_weights={3: 1}).next(random.Random(5))
    answers = [answer(u, n) for u, n in many.expected]
    assert check_answer(200, json.dumps(answers), many) is None
    assert "answer(s)" in check_answer(200, json.dumps(answers[:-1]), many)
    assert "answer(s)" in check_answer(200, json.dumps(answers[0]), many)


def test_mix_bounds():
    for bad in ({"cold_share": 1.5}, {"multi_share": -0.1}, {"multi_users": 1}):
        with pytest.raises(ValueError):
            Mix(**bad)


def test_step_levels():
    assert user_levels(64) == [1, 2, 4, 8, 16, 32, 64]
    assert user_levels(48) == [1, 2, 4, 8, 16, 32, 48]
    assert user_levels(1) == [1]
    assert Load(shape="step", step_time_s=15, step_max_users=64).expected_seconds() == 105


def test_locust_command_selects_user_class_and_shape(tmp_path):
    torchserve = Target("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3")
    command = locust_command(torchserve, Load(users=8, duration_s=5), tmp_path, tmp_path)
    assert "TorchServeUser" in command and command[command.index("-u") + 1] == "8"
    assert command[command.index("--host") + 1] == "http://127.0.0.1:1"
    step = locust_command(torchserve, Load(shape="step"), tmp_path, tmp_path)
    assert step[step.index("-f") + 1].endswith("locustfile.py," + str(report_shape()))
    assert "-u" not in step  # the shape sets the users
    sagemaker = locust_command(
        Target(endpoint="ep", region="eu-west-1"), Load(), tmp_path, tmp_path
    )
    assert "SageMakerUser" in sagemaker and "--host" not in sagemaker
    assert sagemaker[sagemaker.index("--endpoint-name") + 1] == "ep"


def report_shape():
    from loadtest.run import SHAPEFILE

    return SHAPEFILE


# ---------------------------------------------------------------------- report generator

STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
    "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)
HISTORY_HEADER = (
    "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,"
    "99.9%,99.99%,100%,Total Request Count,Total Failure Count,Total Median Response Time,"
    "Total Average Response Time,Total Min Response Time,Total Max Response Time,"
    "Total Average Content Size"
)


def history_row(t, users, rps, p50, p90, p99, total, failures):
    percentiles = [p50, p50, p50, p50, p90, p90, p99, p99, p99, p99, p99]
    return [
        t,
        users,
        "",
        "Aggregated",
        rps,
        0,
        *percentiles,
        total,
        failures,
        p50,
        p50,
        1,
        p99,
        900,
    ]


def write_recorded_run(folder, rows, totals):
    """A recorded step-load run in Locust's CSV layout, with a per-name row as Locust
    writes with --csv-full-history (the report must keep to the Aggregated rows)."""
    with open(folder / "locust_stats.csv", "w", newline="") as f:
        f.write(STATS_HEADER + "\n")
        f.write("POST,/predictions/ncf user_id,1,0,3,3,1,9,900,1,0," + ",".join(["3"] * 11) + "\n")
        f.write(",Aggregated," + ",".join(map(str, totals)) + "\n")
    with open(folder / "locust_stats_history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HISTORY_HEADER.split(","))
        writer.writerow([0, 0, "", "Aggregated", 0, 0, *["N/A"] * 11, 0, 0, 0, 0, 0, 0, 0])
        for row in rows:
            writer.writerow(row)
            writer.writerow([row[0], row[1], "POST", "/predictions/ncf user_id", *row[4:]])


def test_report_generator_on_a_recorded_step_run(tmp_path):
    rows = [history_row(t, 1, 100, 2, 3, 4, 100 * (t - 99), 0) for t in range(100, 104)]
    rows += [history_row(t, 2, 180, 3, 5, 8, 400 + 180 * (t - 103), 0) for t in range(104, 108)]
    rows += [history_row(t, 4, 200, 9, 20, 41, 1120 + 200 * (t - 107), 2) for t in range(108, 112)]
    totals = [1920, 2, 4, 5.25, 0.8, 60.0, 900, 160.0, 0.17, 4, 5, 6, 7, 20, 30, 38, 41, 55, 60, 60]
    write_recorded_run(tmp_path, rows, totals)
    meta = {"shape": "step", "target": "TorchServe t", "users": 4, "started": "s", "mix": {}}
    meta["server"] = {"inference_latency_ms": 0.8123, "queue_latency_ms": 0.2}
    (tmp_path / "run.json").write_text(json.dumps(meta))

    assert report.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {
        "rps": 160.0, "p50_ms": 4.0, "p90_ms": 20.0, "p99_ms": 41.0, "requests": 1920,
        "failures": 2, "users": 4, "duration_s": 12.0,
        "server": {"inference_latency_ms": 0.8123, "queue_latency_ms": 0.2},
    }  # fmt: skip
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert [s["users"] for s in steps] == [1, 2, 4]
    # RPS from the running totals over each step; percentiles from the step's last row.
    assert [s["rps"] for s in steps] == [100.0, 180.0, 200.0]
    assert [s["p99_ms"] for s in steps] == [4, 8, 41]
    assert [s["failures"] for s in steps] == [0, 0, 2]
    for png in (report.OVER_TIME_PNG, report.KNEE_PNG):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.md").read_text()
    assert "| 1920 | 2 | 160 | 4 | 20 | 41 | 5.25 | 12 |" in text
    assert "inference 0.8123 ms, of which queue 0.2 ms" in text
    assert "| 4 | 200 | 9 | 41 | 2 |" in text


def test_report_prefers_the_final_stats_of_the_locustfile(tmp_path):
    rows = [history_row(t, 2, 50, 2, 3, 4, 50 * (t - 9), 0) for t in range(10, 13)]
    write_recorded_run(
        tmp_path, rows, [150, 0, 2, 2.1, 1, 9, 900, 50.0, 0, 2, 2, 2, 2, 3, 3, 4, 4, 9, 9, 9]
    )
    final = {
        "Request Count": 171,
        "Failure Count": 1,
        "Requests/s": 57.0,
        "Average Response Time": 2.2,
    }
    final |= {"50%": 2, "90%": 3, "99%": 5}
    (tmp_path / "locust_final.json").write_text(json.dumps(final))
    summary = report.generate(tmp_path, {"shape": "constant", "users": 2})
    assert (summary["requests"], summary["failures"], summary["p99_ms"]) == (171, 1, 5)
    assert summary["server"] == {"inference_latency_ms": None, "queue_latency_ms": None}
    assert not (tmp_path / report.KNEE_PNG).exists()
    assert "inference n/a ms" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------- server metrics, outage


def test_server_latency_is_the_counters_growth_per_request():
    before = {
        ("ts_inference_requests_total", "ncf"): 10,
        ("ts_inference_latency_microseconds", "ncf"): 5_000,
        ("ts_queue_latency_microseconds", "ncf"): 1_000,
        ("ts_inference_requests_total", "null"): 99,
    }
    after = {
        ("ts_inference_requests_total", "ncf"): 410,
        ("ts_inference_latency_microseconds", "ncf"): 5_000 + 400 * 850,
        ("ts_queue_latency_microseconds", "ncf"): 1_000 + 400 * 120,
        ("ts_inference_requests_total", "null"): 1099,
    }
    assert server_latency(before, after, "ncf") == {
        "inference_latency_ms": 0.85,
        "queue_latency_ms": 0.12,
    }
    assert server_latency(after, after, "ncf") == {
        "inference_latency_ms": None,
        "queue_latency_ms": None,
    }


def test_scrape_parses_torchserve_prometheus_text(monkeypatch):
    from loadtest import torchserve

    text = "\n".join([
        "# HELP ts_inference_requests_total Torchserve prometheus counter metric",
        "# TYPE ts_inference_requests_total counter",
        'ts_inference_requests_total{model_name="ncf",model_version="default",hostname="vm",} 12.0',
        'ts_inference_latency_microseconds{model_name="ncf",model_version="default",hostname="vm",} 1.0815E7',
        'NCFScoringTime_count{ModelName="ncf",Level="Model",Hostname="vm",} 4.0',
    ])  # fmt: skip
    monkeypatch.setattr(torchserve.ts, "http", lambda *a, **k: (200, text))
    samples = torchserve.scrape("http://metrics")
    assert samples[("ts_inference_requests_total", "ncf")] == 12
    assert samples[("ts_inference_latency_microseconds", "ncf")] == 1.0815e7
    assert samples[("NCFScoringTime_count", "ncf")] == 4


def test_outage_from_the_request_log(tmp_path):
    log = tmp_path / "requests.csv"
    rows = [(t / 10, 1, 5.0) for t in range(0, 100)]  # 10 s of successes
    rows += [(10.05, 0, 3.0), (10.2, 0, 4.0), (10.3, 0, 4.0)]  # the kill at 10.0
    rows += [(12.5, 1, 2400.0), (12.6, 1, 6.0)]  # queued requests answered by the new worker
    with open(log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time", "success", "response_ms"])
        writer.writerows(rows)
    gap = outage(log, killed_at=10.0)
    assert gap["requests_before_kill"] == 100 and gap["failures_before_kill"] == 0
    assert gap["failures_after_kill"] == 3
    assert gap["first_failure_after_s"] == 0.05 and gap["last_failure_after_s"] == 0.3
    assert gap["recovered_after_s"] == 2.5
    assert gap["max_response_ms_after_kill"] == 2400.0


def test_rss_figures_judge_growth_after_the_first_minute():
    samples = [{"t_s": 0.0, "rss_mb": [250.0, 10.0]}, {"t_s": 15.0, "rss_mb": [270.0, 10.0]}]
    samples += [
        {"t_s": float(t), "rss_mb": [272.0 + (t % 30 == 0), 10.0]} for t in range(60, 601, 30)
    ]
    figures = rss_figures(samples)
    assert figures["rss_start_mb"] == 260 and figures["rss_settled_mb"] == 283
    assert figures["rss_end_mb"] == 283 and figures["rss_max_mb"] == 283
    assert figures["rss_growth_pct"] == 8.85 and figures["rss_growth_after_settle_pct"] == 0


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"


def test_cpu_meter_counts_the_workers_and_the_waited_for_locust():
    worker = subprocess.Popen(
        [sys.executable, "-c", "input()\n" + BURN + "print('done', flush=True)\ninput()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with CpuMeter(os.getpid(), [worker.pid]) as cpu:
            worker.stdin.write("go\n")
            worker.stdin.flush()
            assert worker.stdout.readline().strip() == "done"
            subprocess.run([sys.executable, "-c", BURN], check=True)  # as Locust is run
    finally:
        worker.kill()
        worker.wait()
    assert cpu.seconds["workers"] >= 0.35 and cpu.seconds["locust"] >= 0.35
    assert cpu.seconds["frontend"] < 0.2  # this process only waited: its children are not its own
    assert cpu.seconds["machine"] >= cpu.seconds["workers"] + cpu.seconds["locust"] - 0.05
    per_request = cpu.per_request_ms(100)
    assert per_request["workers"] == round(cpu.seconds["workers"] * 10, 3)
    assert cpu.per_request_ms(0)["locust"] is None
