"""handler/schema.py (request validation, response schema) and the handler over TorchServe's
own Context class: no server, no training."""

import json
import logging
from pathlib import Path

import pytest
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler import ARTIFACT_DIR
from handler.ncf_handler import NCFHandler
from handler.schema import (
    HandlerConfig,
    RecommendRequest,
    RequestError,
    decode_body,
    format_response,
    parse_request,
)
from model.artifact import save_artifact
from model.recommender import Query, Recommendation, ScoredItem
from tests.synthetic_artifacts import make_artifact

METRICS_CONFIG = Path(__file__).resolve().parents[1] / "archive" / "metrics.yaml"
LIMITS = HandlerConfig(max_k=50, max_user_ids=3, max_items=4)
KNOWN_ITEMS = {10, 11, 12, 13, 14}


def unknown_items(ids):
    return [i for i in ids if i not in KNOWN_ITEMS]


def parse(payload, limits=LIMITS):
    return parse_request(payload, limits, unknown_items)


def refused(payload, limits=LIMITS) -> str:
    with pytest.raises(RequestError) as error:
        parse(payload, limits)
    return str(error.value)


# ---------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "row",
    [
        {"body": b'{"user_id": 7}'},
        {"body": '{"user_id": 7}'},
        {"body": {"user_id": 7}},  # TorchServe already decoded an application/json body
        {"data": b'{"user_id": 7}'},
    ],
)
def test_bodies_as_torchserve_hands_them_over(row):
    assert decode_body(row) == {"user_id": 7}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"body": b'{"user_id": 7'}, "not valid JSON"),
        ({"body": b"user_id=7"}, "not valid JSON"),
        ({"body": b'{"user_id": NaN}'}, "NaN is not valid JSON"),
        ({"body": b"\xff\xfe"}, "not UTF-8"),
        ({"body": b"   "}, "empty request"),
        ({"body": b""}, "empty request"),
        ({}, "empty request"),
        # curl -d without a Content-Type: TorchServe parses a form, there is no body.
        ({'{"user_id": 7}': b""}, "Content-Type: application/json"),
        ({"body": b"[" * 100_000}, "not valid JSON"),  # nesting too deep for the parser
    ],
)
def test_undecodable_bodies(row, message):
    with pytest.raises(RequestError, match=message):
        decode_body(row)


# ---------------------------------------------------------------------- validation


def test_defaults():
    request = parse({"user_id": 7})
    assert request == RecommendRequest((7,), many=False, k=10, exclude_seen=True, items=None)
    assert request.queries() == [Query(7, 10, True, None)]
    assert parse({"user_id": 7}, HandlerConfig(max_k=5)).k == 5  # the default never exceeds max_k


def test_every_field():
    request = parse({"user_ids": [7, 8, 7], "k": 50, "exclude_seen": False, "items": [12, 10]})
    assert request == RecommendRequest((7, 8, 7), True, 50, False, (12, 10))
    assert [q.user_id for q in request.queries()] == [7, 8, 7]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([{"user_id": 7}], "must be a JSON object, got an array"),
        ("user 7", "must be a JSON object, got a string"),
        (7, "must be a JSON object, got an integer"),
        ({}, "exactly one of user_id"),
        ({"k": 5}, "exactly one of user_id"),
        ({"user_id": 7, "user_ids": [8]}, "exactly one of user_id"),
        ({"user_id": 7, "kk": 5}, "unknown field(s) kk"),
        ({"user_id": "7"}, "user_id must be an integer id, got a string"),
        ({"user_id": 7.0}, "user_id must be an integer id, got a number"),
        ({"user_id": None}, "user_id must be an integer id, got null"),
        ({"user_id": True}, "user_id must be an integer id, got a boolean"),
        ({"user_id": 2**63}, "out of range"),
        ({"user_ids": 7}, "user_ids must be an array of integer ids, got an integer"),
        ({"user_ids": []}, "user_ids must not be empty"),
        ({"user_ids": [1, 2, 3, 4]}, "user_ids holds 4 ids; at most 3"),
        ({"user_ids": [1, "2"]}, "user_ids[1] must be an integer id, got a string"),
        ({"user_ids": [1, False]}, "user_ids[1] must be an integer id, got a boolean"),
        ({"user_id": 7, "k": True}, "k must be an integer, got a boolean"),
        ({"user_id": 7, "k": "5"}, "k must be an integer, got a string"),
        ({"user_id": 7, "k": 2.5}, "k must be an integer, got a number"),
        ({"user_id": 7, "k": 0}, "k must be between 1 and 50, got 0"),
        ({"user_id": 7, "k": -1}, "k must be between 1 and 50, got -1"),
        ({"user_id": 7, "k": 51}, "k must be between 1 and 50, got 51"),
        ({"user_id": 7, "k": 10**30}, "k must be between 1 and 50"),
        ({"user_id": 7, "exclude_seen": 1}, "exclude_seen must be true or false, got an integer"),
        ({"user_id": 7, "exclude_seen": "no"}, "exclude_seen must be true or false"),
        ({"user_id": 7, "items": []}, "items must not be empty"),
        ({"user_id": 7, "items": "10,11"}, "items must be an array"),
        ({"user_id": 7, "items": [10, 11, 12, 13, 14]}, "items holds 5 ids; at most 4"),
        ({"user_id": 7, "items": [10, 10.5]}, "items[1] must be an integer id"),
        ({"user_id": 7, "items": [10, 11, 10]}, "items repeats id"),
        ({"user_id": 7, "items": [10, 99, 98]}, "unknown item id(s) 99, 98"),
    ],
)
def test_bad_requests(payload, message):
    assert message in refused(payload)


