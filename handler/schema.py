"""The HTTP request and response schema of the `ncf` model, as pure functions.

No TorchServe import: the handler calls these, and tests/test_handler_requests.py tests
them directly. Every way a client can get a request wrong raises RequestError, which the
handler answers with 400 and {"error": message}; nothing here can raise anything else
for bad input.

Request (a JSON object; ids are the dataset's raw ids, e.g. MovieLens UserID / MovieID):
    user_id       integer                 one user ...
    user_ids      array of integers       ... or several (the response is then an array)
    k             integer, default 10     items per user, 1 .. max_k
    exclude_seen  boolean, default true   leave out the user's training items
    items         array of integers       rank these candidate items instead of the catalogue
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

from model.recommender import Query, Recommendation

DEFAULT_K = 10
FIELDS = ("user_id", "user_ids", "k", "exclude_seen", "items")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SCORE_DIGITS = 6  # float32 scores carry ~7 significant digits; more is noise in the JSON


class RequestError(ValueError):
    """A client error: the request is answered with 400 and {"error": str(error)}."""

    @property
    def phrase(self) -> str:
        """The message as an HTTP reason phrase: one line of printable ASCII."""
        text = "".join(c if " " <= c <= "~" else "?" for c in str(self))
        return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True)
class HandlerConfig:
    """The `handler` section of model-config.yaml: bounds on one request, and the worker's
    torch threads (0: torch's default, one per core)."""

    max_k: int = 100
    max_user_ids: int = 100
    max_items: int = 1000
    threads: int = 0

    @classmethod
    def from_yaml(cls, section: Mapping | None) -> HandlerConfig:
        """The settings of the yaml section; a wrong one is a deployment error (ValueError)."""
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise ValueError("model-config.yaml: `handler` must be a mapping")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(names))
        if unknown:
            raise ValueError(
                f"model-config.yaml: unknown handler setting(s) {', '.join(map(str, unknown))}; "
                f"known: {', '.join(names)}"
            )
        for name, value in section.items():
            least = 0 if name == "threads" else 1
            if not _is_int(value) or value < least:
                raise ValueError(f"model-config.yaml: handler.{name} must be an integer >= {least}")
        return cls(**section)


@dataclass(frozen=True)
class RecommendRequest:
    user_ids: tuple[int, ...]
    many: bool  # sent as `user_ids`: answer with an array, one object per user
    k: int
    exclude_seen: bool
    items: tuple[int, ...] | None

    def queries(self) -> list[Query]:
        return [Query(u, self.k, self.exclude_seen, self.items) for u in self.user_ids]


def _is_int(value) -> bool:
    # JSON true/false decode to Python bools, which are ints: never accept them as numbers.
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value) -> str:
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "an array"),
        (dict, "an object"),
    ):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_body(row: Mapping) -> object:
    """The JSON value of one request of a TorchServe batch.

    TorchServe hands each request over as {"body": ...} (or {"data": ...} for a form field):
    already decoded when it was sent as application/json and parsed, else bytes or text.
    """
    raw = row.get("body", row.get("data")) if isinstance(row, Mapping) else None
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("request body is not UTF-8 text") from None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise RequestError(
            "empty request: POST a JSON object (Content-Type: application/json), "
            'e.g. {"user_id": 42}'
        )
    if isinstance(raw, str):
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as error:
            raise RequestError(f"request body is not valid JSON: {error}") from None
    return raw


def _raw_id(value, field: str) -> int:
    if not _is_int(value):
        raise RequestError(f"{field} must be an integer id, got {_json_type(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise RequestError(f"{field} {value} is out of range (64-bit integer ids)")
    return value


def _id_list(value, field: str, limit: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise RequestError(f"{field} must be an array of integer ids, got {_json_type(value)}")
    if not value:
        raise RequestError(f"{field} must not be empty")
    if len(value) > limit:
        raise RequestError(f"{field} holds {len(value)} ids; at most {limit} are allowed")
    return tuple(_raw_id(v, f"{field}[{n}]") for n, v in enumerate(value))


def parse_request(
    payload: object,
    config: HandlerConfig,
    unknown_items: Callable[[Sequence[int]], Sequence[int]],
) -> RecommendRequest:
    """Validate a decoded request body. `unknown_items` returns those of the given item ids
    that the model does not know (Recommender.unknown_items)."""
    if not isinstance(payload, dict):
        raise RequestError(f"request body must be a JSON object, got {_json_type(payload)}")
    unknown = [str(name) for name in payload if name not in FIELDS]
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    if ("user_id" in payload) == ("user_ids" in payload):
        raise RequestError(
            "give exactly one of user_id (an integer) and user_ids (an array of integers)"
        )
    many = "user_ids" in payload
    if many:
        user_ids = _id_list(payload["user_ids"], "user_ids", config.max_user_ids)
    else:
        user_ids = (_raw_id(payload["user_id"], "user_id"),)

    k = payload.get("k", min(DEFAULT_K, config.max_k))
    if not _is_int(k):
        raise RequestError(f"k must be an integer, got {_json_type(k)}")
    if not 1 <= k <= config.max_k:
        raise RequestError(f"k must be between 1 and {config.max_k}, got {k}")

    exclude_seen = payload.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise RequestError(f"exclude_seen must be true or false, got {_json_type(exclude_seen)}")

    items = None
    if "items" in payload:
        items = _id_list(payload["items"], "items", config.max_items)
        repeated = sorted(i for i, count in Counter(items).items() if count > 1)
        if repeated:
            raise RequestError(f"items repeats id(s) {', '.join(map(str, repeated[:10]))}")
        missing = list(unknown_items(items))
        if missing:
            shown = ", ".join(map(str, missing[:10]))
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise RequestError(f"items: unknown item id(s) {shown}{more}")
    return RecommendRequest(user_ids, many, k, exclude_seen, items)


def format_response(
    request: RecommendRequest, recommendations: Sequence[Recommendation], model: Mapping
) -> dict | list:
    """The response body: one object per user, an array of them for `user_ids`."""
    bodies = [
        {
            "user_id": rec.user_id,
            "items": [
                {
                    "item_id": item.item_id,
                    "score": None if item.score is None else round(item.score, SCORE_DIGITS),
                    "title": item.title,
                }
                for item in rec.items
            ],
            "fallback": rec.fallback,
            "model": dict(model),
        }
        for rec in recommendations
    ]
    return bodies if request.many else bodies[0]


def error_body(error: RequestError) -> dict:
    return {"error": str(error)}
