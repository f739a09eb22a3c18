"""`invoke`: one recommendation request to the endpoint, printed as a table."""

from __future__ import annotations

import json

from deploy.common import Aws, DeployError


def request_body(user_id: int, k: int) -> str:
    return json.dumps({"user_id": user_id, "k": k})


def invoke(aws: Aws, endpoint: str, user_id: int, k: int) -> dict:
    response = aws.client("sagemaker-runtime").invoke_endpoint(
        EndpointName=endpoint,
        ContentType="application/json",
        Accept="application/json",
        Body=request_body(user_id, k),
    )
    raw = response["Body"].read().decode("utf-8", errors="replace")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise DeployError(f"endpoint {endpoint} answered non-JSON: {raw[:200]!r}") from None


def format_recommendations(answer: dict) -> str:
    items = answer.get("items") or []
    model = answer.get("model") or {}
    described = " ".join(f"{k}={v}" for k, v in model.items() if not isinstance(v, dict | list))
    lines = [
        f"user {answer.get('user_id')}: {len(items)} items"
        + (f" ({described})" if described else "")
    ]
    for rank, item in enumerate(items, 1):
        score = item.get("score")
        score = f"{score:.4f}" if isinstance(score, int | float) else str(score)
        title = item.get("title") or ""
        lines.append(f"{rank:3d}. {item.get('item_id')!s:>8}  {score:>8}  {title}".rstrip())
    if answer.get("fallback") is not None:
        lines.append(f"fallback: {answer['fallback']}")
    return "\n".join(lines)
