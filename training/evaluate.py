"""Recompute an artifact's metrics on its dataset's test split.

python -m training.evaluate artifacts/ml-1m-neumf-pre              # 99-negative protocol
python -m training.evaluate artifacts/ml-1m-neumf-pre --full-ranking  # against every unseen item
python -m training.evaluate DIR --json evaluation.json             # also write the figures
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from model.artifact import ArtifactError, load_artifact
from training.cli import one_line_errors
from training.data import load_dataset, load_folder
from training.metrics import Evaluator, full_ranking_metrics


def dataset_of(artifact, data_dir: Path | None):
    """The artifact's dataset, checked against the input hashes recorded at training time."""
    meta = artifact.metadata["dataset"]
    training = artifact.metadata.get("training", {})
    seed = training.get("seed", 0)
    channel = os.environ.get("SM_CHANNEL_TEST") or os.environ.get("SM_CHANNEL_TRAIN")
    if data_dir is None and channel and meta["name"] != "demo":
        folder = Path(channel) / meta["name"]
        data = load_folder(folder if folder.is_dir() else Path(channel), meta["name"], seed)
    else:
        data = load_dataset(meta["name"], data_dir, seed=seed)
    if data.files != meta["files"]:
        raise ArtifactError(
            f"{artifact.path} was trained on other {meta['name']} files than those found now "
            "(their sha256 differ)"
        )
    return data


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("artifact", type=Path)
    p.add_argument(
        "--data-dir", type=Path, help="folder of datasets (default $NCF_DATA_DIR or data/)"
    )
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--full-ranking", action="store_true", help="rank against all unseen items")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write {'metrics': {...}} to this file")
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    artifact = load_artifact(args.artifact, device=device)
    data = dataset_of(artifact, args.data_dir)
    k = args.topk
    if args.full_ranking:
        metrics = full_ranking_metrics(artifact.model, data, k=k, device=device)
        protocol = "full ranking against every unseen item"
    else:
        evaluator = Evaluator(data, device, k=k)
        metrics = evaluator.model_metrics(artifact.model)
        metrics["baseline_popular"] = evaluator.popularity_metrics()
        protocol = f"{data.test_negatives.shape[1]} sampled negatives"
    print(f"{artifact.path}: {artifact.metadata['name']} on {data.name}, {protocol}")
    print(f"HR@{k}={metrics[f'hr@{k}']:.4f} NDCG@{k}={metrics[f'ndcg@{k}']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # hr_at_10 as well: JsonPath in SageMaker pipeline conditions handles '@' poorly.
        flat = {f"hr_at_{k}": metrics[f"hr@{k}"], f"ndcg_at_{k}": metrics[f"ndcg@{k}"]}
        report = {
            "metrics": metrics | flat,
            "protocol": protocol,
            "model": artifact.metadata["name"],
            "version": artifact.version,
            "dataset": data.name,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
