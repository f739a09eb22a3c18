"""`package`: model.tar.gz (the .mar, plus the artifact's metadata.json) to S3.

SageMaker extracts model.tar.gz into /opt/ml/model, so the container finds
/opt/ml/model/ncf.mar there and hands it to TorchServe.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from deploy.common import PROJECT_TAG, Aws, ConfigError, DeployError

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def models_prefix(prefix: str) -> str:
    return f"{prefix.strip('/')}/models/"


def model_key(prefix: str, version: str) -> str:
    return f"{models_prefix(prefix)}{version}/model.tar.gz"


def default_version() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def build_tarball(mar: Path, artifact: Path | None, out: Path) -> Path:
    if not mar.is_file():
        raise ConfigError(f"{mar}: no such .mar (build it first, or pass --mar)")
    members = [(mar, mar.name)]
    if artifact is not None:
        metadata = artifact / "metadata.json"
        if not metadata.is_file():
            raise ConfigError(f"{metadata}: not found (--artifact must be an artifact folder)")
        members.append((metadata, "metadata.json"))
    with tarfile.open(out, "w:gz") as tar:
        for path, name in members:
            tar.add(path, arcname=name)  # flat: SageMaker wants them at /opt/ml/model/
    return out


def package(
    aws: Aws, bucket: str, prefix: str, mar: Path, artifact: Path | None, version: str
) -> str:
    if not VERSION_RE.match(version):
        raise ConfigError(f"--version {version!r}: use letters, digits, '.', '_' or '-'")
    key = model_key(prefix, version)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = build_tarball(mar, artifact, Path(tmp) / "model.tar.gz")
        tagging = f"{quote(PROJECT_TAG['Key'])}={quote(PROJECT_TAG['Value'])}"
        aws.client("s3").upload_file(str(tarball), bucket, key, ExtraArgs={"Tagging": tagging})
    return f"s3://{bucket}/{key}"


def latest_model_data(aws: Aws, bucket: str, prefix: str) -> str:
    """The most recently uploaded s3://bucket/prefix/models/<version>/model.tar.gz."""
    paginator = aws.client("s3").get_paginator("list_objects_v2")
    objects = [
        obj
        for page in paginator.paginate(Bucket=bucket, Prefix=models_prefix(prefix))
        for obj in page.get("Contents", [])
        if obj["Key"].endswith("/model.tar.gz")
    ]
    if not objects:
        raise DeployError(
            f"no model.tar.gz under s3://{bucket}/{models_prefix(prefix)} (run package first)"
        )
    newest = max(objects, key=lambda obj: (obj["LastModified"], obj["Key"]))
    return f"s3://{bucket}/{newest['Key']}"
