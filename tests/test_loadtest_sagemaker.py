"""The locustfile's SageMakerUser in a real headless Locust run, against a local stand-in for
sagemaker-runtime's InvokeEndpoint (POST /endpoints/<name>/invocations, the API's own wire
format) that boto3 is pointed at with AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME. The stand-in
answers like the NCF model, except for a known set of wrong answers and 500s, which must
all, and only, show as failures: retries are off, so each 500 is one failed request."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from model.artifact import save_artifact
from tests.synthetic_artifacts import make_artifact

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENDPOINT = "ncf-loadtest"


class StandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Invocations)
        self.lock = threading.Lock()
        self.calls: list[dict] = []
        self.bad = 0  # answers that a correct check must count as failures


class Invocations(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            number = len(self.server.calls)
            self.server.calls.append(
                {"path": self.path, "content_type": self.headers["Content-Type"], "body": body}
            )
            wrong = number % 7 == 3  # one item short
            error = number % 11 == 5  # the model container failing
            self.server.bad += wrong or error
        if error:
            status, payload = 500, {"code": 500, "message": "worker died"}
        else:
            users = body.get("user_ids") or [body["user_id"]]
            count = body["k"] - wrong
            answers = [
                {"user_id": u, "items": [{"item_id": i} for i in range(count)], "fallback": None}
                for u in users
            ]
            status, payload = 200, answers if "user_ids" in body else answers[0]
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_sagemaker_user_invokes_the_endpoint_and_reports_failures(tmp_path):
    synthetic = make_artifact("neumf")
    artifact = save_artifact(tmp_path / "artifact", synthetic.model, synthetic.catalog, {})
    stand_in = StandIn()
    thread = threading.Thread(target=stand_in.serve_forever, daemon=True)
    thread.start()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": f"http://127.0.0.1:{stand_in.server_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "eu-west-1",
    }
    for key in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    final = tmp_path / "final.json"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "SageMakerUser",
             "--headless", "-u", "3", "-r", "3", "-t", "3s",
             # Users finish the call in flight at the end: the stand-in's count is exact.
             "--stop-timeout", "10",
             "--artifact", str(artifact), "--endpoint-name", ENDPOINT,
             "--multi-share", "0.3", "--k-mix", "3:1,7:1",
             "--final-stats", str(final), "--csv", str(tmp_path / "locust"),
             "--request-log", str(tmp_path / "requests.csv")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        stand_in.shutdown()
    assert done.returncode == 1, done.stdout + done.stderr  # Locust: some requests failed
    totals = json.loads(final.read_text())
    calls = stand_in.calls
    assert len(calls) > 20
    # Retries off: one call per request, every bad answer and every 500 one failure.
    assert totals["Request Count"] == len(calls)
    assert totals["Failure Count"] == stand_in.bad > 0
    assert {c["path"] for c in calls} == {f"/endpoints/{ENDPOINT}/invocations"}
    assert {c["content_type"] for c in calls} == {"application/json"}
    users = set(synthetic.catalog.user_ids.tolist())
    singles = [c["body"] for c in calls if "user_id" in c["body"]]
    many = [c["body"] for c in calls if "user_ids" in c["body"]]
    assert singles and many and {b["k"] for b in singles + many} == {3, 7}
    assert any(b["user_id"] in users for b in singles)
    with open(tmp_path / "requests.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    assert len(logged) == len(calls)
    assert sum(row["success"] == "0" for row in logged) == stand_in.bad
    failures = (tmp_path / "locust_failures.csv").read_text()
    assert "items, expected" in failures and "HTTP 500" in failures
