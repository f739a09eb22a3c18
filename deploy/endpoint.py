"""`deploy`: Model -> EndpointConfig -> Endpoint, blue/green updates, autoscaling.

Each deploy creates a fresh Model and EndpointConfig named <endpoint>-<UTC stamp>-<rand>.
`--update` points the live endpoint at the new config with UpdateEndpoint: SageMaker
starts the new fleet, shifts traffic, then retires the old one (blue/green), so the
endpoint keeps serving throughout. The old config and model are deleted afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import ClientError

from deploy.common import (
    PROJECT_TAG,
    TAGS,
    VARIANT,
    Aws,
    ConfigError,
    DeployError,
    has_project_tag,
    unique_name,
    wait_for,
)

SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
FAILED_STATUSES = {"Failed", "OutOfService", "UpdateRollbackFailed"}


@dataclass
class Autoscaling:
    min_instances: int
    max_instances: int
    target_invocations: float  # per instance per minute (SageMakerVariantInvocationsPerInstance)

    def __post_init__(self):
        if not 1 <= self.min_instances <= self.max_instances:
            raise ConfigError("autoscaling needs 1 <= --min-instances <= --max-instances")
        if self.target_invocations <= 0:
            raise ConfigError("--target-invocations must be positive")


def model_environment(workers: int, timeout: int, extra: dict[str, str]) -> dict[str, str]:
    # Read by the container's serve entrypoint (TorchServe workers per model, response timeout).
    return {
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
        "SAGEMAKER_MODEL_SERVER_TIMEOUT": str(timeout),
        **extra,
    }


def describe_endpoint(aws: Aws, name: str) -> dict | None:
    try:
        return aws.client("sagemaker").describe_endpoint(EndpointName=name)
    except ClientError as e:
        if "Could not find endpoint" in e.response["Error"].get("Message", ""):
            return None
        raise


def is_ours(aws: Aws, arn: str, name: str, name_prefix: str) -> bool:
    """Name prefix AND project tag: the two marks cleanup and update rely on."""
    if not name.startswith(name_prefix):
        return False
    tags = aws.client("sagemaker").list_tags(ResourceArn=arn).get("Tags", [])
    return has_project_tag(tags)


def create_model_and_config(
    aws: Aws,
    name: str,
    image: str,
    model_data: str,
    role_arn: str,
    environment: dict[str, str],
    instance_type: str,
    instance_count: int,
    extra_tags: list[dict] = (),
) -> None:
    sm = aws.client("sagemaker")
    sm.create_model(
        ModelName=name,
        PrimaryContainer={"Image": image, "ModelDataUrl": model_data, "Environment": environment},
        ExecutionRoleArn=role_arn,
        Tags=[*TAGS, *extra_tags],
    )
    sm.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[
            {
                "VariantName": VARIANT,
                "ModelName": name,
                "InstanceType": instance_type,
                "InitialInstanceCount": instance_count,
                "InitialVariantWeight": 1.0,
            }
        ],
        Tags=[*TAGS, *extra_tags],
    )


def wait_in_service(aws: Aws, endpoint: str, config_name: str, timeout: float, poll: float):
    """Until the endpoint is InService on config_name; an update that rolled back fails."""
    seen = set()

    def describe():
        description = aws.client("sagemaker").describe_endpoint(EndpointName=endpoint)
        seen.add(description["EndpointStatus"])
        return description

    def done(d):
        return d["EndpointStatus"] == "InService" and d["EndpointConfigName"] == config_name

    def failed(d):
        if d["EndpointStatus"] in FAILED_STATUSES:
            return d.get("FailureReason", "no reason given")
        if d["EndpointStatus"] == "InService" and seen - {"InService"}:
            # Back in service on the old config after Updating/RollingBack: rolled back.
            return f"update rolled back, still on {d['EndpointConfigName']}: {d.get('FailureReason', '')}"
        return None

    return wait_for(f"endpoint {endpoint}", describe, "EndpointStatus", done, failed, timeout, poll)


# --- autoscaling -----------------------------------------------------------------------


def resource_id(endpoint: str, variant: str = VARIANT) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def enable_autoscaling(aws: Aws, endpoint: str, scaling: Autoscaling) -> None:
    aas = aws.client("application-autoscaling")
    target = dict(
        ServiceNamespace="sagemaker",
        ResourceId=resource_id(endpoint),
        ScalableDimension=SCALABLE_DIMENSION,
    )
    aas.register_scalable_target(
        **target,
        MinCapacity=scaling.min_instances,
        MaxCapacity=scaling.max_instances,
        Tags={PROJECT_TAG["Key"]: PROJECT_TAG["Value"]},
    )
    aas.put_scaling_policy(
        **target,
        PolicyName=f"{endpoint}-invocations",
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": float(scaling.target_invocations),
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
            },
            # Out fast when traffic grows, in slowly so a dip does not drop warm instances.
            "ScaleOutCooldown": 60,
            "ScaleInCooldown": 300,
        },
    )


def remove_autoscaling(aws: Aws, endpoint: str, variants=(VARIANT,)) -> list[dict]:
    """Deletes the policies and deregisters the targets; returns them for restore_autoscaling."""
    aas = aws.client("application-autoscaling")
    removed = []
    for variant in variants:
        rid = resource_id(endpoint, variant)
        targets = aas.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[rid], ScalableDimension=SCALABLE_DIMENSION
        )["ScalableTargets"]
        if not targets:
            continue
        policies = aas.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=SCALABLE_DIMENSION
        )["ScalingPolicies"]
        for policy in policies:
            aas.delete_scaling_policy(
                PolicyName=policy["PolicyName"],
                ServiceNamespace="sagemaker",
                ResourceId=rid,
                ScalableDimension=SCALABLE_DIMENSION,
            )
        aas.deregister_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=SCALABLE_DIMENSION
        )
        removed.append({"target": targets[0], "policies": policies})
    return removed


def restore_autoscaling(aws: Aws, removed: list[dict]) -> None:
    aas = aws.client("application-autoscaling")
    for entry in removed:
        t = entry["target"]
        key = dict(
            ServiceNamespace="sagemaker",
            ResourceId=t["ResourceId"],
            ScalableDimension=t["ScalableDimension"],
        )
        aas.register_scalable_target(
            **key,
            MinCapacity=t["MinCapacity"],
            MaxCapacity=t["MaxCapacity"],
            Tags={PROJECT_TAG["Key"]: PROJECT_TAG["Value"]},
        )
        for p in entry["policies"]:
            configs = {
                k: p[k]
                for k in (
                    "TargetTrackingScalingPolicyConfiguration",
                    "StepScalingPolicyConfiguration",
                )
                if k in p
            }
            aas.put_scaling_policy(
                **key, PolicyName=p["PolicyName"], PolicyType=p["PolicyType"], **configs
            )


# --- deploy ----------------------------------------------------------------------------


def delete_config_and_models(aws: Aws, config_name: str, name_prefix: str, keep: str) -> list[str]:
    """Deletes an endpoint config and its models, if ours; returns what was deleted."""
    sm = aws.client("sagemaker")
    deleted = []
    try:
        config = sm.describe_endpoint_config(EndpointConfigName=config_name)
    except ClientError:
        return deleted  # already gone: nothing to retire
    models = [v["ModelName"] for v in config["ProductionVariants"]]
    if is_ours(aws, config["EndpointConfigArn"], config_name, name_prefix):
        sm.delete_endpoint_config(EndpointConfigName=config_name)
        deleted.append(f"endpoint config {config_name}")
    for model in models:
        if model == keep:
            continue
        try:
            arn = sm.describe_model(ModelName=model)["ModelArn"]
        except ClientError:
            continue  # already gone
        if is_ours(aws, arn, model, name_prefix):
            sm.delete_model(ModelName=model)
            deleted.append(f"model {model}")
    return deleted


def deploy(
    aws: Aws,
    *,
    endpoint: str,
    name_prefix: str,
    image: str,
    model_data: str,
    role_arn: str,
    instance_type: str,
    instance_count: int,
    environment: dict[str, str],
    update: bool,
    scaling: Autoscaling | None,
    timeout: float,
    poll: float,
    extra_tags: list[dict] = (),
    log=print,
) -> str:
    """Creates or (update=True) blue/green-updates the endpoint; returns the new config name."""
    if not endpoint.startswith(name_prefix):
        raise ConfigError(
            f"endpoint name {endpoint!r} must start with the name prefix {name_prefix!r} "
            "(cleanup finds resources by it)"
        )
    if instance_count < 1:
        raise ConfigError("--instance-count must be at least 1")
    current = describe_endpoint(aws, endpoint)
    if current and not update:
        raise ConfigError(f"endpoint {endpoint} exists: pass --update to replace its model")
    if current and current["EndpointStatus"] != "InService":
        raise DeployError(
            f"endpoint {endpoint} is {current['EndpointStatus']}: retry when InService"
        )

    name = unique_name(endpoint)
    create_model_and_config(
        aws,
        name,
        image,
        model_data,
        role_arn,
        environment,
        instance_type,
        instance_count,
        extra_tags,
    )
    log(f"model and endpoint config {name}: {model_data}")
    sm = aws.client("sagemaker")
    if current is None:
        sm.create_endpoint(EndpointName=endpoint, EndpointConfigName=name, Tags=TAGS)
        wait_in_service(aws, endpoint, name, timeout, poll)
    else:
        old_config = current["EndpointConfigName"]
        # UpdateEndpoint fails when it would change the instance type of an autoscaled
        # variant, so the scaling is lifted for the update and put back after it.
        removed = remove_autoscaling(aws, endpoint)
        sm.update_endpoint(EndpointName=endpoint, EndpointConfigName=name)
        try:
            wait_in_service(aws, endpoint, name, timeout, poll)
        except DeployError:
            restore_autoscaling(aws, removed)  # the old config still serves: keep its scaling
            raise
        if scaling is None:
            restore_autoscaling(aws, removed)
        for line in delete_config_and_models(aws, old_config, name_prefix, keep=name):
            log(f"deleted old {line}")
    if scaling is not None:
        enable_autoscaling(aws, endpoint, scaling)
        log(
            f"autoscaling {scaling.min_instances}-{scaling.max_instances} instances, "
            f"target {scaling.target_invocations:g} invocations/instance/minute"
        )
    log(f"endpoint {endpoint} InService on {name}")
    return name


def approved_package(aws: Aws, group: str) -> dict:
    """The newest Approved model package of a group: {"arn", "image", "model_data", "env"}."""
    sm = aws.client("sagemaker")
    summaries = sm.list_model_packages(
        ModelPackageGroupName=group,
        ModelApprovalStatus="Approved",
        SortBy="CreationTime",
        SortOrder="Descending",
        MaxResults=1,
    )["ModelPackageSummaryList"]
    if not summaries:
        raise DeployError(f"model package group {group} has no Approved package")
    arn = summaries[0]["ModelPackageArn"]
    container = sm.describe_model_package(ModelPackageName=arn)["InferenceSpecification"][
        "Containers"
    ][0]
    return {
        "arn": arn,
        "image": container["Image"],
        "model_data": container["ModelDataUrl"],
        "env": container.get("Environment", {}),
    }
