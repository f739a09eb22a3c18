"""train-job: metric regexes against the real log line, and the request under moto."""

from __future__ import annotations

import re

import boto3
import pytest
from moto import mock_aws

from deploy import train_job
from deploy.cli import main
from deploy.common import TAGS, Aws
from training.cli import parse_int_list
from training.train import build_parser

REGION = "us-west-2"
BUCKET = "ncf-train-bucket"
ROLE = "arn:aws:iam::123456789012:role/ncf-sagemaker"
EPOCH_LINE = "epoch=3 loss=0.3120 HR@10=0.7120 NDCG@10=0.4310 seconds=5.2"


def metric(name: str) -> str:
    return next(m["Regex"] for m in train_job.METRIC_DEFINITIONS if m["Name"] == name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("train:loss", "0.3120"),
        ("test:HR@10", "0.7120"),
        ("test:NDCG@10", "0.4310"),
        ("train:epoch_seconds", "5.2"),
    ],
)
def test_metric_regexes_read_the_epoch_line(name, value):
    match = re.search(metric(name), f"[1,mpirank:0]<stdout>: {EPOCH_LINE}")
    assert match and match.group(1) == value


@pytest.mark.parametrize(
    "line",
    [
        "best epoch=7 HR@10=0.7200 NDCG@10=0.4400",
        "baseline_popular HR@10=0.4500 NDCG@10=0.2500",
        "dataset=ml-1m users=6040 items=3706 train=994169 test=6040 device=cuda world=1",
    ],
)
def test_metric_regexes_skip_the_other_lines(line):
    assert all(re.search(m["Regex"], line) is None for m in train_job.METRIC_DEFINITIONS)


def test_scientific_notation_loss():
    assert re.search(metric("train:loss"), "epoch=40 loss=1.5e-05 HR@10=0.7").group(1) == "1.5e-05"


def test_distributed_when_several_instances_or_gpus():
    assert not train_job.is_distributed("ml.g5.xlarge", 1)
    assert train_job.is_distributed("ml.g5.xlarge", 2)
    assert train_job.is_distributed("ml.g5.12xlarge", 1)
    assert train_job.is_distributed("ml.p4d.24xlarge", 1)


@pytest.fixture
def aws(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "SAGEMAKER_ROLE_ARN": ROLE,
        "NCF_S3_BUCKET": BUCKET,
    }.items():
        monkeypatch.setenv(key, value)
    for key in (
        "AWS_REGION",
        "AWS_PROFILE",
        "NCF_S3_PREFIX",
        "NCF_NAME_PREFIX",
        "NCF_IMAGE_URI",
        "NCF_INSTANCE_TYPE",
        "NCF_TRAIN_INSTANCE_TYPE",
        "NCF_TRAIN_DATA",
    ):
        monkeypatch.delenv(key, raising=False)
    with mock_aws():
        yield boto3.client("sagemaker", region_name=REGION)


@pytest.fixture
def sent(monkeypatch):
    """CreateTrainingJob parameters as sent: moto's describe replaces MetricDefinitions."""
    requests = []
    real_client = Aws.client

    def client(self, service):
        c = real_client(self, service)
        if service == "sagemaker" and not getattr(c, "_ncf_captured", False):
            c.meta.events.register(
                "provide-client-params.sagemaker.CreateTrainingJob",
                lambda params, **_: requests.append(dict(params)),
            )
            c._ncf_captured = True
        return c

    monkeypatch.setattr(Aws, "client", client)
    return requests


def test_training_job_request(aws, capsys, sent):
    code = main(
        [
            "train-job", "--dataset", "ml-1m", "--model", "neumf-pre", "--factors", "16",
            "--layers", "64,32,16,8", "--negatives", "4", "--batch-size", "256", "--lr", "0.001",
            "--l2", "0.002", "--weight-decay", "0.2", "--epochs", "3", "--seed", "7",
            "--instance-type", "ml.g5.12xlarge",
            "--wait", "--poll", "0",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    name = out.strip()
    assert name.startswith("ncf-recommender-train-") and len(name) <= 63
    job = aws.describe_training_job(TrainingJobName=name)

    spec = job["AlgorithmSpecification"]
    assert spec["TrainingImage"] == (
        f"123456789012.dkr.ecr.{REGION}.amazonaws.com/ncf-recommender:latest"
    )
    assert spec["TrainingInputMode"] == "File"
    (request,) = sent
    regexes = {
        m["Name"]: m["Regex"] for m in request["AlgorithmSpecification"]["MetricDefinitions"]
    }
    assert set(regexes) == {"train:loss", "test:HR@10", "test:NDCG@10", "train:epoch_seconds"}
    values = {name: re.search(regex, EPOCH_LINE).group(1) for name, regex in regexes.items()}
    assert values == {
        "train:loss": "0.3120",
        "test:HR@10": "0.7120",
        "test:NDCG@10": "0.4310",
        "train:epoch_seconds": "5.2",
    }
    assert request["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/ncf-recommender/checkpoints/{name}/",
        "LocalPath": "/opt/ml/checkpoints",
    }

    (channel,) = job["InputDataConfig"]
    assert channel["ChannelName"] == "train"
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == (
        f"s3://{BUCKET}/ncf-recommender/data/ml-1m/"
    )
    assert channel["DataSource"]["S3DataSource"]["S3DataType"] == "S3Prefix"
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/ncf-recommender/training/"
    assert job["ResourceConfig"] == {
        "InstanceType": "ml.g5.12xlarge",
        "InstanceCount": 1,
        "VolumeSizeInGB": 50,
    }
    assert job["StoppingCondition"]["MaxRuntimeInSeconds"] == 86400
    assert job["RoleArn"] == ROLE
    assert job["HyperParameters"] == {
        "dataset": "ml-1m",
        "model": "neumf-pre",
        "factors": "16",
        "layers": "64,32,16,8",
        "negatives": "4",
        "batch-size": "256",
        "lr": "0.001",
        "l2": "0.002",
        "weight-decay": "0.2",
        "epochs": "3",
        "seed": "7",
        "sagemaker_distributed": "true",  # 4 GPUs on a g5.12xlarge
    }
    assert TAGS[0] in aws.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]


def test_training_defaults_leave_the_cli_defaults_alone(aws, capsys):
    code = main(["train-job", "--train-data", "s3://elsewhere/ml-1m/"])
    out, err = capsys.readouterr()
    assert code == 0, err
    job = aws.describe_training_job(TrainingJobName=out.strip())
    assert job["HyperParameters"] == {"dataset": "ml-1m", "model": "neumf-pre"}
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert job["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == (
        "s3://elsewhere/ml-1m/"
    )


def test_forwarded_options_are_training_options_of_their_type():
    actions = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}
    for option, kind in train_job.HYPERPARAMETER_OPTIONS.items():
        trained_as = actions[f"--{option}"].type
        # --layers arrives as the text the training CLI parses itself
        assert trained_as is kind or (kind is str and trained_as is parse_int_list), option
