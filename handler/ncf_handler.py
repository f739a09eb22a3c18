"""TorchServe handler of the `ncf` model: JSON requests in, top-K recommendations out.

Thin on purpose: request validation and the response schema live in handler/schema.py,
scoring in model/recommender.py, both importable and tested without TorchServe.

A TorchServe batch is answered by one Recommender call. A bad request gets its own 400
and {"error": ...}; the other requests of its batch are answered as if it were not there.
"""

from __future__ import annotations

import json
import time
from itertools import islice
from pathlib import Path

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler import ARTIFACT_DIR
from handler.schema import (
    HandlerConfig,
    RequestError,
    decode_body,
    error_body,
    format_response,
    parse_request,
)
from model.recommender import FALLBACK_POPULAR, Recommender


class NCFHandler(BaseHandler):
    def initialize(self, context):
        self.config = HandlerConfig.from_yaml((context.model_yaml_config or {}).get("handler"))
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        properties = context.system_properties
        gpu = properties.get("gpu_id")  # set by TorchServe when it gives the worker a GPU
        if torch.cuda.is_available() and gpu is not None:
            self.device = torch.device("cuda", int(gpu))
        else:
            self.device = torch.device("cpu")
        model_dir = Path(properties["model_dir"])  # the extracted .mar
        self.recommender = Recommender(model_dir / ARTIFACT_DIR, self.device)
        self.model_info = {"name": context.model_name, "version": self.recommender.version}
        # The first scoring pass pays for lazy initialisation (kernels, allocator): over half
        # a second on ml-1m. Pay it here, before the worker is READY, not on a client request.
        self.recommender.recommend(self.recommender.catalog.user_ids[:8].tolist(), k=1)
        self.initialized = True

    def preprocess(self, data):
        """Each request of the batch -> a RecommendRequest, or the RequestError answering it."""
        requests = []
        for row in data:
            try:
                payload = decode_body(row)
                requests.append(parse_request(payload, self.config, self.recommender.unknown_items))
            except RequestError as error:
                requests.append(error)
        return requests

    def inference(self, requests):
        """Score every valid request of the batch in one Recommender call."""
        valid = [r for r in requests if not isinstance(r, RequestError)]
        queries = [q for r in valid for q in r.queries()]
        if not queries:
            return requests
        start = time.perf_counter()
        answers = self.recommender.recommend_queries(queries)
        elapsed_ms = (time.perf_counter() - start) * 1000
        metrics = self.context.metrics
        # Fresh dimension lists: TorchServe appends its default dimensions to the list given.
        metrics.add_counter("NCFUsersScored", len(answers), dimensions=[])
        fallbacks = sum(a.fallback == FALLBACK_POPULAR for a in answers)
        metrics.add_counter("NCFFallbacks", fallbacks, dimensions=[])
        metrics.add_time(
            "NCFScoringTime", elapsed_ms, dimensions=[], metric_type=MetricTypes.HISTOGRAM
        )
        answers = iter(answers)
        return [
            r if isinstance(r, RequestError) else (r, list(islice(answers, len(r.user_ids))))
            for r in requests
        ]

    def postprocess(self, results):
        responses = []
        for idx, result in enumerate(results):
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(result, RequestError):
                self.context.set_response_status(400, result.phrase, idx=idx)
                body = error_body(result)
            else:
                body = format_response(*result, self.model_info)
            responses.append(json.dumps(body, ensure_ascii=False))
        return responses
