"""`pipeline`: train -> evaluate -> (HR@10 >= MinHR ? register : fail) as a SageMaker Pipeline.

The definition is the documented pipeline definition JSON (schema "2020-12-01") written
as plain dicts, not built with sagemaker.workflow: the SageMaker Python SDK would pull a
large dependency tree into the project for what is one JSON document and two boto3
calls (create_pipeline / update_pipeline, start_pipeline_execution). Here every field
SageMaker receives is in view, the JSON can be reviewed offline (--definition-out), and
moto can run the whole command in tests.

Expressions used below, as the definition format spells them:
    {"Get": "Parameters.Epochs"}                          a pipeline parameter
    {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"} a property of an earlier step
    {"Std:Join": {"On": "/", "Values": [...]}}             string concatenation
    {"Std:JsonGet": {"PropertyFile": ..., "Path": ...}}    a value from a step's JSON output

Deploying: the Register step adds a model package (PendingManualApproval) to the group.
Once someone approves it, `python -m deploy deploy --update --from-package-group GROUP`
puts the newest Approved package live; run it by hand or from an EventBridge rule on
"SageMaker Model Package State Change" events with ModelApprovalStatus "Approved".
"""

from __future__ import annotations

import json

from botocore.exceptions import ClientError

from deploy.common import TAGS, Aws
from deploy.train_job import hyperparameters, training_request

TRAIN, EVALUATE, CHECK, REGISTER, FAIL = "Train", "Evaluate", "CheckHR", "RegisterModel", "HRTooLow"
PROPERTY_FILE = "EvaluationReport"
EVALUATION_OUTPUT = "evaluation"
# A plain key: JsonPath dialects differ on "@" in dotted names (metrics.hr@10), so
# training.evaluate writes the same value under metrics.hr_at_10 for this condition.
HR_PATH = "metrics.hr_at_10"
MODEL_DIR = "/opt/ml/processing/model"
EVAL_DIR = "/opt/ml/processing/evaluation"
DATA_DIR = "/opt/ml/processing/data"


def get(path: str) -> dict:
    return {"Get": path}


def join(on: str, *values) -> dict:
    return {"Std:Join": {"On": on, "Values": list(values)}}


def parameters(instance_type: str, train_data: str, epochs: int, min_hr: float) -> list[dict]:
    return [
        {"Name": "InstanceType", "Type": "String", "DefaultValue": instance_type},
        {"Name": "TrainData", "Type": "String", "DefaultValue": train_data},
        {"Name": "Epochs", "Type": "Integer", "DefaultValue": epochs},
        {"Name": "MinHR", "Type": "Float", "DefaultValue": min_hr},
    ]


