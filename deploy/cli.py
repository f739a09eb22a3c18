"""python -m deploy <command>: package, push, deploy, invoke, train-job, pipeline, cleanup.

Settings come from options or environment variables (see deploy/README.md). Errors are
one line on stderr: exit code 2 for missing settings or credentials, 1 for the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from deploy import cleanup as cleanup_mod
from deploy import endpoint as endpoint_mod
from deploy import invoke as invoke_mod
from deploy import package as package_mod
from deploy import pipeline as pipeline_mod
from deploy import push as push_mod
from deploy import train_job
from deploy.common import (
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_NAME_PREFIX,
    Aws,
    ConfigError,
    DeployError,
    ecr_domain,
    env,
    require,
    resolve_region,
)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


# --- settings ---------------------------------------------------------------------------


def aws_for(args) -> Aws:
    return Aws(resolve_region(args.region))


def role_arn(args) -> str:
    arn = require(args.role_arn, "SageMaker execution role (--role-arn or SAGEMAKER_ROLE_ARN)")
    if not (arn.startswith("arn:") and ":role/" in arn):
        raise ConfigError(
            f"--role-arn {arn!r} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
        )
    return arn


def bucket(args) -> str:
    return require(args.bucket, "S3 bucket (--bucket or NCF_S3_BUCKET)")


def name_prefix(args) -> str:
    return args.name_prefix


def image(args, aws: Aws) -> str:
    return aws.image_uri(args.image_uri, args.ecr_repository, args.image_tag)


def instance_type(args, training: bool = False) -> str:
    if args.instance_type:
        return args.instance_type
    names = ("NCF_TRAIN_INSTANCE_TYPE", "NCF_INSTANCE_TYPE") if training else ("NCF_INSTANCE_TYPE",)
    return env(*names, default=DEFAULT_INSTANCE_TYPE)


def train_data(args) -> str:
    return args.train_data or f"s3://{bucket(args)}/{args.prefix}/data/{args.dataset}/"


def hp_options(args) -> dict:
    return {key: getattr(args, key.replace("-", "_")) for key in train_job.HYPERPARAMETER_OPTIONS}


# --- commands ---------------------------------------------------------------------------


def cmd_package(args) -> int:
    b = bucket(args)
    aws = aws_for(args)
    uri = package_mod.package(
        aws, b, args.prefix, args.mar, args.artifact, args.version or package_mod.default_version()
    )
    print(uri)
    return 0


def cmd_push(args) -> int:
    push_mod.find_engine(args.engine)  # says so in one line before any AWS call
    aws = aws_for(args)
    print(push_mod.push(aws, args.ecr_repository, args.image_tag, args.local_image, args.engine))
    return 0


def cmd_deploy(args) -> int:
    role = role_arn(args)
    aws = aws_for(args)
    scaling = None
    if args.max_instances is not None or args.target_invocations is not None:
        if args.max_instances is None or args.target_invocations is None:
            raise ConfigError("autoscaling needs both --max-instances and --target-invocations")
        scaling = endpoint_mod.Autoscaling(
            args.min_instances or args.instance_count, args.max_instances, args.target_invocations
        )
    environment = endpoint_mod.model_environment(args.workers, args.model_timeout, dict(args.env))
    extra_tags = []
    if args.from_package_group:
        package = endpoint_mod.approved_package(aws, args.from_package_group)
        image_uri, model_data = package["image"], package["model_data"]
        environment = {**package["env"], **environment}
        extra_tags = [{"Key": "model-package", "Value": package["arn"]}]
        log(f"deploying {package['arn']}")
    else:
        image_uri = image(args, aws)
        if args.model_data:
            model_data = args.model_data
        elif args.version:
            model_data = f"s3://{bucket(args)}/{package_mod.model_key(args.prefix, args.version)}"
        else:
            model_data = package_mod.latest_model_data(aws, bucket(args), args.prefix)
    endpoint_mod.deploy(
        aws,
        endpoint=args.endpoint_name or name_prefix(args),
        name_prefix=name_prefix(args),
        image=image_uri,
        model_data=model_data,
        role_arn=role,
        instance_type=instance_type(args),
        instance_count=args.instance_count,
        environment=environment,
        update=args.update,
        scaling=scaling,
        timeout=args.timeout,
        poll=args.poll,
        extra_tags=extra_tags,
        log=log,
    )
    print(args.endpoint_name or name_prefix(args))
    return 0


def cmd_invoke(args) -> int:
    aws = aws_for(args)
    answer = invoke_mod.invoke(aws, args.endpoint_name or name_prefix(args), args.user_id, args.k)
    print(json.dumps(answer, indent=2) if args.json else invoke_mod.format_recommendations(answer))
    return 0


def cmd_train_job(args) -> int:
    role = role_arn(args)
    b = bucket(args)
    aws = aws_for(args)
    itype = instance_type(args, training=True)
    distributed = (
        train_job.is_distributed(itype, args.instance_count)
        if args.distributed is None
        else args.distributed
    )
    hp = train_job.hyperparameters(args.dataset, args.model, hp_options(args), distributed)
    name = train_job.create_training_job(
        aws,
        name_prefix=name_prefix(args),
        bucket=b,
        prefix=args.prefix,
        image=image(args, aws),
        role_arn=role,
        train_data=train_data(args),
        instance_type=itype,
        instance_count=args.instance_count,
        volume_gb=args.volume_gb,
        max_runtime=args.max_runtime,
        hp=hp,
    )
    print(name)
    if args.wait:
        done = train_job.wait_training_job(aws, name, args.timeout, args.poll)
        for metric in done.get("FinalMetricDataList", []):
            log(f"{metric['MetricName']} = {metric['Value']}")
        log(f"model: {done.get('ModelArtifacts', {}).get('S3ModelArtifacts')}")
    return 0


def cmd_pipeline(args) -> int:
    offline = args.definition_out is not None
    if offline:
        # Review only: no AWS call, so what would need one becomes a visible placeholder.
        region = args.region or env("AWS_REGION", "AWS_DEFAULT_REGION") or "<region>"
        image_uri = args.image_uri or (
            f"<account-id>.dkr.ecr.{region}.{ecr_domain(region)}/{args.ecr_repository}:{args.image_tag}"
        )
        role = args.role_arn or "<SAGEMAKER_ROLE_ARN>"
        b = args.bucket or "<NCF_S3_BUCKET>"
        aws = None
    else:
        role = role_arn(args)
        b = bucket(args)
        aws = aws_for(args)
        image_uri = image(args, aws)
    group = args.package_group or f"{name_prefix(args)}-models"
    body = pipeline_mod.definition(
        image=image_uri,
        role_arn=role,
        bucket=b,
        prefix=args.prefix,
        dataset=args.dataset,
        model=args.model,
        hp_options=hp_options(args),
        instance_type=instance_type(args, training=True),
        train_data=args.train_data or f"s3://{b}/{args.prefix}/data/{args.dataset}/",
        epochs=args.epochs if args.epochs is not None else 20,
        min_hr=args.min_hr,
        package_group=group,
        inference_instance_type=env("NCF_INSTANCE_TYPE", default=DEFAULT_INSTANCE_TYPE),
    )
    if offline:
        text = json.dumps(body, indent=2) + "\n"
        if str(args.definition_out) == "-":
            sys.stdout.write(text)
        else:
            args.definition_out.write_text(text)
            log(f"wrote {args.definition_out}")
        return 0
    name = args.pipeline_name or f"{name_prefix(args)}-pipeline"
    log(f"pipeline {name} {pipeline_mod.upsert(aws, name, body, role, group)}")
    if not args.no_start:
        print(pipeline_mod.start(aws, name))
    return 0


def cmd_cleanup(args) -> int:
    aws = aws_for(args)
    done = cleanup_mod.cleanup(
        aws,
        name_prefix(args),
        bucket=args.bucket,
        prefix=args.prefix,
        s3=args.s3,
        ecr_repository=args.ecr_repository if args.ecr else None,
        dry_run=args.dry_run,
        log=log,
    )
    if not done:
        log("nothing of ours to delete")
    return 0


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("AWS settings (options override environment variables)")
    g.add_argument("--region", help="AWS region (AWS_REGION, AWS_DEFAULT_REGION, the profile)")
    g.add_argument(
        "--role-arn",
        default=env("SAGEMAKER_ROLE_ARN"),
        help="SageMaker execution role (SAGEMAKER_ROLE_ARN)",
    )
    g.add_argument("--bucket", default=env("NCF_S3_BUCKET"), help="S3 bucket (NCF_S3_BUCKET)")
    g.add_argument(
        "--prefix",
        default=env("NCF_S3_PREFIX", default="ncf-recommender").strip("/"),
        help="S3 key prefix (NCF_S3_PREFIX, default ncf-recommender)",
    )
    g.add_argument(
        "--name-prefix",
        default=env("NCF_NAME_PREFIX", default=DEFAULT_NAME_PREFIX),
        help="prefix of every SageMaker name (NCF_NAME_PREFIX, default ncf-recommender)",
    )
    g.add_argument(
        "--endpoint-name",
        default=env("NCF_ENDPOINT_NAME"),
        help="endpoint (NCF_ENDPOINT_NAME, default the name prefix)",
    )
    g.add_argument(
        "--instance-type",
        help=f"NCF_INSTANCE_TYPE (endpoint) / NCF_TRAIN_INSTANCE_TYPE (training), default {DEFAULT_INSTANCE_TYPE}",
    )
    g.add_argument(
        "--image-uri",
        default=env("NCF_IMAGE_URI"),
        help="image for SageMaker (NCF_IMAGE_URI, default the ECR image push makes)",
    )
    g.add_argument(
        "--ecr-repository",
        default=env("NCF_ECR_REPOSITORY", default="ncf-recommender"),
        help="ECR repository (NCF_ECR_REPOSITORY)",
    )
    g.add_argument(
        "--image-tag",
        default=env("NCF_IMAGE_TAG", default="latest"),
        help="image tag (NCF_IMAGE_TAG, default latest)",
    )

    parser = argparse.ArgumentParser(
        prog="python -m deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_):
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    def wait_options(p, timeout):
        p.add_argument(
            "--timeout", type=float, default=timeout, help=f"seconds to wait (default {timeout})"
        )
        p.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")

    def training_options(p):
        p.add_argument(
            "--train-data",
            default=env("NCF_TRAIN_DATA"),
            help="S3 prefix of the dataset (NCF_TRAIN_DATA, default s3://BUCKET/PREFIX/data/DATASET/)",
        )
        p.add_argument("--dataset", default="ml-1m")
        p.add_argument("--model", default="neumf-pre")
        for option, kind in train_job.HYPERPARAMETER_OPTIONS.items():
            p.add_argument(
                f"--{option}", type=kind, help="training.train option (default: its own)"
            )

    p = command(
        "package",
        cmd_package,
        "model.tar.gz (.mar + metadata.json) to s3://BUCKET/PREFIX/models/VERSION/",
    )
    p.add_argument("--mar", type=Path, default=Path("model-store/ncf.mar"))
    p.add_argument("--artifact", type=Path, help="artifact folder whose metadata.json goes along")
    p.add_argument("--version", help="default: UTC timestamp")

    p = command(
        "push", cmd_push, "create the ECR repository if missing, log in, tag and push the image"
    )
    p.add_argument(
        "--local-image",
        default=env("NCF_LOCAL_IMAGE", default="ncf-recommender:latest"),
        help="NCF_LOCAL_IMAGE",
    )
    p.add_argument(
        "--engine",
        default=env("NCF_CONTAINER_ENGINE"),
        help="docker or podman (NCF_CONTAINER_ENGINE, default whichever is found)",
    )

    p = command("deploy", cmd_deploy, "create the endpoint, or --update it blue/green")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model-data", help="s3://.../model.tar.gz (default: the newest packaged)")
    source.add_argument("--version", help="a packaged version")
    source.add_argument(
        "--from-package-group", metavar="GROUP", help="the newest Approved model package of GROUP"
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="replace the live endpoint's model (created if missing)",
    )
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="SAGEMAKER_MODEL_SERVER_WORKERS")
    p.add_argument(
        "--model-timeout", type=int, default=60, help="SAGEMAKER_MODEL_SERVER_TIMEOUT, seconds"
    )
    p.add_argument(
        "--env",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="container environment, repeatable",
    )
    p.add_argument("--min-instances", type=int, help="autoscaling floor (default --instance-count)")
    p.add_argument("--max-instances", type=int, help="autoscaling ceiling: enables autoscaling")
    p.add_argument(
        "--target-invocations", type=float, help="invocations per instance per minute to track"
    )
    wait_options(p, 1800)

    p = command("invoke", cmd_invoke, "ask the endpoint for a user's recommendations")
    p.add_argument("--user-id", type=int, required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")

    p = command("train-job", cmd_train_job, "run training as a SageMaker training job")
    training_options(p)
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--volume-gb", type=int, default=50)
    p.add_argument("--max-runtime", type=int, default=24 * 3600, help="seconds")
    dist = p.add_mutually_exclusive_group()
    dist.add_argument(
        "--distributed", action="store_true", default=None, help="torchrun even on one GPU"
    )
    dist.add_argument("--no-distributed", dest="distributed", action="store_false")
    p.add_argument("--wait", action="store_true", help="wait for the job, with a status line")
    wait_options(p, 24 * 3600)

    p = command("pipeline", cmd_pipeline, "create or update the SageMaker Pipeline and start it")
    training_options(p)
    p.add_argument(
        "--min-hr", type=float, default=0.70, help="MinHR default: register only when HR@10 >= it"
    )
    p.add_argument("--pipeline-name", help="default NAME_PREFIX-pipeline")
    p.add_argument(
        "--package-group",
        default=env("NCF_MODEL_PACKAGE_GROUP"),
        help="model package group (NCF_MODEL_PACKAGE_GROUP, default NAME_PREFIX-models)",
    )
    p.add_argument(
        "--definition-out",
        type=Path,
        metavar="FILE",
        help="only write the definition JSON (- for stdout); no AWS call",
    )
    p.add_argument("--no-start", action="store_true", help="upsert without starting an execution")

    p = command(
        "cleanup", cmd_cleanup, "delete this project's endpoints, configs, models, autoscaling"
    )
    p.add_argument("--s3", action="store_true", help="also the objects under s3://BUCKET/PREFIX/")
    p.add_argument("--ecr", action="store_true", help="also the ECR repository, if push created it")
    p.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (NoCredentialsError, PartialCredentialsError):
        message = "no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        code = 2
    except NoRegionError:
        message, code = "AWS region (--region or AWS_REGION) is not set", 2
    except DeployError as e:
        message, code = str(e), e.exit_code
    except (ClientError, BotoCoreError) as e:
        message, code = str(e), 1
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return code
