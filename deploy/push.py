"""`push`: the local image to ECR (repository created if missing, tagged as ours).

The ECR part is boto3; login, tag and push go through docker or podman. The command
lines are built by push_commands() so they can be checked without a container engine.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Callable

from deploy.common import TAGS, Aws, ConfigError, DeployError

ENGINES = ("docker", "podman")


def find_engine(preferred: str | None) -> str:
    for name in [preferred] if preferred else ENGINES:
        path = shutil.which(name)
        if path:
            return path
    wanted = preferred or " or ".join(ENGINES)
    raise ConfigError(f"no container engine found ({wanted} not on PATH)")


def ensure_repository(aws: Aws, name: str) -> str:
    """The repository URI; creates the repository (tagged, scan on push) when missing."""
    ecr = aws.client("ecr")
    try:
        repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except ecr.exceptions.RepositoryNotFoundException:
        repo = ecr.create_repository(
            repositoryName=name,
            imageScanningConfiguration={"scanOnPush": True},
            tags=TAGS,
        )["repository"]
    return repo["repositoryUri"]


def registry_login(aws: Aws) -> tuple[str, str, str]:
    """(registry host, user, password) from ecr.get_authorization_token."""
    data = aws.client("ecr").get_authorization_token()["authorizationData"][0]
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    registry = data["proxyEndpoint"].removeprefix("https://").removeprefix("http://")
    return registry, user, password


def push_commands(engine: str, registry: str, user: str, local_image: str, remote_image: str):
    """argv lists for login (password on stdin, never in argv), tag and push."""
    return [
        [engine, "login", "--username", user, "--password-stdin", registry],
        [engine, "tag", local_image, remote_image],
        [engine, "push", remote_image],
    ]


def push(
    aws: Aws,
    repository: str,
    tag: str,
    local_image: str,
    engine: str | None = None,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> str:
    engine_path = find_engine(engine)  # before any AWS call: nothing to do without one
    repository_uri = ensure_repository(aws, repository)
    registry, user, password = registry_login(aws)
    remote_image = f"{repository_uri}:{tag}"
    for argv in push_commands(engine_path, registry, user, local_image, remote_image):
        stdin = password if "--password-stdin" in argv else None
        result = run(argv, input=stdin, text=True)
        if result.returncode != 0:
            raise DeployError(f"{' '.join(argv[:2])} failed (exit code {result.returncode})")
    return remote_image
