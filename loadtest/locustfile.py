"""Locust users for the NCF service. From the repository root, name the user class:

    locust -f loadtest/locustfile.py TorchServeUser --host http://127.0.0.1:8080 \
        --artifact artifacts/ml-1m-neumf --headless -u 32 -r 32 -t 60s
    locust -f loadtest/locustfile.py SageMakerUser --endpoint-name ncf-recommender ...
    locust -f loadtest/locustfile.py,loadtest/shape.py TorchServeUser ...   # step load

`make loadtest` (loadtest/run.py) runs these headless and writes the report. Every option
below can also be set from the environment (NCF_LT_ARTIFACT, NCF_LT_PATH, ...).

Requests follow loadtest/workload.py's mix (user ids from the artifact weighted by
activity, cold-start users, a k mix, multi-user requests). An answer is a failure unless it
is 200 with one object per user and the expected number of items (--check items); the null
handler's constant answer is checked for 200 only (--check status).

Users send their next request as soon as the last one is answered (--think-time 0), so
N users keep N requests in flight: a closed loop that measures the capacity at that
concurrency.
"""

from __future__ import annotations

import csv
import json
import random
import time

import boto3
import gevent
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from locust import FastHttpUser, User, events, task
from locust.stats import PERCENTILES_TO_REPORT

from loadtest.workload import (
    DEFAULT_K_WEIGHTS,
    Mix,
    Workload,
    check_answer,
    format_k_weights,
    parse_k_weights,
)

_workload: Workload | None = None
_request_log: list[tuple[float, int, float]] = []  # (end time, 1 = success, response ms)


@events.init_command_line_parser.add_listener
def _add_options(parser):
    group = parser.add_argument_group("NCF load test")
    option = group.add_argument
    option(
        "--artifact",
        env_var="NCF_LT_ARTIFACT",
        required=True,
        help="artifact of the served model: its users and their activity",
    )
    option(
        "--path",
        env_var="NCF_LT_PATH",
        default="/predictions/ncf",
        help="TorchServeUser: /predictions/<model> or /invocations",
    )
    option(
        "--check",
        env_var="NCF_LT_CHECK",
        choices=("items", "status"),
        default="items",
        help="items: 200 with the expected items; status: 200 only (the null handler)",
    )
    option(
        "--cold-share",
        env_var="NCF_LT_COLD_SHARE",
        type=float,
        default=Mix.cold_share,
        help="share of users the model does not know",
    )
    option(
        "--multi-share",
        env_var="NCF_LT_MULTI_SHARE",
        type=float,
        default=Mix.multi_share,
        help="share of multi-user requests (user_ids)",
    )
    option(
        "--multi-users",
        env_var="NCF_LT_MULTI_USERS",
        type=int,
        default=Mix.multi_users,
        help="most users in one multi-user request",
    )
    option(
        "--k-mix",
        env_var="NCF_LT_K_MIX",
        default=format_k_weights(DEFAULT_K_WEIGHTS),
        help="k values and their weights, K:WEIGHT,...",
    )
    option(
        "--think-time",
        env_var="NCF_LT_THINK_TIME",
        type=float,
        default=0.0,
        help="seconds a user waits between requests",
    )
    option(
        "--endpoint-name",
        env_var="NCF_LT_ENDPOINT",
        default="",
        help="SageMakerUser: the endpoint to invoke",
    )
    # botocore itself reads AWS_DEFAULT_REGION only; the project's AWS_REGION is honoured here.
    option("--region", env_var="AWS_REGION", default=None, help="SageMakerUser: AWS region")
    option(
        "--step-time",
        env_var="NCF_LT_STEP_TIME",
        type=float,
        default=15.0,
        help="step load: seconds at each user count",
    )
    option(
        "--step-max-users",
        env_var="NCF_LT_STEP_MAX_USERS",
        type=int,
        default=64,
        help="step load: 1, 2, 4 ... up to this many users",
    )
    option(
        "--final-stats",
        env_var="NCF_LT_FINAL_STATS",
        default="",
        help="write Locust's final Aggregated figures to this JSON file at exit",
    )
    option(
        "--request-log",
        env_var="NCF_LT_REQUEST_LOG",
        default="",
        help="write every request's end time, success and latency to this CSV at exit",
    )


