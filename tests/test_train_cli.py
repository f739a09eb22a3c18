"""The training and evaluation commands, run as users run them (subprocesses)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sagemaker_job import write_u_data

from model.artifact import load_artifact
from model.ncf import neumf_from_pretrained

ROOT = Path(__file__).resolve().parents[1]


def run(module, *args, env=None, timeout=300):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics_of(artifact):
    return json.loads((Path(artifact) / "metadata.json").read_text())["metrics"]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error:") or "error:" in lines[-1], result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture(scope="module")
def demo_neumf(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "demo-neumf"
    result = run("training.train", "--model", "neumf", "--epochs", 12, "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_demo_training_beats_popularity(demo_neumf):
    out, stdout = demo_neumf
    metrics = metrics_of(out)
    baseline = metrics["baseline_popular"]
    assert metrics["hr@10"] > baseline["hr@10"] + 0.05, metrics
    assert metrics["ndcg@10"] > baseline["ndcg@10"] + 0.04, metrics
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("epoch=")]
    assert len(epoch_lines) == metrics["epochs_run"]
    # the line SageMaker metric regexes and people read
    assert all(
        part.split("=")[0] in {"epoch", "loss", "HR@10", "NDCG@10", "seconds"}
        for part in epoch_lines[0].split()
    )
    assert f"artifact: {out}" in stdout


def test_evaluate_recomputes_the_recorded_metrics(demo_neumf, tmp_path):
    out, _ = demo_neumf
    report = tmp_path / "evaluation.json"
    result = run("training.evaluate", out, "--json", report)
    assert result.returncode == 0, result.stderr
    recorded, recomputed = metrics_of(out), json.loads(report.read_text())["metrics"]
    assert recomputed["hr@10"] == pytest.approx(recorded["hr@10"], abs=1e-9)
    assert recomputed["ndcg@10"] == pytest.approx(recorded["ndcg@10"], abs=1e-9)
    assert recomputed["hr_at_10"] == recomputed["hr@10"]
    full = run("training.evaluate", out, "--full-ranking")
    assert full.returncode == 0 and "full ranking" in full.stdout
    hr_full = float(full.stdout.split("HR@10=")[1].split()[0])
    assert 0 < hr_full < recorded["hr@10"]  # ranking against ~960 items is harder than 99


def test_resume_continues_from_the_checkpoint(tmp_path):
    out = tmp_path / "a"
    first = run("training.train", "--model", "gmf", "--epochs", 2, "--out", out)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "a.ckpt").is_file()
    again = run("training.train", "--model", "gmf", "--epochs", 3, "--out", out, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed gmf" in again.stdout and "after epoch 2" in again.stdout
    assert [line.split()[0] for line in again.stdout.splitlines() if line.startswith("epoch=")] == [
        "epoch=3"
    ]
    assert [h["epoch"] for h in metrics_of(out)["history"]] == [1, 2, 3]


def test_resume_takes_this_runs_weight_decay_and_refuses_another_optimizer(tmp_path):
    out, checkpoint = tmp_path / "a", tmp_path / "a.ckpt"
    first = run("training.train", "--model", "gmf", "--epochs", 1, "--out", out)
    assert first.returncode == 0, first.stderr
    again = run(
        "training.train", "--model", "gmf", "--epochs", 2, "--weight-decay", 0.5,
        "--out", out, "--resume",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    groups = torch.load(checkpoint, weights_only=True)["optimizer"]["param_groups"]
    assert [group["weight_decay"] for group in groups] == [0.5, 0.0]  # linear weights, rest

    state = torch.load(checkpoint, weights_only=True)
    state["optimizer"] = torch.optim.Adam(load_artifact(out).model.parameters()).state_dict()
    torch.save(state, checkpoint)  # one parameter group, as before --weight-decay
    stale = run("training.train", "--model", "gmf", "--epochs", 3, "--out", out, "--resume")
    assert_one_line_error(stale, "optimizer state does not fit", "rerun without --resume")


def test_weight_decay_reaches_the_training(tmp_path):
    norms = {}
    for decay in (0, 20):
        out = tmp_path / f"decay-{decay}"
        result = run(
            "training.train", "--model", "gmf", "--epochs", 1, "--weight-decay", decay, "--out", out
        )
        assert result.returncode == 0, result.stderr
        norms[decay] = load_artifact(out).model.predict.weight.norm().item()
    # Decay pulls the prediction layer towards 0 against Adam's steps of ~lr each.
    assert norms[20] < 0.5 * norms[0], norms


def test_neumf_pre_trains_its_parts_then_reuses_them(tmp_path):
    out = tmp_path / "pre"
    result = run("training.train", "--model", "neumf-pre", "--epochs", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    parts = tmp_path / "pre-pretrain"
    assert (parts / "gmf" / "metadata.json").is_file() and (
        parts / "mlp" / "metadata.json"
    ).is_file()
    assert json.loads((out / "metadata.json").read_text())["name"] == "neumf-pre"
    # --precision auto: bf16 (where the CPU has it) does not pay for GMF's one-output layer
    precision = {
        name: json.loads((folder / "metadata.json").read_text())["training"]["precision"]
        for name, folder in (("gmf", parts / "gmf"), ("mlp", parts / "mlp"), ("pre", out))
    }
    assert precision["gmf"] == "fp32" and precision["mlp"] == precision["pre"]
    reuse = run(
        "training.train",
        "--model",
        "neumf-pre",
        "--epochs",
        1,
        "--out",
        tmp_path / "pre2",
        "--gmf",
        parts / "gmf",
        "--mlp",
        parts / "mlp",
    )
    assert reuse.returncode == 0, reuse.stderr
    assert "using pre-trained gmf" in reuse.stdout and "using pre-trained mlp" in reuse.stdout
    wrong = run(
        "training.train", "--model", "neumf-pre", "--gmf", parts / "mlp", "--out", tmp_path / "x"
    )
    assert_one_line_error(wrong, "holds a mlp model")


def test_a_diverged_fine_tuning_keeps_the_merged_model(tmp_path):
    out = tmp_path / "pre"
    result = run(
        "training.train", "--model", "neumf-pre", "--epochs", 1, "--pretrain-lr", 1e6, "--out", out
    )
    assert result.returncode == 0, result.stderr
    assert "neumf-pre diverged in epoch 1 (loss nan)" in result.stdout
    assert metrics_of(out)["best_epoch"] == 0
    merged = load_artifact(out).model  # refuses non-finite weights
    parts = [load_artifact(tmp_path / "pre-pretrain" / part).model for part in ("gmf", "mlp")]
    users, items = torch.arange(20), torch.arange(20)
    torch.testing.assert_close(
        merged(users, items), neumf_from_pretrained(*parts, alpha=0.5)(users, items)
    )


def test_a_diverged_first_epoch_is_a_one_line_error(tmp_path):
    result = run("training.train", "--model", "gmf", "--lr", 1e20, "--epochs", 1, "--out", tmp_path)
    assert_one_line_error(result, "gmf diverged in epoch 1", "lower --lr")
    assert not (tmp_path / "metadata.json").exists()


def test_sagemaker_training_contract(tmp_path):
    channel, model_dir, output = (
        tmp_path / "input/data/train",
        tmp_path / "model",
        tmp_path / "output",
    )
    write_u_data(channel, users=60, items=300, per_user=25)
    env = {
        "SM_CHANNEL_TRAIN": str(channel),
        "SM_MODEL_DIR": str(model_dir),
        "SM_OUTPUT_DATA_DIR": str(output),
    }
    # hyperparameters arrive as --key value, in either spelling
    result = run(
        "training.train",
        "--dataset",
        "ml-100k",
        "--model",
        "gmf",
        "--epochs",
        "2",
        "--batch_size",
        "512",
        "--layers",
        "[16, 8]",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["training"]["batch_size"] == 512 and meta["dataset"]["files"].keys() == {"u.data"}
    assert (
        json.loads((output / "metrics-gmf.json").read_text())["hr@10"] == meta["metrics"]["hr@10"]
    )


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--dataset", "nope"], ["invalid choice: 'nope'"]),
        (["--model", "svd"], ["invalid choice: 'svd'"]),
        (["--epochs", "0"], ["--epochs must be at least 1"]),
        (["--lr", "nan"], ["learning rates must be positive numbers"]),
        (["--weight-decay", "-0.1"], ["--weight-decay must be a number >= 0"]),
        (["--l2", "inf"], ["--l2 must be a number >= 0"]),
        (["--layers", "64,x"], ["--layers"]),
        (["--dataset", "ml-100k", "--data-dir", "/nonexistent"], ["make data DATASET=ml-100k"]),
    ],
)
def test_bad_arguments_give_one_line(args, fragments):
    assert_one_line_error(run("training.train", *args), *fragments)


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("1\t10\t5\t100\n1\tabc\t3\t200\n", "malformed"),
        ("", "no interactions"),
        ("1\t10\t5\t100\n", "nothing to test on"),
    ],
)
def test_bad_data_gives_one_line(tmp_path, content, fragment):
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text(content)
    result = run(
        "training.train", "--dataset", "ml-100k", "--data-dir", tmp_path, "--out", tmp_path / "o"
    )
    assert_one_line_error(result, fragment)


def test_evaluate_refuses_a_broken_artifact(tmp_path, demo_neumf):
    out, _ = demo_neumf
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(run("training.evaluate", broken), "sha256 does not match")


def test_distributed_two_processes_agree(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "training.train",
            "--model",
            "neumf",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "ddp"),
            "--quiet",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    finals = sorted(line for line in result.stdout.splitlines() if line.startswith("rank="))
    assert [line.split()[0] for line in finals] == ["rank=0", "rank=1"]
    assert finals[0].split()[1:] == finals[1].split()[1:]  # same metrics, same weights
    meta = json.loads((tmp_path / "ddp" / "metadata.json").read_text())
    assert meta["training"]["world_size"] == 2
    assert f"HR@10={meta['metrics']['hr@10']:.6f}" in finals[0]
