"""Shared pieces: errors, the project tag, resource names, boto3 clients, waiting."""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable

import boto3
import botocore.session
from botocore.config import Config
from tqdm import tqdm

# Every create call sets this tag; cleanup deletes only what has it AND the name prefix.
PROJECT_TAG = {"Key": "project", "Value": "ncf-recommender"}
TAGS = [PROJECT_TAG]
DEFAULT_NAME_PREFIX = "ncf-recommender"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
VARIANT = "AllTraffic"
NAME_MAX = 63  # SageMaker names: ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}


class DeployError(Exception):
    """A failure reported as one line on stderr, exit code 1."""

    exit_code = 1


class ConfigError(DeployError):
    """A missing or invalid setting (region, role, bucket...), exit code 2."""

    exit_code = 2


def env(*names: str, default: str | None = None) -> str | None:
    """The first of these environment variables that is set and not empty."""
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return default


def require(value, what: str):
    if value in (None, ""):
        raise ConfigError(f"{what} is not set")
    return value


def resolve_region(option: str | None) -> str:
    # botocore itself reads AWS_DEFAULT_REGION and the profile, not AWS_REGION.
    region = option or env("AWS_REGION", "AWS_DEFAULT_REGION") or boto3.Session().region_name
    return require(region, "AWS region (--region or AWS_REGION)")


def unique_name(base: str, *parts: str) -> str:
    """base-parts-YYYYmmdd-HHMMSS-xxxx, cut to SageMaker's 63 characters.

    The random tail keeps two calls in the same second (deploy then --update) apart.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)
    tail = "-".join([*parts, stamp])
    return f"{base[: NAME_MAX - len(tail) - 1].rstrip('-')}-{tail}"


def has_project_tag(tags: Iterable[dict]) -> bool:
    return any(
        t.get("Key") == PROJECT_TAG["Key"] and t.get("Value") == PROJECT_TAG["Value"] for t in tags
    )


def ecr_domain(region: str) -> str:
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


_loader = None


def new_session(region: str) -> boto3.Session:
    """A boto3 session sharing one botocore data loader per process: the service models
    are large JSON files (sagemaker's is megabytes), read once instead of per session."""
    global _loader
    core = botocore.session.get_session()
    if _loader is None:
        _loader = core.get_component("data_loader")
    else:
        core.register_component("data_loader", _loader)
    return boto3.Session(botocore_session=core, region_name=region)


class Aws:
    """boto3 clients for one region, made on first use."""

    def __init__(self, region: str, session: boto3.Session | None = None):
        self.region = region
        self.session = session or new_session(region)
        self._clients: dict[str, object] = {}
        self._account: str | None = None

    def client(self, service: str):
        if service not in self._clients:
            config = Config(retries={"mode": "standard", "max_attempts": 5})
            self._clients[service] = self.session.client(
                service, region_name=self.region, config=config
            )
        return self._clients[service]

    def account_id(self) -> str:
        if self._account is None:
            self._account = self.client("sts").get_caller_identity()["Account"]
        return self._account

    def image_uri(self, image_uri: str | None, repository: str, tag: str) -> str:
        """The explicit --image-uri, else the ECR image that `push` uploads."""
        if image_uri:
            return image_uri
        registry = f"{self.account_id()}.dkr.ecr.{self.region}.{ecr_domain(self.region)}"
        return f"{registry}/{repository}:{tag}"


def wait_for(
    what: str,
    describe: Callable[[], dict],
    status_key: str,
    done: Callable[[dict], bool],
    failed: Callable[[dict], str | None],
    timeout: float,
    poll: float,
    detail_key: str | None = None,
) -> dict:
    """Poll describe() until done(); a status line (tqdm) shows status and elapsed time.

    failed(description) returns a reason to stop with, or None. boto3's waiters would do
    the polling but show nothing for the 5-10 minutes an endpoint takes.
    """
    start = time.monotonic()
    bar_format = "{desc}: {postfix} [{elapsed}]"
    with tqdm(desc=what, bar_format=bar_format, file=sys.stderr, dynamic_ncols=True) as bar:
        while True:
            description = describe()
            status = description.get(status_key, "?")
            detail = description.get(detail_key) if detail_key else None
            bar.set_postfix_str(f"{status} ({detail})" if detail and detail != status else status)
            if done(description):
                return description
            reason = failed(description)
            if reason:
                raise DeployError(f"{what}: {status}: {reason}")
            if time.monotonic() - start > timeout:
                raise DeployError(f"{what}: still {status} after {timeout:.0f} s")
            time.sleep(poll)
