"""Missing region, role or credentials: one `error:` line, exit code 2, no traceback.

Run as real subprocesses with an empty environment; the only variables set keep botocore
from reading this machine's ~/.aws files or probing the EC2 metadata service.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tmp_path, *argv, **env):
    hermetic = {
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return subprocess.run(
        [sys.executable, "-m", "deploy", *argv],
        cwd=ROOT,
        env={**hermetic, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def test_missing_region(tmp_path):
    assert_one_line_error(run_cli(tmp_path, "invoke", "--user-id", "42"), "region")


def test_missing_role(tmp_path):
    result = run_cli(tmp_path, "deploy", AWS_REGION="eu-west-1")
    assert_one_line_error(result, "SAGEMAKER_ROLE_ARN")


def test_bad_role(tmp_path):
    result = run_cli(tmp_path, "train-job", "--role-arn", "ncf", AWS_REGION="eu-west-1")
    assert_one_line_error(result, "IAM role ARN")


@pytest.mark.parametrize("argv", [["invoke", "--user-id", "42"], ["cleanup"]])
def test_missing_credentials(tmp_path, argv):
    result = run_cli(tmp_path, *argv, AWS_DEFAULT_REGION="eu-west-1")
    assert_one_line_error(result, "no AWS credentials")


def test_missing_bucket(tmp_path):
    result = run_cli(
        tmp_path,
        "train-job",
        AWS_REGION="eu-west-1",
        SAGEMAKER_ROLE_ARN="arn:aws:iam::123456789012:role/x",
    )
    assert_one_line_error(result, "NCF_S3_BUCKET")
