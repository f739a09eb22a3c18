"""The pipeline definition, built offline and checked, then upserted and started under moto."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from deploy.cli import main
from deploy.common import TAGS

REGION = "us-east-1"
BUCKET = "ncf-pipeline-bucket"
ROLE = "arn:aws:iam::123456789012:role/ncf-sagemaker"
ENV = ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "SAGEMAKER_ROLE_ARN", "NCF_S3_BUCKET",
       "NCF_S3_PREFIX", "NCF_NAME_PREFIX", "NCF_IMAGE_URI", "NCF_INSTANCE_TYPE",
       "NCF_TRAIN_INSTANCE_TYPE", "NCF_MODEL_PACKAGE_GROUP", "NCF_TRAIN_DATA")  # fmt: skip


def refs(node, found=None):
    """Every {"Get": ...} path in a definition."""
    found = [] if found is None else found
    if isinstance(node, dict):
        if set(node) == {"Get"}:
            found.append(node["Get"])
        for value in node.values():
            refs(value, found)
    elif isinstance(node, list):
        for value in node:
            refs(value, found)
    return found


def all_steps(steps):
    for step in steps:
        yield step
        if step["Type"] == "Condition":
            yield from all_steps(step["Arguments"]["IfSteps"] + step["Arguments"]["ElseSteps"])


@pytest.fixture
def offline_definition(tmp_path, monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)

    def no_aws(*args, **kwargs):
        raise AssertionError("--definition-out must not call AWS")

    monkeypatch.setattr("deploy.common.new_session", no_aws)
    monkeypatch.setattr("boto3.Session", no_aws)
    out = tmp_path / "pipeline.json"
    assert main(["pipeline", "--definition-out", str(out), "--bucket", BUCKET, "--role-arn", ROLE,
                 "--region", REGION, "--dataset", "ml-1m", "--min-hr", "0.65"]) == 0  # fmt: skip
    return json.loads(out.read_text())


def test_parameters(offline_definition):
    d = offline_definition
    assert d["Version"] == "2020-12-01"
    params = {p["Name"]: (p["Type"], p["DefaultValue"]) for p in d["Parameters"]}
    assert params == {
        "InstanceType": ("String", "ml.g5.xlarge"),
        "TrainData": ("String", f"s3://{BUCKET}/ncf-recommender/data/ml-1m/"),
        "Epochs": ("Integer", 20),
        "MinHR": ("Float", 0.65),
    }


def test_steps_and_references(offline_definition):
    d = offline_definition
    steps = {s["Name"]: s for s in all_steps(d["Steps"])}
    assert {name: s["Type"] for name, s in steps.items()} == {
        "Train": "Training",
        "Evaluate": "Processing",
        "CheckHR": "Condition",
        "RegisterModel": "RegisterModel",
        "HRTooLow": "Fail",
    }
    declared = {p["Name"] for p in d["Parameters"]}
    for path in refs(d):
        head, name = path.split(".")[:2]
        assert head in ("Parameters", "Steps", "Execution"), path
        if head == "Parameters":
            assert name in declared, path
        if head == "Steps":
            assert name in steps, path

    train = steps["Train"]["Arguments"]
    image = "<account-id>.dkr.ecr.us-east-1.amazonaws.com/ncf-recommender:latest"
    assert train["AlgorithmSpecification"]["TrainingImage"] == image
    assert train["ResourceConfig"]["InstanceType"] == {"Get": "Parameters.InstanceType"}
    assert train["InputDataConfig"][0]["ChannelName"] == "train"
    assert train["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == {
        "Get": "Parameters.TrainData"
    }
    hp = train["HyperParameters"]
    assert hp["dataset"] == "ml-1m"
    assert hp["epochs"] == {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.Epochs"}]}}
    assert train["RoleArn"] == ROLE

    evaluate = steps["Evaluate"]
    app = evaluate["Arguments"]["AppSpecification"]
    assert app["ImageUri"] == image
    assert (
        "python -m training.evaluate /opt/ml/processing/model --json "
        "/opt/ml/processing/evaluation/evaluation.json" in app["ContainerEntrypoint"][-1]
    )
    model_input = evaluate["Arguments"]["ProcessingInputs"][0]["S3Input"]
    assert model_input["S3Uri"] == {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}
    assert model_input["LocalPath"] == "/opt/ml/processing/model"
    (output,) = evaluate["Arguments"]["ProcessingOutputConfig"]["Outputs"]
    assert output["S3Output"]["LocalPath"] == "/opt/ml/processing/evaluation"
    assert evaluate["PropertyFiles"] == [
        {
            "PropertyFileName": "EvaluationReport",
            "OutputName": output["OutputName"],
            "FilePath": "evaluation.json",
        }
    ]

    register = steps["RegisterModel"]["Arguments"]
    assert register["ModelPackageGroupName"] == "ncf-recommender-models"
    assert register["ModelApprovalStatus"] == "PendingManualApproval"
    (container,) = register["InferenceSpecification"]["Containers"]
    assert container == {
        "Image": image,
        "ModelDataUrl": {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"},
    }
    assert "below MinHR" in json.dumps(steps["HRTooLow"]["Arguments"]["ErrorMessage"])


def test_condition_reads_hr_from_the_property_file(offline_definition):
    (check,) = [s for s in offline_definition["Steps"] if s["Type"] == "Condition"]
    (condition,) = check["Arguments"]["Conditions"]
    assert condition["Type"] == "GreaterThanOrEqualTo"
    assert condition["RightValue"] == {"Get": "Parameters.MinHR"}
    json_get = condition["LeftValue"]["Std:JsonGet"]
    assert json_get["PropertyFile"] == {"Get": "Steps.Evaluate.PropertyFiles.EvaluationReport"}
    assert json_get["Path"] == "metrics.hr_at_10"
    assert [s["Name"] for s in check["Arguments"]["IfSteps"]] == ["RegisterModel"]
    assert [s["Name"] for s in check["Arguments"]["ElseSteps"]] == ["HRTooLow"]

    # The path resolves in what training.evaluate writes (plain keys: no JsonPath quirks).
    evaluation = {"metrics": {"hr@10": 0.71, "ndcg@10": 0.43, "hr_at_10": 0.71}}
    value = evaluation
    for key in json_get["Path"].split("."):
        value = value[key]
    assert value == 0.71


def test_definition_to_stdout(capsys, monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    assert main(["pipeline", "--definition-out", "-"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert (
        body["Parameters"][1]["DefaultValue"] == "s3://<NCF_S3_BUCKET>/ncf-recommender/data/ml-1m/"
    )


@pytest.fixture
def aws(monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "SAGEMAKER_ROLE_ARN": ROLE,
        "NCF_S3_BUCKET": BUCKET,
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.client("sagemaker", region_name=REGION)


def test_upsert_and_start(aws, capsys):
    assert main(["pipeline", "--epochs", "5"]) == 0
    out, err = capsys.readouterr()
    assert "pipeline ncf-recommender-pipeline created" in err
    first_execution = out.strip()
    described = aws.describe_pipeline(PipelineName="ncf-recommender-pipeline")
    assert described["RoleArn"] == ROLE
    body = json.loads(described["PipelineDefinition"])
    assert {p["Name"]: p["DefaultValue"] for p in body["Parameters"]}["Epochs"] == 5
    assert TAGS[0] in aws.list_tags(ResourceArn=described["PipelineArn"])["Tags"]
    group = aws.describe_model_package_group(ModelPackageGroupName="ncf-recommender-models")
    assert TAGS[0] in aws.list_tags(ResourceArn=group["ModelPackageGroupArn"])["Tags"]

    # The second run updates in place and starts another execution.
    assert main(["pipeline", "--epochs", "7", "--min-hr", "0.72"]) == 0
    out, err = capsys.readouterr()
    assert "pipeline ncf-recommender-pipeline updated" in err
    body = json.loads(
        aws.describe_pipeline(PipelineName="ncf-recommender-pipeline")["PipelineDefinition"]
    )
    assert {p["Name"]: p["DefaultValue"] for p in body["Parameters"]}["MinHR"] == 0.72
    executions = aws.list_pipeline_executions(PipelineName="ncf-recommender-pipeline")
    arns = {e["PipelineExecutionArn"] for e in executions["PipelineExecutionSummaries"]}
    assert arns == {first_execution, out.strip()}


def test_upsert_without_start(aws, capsys):
    assert main(["pipeline", "--no-start"]) == 0
    assert capsys.readouterr().out == ""
    executions = aws.list_pipeline_executions(PipelineName="ncf-recommender-pipeline")
    assert executions["PipelineExecutionSummaries"] == []
