"""deploy/ against moto's in-process AWS: package, push, deploy/update, autoscaling, invoke,
deploy from the model registry, and cleanup that leaves other people's resources alone."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import zipfile

import boto3
import pytest
import requests
from moto import mock_aws
from moto.core.responses import ActionResult
from moto.sagemaker.models import FakeEndpointConfig
from moto.sagemaker.responses import SageMakerResponse

from deploy import push as push_mod
from deploy.cli import main
from deploy.common import TAGS, Aws

REGION = "eu-west-1"
BUCKET = "ncf-test-bucket"
ROLE = "arn:aws:iam::123456789012:role/ncf-sagemaker"
ACCOUNT = "123456789012"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/ncf-recommender:latest"


def _update_endpoint(self):
    """moto 5.2 lacks UpdateEndpoint: switch the endpoint to the new config at once."""
    backend = self.sagemaker_backend
    endpoint = backend.endpoints[self._get_param("EndpointName")]
    config = backend.describe_endpoint_config(self._get_param("EndpointConfigName"))
    endpoint.endpoint_config_name = config["EndpointConfigName"]
    endpoint.production_variants = endpoint._process_production_variants(
        config["ProductionVariants"]
    )
    return ActionResult({"EndpointArn": endpoint.arn})


@pytest.fixture
def aws(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": REGION,
        "SAGEMAKER_ROLE_ARN": ROLE,
        "NCF_S3_BUCKET": BUCKET,
    }.items():
        monkeypatch.setenv(key, value)
    for key in (
        "AWS_PROFILE",
        "AWS_DEFAULT_REGION",
        "NCF_S3_PREFIX",
        "NCF_NAME_PREFIX",
        "NCF_ENDPOINT_NAME",
        "NCF_IMAGE_URI",
        "NCF_INSTANCE_TYPE",
        "NCF_ECR_REPOSITORY",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(SageMakerResponse, "update_endpoint", _update_endpoint, raising=False)
    # moto's list of endpoint instance types predates ml.g5 (our default); AWS has it.
    monkeypatch.setattr(FakeEndpointConfig, "validate_instance_type", lambda self, _type: None)
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        yield Aws(REGION)


@pytest.fixture
def mar(tmp_path):
    path = tmp_path / "ncf.mar"
    with zipfile.ZipFile(path, "w") as z:  # stands in for torch-model-archiver's output
        z.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelName": "ncf"}}')
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def package(capsys, mar, version) -> str:
    code, out, err = run(capsys, "package", "--mar", str(mar), "--version", version)
    assert code == 0, err
    return out.strip()


def sm(aws):
    return aws.client("sagemaker")


# --- package ----------------------------------------------------------------------------


def test_package_uploads_a_tarball_holding_the_mar(aws, capsys, mar, tmp_path):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "metadata.json").write_text('{"metrics": {"hr@10": 0.71}}')
    code, out, err = run(
        capsys, "package", "--mar", str(mar), "--artifact", str(artifact), "--version", "v1"
    )
    assert code == 0, err
    key = "ncf-recommender/models/v1/model.tar.gz"
    assert out.strip() == f"s3://{BUCKET}/{key}"

    s3 = aws.client("s3")
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["metadata.json", "ncf.mar"]  # flat: /opt/ml/model/ncf.mar
        assert tar.extractfile("ncf.mar").read() == mar.read_bytes()
        assert json.load(tar.extractfile("metadata.json"))["metrics"]["hr@10"] == 0.71
    assert s3.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"] == TAGS


def test_package_without_a_mar_is_one_line(aws, capsys, tmp_path):
    code, out, err = run(capsys, "package", "--mar", str(tmp_path / "missing.mar"))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1


# --- deploy, update, cleanup ------------------------------------------------------------


def make_unrelated(aws):
    """Resources cleanup must not touch: foreign names, and our prefix without our tag."""
    s = sm(aws)
    for name, tags in (
        ("other-model", TAGS),  # our tag, not our prefix
        ("ncf-recommender-by-hand", [{"Key": "project", "Value": "someone-else"}]),  # prefix only
    ):
        s.create_model(
            ModelName=name,
            PrimaryContainer={"Image": IMAGE, "ModelDataUrl": f"s3://{BUCKET}/x.tar.gz"},
            ExecutionRoleArn=ROLE,
            Tags=tags,
        )
        s.create_endpoint_config(
            EndpointConfigName=name,
            ProductionVariants=[
                {
                    "VariantName": "AllTraffic",
                    "ModelName": name,
                    "InstanceType": "ml.m5.large",
                    "InitialInstanceCount": 1,
                }
            ],
            Tags=tags,
        )
        s.create_endpoint(EndpointName=name, EndpointConfigName=name, Tags=tags)
    s3 = aws.client("s3")
    for key in ("other/keep.txt", "ncf-recommender-other/keep.txt", "ncf-recommender.txt"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"keep")
    aws.client("ecr").create_repository(repositoryName="other-repo")


def names(aws):
    s = sm(aws)
    return {
        "endpoints": sorted(e["EndpointName"] for e in s.list_endpoints()["Endpoints"]),
        "configs": sorted(
            c["EndpointConfigName"] for c in s.list_endpoint_configs()["EndpointConfigs"]
        ),
        "models": sorted(m["ModelName"] for m in s.list_models()["Models"]),
    }


def test_deploy_update_then_cleanup(aws, capsys, mar):
    make_unrelated(aws)
    package(capsys, mar, "v1")
    code, out, err = run(
        capsys, "deploy", "--poll", "0", "--workers", "2", "--env", "LOG_LEVEL=debug"
    )
    assert code == 0, err
    assert out.strip() == "ncf-recommender"
    s = sm(aws)
    live = s.describe_endpoint(EndpointName="ncf-recommender")
    assert live["EndpointStatus"] == "InService"
    first = live["EndpointConfigName"]
    config = s.describe_endpoint_config(EndpointConfigName=first)
    variant = config["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.g5.xlarge" and variant["InitialInstanceCount"] == 1
    model = s.describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/ncf-recommender/models/v1/model.tar.gz"
    assert container["Environment"] == {
        "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
        "SAGEMAKER_MODEL_SERVER_TIMEOUT": "60",
        "LOG_LEVEL": "debug",
    }
    for arn in (live["EndpointArn"], config["EndpointConfigArn"], model["ModelArn"]):
        assert TAGS[0] in s.list_tags(ResourceArn=arn)["Tags"]

    # A second plain deploy refuses; --update replaces blue/green and retires the old pair.
    code, _, err = run(capsys, "deploy", "--poll", "0")
    assert code == 2 and "--update" in err
    package(capsys, mar, "v2")
    code, _, err = run(capsys, "deploy", "--update", "--poll", "0")
    assert code == 0, err
    second = s.describe_endpoint(EndpointName="ncf-recommender")["EndpointConfigName"]
    assert second != first
    new_model = s.describe_endpoint_config(EndpointConfigName=second)["ProductionVariants"][0][
        "ModelName"
    ]
    assert s.describe_model(ModelName=new_model)["PrimaryContainer"]["ModelDataUrl"].endswith(
        "/v2/model.tar.gz"
    )
    now = names(aws)
    assert first not in now["configs"] and variant["ModelName"] not in now["models"]
    assert second in now["configs"] and new_model in now["models"]
    assert f"deleted old endpoint config {first}" in err

    # Cleanup: nothing of ours is left, everything else is.
    aws.client("ecr").create_repository(repositoryName="ncf-recommender", tags=TAGS)
    code, _, err = run(capsys, "cleanup", "--s3", "--ecr")
    assert code == 0, err
    unrelated = ["ncf-recommender-by-hand", "other-model"]
    assert names(aws) == {"endpoints": unrelated, "configs": unrelated, "models": unrelated}
    keys = sorted(o["Key"] for o in aws.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == ["ncf-recommender-other/keep.txt", "ncf-recommender.txt", "other/keep.txt"]
    repos = [r["repositoryName"] for r in aws.client("ecr").describe_repositories()["repositories"]]
    assert repos == ["other-repo"]
    # A second run finds nothing.
    code, _, err = run(capsys, "cleanup", "--s3", "--ecr")
    assert code == 0 and "nothing of ours" in err


def test_cleanup_dry_run_deletes_nothing(aws, capsys, mar):
    package(capsys, mar, "v1")
    assert run(capsys, "deploy", "--poll", "0")[0] == 0
    before = names(aws)
    code, _, err = run(capsys, "cleanup", "--dry-run", "--s3")
    assert code == 0 and "would delete endpoint ncf-recommender" in err
    assert names(aws) == before


def test_autoscaling_registered_kept_on_update_and_cleaned(aws, capsys, mar):
    package(capsys, mar, "v1")
    code, _, err = run(
        capsys, "deploy", "--poll", "0", "--max-instances", "4", "--target-invocations", "900"
    )
    assert code == 0, err
    aas = aws.client("application-autoscaling")
    rid = "endpoint/ncf-recommender/variant/AllTraffic"

    def targets():
        return aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])[
            "ScalableTargets"
        ]

    (target,) = targets()
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)
    (policy,) = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)[
        "ScalingPolicies"
    ]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert config["TargetValue"] == 900.0
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == (
        "SageMakerVariantInvocationsPerInstance"
    )

    # An update without autoscaling options keeps the scaling it had.
    assert run(capsys, "deploy", "--update", "--poll", "0")[0] == 0
    (target,) = targets()
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)
    assert (
        len(
            aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)[
                "ScalingPolicies"
            ]
        )
        == 1
    )

    code, _, err = run(capsys, "cleanup")
    assert code == 0 and f"deleted autoscaling target {rid}" in err
    assert targets() == []


def test_deploy_from_package_group_takes_newest_approved(aws, capsys):
    s = sm(aws)
    s.create_model_package_group(ModelPackageGroupName="ncf-recommender-models", Tags=TAGS)
    for status, data in (
        ("Approved", "old"),
        ("Approved", "newest-approved"),
        ("PendingManualApproval", "pending"),
    ):
        s.create_model_package(
            ModelPackageGroupName="ncf-recommender-models",
            ModelApprovalStatus=status,
            InferenceSpecification={
                "Containers": [{"Image": IMAGE, "ModelDataUrl": f"s3://{BUCKET}/{data}.tar.gz"}],
                "SupportedContentTypes": ["application/json"],
                "SupportedResponseMIMETypes": ["application/json"],
            },
        )
    code, _, err = run(
        capsys, "deploy", "--from-package-group", "ncf-recommender-models", "--poll", "0"
    )
    assert code == 0, err
    config = s.describe_endpoint_config(
        EndpointConfigName=s.describe_endpoint(EndpointName="ncf-recommender")["EndpointConfigName"]
    )
    model = s.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/newest-approved.tar.gz"
    tags = s.list_tags(ResourceArn=model["ModelArn"])["Tags"]
    assert {
        "Key": "model-package",
        "Value": next(
            p["ModelPackageArn"]
            for p in s.list_model_packages(ModelPackageGroupName="ncf-recommender-models")[
                "ModelPackageSummaryList"
            ]
            if p["ModelPackageVersion"] == 2
        ),
    } in tags


def test_deploy_without_a_package_says_so(aws, capsys):
    code, _, err = run(capsys, "deploy", "--poll", "0")
    assert code == 1 and "run package first" in err


# --- push ---------------------------------------------------------------------------------


def test_push_creates_the_repository_and_runs_login_tag_push(aws, monkeypatch):
    monkeypatch.setattr(push_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    calls = []

    class Done:
        returncode = 0

    def fake_run(argv, input=None, text=None):
        calls.append((argv, input))
        return Done()

    remote = push_mod.push(aws, "ncf-recommender", "v3", "ncf-recommender:latest", run=fake_run)
    registry = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
    assert remote == f"{registry}/ncf-recommender:v3"
    ecr = aws.client("ecr")
    repo = ecr.describe_repositories(repositoryNames=["ncf-recommender"])["repositories"][0]
    assert ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"])["tags"] == TAGS

    token = base64.b64decode(
        ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    )
    password = token.decode().split(":", 1)[1]
    assert calls == [
        (["/usr/bin/docker", "login", "--username", "AWS", "--password-stdin", registry], password),
        (["/usr/bin/docker", "tag", "ncf-recommender:latest", remote], None),
        (["/usr/bin/docker", "push", remote], None),
    ]
    assert all(password not in " ".join(argv) for argv, _ in calls)  # never in argv
    # The repository is reused the second time.
    assert push_mod.ensure_repository(aws, "ncf-recommender") == repo["repositoryUri"]


def test_push_without_an_engine_is_one_line(aws, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run(capsys, "push")
    assert code == 2
    assert err == "error: no container engine found (docker or podman not on PATH)\n"


def test_push_commands_prefers_podman_when_asked():
    argv = push_mod.push_commands("podman", "r.example", "AWS", "img:1", "r.example/img:2")
    assert argv[0] == ["podman", "login", "--username", "AWS", "--password-stdin", "r.example"]
    assert argv[1:] == [
        ["podman", "tag", "img:1", "r.example/img:2"],
        ["podman", "push", "r.example/img:2"],
    ]


# --- invoke -------------------------------------------------------------------------------

ANSWER = {
    "user_id": 42,
    "items": [
        {"item_id": 2571, "score": 0.93, "title": "Matrix, The (1999)"},
        {"item_id": 260, "score": 0.9012, "title": "Star Wars (1977)"},
    ],
    "fallback": None,
    "model": {"name": "ncf", "version": "v2"},
}


def queue_runtime_answer(body: str):
    # moto's documented hook for canned sagemaker-runtime answers.
    requests.post(
        "http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
        json={
            "account_id": ACCOUNT,
            "region": REGION,
            "results": [
                {
                    "Body": body,
                    "ContentType": "application/json",
                    "InvokedProductionVariant": "AllTraffic",
                    "CustomAttributes": "",
                }
            ],
        },
        timeout=5,
    )


def test_invoke_request_shape_and_printing(aws, capsys, monkeypatch):
    queue_runtime_answer(json.dumps(ANSWER))
    sent = []
    real_client = Aws.client

    def client(self, service):
        c = real_client(self, service)
        if service == "sagemaker-runtime" and not sent:
            c.meta.events.register(
                "provide-client-params.sagemaker-runtime.InvokeEndpoint",
                lambda params, **_: sent.append(dict(params)),
            )
        return c

    monkeypatch.setattr(Aws, "client", client)
    code, out, err = run(capsys, "invoke", "--user-id", "42")
    assert code == 0, err
    (params,) = sent
    assert params["EndpointName"] == "ncf-recommender"
    assert params["ContentType"] == "application/json"
    assert json.loads(params["Body"]) == {"user_id": 42, "k": 10}
    lines = out.splitlines()
    assert lines[0] == "user 42: 2 items (name=ncf version=v2)"
    assert "2571" in lines[1] and "0.9300" in lines[1] and lines[1].endswith("Matrix, The (1999)")
    assert "260" in lines[2] and "Star Wars (1977)" in lines[2]
    assert not any(line.startswith("fallback") for line in lines)


def test_invoke_prints_the_fallback_and_json(aws, capsys):
    queue_runtime_answer(
        json.dumps({**ANSWER, "items": [], "fallback": "unknown user: popular items"})
    )
    code, out, _ = run(capsys, "invoke", "--user-id", "7", "--k", "3")
    assert code == 0 and out.splitlines()[-1] == "fallback: unknown user: popular items"
    queue_runtime_answer(json.dumps(ANSWER))
    code, out, _ = run(capsys, "invoke", "--user-id", "8", "--json")
    assert code == 0 and json.loads(out) == ANSWER


def test_invoke_non_json_answer_is_one_line(aws, capsys):
    queue_runtime_answer("<html>upstream error</html>")
    code, _, err = run(capsys, "invoke", "--user-id", "9")
    assert code == 1 and err.startswith("error: endpoint ncf-recommender answered non-JSON")
