"""A real TorchServe, started by `python -m archive.server` (what `make serve` runs) on free
ports, serving a .mar built by the real torch-model-archiver from a demo model trained for
this module. One server for the whole module; the last test stops it."""

import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from archive.build import MODEL_CONFIG, build, model_config_with
from archive.server import our_processes
from loadtest.torchserve import loopback_ports, scrape
from model.recommender import Recommender

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SERVER = [sys.executable, "-m", "archive.server"]
BATCH_WINDOW_MS = 300


@dataclass
class Served:
    state: Path
    inference: str
    management: str
    metrics: str
    pid: int
    start_output: str
    mar: Path
    artifact: Path
    recommender: Recommender  # the same artifact, scored in this process


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    artifact = root / "artifact"
    # A real training run, as short as it goes: serving is under test, not model quality.
    subprocess.run(
        [sys.executable, "-m", "training.train", "--dataset", "demo", "--model", "neumf",
         "--epochs", "1", "--negatives", "1", "--batch-size", "16384", "--quiet",
         "--out", str(artifact)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    (artifact / "notes.txt").write_text("not part of the artifact")  # must not be packed
    # The project's model config with a wider batching window, so that the concurrent
    # requests of test_concurrent_requests_share_a_batch reliably meet in one batch.
    config = model_config_with({"maxBatchDelay": BATCH_WINDOW_MS}, root / "model-config.yaml")
    mar = build(artifact, root / "store", config)

    state = root / "state"
    settings = loopback_ports()  # through `--set`, as a user would
    command = [*SERVER, "start", "--state", str(state), "--model-store", str(root / "store")]
    command += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    try:
        started = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        info = json.loads((state / "server.json").read_text())
        yield Served(
            state=state,
            inference=info["inference"],
            management=info["management"],
            metrics=info["metrics"],
            pid=info["pid"],
            start_output=started.stdout,
            mar=mar,
            artifact=artifact,
            recommender=Recommender(artifact, "cpu"),
        )
    finally:  # a no-op when test_stop_leaves_nothing_behind already stopped it
        subprocess.run([*SERVER, "stop", "--state", str(state)], cwd=REPO, timeout=120)


def post(url: str, body, content_type: str | None = "application/json"):
    """(status, headers, parsed JSON) of a POST; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def recommend(served: Served, body, endpoint="/predictions/ncf"):
    status, headers, answer = post(served.inference + endpoint, body)
    assert status == 200, answer
    assert headers["Content-Type"].startswith("application/json")
    return answer


def assert_matches_local(answer: dict, served: Served, **query):
    """The server's answer equals the Recommender's on the same artifact."""
    [local] = served.recommender.recommend([answer["user_id"]], **query)
    assert answer["fallback"] == local.fallback
    assert [i["item_id"] for i in answer["items"]] == [i.item_id for i in local.items]
    assert [i["title"] for i in answer["items"]] == [i.title for i in local.items]
    for got, expected in zip(answer["items"], local.items, strict=True):
        assert (got["score"] is None) == (expected.score is None)
        if expected.score is not None:
            assert got["score"] == pytest.approx(expected.score, abs=1e-5)


def known_users(served: Served, count: int) -> list[int]:
    return [int(u) for u in served.recommender.catalog.user_ids[:count]]


def test_the_mar_holds_the_handler_the_code_and_only_the_artifact_files(served):
    with zipfile.ZipFile(served.mar) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    artifact_files = {
        f"artifact/{n}"
        for n in ("model.safetensors", "catalog.safetensors", "item_titles.json", "metadata.json")
    }
    assert artifact_files <= names and "artifact/notes.txt" not in names
    assert {"ncf_handler.py", "model-config.yaml", "model/recommender.py", "handler/schema.py"} <= (
        names
    )
    metadata = json.loads((served.artifact / "metadata.json").read_text())
    assert manifest["model"]["modelVersion"] == metadata["version"]
    assert manifest["model"]["handler"] == "ncf_handler.py"


def test_start_prints_a_working_curl_line(served):
    line = next(s.strip() for s in served.start_output.splitlines() if s.strip().startswith("curl"))
    assert f"{served.inference}/predictions/ncf" in line
    if shutil.which("curl"):
        answer = json.loads(
            subprocess.run(shlex.split(line), capture_output=True, check=True).stdout
        )
        assert answer["user_id"] == 1 and len(answer["items"]) == 3


def test_ping(served):
    status, text = get(served.inference + "/ping")
    assert status == 200 and json.loads(text) == {"status": "Healthy"}


def test_one_user(served):
    user = known_users(served, 1)[0]
    answer = recommend(served, {"user_id": user, "k": 5})
    assert list(answer) == ["user_id", "items", "fallback", "model"]
    assert answer["user_id"] == user and len(answer["items"]) == 5
    assert answer["model"] == {"name": "ncf", "version": served.recommender.version}
    scores = [i["score"] for i in answer["items"]]
    assert all(0 < s < 1 for s in scores) and scores == sorted(scores, reverse=True)
    assert all(i["title"].startswith("Demo ") for i in answer["items"])
    assert_matches_local(answer, served, k=5)


def test_several_users(served):
    users = [*known_users(served, 3), 10**9]
    answers = recommend(served, {"user_ids": users, "k": 4})
    assert [a["user_id"] for a in answers] == users
    assert [a["fallback"] for a in answers] == [None, None, None, "popular"]
    for answer in answers:
        assert_matches_local(answer, served, k=4)


def test_invocations_answer_like_predictions(served):
    body = {"user_ids": known_users(served, 2), "k": 3, "exclude_seen": False}
    assert recommend(served, body, "/invocations") == recommend(served, body)


def test_seen_items_are_excluded(served):
    catalog = served.recommender.catalog
    # A user whose unfiltered top 20 holds training items, so that exclusion shows.
    for index, user in enumerate(catalog.user_ids[:200]):
        seen = set(catalog.item_ids[catalog.seen(index)].tolist())
        unfiltered = recommend(served, {"user_id": int(user), "k": 20, "exclude_seen": False})
        if seen & {i["item_id"] for i in unfiltered["items"]}:
            break
    else:
        pytest.fail("no user with a training item in the unfiltered top 20")
    filtered = recommend(served, {"user_id": int(user), "k": 20})
    assert len(filtered["items"]) == 20 and not seen & {i["item_id"] for i in filtered["items"]}
    assert_matches_local(filtered, served, k=20)
    assert_matches_local(unfiltered, served, k=20, exclude_seen=False)


def test_candidates(served):
    user = known_users(served, 1)[0]
    items = [int(i) for i in served.recommender.catalog.item_ids[10:20]]
    answer = recommend(served, {"user_id": user, "k": 3, "items": items, "exclude_seen": False})
    assert {i["item_id"] for i in answer["items"]} <= set(items)
    assert_matches_local(answer, served, k=3, candidates=items, exclude_seen=False)


def test_cold_start_gets_popular_items(served):
    catalog = served.recommender.catalog
    popular = catalog.item_ids[np.argsort(-catalog.item_popularity, kind="stable")][:5]
    answer = recommend(served, {"user_id": 10**9, "k": 5})
    assert answer["fallback"] == "popular"
    assert [i["item_id"] for i in answer["items"]] == popular.tolist()
    assert all(i["score"] is None for i in answer["items"])


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'{"user_id": 1', "application/json", "not valid JSON"),
        # TorchServe decodes application/json itself, and its decoder accepts NaN: a number
        (b'{"user_id": NaN}', "application/json", "user_id must be an integer id, got a number"),
        (b'{"user_id": 1, "k": Infinity}', "text/plain", "Infinity is not valid JSON"),
        (b"\xff\xfe{}", "application/json", "request body is not UTF-8 text"),
        (b'{"user_id": 1}', None, "Content-Type: application/json"),  # a form, to TorchServe
        (b"", "application/json", "empty request"),
        ({"user_id": "1"}, "application/json", "must be an integer id"),
        ({"user_id": True}, "application/json", "got a boolean"),
        ({"user_id": 1, "k": -1}, "application/json", "k must be between 1 and 100"),
        ({"user_id": 1, "k": 10**12}, "application/json", "k must be between 1 and 100"),
        ({"user_ids": list(range(101))}, "application/json", "at most 100"),
        ({"user_id": 1, "items": [1, 10**9]}, "application/json", "unknown item id(s) 1000000000"),
        ({"k": 3}, "text/plain", "exactly one of user_id"),
    ],
)
def test_bad_requests_get_400_and_a_message(served, body, content_type, message):
    status, headers, answer = post(served.inference + "/predictions/ncf", body, content_type)
    assert status == 400 and message in answer["error"]
    assert headers["Content-Type"].startswith("application/json")


def batches_received(served: Served) -> int:
    """Batches the worker has been handed (TorchServe logs one line per batch)."""
    log = served.state / "model_log.log"
    return log.read_text().count("Backend received inference")


def test_concurrent_requests_share_a_batch_and_only_the_bad_one_fails(served):
    users = known_users(served, 7)
    bodies = [{"user_id": u, "k": 2} for u in users[:4]]
    bodies += [{"user_id": users[4], "k": "two"}]  # the bad one
    bodies += [{"user_id": u, "k": 2} for u in users[5:]] + [{"user_id": 10**9, "k": 2}]
    before = batches_received(served)
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait()
        return post(served.inference + "/predictions/ncf", body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(send, bodies))
    deadline = time.monotonic() + 5  # the worker's log reaches the file asynchronously
    while batches_received(served) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batches_received(served) - before == 1  # all eight in one batch (batchSize 16)
    statuses = [status for status, _, _ in results]
    assert statuses == [200, 200, 200, 200, 400, 200, 200, 200]
    assert "k must be an integer, got a string" in results[4][2]["error"]
    for body, (_, _, answer) in zip(bodies, results, strict=True):
        if body["k"] == 2:
            assert_matches_local(answer, served, k=2)


def metric(samples: dict, name: str) -> float:
    return samples.get((name, "ncf"), 0.0)


def test_metrics_endpoint_serves_the_custom_metrics(served):
    before = scrape(served.metrics)
    recommend(served, {"user_ids": [*known_users(served, 2), 10**9], "k": 2})
    # One user unknown (a fallback), three scored, one scoring timed.
    expected = {"NCFUsersScored": 3, "NCFFallbacks": 1, "NCFScoringTime_count": 1}
    # Metrics travel from the worker's log to the frontend, each line on its own: wait for all.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(served.metrics)
        grown = {name: metric(after, name) - metric(before, name) for name in expected}
        timed = metric(after, "NCFScoringTime_sum") > metric(before, "NCFScoringTime_sum")
        if timed and all(grown[name] >= least for name, least in expected.items()):
            break
        assert time.monotonic() < deadline, f"metrics grew by {grown} (sum grew: {timed})"
        time.sleep(0.1)


def test_stop_leaves_nothing_behind(served):
    _, described = get(f"{served.management}/models/ncf")
    worker_pids = [w["pid"] for w in json.loads(described)[0]["workers"]]
    pids = [served.pid, *worker_pids]
    assert worker_pids and all(psutil.pid_exists(p) for p in pids)
    stopped = subprocess.run(
        [*SERVER, "stop", "--state", str(served.state)], cwd=REPO, capture_output=True, timeout=120
    )
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids:
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not reaped
        except psutil.NoSuchProcess:
            pass
    assert our_processes(served.state) == []
    with pytest.raises(OSError):
        get(served.inference + "/ping")


def test_model_config_with_changes_only_what_it_is_given(tmp_path):
    shipped = yaml.safe_load(MODEL_CONFIG.read_text())
    changes = {"handler": {"threads": 3}, "maxBatchDelay": 9}
    changed = yaml.safe_load(model_config_with(changes, tmp_path / "c.yaml").read_text())
    assert changed["handler"] == {**shipped["handler"], "threads": 3}  # the rest of it kept
    assert changed == {**shipped, "handler": changed["handler"], "maxBatchDelay": 9}