def definition(
    *,
    image: str,
    role_arn: str,
    bucket: str,
    prefix: str,
    dataset: str,
    model: str,
    hp_options: dict,
    instance_type: str,
    train_data: str,
    epochs: int,
    min_hr: float,
    package_group: str,
    inference_instance_type: str,
) -> dict:
    # Each execution writes under its own id, so runs never overwrite each other.
    run_root = join("/", f"s3://{bucket}/{prefix}/pipeline", get("Execution.PipelineExecutionId"))
    model_artifacts = get(f"Steps.{TRAIN}.ModelArtifacts.S3ModelArtifacts")

    hp = hyperparameters(dataset, model, {**hp_options, "epochs": None})
    hp["epochs"] = join("", get("Parameters.Epochs"))  # hyperparameters must be strings
    train = {
        "Name": TRAIN,
        "Type": "Training",
        "Arguments": training_request(
            image=image,
            role_arn=role_arn,
            train_data=get("Parameters.TrainData"),
            output_path=join("/", run_root, "training"),
            instance_type=get("Parameters.InstanceType"),
            instance_count=1,
            volume_gb=50,
            max_runtime=24 * 3600,
            hyperparameters=hp,
        ),
    }

    # The model arrives as model.tar.gz (SM_MODEL_DIR tarred): unpack, then evaluate.
    evaluate_script = (
        f"set -e; tar -xzf {MODEL_DIR}/model.tar.gz -C {MODEL_DIR}; mkdir -p {EVAL_DIR}; "
        f"exec python -m training.evaluate {MODEL_DIR} --json {EVAL_DIR}/evaluation.json"
    )
    evaluate = {
        "Name": EVALUATE,
        "Type": "Processing",
        "Arguments": {
            "ProcessingResources": {
                "ClusterConfig": {
                    "InstanceType": get("Parameters.InstanceType"),
                    "InstanceCount": 1,
                    "VolumeSizeInGB": 30,
                }
            },
            "AppSpecification": {
                "ImageUri": image,
                "ContainerEntrypoint": ["sh", "-c", evaluate_script],
            },
            "RoleArn": role_arn,
            # Same layouts as training: $NCF_DATA_DIR/<dataset> and SM_CHANNEL_TRAIN.
            "Environment": {"NCF_DATA_DIR": DATA_DIR, "SM_CHANNEL_TRAIN": f"{DATA_DIR}/{dataset}"},
            "ProcessingInputs": [
                s3_input("model", model_artifacts, MODEL_DIR),
                s3_input("data", get("Parameters.TrainData"), f"{DATA_DIR}/{dataset}"),
            ],
            "ProcessingOutputConfig": {
                "Outputs": [
                    {
                        "OutputName": EVALUATION_OUTPUT,
                        "AppManaged": False,
                        "S3Output": {
                            "S3Uri": join("/", run_root, "evaluation"),
                            "LocalPath": EVAL_DIR,
                            "S3UploadMode": "EndOfJob",
                        },
                    }
                ]
            },
            "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        },
        "PropertyFiles": [
            {
                "PropertyFileName": PROPERTY_FILE,
                "OutputName": EVALUATION_OUTPUT,
                "FilePath": "evaluation.json",
            }
        ],
    }

    evaluation_uri = join(
        "/",
        get(
            f"Steps.{EVALUATE}.ProcessingOutputConfig.Outputs['{EVALUATION_OUTPUT}'].S3Output.S3Uri"
        ),
        "evaluation.json",
    )
    register = {
        "Name": REGISTER,
        "Type": "RegisterModel",
        "Arguments": {  # a CreateModelPackage request
            "ModelPackageGroupName": package_group,
            "ModelPackageDescription": f"NCF {model} on {dataset}",
            "ModelApprovalStatus": "PendingManualApproval",
            "InferenceSpecification": {
                "Containers": [{"Image": image, "ModelDataUrl": model_artifacts}],
                "SupportedContentTypes": ["application/json"],
                "SupportedResponseMIMETypes": ["application/json"],
                "SupportedRealtimeInferenceInstanceTypes": [inference_instance_type],
            },
            "ModelMetrics": {
                "ModelQuality": {
                    "Statistics": {"ContentType": "application/json", "S3Uri": evaluation_uri}
                }
            },
        },
    }
    fail = {
        "Name": FAIL,
        "Type": "Fail",
        "Arguments": {
            "ErrorMessage": join(
                " ", "HR@10 of the trained model is below MinHR", get("Parameters.MinHR")
            )
        },
    }
    check = {
        "Name": CHECK,
        "Type": "Condition",
        "Arguments": {
            "Conditions": [
                {
                    "Type": "GreaterThanOrEqualTo",
                    "LeftValue": {
                        "Std:JsonGet": {
                            "PropertyFile": get(f"Steps.{EVALUATE}.PropertyFiles.{PROPERTY_FILE}"),
                            "Path": HR_PATH,
                        }
                    },
                    "RightValue": get("Parameters.MinHR"),
                }
            ],
            "IfSteps": [register],
            "ElseSteps": [fail],
        },
    }
    return {
        "Version": "2020-12-01",
        "Metadata": {},
        "Parameters": parameters(instance_type, train_data, epochs, min_hr),
        "PipelineExperimentConfig": {
            "ExperimentName": get("Execution.PipelineName"),
            "TrialName": get("Execution.PipelineExecutionId"),
        },
        "Steps": [train, evaluate, check],
    }


def s3_input(name: str, uri, local_path: str) -> dict:
    return {
        "InputName": name,
        "AppManaged": False,
        "S3Input": {
            "S3Uri": uri,
            "LocalPath": local_path,
            "S3DataType": "S3Prefix",
            "S3InputMode": "File",
            "S3DataDistributionType": "FullyReplicated",
            "S3CompressionType": "None",
        },
    }


def ensure_package_group(aws: Aws, group: str) -> None:
    sm = aws.client("sagemaker")
    try:
        sm.describe_model_package_group(ModelPackageGroupName=group)
    except ClientError:
        sm.create_model_package_group(
            ModelPackageGroupName=group,
            ModelPackageGroupDescription="NCF recommender models registered by the pipeline",
            Tags=TAGS,
        )


def pipeline_exists(aws: Aws, name: str) -> bool:
    try:
        aws.client("sagemaker").describe_pipeline(PipelineName=name)
    except ClientError as e:
        # AWS answers ResourceNotFound; moto a ValidationException.
        if e.response["Error"]["Code"] in ("ResourceNotFound", "ValidationException"):
            return False
        raise
    return True


def upsert(aws: Aws, name: str, body: dict, role_arn: str, package_group: str) -> str:
    """create_pipeline or update_pipeline; returns which was done."""
    ensure_package_group(aws, package_group)
    sm = aws.client("sagemaker")
    common = dict(
        PipelineName=name,
        PipelineDefinition=json.dumps(body),
        PipelineDescription="NCF: train, evaluate, register when HR@10 >= MinHR",
        RoleArn=role_arn,
    )
    if pipeline_exists(aws, name):
        sm.update_pipeline(**common)
        return "updated"
    sm.create_pipeline(**common, Tags=TAGS)
    return "created"


def start(aws: Aws, name: str) -> str:
    return aws.client("sagemaker").start_pipeline_execution(
        PipelineName=name, PipelineExecutionDescription="started by python -m deploy pipeline"
    )["PipelineExecutionArn"]
