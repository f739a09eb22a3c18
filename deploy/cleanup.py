"""`cleanup`: deletes what this project created, and nothing else.

SageMaker endpoints, endpoint configs and models count as ours only when their name
starts with the name prefix AND they carry the project tag (every create call here sets
it). Autoscaling is removed from our endpoints before they go. With --s3, the objects
under s3://<bucket>/<prefix>/ (never the bucket, never an empty prefix); with --ecr, the
repository, only if it carries the project tag (push creates it with the tag).
Training jobs cannot be deleted; pipelines and model packages are kept (the registry).
"""

from __future__ import annotations

from botocore.exceptions import ClientError

from deploy.common import Aws, ConfigError, has_project_tag
from deploy.endpoint import is_ours, remove_autoscaling


def _paged(client, operation: str, key: str, **kwargs):
    for page in client.get_paginator(operation).paginate(**kwargs):
        yield from page.get(key, [])


def sagemaker_resources(aws: Aws, name_prefix: str) -> dict[str, list[dict]]:
    """Our endpoints, endpoint configs and models: {"endpoints": [{"name", "arn"}], ...}."""
    sm = aws.client("sagemaker")
    listings = {
        "endpoints": ("list_endpoints", "Endpoints", "EndpointName", "EndpointArn"),
        "endpoint_configs": (
            "list_endpoint_configs",
            "EndpointConfigs",
            "EndpointConfigName",
            "EndpointConfigArn",
        ),
        "models": ("list_models", "Models", "ModelName", "ModelArn"),
    }
    found = {}
    for kind, (operation, key, name_key, arn_key) in listings.items():
        found[kind] = [
            {"name": item[name_key], "arn": item[arn_key]}
            for item in _paged(sm, operation, key, NameContains=name_prefix)
            if is_ours(aws, item[arn_key], item[name_key], name_prefix)
        ]
    return found


def cleanup(
    aws: Aws,
    name_prefix: str,
    bucket: str | None = None,
    prefix: str | None = None,
    s3: bool = False,
    ecr_repository: str | None = None,
    dry_run: bool = False,
    log=print,
) -> list[str]:
    """Deletes (or with dry_run lists) our resources; returns one line per resource."""
    if not name_prefix:
        raise ConfigError("the name prefix is empty: refusing to match everything")
    verb = "would delete" if dry_run else "deleted"
    done: list[str] = []

    def report(line: str):
        done.append(line)
        log(f"{verb} {line}")

    sm = aws.client("sagemaker")
    found = sagemaker_resources(aws, name_prefix)
    for endpoint in found["endpoints"]:
        variants = [
            v["VariantName"]
            for v in sm.describe_endpoint(EndpointName=endpoint["name"]).get(
                "ProductionVariants", []
            )
        ] or ["AllTraffic"]
        if not dry_run:
            for removed in remove_autoscaling(aws, endpoint["name"], variants):
                report(f"autoscaling target {removed['target']['ResourceId']}")
            sm.delete_endpoint(EndpointName=endpoint["name"])
        report(f"endpoint {endpoint['name']}")
    for config in found["endpoint_configs"]:
        if not dry_run:
            sm.delete_endpoint_config(EndpointConfigName=config["name"])
        report(f"endpoint config {config['name']}")
    for model in found["models"]:
        if not dry_run:
            sm.delete_model(ModelName=model["name"])
        report(f"model {model['name']}")

    if s3:
        _cleanup_s3(aws, bucket, prefix, dry_run, report)
    if ecr_repository:
        _cleanup_ecr(aws, ecr_repository, dry_run, report, log)
    return done


def _cleanup_s3(aws: Aws, bucket, prefix, dry_run, report) -> None:
    if not bucket:
        raise ConfigError("--s3 needs the bucket (--bucket or NCF_S3_BUCKET)")
    root = (prefix or "").strip("/")
    if not root:
        raise ConfigError("--s3 needs a non-empty prefix: refusing to empty the whole bucket")
    root += "/"  # "ncf/" must not match "ncf-other/"
    s3 = aws.client("s3")
    keys = [
        obj["Key"] for obj in _paged(s3, "list_objects_v2", "Contents", Bucket=bucket, Prefix=root)
    ]
    for start in range(0, len(keys), 1000):  # delete_objects takes at most 1000 keys
        batch = keys[start : start + 1000]
        if not dry_run:
            s3.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
    if keys:
        report(f"{len(keys)} objects under s3://{bucket}/{root}")


def _cleanup_ecr(aws: Aws, name: str, dry_run, report, log) -> None:
    ecr = aws.client("ecr")
    try:
        repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except ecr.exceptions.RepositoryNotFoundException:
        return
    try:
        tags = ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"]).get("tags", [])
    except ClientError:
        tags = []
    if not has_project_tag(tags):
        log(f"kept ECR repository {name}: it does not carry the project tag")
        return
    if not dry_run:
        ecr.delete_repository(repositoryName=name, force=True)  # force: with its images
    report(f"ECR repository {name} and its images")
