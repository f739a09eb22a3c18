"""A TorchServe handler that does no work: every request gets the same pre-rendered answer.

Served under the same TorchServe configuration as the NCF handler (same config.properties,
batch settings and workers), it measures what TorchServe itself costs on this machine
(HTTP, queueing, the frontend-to-worker socket): the ceiling the NCF model's throughput is
compared with. No torch import, no model: nothing but TorchServe is on the request path.

The answer is shaped like a 10-item NCF answer, so that the bytes on the wire are alike.
"""

import json

RESPONSE = json.dumps(
    {
        "user_id": 0,
        "items": [{"item_id": i, "score": 0.5, "title": f"Item {i}"} for i in range(10)],
        "fallback": None,
        "model": {"name": "null", "version": "1.0"},
    }
)


def handle(data, context):
    # TorchServe calls a module-level handler once with data=None to initialise it.
    if data is None:
        return None
    for index in range(len(data)):
        context.set_response_content_type(index, "application/json")
    return [RESPONSE] * len(data)
