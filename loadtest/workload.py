"""The request mix of the load tests, and what counts as a correct answer. No Locust here:
the locustfile draws requests from a Workload and checks answers with `check_answer`, and
the tests exercise both directly.

A request is drawn as production traffic would look:
  - the user: one of the artifact's users, weighted by their training activity (busy users
    come back more often), or with probability `cold_share` an id the model has never seen
    (a cold-start user, answered with popular items);
  - k: drawn from `k_weights` (e.g. mostly 10, sometimes 5, 20 or 50);
  - with probability `multi_share` a multi-user request ({"user_ids": [...]}) of 2 to
    `multi_users` users, as a batch job or a page with several carousels would send.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import numpy as np

from model.artifact import load_artifact

DEFAULT_K_WEIGHTS = {10: 0.6, 5: 0.2, 20: 0.15, 50: 0.05}


def parse_k_weights(text: str) -> dict[int, float]:
    """ "10:0.6,5:0.2" -> {10: 0.6, 5: 0.2}; weights need not sum to 1."""
    weights = {}
    for part in text.split(","):
        k, sep, weight = part.partition(":")
        try:
            k_value, weight_value = int(k), float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(
                f"k mix {text!r}: expected K:WEIGHT pairs, e.g. 10:0.6,5:0.4"
            ) from None
        if k_value < 1 or weight_value < 0:
            raise ValueError(f"k mix {text!r}: k must be >= 1 and weights >= 0")
        weights[k_value] = weight_value
    if not any(weights.values()):
        raise ValueError(f"k mix {text!r}: all weights are 0")
    return weights


def format_k_weights(weights: Mapping[int, float]) -> str:
    return ",".join(f"{k}:{w:g}" for k, w in weights.items())


@dataclass(frozen=True)
class Mix:
    cold_share: float = 0.05
    multi_share: float = 0.1
    multi_users: int = 4
    k_weights: Mapping[int, float] = field(default_factory=lambda: dict(DEFAULT_K_WEIGHTS))

    def __post_init__(self):
        for name in ("cold_share", "multi_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.multi_users < 2:
            raise ValueError("multi_users must be at least 2")

    def describe(self) -> dict:
        return {
            "cold_share": self.cold_share,
            "multi_share": self.multi_share,
            "multi_users": self.multi_users,
            "k_mix": format_k_weights(self.k_weights),
        }


@dataclass(frozen=True)
class Request:
    body: dict
    expected: tuple[tuple[int, int], ...]  # (user id, number of items) per answer, in order
    many: bool  # sent as user_ids: the answer is an array
    name: str  # the Locust statistics row


class Workload:
    def __init__(self, user_ids, activity, num_items: int, mix: Mix):
        user_ids = np.asarray(user_ids, dtype=np.int64)
        activity = np.asarray(activity, dtype=np.int64)
        if len(user_ids) == 0 or len(user_ids) != len(activity):
            raise ValueError("need one activity count per user, and at least one user")
        self.mix = mix
        self.num_items = num_items
        self.user_ids = user_ids.tolist()
        # With exclude_seen (the default) a user can get at most their unseen items.
        self.unseen = (num_items - activity).tolist()
        # Cumulative weights once, so that a draw is one bisection (random.choices).
        self.cum_weights = list(accumulate(np.maximum(activity, 1).tolist()))
        self.cold_start = int(user_ids.max()) + 1  # ids from here on are unknown to the model
        self.ks = list(mix.k_weights)
        self.k_cum_weights = list(accumulate(mix.k_weights.values()))

    @classmethod
    def from_artifact(cls, path: str | Path, mix: Mix) -> Workload:
        catalog = load_artifact(path, verify=False).catalog
        return cls(catalog.user_ids, np.diff(catalog.seen_indptr), len(catalog.item_ids), mix)

    def _user(self, rng: random.Random) -> tuple[int, int]:
        """(raw user id, items they can be recommended)."""
        if rng.random() < self.mix.cold_share:
            return self.cold_start + rng.randrange(1_000_000), self.num_items
        index = rng.choices(range(len(self.user_ids)), cum_weights=self.cum_weights)[0]
        return self.user_ids[index], self.unseen[index]

    def next(self, rng: random.Random) -> Request:
        k = rng.choices(self.ks, cum_weights=self.k_cum_weights)[0]
        if rng.random() < self.mix.multi_share:
            users = [self._user(rng) for _ in range(rng.randint(2, self.mix.multi_users))]
            body = {"user_ids": [u for u, _ in users], "k": k}
            expected = tuple((u, min(k, available)) for u, available in users)
            return Request(body, expected, True, "user_ids")
        user, available = self._user(rng)
        return Request({"user_id": user, "k": k}, ((user, min(k, available)),), False, "user_id")


def check_answer(status: int, text: str | bytes | None, request: Request) -> str | None:
    """None for a correct answer, else why it is a failure: anything but 200 with one object
    per requested user, in order, each with the expected number of items.

    The reasons carry no user ids: Locust keeps one failure row per distinct message."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {' '.join((text or '').split())[:200]}"
    try:
        answer = json.loads(text or "")
    except ValueError:
        return "answer is not JSON"
    answers = answer if request.many else [answer]
    if not isinstance(answers, list) or len(answers) != len(request.expected):
        return f"expected {len(request.expected)} answer(s)"
    for got, (user, count) in zip(answers, request.expected, strict=True):
        if not isinstance(got, dict) or got.get("user_id") != user:
            return "an answer is missing or out of order"
        items = got.get("items")
        if not isinstance(items, list) or len(items) != count:
            found = len(items) if isinstance(items, list) else "no"
            return f"{found} items, expected {count}"
    return None


def user_levels(max_users: int) -> list[int]:
    """The user counts of a step load (loadtest/shape.py): 1, 2, 4 ... up to max_users."""
    if max_users < 1:
        raise ValueError("step load needs at least 1 user")
    levels = [1]
    while levels[-1] * 2 <= max_users:
        levels.append(levels[-1] * 2)
    if levels[-1] != max_users:
        levels.append(max_users)
    return levels