def test_error_messages_fit_a_status_line():
    error = RequestError("unknown field(s) \u00e9t\u00e9\n" + "x" * 500)
    phrase = error.phrase
    assert phrase.isascii() and phrase.isprintable() and len(phrase) <= 120


def test_handler_config_from_model_config():
    assert HandlerConfig.from_yaml(None) == HandlerConfig()
    assert HandlerConfig.from_yaml({"max_k": 20, "threads": 1}) == HandlerConfig(
        max_k=20, threads=1
    )
    assert HandlerConfig.from_yaml({"threads": 0}).threads == 0  # torch's default
    for section, message in [
        ({"max_k": 0}, "integer >= 1"),
        ({"max_k": True}, "integer >= 1"),
        ({"threads": -1}, "integer >= 0"),
        ({"max_kk": 5}, "unknown handler setting"),
        (["max_k"], "must be a mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            HandlerConfig.from_yaml(section)


def test_response_schema():
    recs = [
        Recommendation(7, [ScoredItem(10, 0.123456789, "Ten"), ScoredItem(11, 0.1, None)], None),
        Recommendation(-1, [ScoredItem(12, None, "Twelve")], "popular"),
    ]
    model = {"name": "ncf", "version": "v1"}
    many = format_response(parse({"user_ids": [7, -1]}), recs, model)
    assert many == [
        {
            "user_id": 7,
            "items": [
                {"item_id": 10, "score": 0.123457, "title": "Ten"},
                {"item_id": 11, "score": 0.1, "title": None},
            ],
            "fallback": None,
            "model": {"name": "ncf", "version": "v1"},
        },
        {
            "user_id": -1,
            "items": [{"item_id": 12, "score": None, "title": "Twelve"}],
            "fallback": "popular",
            "model": {"name": "ncf", "version": "v1"},
        },
    ]
    assert format_response(parse({"user_id": 7}), recs[:1], model) == many[0]
    assert list(many[0]) == ["user_id", "items", "fallback", "model"]


# ---------------------------------------------------------------------- the handler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    built = make_artifact("neumf")
    folder = tmp_path_factory.mktemp("extracted-mar")
    save_artifact(folder / ARTIFACT_DIR, built.model, built.catalog, {"name": "neumf"})
    return folder, built


def handler_and_context(model_dir, batch_size):
    folder, _ = model_dir
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    metrics.initialize_cache()
    metrics.model_name = "ncf"
    context = Context(
        "ncf",
        str(folder),
        {"model": {"modelName": "ncf"}},
        batch_size,
        None,
        "0.12.0",
        metrics=metrics,
        model_yaml_config={"handler": {"max_k": 20, "max_user_ids": 5}},
    )
    handler = NCFHandler()
    handler.initialize(context)
    context.request_processor = [RequestProcessor({}) for _ in range(batch_size)]
    context.request_ids = {i: f"request-{i}" for i in range(batch_size)}
    metrics.request_ids = context.request_ids
    return handler, context


def test_a_bad_request_fails_alone_and_the_batch_is_scored_once(model_dir, caplog):
    _, built = model_dir
    users = [int(u) for u in built.catalog.user_ids[:3]]
    handler, context = handler_and_context(model_dir, batch_size=4)
    calls = []
    score = handler.recommender.recommend_queries
    handler.recommender.recommend_queries = lambda queries: calls.append(queries) or score(queries)
    batch = [
        {"body": json.dumps({"user_id": users[0], "k": 3}).encode()},
        {"body": b'{"user_id": 1, "k": 0}'},
        {"body": {"user_ids": [users[1], 999], "k": 2}},
        {"body": json.dumps({"user_id": users[2], "items": [int(built.catalog.item_ids[0])]})},
    ]
    with caplog.at_level(logging.INFO):
        responses = [json.loads(r) for r in handler.handle(batch, context)]
    assert len(calls) == 1 and [q.user_id for q in calls[0]] == [users[0], users[1], 999, users[2]]
    statuses = [context.get_response_status(i)[0] for i in range(4)]
    assert statuses == [200, 400, 200, 200]
    assert context.get_response_status(1)[1] == "k must be between 1 and 20, got 0"
    assert responses[1] == {"error": "k must be between 1 and 20, got 0"}
    assert all(context.get_response_content_type(i) == "application/json" for i in range(4))
    single, many, candidate = responses[0], responses[2], responses[3]
    assert single["user_id"] == users[0] and len(single["items"]) == 3
    assert single["model"] == {"name": "ncf", "version": handler.recommender.version}
    assert [r["fallback"] for r in many] == [None, "popular"]
    assert [i["item_id"] for i in candidate["items"]] == [int(built.catalog.item_ids[0])]
    # The custom metrics went out on TorchServe's metrics channel (the worker's log).
    emitted = "\n".join(r.getMessage() for r in caplog.records)
    assert "[METRICS]NCFUsersScored.Count:4|#ModelName:ncf,Level:Model" in emitted
    assert "[METRICS]NCFFallbacks.Count:1|" in emitted
    assert "[METRICS]NCFScoringTime.Milliseconds:" in emitted and "#type:HISTOGRAM" in emitted


def test_a_batch_of_bad_requests_is_not_scored(model_dir):
    handler, context = handler_and_context(model_dir, batch_size=2)
    handler.recommender.recommend_queries = lambda queries: pytest.fail("scored bad requests")
    responses = handler.handle([{"body": b"{"}, {"body": b'{"user_ids": [1,2,3,4,5,6]}'}], context)
    assert [context.get_response_status(i)[0] for i in range(2)] == [400, 400]
    assert "at most 5" in json.loads(responses[1])["error"]
