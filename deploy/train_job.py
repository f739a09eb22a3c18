"""`train-job`: a SageMaker training job running the project's image.

SageMaker runs the image with the argument `train`; the entrypoint starts
`python -m training.train` (or torchrun), which reads SM_CHANNEL_TRAIN and writes the
artifact to SM_MODEL_DIR (SageMaker tars it to <output>/<job>/output/model.tar.gz).
"""

from __future__ import annotations

from deploy.common import TAGS, Aws, ConfigError, unique_name, wait_for

# The training log prints, per epoch:
#   epoch=3 loss=0.3120 HR@10=0.7120 NDCG@10=0.4310 seconds=5.2
# SageMaker takes the first group of each regex as the value. Every regex is anchored on
# "epoch=N loss=" so the baseline and "best epoch=..." summary lines do not count.
NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
EPOCH_LINE = r"epoch=[0-9]+ loss="
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": EPOCH_LINE + NUMBER},
    {"Name": "test:HR@10", "Regex": EPOCH_LINE + r"[^ ]+ HR@10=" + NUMBER},
    {"Name": "test:NDCG@10", "Regex": EPOCH_LINE + r"[^ ]+ HR@10=[^ ]+ NDCG@10=" + NUMBER},
    {"Name": "train:epoch_seconds", "Regex": EPOCH_LINE + r"[^ ]+ .*seconds=" + NUMBER},
]

# GPUs per instance for the multi-GPU types; anything else counts as one device.
GPUS = {
    "ml.g4dn.12xlarge": 4,
    "ml.g4dn.metal": 8,
    "ml.g5.12xlarge": 4,
    "ml.g5.24xlarge": 4,
    "ml.g5.48xlarge": 8,
    "ml.g6.12xlarge": 4,
    "ml.g6.24xlarge": 4,
    "ml.g6.48xlarge": 8,
    "ml.g6e.12xlarge": 4,
    "ml.g6e.24xlarge": 4,
    "ml.g6e.48xlarge": 8,
    "ml.p3.8xlarge": 4,
    "ml.p3.16xlarge": 8,
    "ml.p3dn.24xlarge": 8,
    "ml.p4d.24xlarge": 8,
    "ml.p4de.24xlarge": 8,
    "ml.p5.48xlarge": 8,
    "ml.p5e.48xlarge": 8,
    "ml.p5en.48xlarge": 8,
}

# The training CLI's options that train-job forwards, with their types (None: the CLI's
# own default).
HYPERPARAMETER_OPTIONS = {
    "factors": int,
    "layers": str,
    "negatives": int,
    "batch-size": int,
    "lr": float,
    "l2": float,
    "weight-decay": float,
    "epochs": int,
    "seed": int,
}


def is_distributed(instance_type: str, instance_count: int) -> bool:
    return instance_count > 1 or GPUS.get(instance_type, 1) > 1


def hyperparameters(
    dataset: str, model: str, options: dict, distributed: bool = False
) -> dict[str, str]:
    """All values strings, as CreateTrainingJob requires; SageMaker hands them to the
    container as /opt/ml/input/config/hyperparameters.json and the entrypoint turns them
    into --key value. Keys starting with sagemaker_ are for the entrypoint only."""
    hp = {"dataset": dataset, "model": model}
    for key in HYPERPARAMETER_OPTIONS:
        if options.get(key) is not None:
            hp[key] = str(options[key])
    if distributed:
        hp["sagemaker_distributed"] = "true"  # entrypoint: torchrun over SM_HOSTS x SM_NUM_GPUS
    return hp


def training_request(
    *,
    image,
    role_arn,
    train_data,
    output_path,
    instance_type,
    instance_count,
    volume_gb: int,
    max_runtime: int,
    hyperparameters: dict,
) -> dict:
    """The CreateTrainingJob fields shared by train-job and the pipeline's TrainingStep.

    Values may be pipeline expressions ({"Get": "Parameters.X"}) as well as literals.
    """
    return {
        "AlgorithmSpecification": {
            "TrainingImage": image,
            "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "RoleArn": role_arn,
        "InputDataConfig": [
            {
                "ChannelName": "train",  # -> SM_CHANNEL_TRAIN=/opt/ml/input/data/train
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": train_data,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }
        ],
        "OutputDataConfig": {"S3OutputPath": output_path},
        "ResourceConfig": {
            "InstanceType": instance_type,
            "InstanceCount": instance_count,
            "VolumeSizeInGB": volume_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime},
        "HyperParameters": hyperparameters,
    }


def create_training_job(
    aws: Aws,
    *,
    name_prefix: str,
    bucket: str,
    prefix: str,
    image: str,
    role_arn: str,
    train_data: str,
    instance_type: str,
    instance_count: int,
    volume_gb: int,
    max_runtime: int,
    hp: dict[str, str],
) -> str:
    if instance_count < 1:
        raise ConfigError("--instance-count must be at least 1")
    name = unique_name(name_prefix, "train")
    request = training_request(
        image=image,
        role_arn=role_arn,
        train_data=train_data,
        output_path=f"s3://{bucket}/{prefix}/training/",
        instance_type=instance_type,
        instance_count=instance_count,
        volume_gb=volume_gb,
        max_runtime=max_runtime,
        hyperparameters=hp,
    )
    aws.client("sagemaker").create_training_job(
        TrainingJobName=name,
        # training.train resumes from /opt/ml/checkpoints when the folder exists.
        CheckpointConfig={
            "S3Uri": f"s3://{bucket}/{prefix}/checkpoints/{name}/",
            "LocalPath": "/opt/ml/checkpoints",
        },
        Tags=TAGS,
        **request,
    )
    return name


def wait_training_job(aws: Aws, name: str, timeout: float, poll: float) -> dict:
    return wait_for(
        f"training job {name}",
        lambda: aws.client("sagemaker").describe_training_job(TrainingJobName=name),
        "TrainingJobStatus",
        done=lambda d: d["TrainingJobStatus"] == "Completed",
        failed=lambda d: (
            d.get("FailureReason", d["TrainingJobStatus"])
            if d["TrainingJobStatus"] in ("Failed", "Stopped")
            else None
        ),
        timeout=timeout,
        poll=poll,
        detail_key="SecondaryStatus",
    )