@events.init.add_listener
def _load_workload(environment, **_):
    global _workload
    options = environment.parsed_options
    mix = Mix(
        cold_share=options.cold_share,
        multi_share=options.multi_share,
        multi_users=options.multi_users,
        k_weights=parse_k_weights(options.k_mix),
    )
    _workload = Workload.from_artifact(options.artifact, mix)
    # Loading the artifact (and importing torch with it) blocks for a second or two before
    # gevent's loop runs; the loop's cached clock would lag by as much, and Locust's
    # --run-time timer, set from it next, would fire that much early (at once, for a short
    # run).
    gevent.get_hub().loop.update_now()
    if options.final_stats:
        environment.events.quit.add_listener(lambda **_: _write_final_stats(environment))
    if options.request_log:
        environment.events.request.add_listener(_log_request)
        environment.events.quit.add_listener(lambda **_: _write_request_log(options.request_log))


def _log_request(response_time, exception, **_):
    _request_log.append((time.time(), int(exception is None), response_time))


def _write_request_log(path: str):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time", "success", "response_ms"])
        writer.writerows(_request_log)


def _write_final_stats(environment):
    """Locust rewrites its stats CSV once a second, so the file misses the run's last
    second; this is the final Aggregated row, by Locust's own arithmetic, keyed like the
    CSV's columns (loadtest/report.py reads either)."""
    total = environment.stats.total
    row = {
        "Name": "Aggregated",
        "Request Count": total.num_requests,
        "Failure Count": total.num_failures,
        "Average Response Time": total.avg_response_time,
        "Min Response Time": total.min_response_time,
        "Max Response Time": total.max_response_time,
        "Requests/s": total.total_rps,
        "Failures/s": total.total_fail_per_sec,
    }
    for fraction in PERCENTILES_TO_REPORT:
        row[f"{fraction * 100:.10g}%"] = total.get_response_time_percentile(fraction)
    with open(environment.parsed_options.final_stats, "w") as f:
        json.dump(row, f, indent=2)


class _NCFUser:
    """What both users share: the request stream and the think time."""

    def on_start(self):
        self.rng = random.Random()  # seeded from the OS: users draw different streams
        self.check = self.environment.parsed_options.check

    def wait_time(self):
        return self.environment.parsed_options.think_time

    def problem(self, status: int, content, request) -> str | None:
        if self.check == "status":
            return None if status == 200 else f"HTTP {status}"
        return check_answer(status, content, request)


class TorchServeUser(_NCFUser, FastHttpUser):
    @task
    def recommend(self):
        request = _workload.next(self.rng)
        path = self.environment.parsed_options.path
        with self.client.post(
            path, json=request.body, name=f"{path} {request.name}", catch_response=True
        ) as response:
            problem = self.problem(response.status_code, response.content, request)
            if problem:
                response.failure(problem)
            else:
                response.success()


class EndpointError(Exception):
    """A SageMaker answer that is not a correct one (Locust groups failures by message)."""


_sagemaker_client = None


def sagemaker_client(region: str | None):
    """One client per Locust process: botocore clients are thread-safe, and building one
    costs tens of ms of CPU that every user would otherwise spend at spawn."""
    global _sagemaker_client
    if _sagemaker_client is None:
        # No retries: a throttled or failed call must show as a failure, not as latency.
        # AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME (botocore's own setting) points it elsewhere.
        config = Config(retries={"max_attempts": 0}, max_pool_connections=256)
        _sagemaker_client = boto3.client("sagemaker-runtime", region_name=region, config=config)
    return _sagemaker_client


class SageMakerUser(_NCFUser, User):
    def on_start(self):
        super().on_start()
        options = self.environment.parsed_options
        if not options.endpoint_name:
            raise ValueError("SageMakerUser needs --endpoint-name (NCF_LT_ENDPOINT)")
        self.endpoint = options.endpoint_name
        self.client = sagemaker_client(options.region)

    @task
    def invoke(self):
        request = _workload.next(self.rng)
        start = time.perf_counter()
        length, exception = 0, None
        try:
            response = self.client.invoke_endpoint(
                EndpointName=self.endpoint,
                ContentType="application/json",
                Accept="application/json",
                Body=json.dumps(request.body),
            )
            content = response["Body"].read()
            length = len(content)
            problem = self.problem(200, content, request)
            exception = EndpointError(problem) if problem else None
        except ClientError as error:
            # The model's own 4xx/5xx arrive as ModelError with the original status code.
            status = error.response.get("OriginalStatusCode") or error.response.get(
                "ResponseMetadata", {}
            ).get("HTTPStatusCode")
            exception = EndpointError(f"HTTP {status}: {error.response['Error'].get('Code')}")
        except BotoCoreError as error:  # connection refused, timeouts, ...
            exception = error
        self.environment.events.request.fire(
            request_type="invoke_endpoint",
            name=f"{self.endpoint} {request.name}",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )
