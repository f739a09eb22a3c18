"""The image in real containers (podman): built on a Debian base made here, since no image
registry is reachable, from a local wheelhouse, so the build downloads no CUDA torch.

    make test-container        (pytest -m container tests/test_container.py)

Then, as SageMaker would: `train` on an /opt/ml layout, the pipeline's evaluation step
(its entrypoint and environment taken from deploy.pipeline), and `serve` with a .mar and
with a training job's artifact mounted at /opt/ml/model, checking /ping, /invocations and
that SIGTERM ends the container within 10 s.

Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap); the
podman settings are docker/containers.conf. The base image localhost/ncf-debian:bookworm is
kept and reused (remove it to rebuild it); the test image is rebuilt with podman's layer
cache, so a second run takes a fraction of the first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from ports import free_ports
from sagemaker_job import opt_ml_for_training, wait_for_ping
from sagemaker_job import request as http_request

from archive.build import build
from deploy import pipeline
from deploy.train_job import hyperparameters

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/ncf-debian:bookworm"
IMAGE = "localhost/ncf-recommender:container-test"
DATASET = "ml-100k"  # trained on a small data set in ml-100k's raw format
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "docker" / "containers.conf")}


def missing() -> str | None:
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install podman runc debootstrap)"
    if os.geteuid() != 0:
        return "needs root (debootstrap, rootful podman)"
    return None


if reason := missing():
    pytest.skip(reason, allow_module_level=True)


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=check
    )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    started = time.monotonic()
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        subprocess.run(
            [str(ROOT / "docker" / "build-base-image.sh"), BASE_IMAGE],
            env=ENV,
            check=True,
            timeout=1200,
        )
    based = time.monotonic()
    # This machine's pip resolves torch==2.13.0 to the local CPU wheel; the wheelhouse must
    # hold no CUDA packages, or the image would carry gigabytes of them.
    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
        + ["-r", str(ROOT / "requirements.txt"), "-d", str(wheelhouse)],
        check=True,
        timeout=1200,
    )
    cuda = [w.name for w in wheelhouse.glob("*.whl") if w.name.startswith(("nvidia", "triton"))]
    assert not cuda, f"pip chose the CUDA torch here (it pulled {cuda}); provide a CPU wheel"
    downloaded = time.monotonic()
    previous = podman("image", "inspect", IMAGE, "--format", "{{.Id}}", check=False).stdout
    build = podman(
        "build", "-f", "docker/Dockerfile", "-t", IMAGE,
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "--build-context", f"wheelhouse={wheelhouse}",
        str(ROOT),
        timeout=2400, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    current = podman("image", "inspect", IMAGE, "--format", "{{.Id}}").stdout
    if previous and previous != current:  # the image this build replaced: 1.7 GB of disk
        podman("rmi", previous.strip(), check=False)
    size = podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip()
    print(
        f"\nbase image {based - started:.0f} s, wheelhouse {downloaded - based:.0f} s, "
        f"build {time.monotonic() - downloaded:.0f} s, image {int(size) / 1e9:.2f} GB"
    )
    return IMAGE


@pytest.fixture
def container_name(request):
    """A unique container name, and the container removed whatever the test did."""
    name = f"ncf-test-{os.getpid()}-{request.node.name[:40]}".replace("_", "-")
    yield name
    podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture(scope="module")
def trained(image, tmp_path_factory) -> Path:
    """/opt/ml of a training job that ran in the image (`train`)."""
    hp = hyperparameters(DATASET, "gmf", {"epochs": 1, "batch-size": 1024})
    opt_ml = opt_ml_for_training(tmp_path_factory.mktemp("train") / "opt_ml", hp)
    result = podman(
        "run", "--rm", "--network", "host", "-e", "OMP_NUM_THREADS=1",
        "-v", f"{opt_ml}:/opt/ml", image, "train",
        timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return opt_ml


@pytest.fixture(scope="module")
def mar(trained, tmp_path_factory) -> Path:
    """A folder holding ncf.mar of the trained artifact, as `make package` uploads it."""
    return build(trained / "model", tmp_path_factory.mktemp("store")).parent


def serve_and_stop(image: str, name: str, model: Path) -> dict:
    """Run `serve` with `model` at /opt/ml/model, check /ping and /invocations, SIGTERM it;
    return the /invocations answer."""
    port = free_ports(6)
    podman(
        "run", "--detach", "--name", name, "--network", "host",
        "-e", f"SAGEMAKER_BIND_TO_PORT={port}",
        "-e", f"SAGEMAKER_SAFE_PORT_RANGE={port + 1}-{port + 5}",
        "-e", "OMP_NUM_THREADS=1",
        "-v", f"{model}:/opt/ml/model:ro",
        image, "serve",
    )  # fmt: skip
    started = time.monotonic()

    def container_logs():
        result = podman("logs", name, check=False)
        return result.stdout[-3000:] + result.stderr[-3000:]

    def container_running():
        return podman("inspect", name, "--format", "{{.State.Running}}").stdout.strip() == "true"

    seen = wait_for_ping(port, container_running, container_logs, timeout=180)
    ready = time.monotonic() - started
    assert 503 in seen, seen  # unhealthy while the model was loading

    status, answer = http_request(port, "POST", "/invocations", {"user_id": 5, "k": 4})
    assert status == 200, answer
    assert len(answer["items"]) == 4

    stopping = time.monotonic()
    podman("kill", "--signal", "TERM", name)
    exit_code = podman("wait", name, timeout=30).stdout.strip()
    stopped = time.monotonic() - stopping
    logs = podman("logs", name).stderr
    assert exit_code == "0", logs[-3000:]
    assert stopped < 10, f"SIGTERM took {stopped:.1f} s"
    assert "SIGTERM: stopping TorchServe" in logs
    print(f"\n{model.name}: /ping 200 after {ready:.1f} s, SIGTERM to exit {stopped:.1f} s")
    return answer


# ---------------------------------------------------------------------- tests


def test_image_has_what_sagemaker_and_the_pipeline_use(image):
    inspect = json.loads(podman("image", "inspect", image).stdout)[0]
    assert inspect["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert inspect["Config"]["Entrypoint"][0] == "/usr/bin/tini"
    # PYTHONPATH would put the image's handler code before the one packed in a .mar.
    assert not [v for v in inspect["Config"]["Env"] if v.startswith("PYTHONPATH=")]
    probe = podman(
        "run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c",
        "for tool in tar gzip java; do command -v $tool; done;"
        " python -c 'import torch, ts; print(torch.__version__)';"
        " ls /root/.cache 2>/dev/null | wc -l; for cc in gcc cc; do command -v $cc; done | wc -l",
    )  # fmt: skip
    tar, gzip, java, torch, caches, compilers = probe.stdout.split()
    assert (tar, gzip, java) == ("/usr/bin/tar", "/usr/bin/gzip", "/usr/bin/java")
    assert torch == "2.13.0+cpu"  # the wheelhouse's, not PyPI's CUDA build
    assert (caches, compilers) == ("0", "0")  # no pip cache, no build tools


def test_train_in_a_container_writes_the_artifact(trained):
    metadata = json.loads((trained / "model" / "metadata.json").read_text())
    assert metadata["dataset"]["name"] == DATASET
    assert (trained / "model" / "model.safetensors").is_file()


def test_the_pipelines_evaluation_step_runs_in_the_image(image, trained, tmp_path, container_name):
    """The Evaluate step exactly as deploy.pipeline defines it: same entrypoint, same
    environment, inputs where its ProcessingInputs put them."""
    definition = pipeline.definition(
        image=image, role_arn="arn:aws:iam::123456789012:role/r", bucket="b", prefix="p",
        dataset=DATASET, model="gmf", hp_options={}, instance_type="ml.m5.large",
        train_data="s3://b/p/data/", epochs=1, min_hr=0.1, package_group="g",
        inference_instance_type="ml.m5.large",
    )  # fmt: skip
    (step,) = [s for s in definition["Steps"] if s["Name"] == pipeline.EVALUATE]
    arguments = step["Arguments"]
    entrypoint = arguments["AppSpecification"]["ContainerEntrypoint"]
    inputs = {i["InputName"]: i["S3Input"]["LocalPath"] for i in arguments["ProcessingInputs"]}

    model, data, evaluation = tmp_path / "model", tmp_path / "data", tmp_path / "evaluation"
    model.mkdir()
    with tarfile.open(model / "model.tar.gz", "w:gz") as tar:  # as SageMaker tars SM_MODEL_DIR
        for path in (trained / "model").iterdir():
            tar.add(path, arcname=path.name)
    shutil.copytree(trained / "input" / "data" / "train", data)
    evaluation.mkdir()
    environment = [f"--env={key}={value}" for key, value in arguments["Environment"].items()]
    result = podman(
        "run", "--name", container_name, "--network", "host", *environment,
        "-v", f"{model}:{inputs['model']}", "-v", f"{data}:{inputs['data']}",
        "-v", f"{evaluation}:{pipeline.EVAL_DIR}",
        f"--entrypoint={json.dumps(entrypoint)}", image,
        timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((evaluation / "evaluation.json").read_text())
    # The pipeline's quality gate reads this key (Std:JsonGet on the property file).
    section, key = pipeline.HR_PATH.split(".")
    assert 0 <= report[section][key] <= 1


def test_serve_a_mar_in_a_container(image, mar, container_name):
    serve_and_stop(image, container_name, mar)


def test_serve_a_training_jobs_artifact_in_a_container(image, trained, container_name):
    answer = serve_and_stop(image, container_name, trained / "model")
    version = json.loads((trained / "model" / "metadata.json").read_text())["version"]
    assert answer["model"]["version"] == version
