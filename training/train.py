"""Train GMF, MLP, NeuMF or NeuMF with pre-training, and write an artifact.

    python -m training.train --dataset ml-1m --model neumf-pre
    torchrun --nproc_per_node=2 -m training.train ...        (DistributedDataParallel)

Each epoch samples fresh negatives on the training device, trains on large shuffled
batches, and evaluates HR@K / NDCG@K on the 99-negative protocol; the best epoch is kept.
Under SageMaker (SM_* variables set) data comes from SM_CHANNEL_TRAIN, the artifact goes
to SM_MODEL_DIR and metrics to SM_OUTPUT_DATA_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.artifact import load_artifact, save_artifact
from model.ncf import NCF, ModelConfig, neumf_from_pretrained
from training.cli import one_line_errors, parse_int_list
from training.data import DATASETS, Interactions, data_dir, load_dataset, load_folder
from training.metrics import Evaluator
from training.sampling import NegativeSampler

MODELS = ("gmf", "mlp", "neumf", "neumf-pre")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="demo", choices=DATASETS)
    p.add_argument("--model", default="neumf-pre", choices=MODELS)
    p.add_argument(
        "--data-dir", type=Path, help="folder of datasets (default $NCF_DATA_DIR or data/)"
    )
    p.add_argument(
        "--out", type=Path, help="artifact directory (default artifacts/<dataset>-<model>)"
    )
    # Sizes and sampling: the paper's defaults.
    p.add_argument("--factors", type=int, default=8, help="GMF embedding size (predictive factors)")
    p.add_argument(
        "--layers", type=parse_int_list, default=[64, 32, 16, 8], help="MLP tower, e.g. 64,32,16,8"
    )
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--negatives", type=int, default=4, help="sampled negatives per positive")
    p.add_argument("--topk", type=int, default=10)
    # Optimisation. Large batches keep a CPU busy; the learning rate is scaled to match.
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=0.005, help="Adam learning rate (gmf, mlp, neumf)")
    p.add_argument("--lr-decay", type=float, default=1.0, help="learning rate x this every epoch")
    p.add_argument("--l2", type=float, default=0.0, help="L2 penalty on each sample's embeddings")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="AdamW weight decay of the linear layers' weights (tower, prediction layer)",
    )
    p.add_argument("--pretrain-lr", type=float, default=0.05, help="SGD learning rate of neumf-pre")
    p.add_argument(
        "--pretrain-epochs", type=int, help="epochs of neumf-pre's own training (default --epochs)"
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, help="GMF share of neumf-pre's prediction layer"
    )
    p.add_argument("--gmf", type=Path, help="neumf-pre: reuse this trained GMF artifact")
    p.add_argument("--mlp", type=Path, help="neumf-pre: reuse this trained MLP artifact")
    p.add_argument(
        "--patience", type=int, default=5, help="stop after this many epochs without a better HR"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ..."
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="bf16 autocast in training (auto: on CUDA, and on CPUs with native bf16 but for gmf)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint beside --out"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # SageMaker passes hyperparameters as --key value; accept snake_case spellings too.
    for action in list(p._actions):
        for option in list(action.option_strings):
            if "-" in option[2:]:
                p._option_string_actions[option.replace("-", "_").replace("__", "--", 1)] = action
    return p


class Run:
    """Where this process stands: device, distributed rank, output paths."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if self.world > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
        self.requested_precision = args.precision
        args.precision = self.precision_for(args.model)
        self.main = self.rank == 0
        self.sagemaker = "SM_MODEL_DIR" in os.environ
        self.metrics_dir = (
            Path(os.environ["SM_OUTPUT_DATA_DIR"]) if "SM_OUTPUT_DATA_DIR" in os.environ else None
        )

    def precision_for(self, model: str) -> str:
        """--precision, with auto resolved for this model."""
        if self.requested_precision != "auto":
            return self.requested_precision
        if self.device.type == "cuda":
            return "bf16"
        # On a CPU, GMF's only matmul is its one-output prediction layer: the casts of
        # autocast cost more than bf16 saves there (28 s against 22 s an epoch on ml-1m).
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return "bf16" if native and model != "gmf" else "fp32"

    def log(self, line: str):
        if self.main:
            print(line, flush=True)


def load_training_data(args) -> Interactions:
    channel = os.environ.get("SM_CHANNEL_TRAIN")
    if channel and args.dataset != "demo":
        folder = Path(channel) / args.dataset
        return load_folder(folder if folder.is_dir() else Path(channel), args.dataset, args.seed)
    return load_dataset(args.dataset, args.data_dir or data_dir(), seed=args.seed)


def fit(
    model: NCF,
    data: Interactions,
    args,
    run: Run,
    optimizer_name: str,
    lr: float,
    epochs: int,
    name: str,
    checkpoint: Path | None = None,
    resume: bool = False,
    keep_start: bool = False,
):
    """Train with early stopping on HR@K; returns (best model, best metrics, history).
    keep_start: evaluate the model as given (epoch 0) and keep it if no epoch beats it."""
    device = run.device
    model.to(device)
    evaluator = Evaluator(data, device, k=args.topk)
    sampler = NegativeSampler(
        torch.as_tensor(data.train_users, device=device),
        torch.as_tensor(data.train_items, device=device),
        data.num_items,
    )
    trained = DistributedDataParallel(model) if run.world > 1 else model
    optimizer = make_optimizer(model, optimizer_name, lr, args.weight_decay)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    metric_keys = (f"hr@{args.topk}", f"ndcg@{args.topk}")

    history, best, best_state, start_epoch, stale = [], None, None, 1, 0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["name"] != name:
            raise ValueError(f"{checkpoint} is a checkpoint of {state['name']}, not {name}")
        model.load_state_dict(state["model"])
        decays = [group["weight_decay"] for group in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as error:  # another optimizer's layout, e.g. before --weight-decay
            raise ValueError(
                f"{checkpoint}: its optimizer state does not fit this run ({error}); "
                "rerun without --resume"
            ) from None
        for group, decay in zip(optimizer.param_groups, decays, strict=True):
            group["weight_decay"] = decay  # this run's option, not the checkpoint's
        generator.set_state(state["generator"].cpu())
        history, best, best_state, stale = (
            state["history"],
            state["best"],
            state["best_state"],
            state["stale"],
        )
        start_epoch = state["epoch"] + 1
        run.log(f"resumed {name} from {checkpoint} after epoch {state['epoch']}")

    if start_epoch == 1 and keep_start:
        # The starting model is already good: epoch 0, kept should training not beat it.
        metrics = evaluator.model_metrics(model)
        best = {**metrics, "epoch": 0}
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        run.log(
            f"epoch=0 HR@{args.topk}={metrics[metric_keys[0]]:.4f} NDCG@{args.topk}={metrics[metric_keys[1]]:.4f}"
        )

    batch_size = max(1, args.batch_size // run.world)  # the global batch stays --batch-size
    for epoch in range(start_epoch, epochs + 1):
        if stale >= args.patience:
            break
        started = time.perf_counter()
        users, items, labels = sampler.epoch(args.negatives, generator)
        if run.world > 1:  # every rank drew the same epoch; each trains on its share
            users, items, labels = (
                users[run.rank :: run.world],
                items[run.rank :: run.world],
                labels[run.rank :: run.world],
            )
        for group in optimizer.param_groups:  # from the epoch number alone, so resuming keeps it
            group["lr"] = lr * args.lr_decay ** (epoch - 1)
        model.train()
        total_loss = torch.zeros((), device=device)
        steps = range(0, len(users), batch_size)
        bar = tqdm(
            steps,
            desc=f"{name} epoch {epoch}",
            unit="batch",
            leave=False,
            disable=args.quiet or not run.main or None,
        )
        for start in bar:
            batch = slice(start, start + batch_size)
            with autocast:
                loss = loss_fn(trained(users[batch], items[batch]).float(), labels[batch])
            if args.l2:
                loss = loss + args.l2 * embedding_penalty(model, users[batch], items[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(users[batch])
        epoch_loss = total_loss.item() / len(users)
        if not math.isfinite(epoch_loss):
            # Diverged: the weights are NaN from here on; the best epoch so far is kept.
            if best_state is None:
                raise ValueError(
                    f"{name} diverged in epoch {epoch} (loss {epoch_loss}): "
                    "lower --lr (--pretrain-lr for neumf-pre)"
                )
            run.log(
                f"{name} diverged in epoch {epoch} (loss {epoch_loss}): stopped, keeping epoch "
                f"{best['epoch']}; a lower learning rate may train further"
            )
            break
        metrics = evaluator.model_metrics(model)
        seconds = time.perf_counter() - started
        record = {
            "epoch": epoch,
            "loss": epoch_loss,
            **metrics,
            "seconds": seconds,
        }
        history.append(record)
        hr, ndcg = (metrics[k] for k in metric_keys)
        run.log(
            f"epoch={epoch} loss={record['loss']:.4f} HR@{args.topk}={hr:.4f} "
            f"NDCG@{args.topk}={ndcg:.4f} seconds={seconds:.1f}"
        )
        if best is None or (hr, ndcg) > (best[metric_keys[0]], best[metric_keys[1]]):
            best = {**metrics, "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stale = 0
        else:
            stale += 1
        if checkpoint is not None and run.main:
            save_checkpoint(
                checkpoint,
                name=name,
                epoch=epoch,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
                history=history,
                best=best,
                best_state=best_state,
                stale=stale,
            )
    if best_state is None:
        raise ValueError(f"{name}: no epoch was trained (--epochs {epochs})")
    best_model = copy.deepcopy(model)
    best_model.load_state_dict(best_state)
    return best_model, best, history


def make_optimizer(model: NCF, name: str, lr: float, weight_decay: float):
    """Plain SGD (neumf-pre), or Adam as AdamW: decoupled weight decay on the linear
    layers' weights only (with 0 it steps exactly as Adam). The embeddings have their own
    per-sample penalty (--l2) and biases none. Without decay GMF's prediction weights grow
    freely while the penalised embeddings shrink, which hollows out --l2."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    decayed = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = {id(p) for p in decayed}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=lr,
    )


def embedding_penalty(model: NCF, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of the embeddings each sample uses (the paper code's embedding
    regulariser): popular rows are pulled in as often as they are trained. Computed as each
    row's squared norm times its count in the batch: the same sum without gathering a row
    per sample (10x cheaper per batch on ml-1m)."""
    tables = []
    if model.use_gmf:
        tables += [(model.gmf_user, users), (model.gmf_item, items)]
    if model.use_mlp:
        tables += [(model.mlp_user, users), (model.mlp_item, items)]
    return sum(
        torch.bincount(index, minlength=table.num_embeddings).to(table.weight.dtype)
        @ table.weight.pow(2).sum(-1)
        for table, index in tables
    ) / len(users)


def save_checkpoint(path: Path, **state):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-save keeps the previous checkpoint


def config_for(kind: str, data: Interactions, args) -> ModelConfig:
    return ModelConfig(
        kind, data.num_users, data.num_items, args.factors, args.layers, args.dropout
    )


def train_one(
    kind: str,
    data: Interactions,
    args,
    run: Run,
    out: Path | None,
    checkpoint: Path | None,
    baseline: dict,
) -> NCF:
    """gmf / mlp / neumf from scratch with Adam; writes the artifact (rank 0) and returns the model."""
    torch.manual_seed(args.seed)
    model = NCF(config_for(kind, data, args))
    best_model, best, history = fit(
        model, data, args, run, "adam", args.lr, args.epochs, kind, checkpoint, args.resume
    )
    write_artifact(out, best_model, data, args, run, kind, best, history, baseline)
    return best_model


def train_neumf_pre(data, args, run, out, checkpoint, parts_dir: Path, baseline) -> NCF:
    """The paper's NeuMF with pre-training: GMF + MLP first, merged with alpha, then SGD."""
    parts = {}
    for kind, given in (("gmf", args.gmf), ("mlp", args.mlp)):
        if given is not None:
            artifact = load_artifact(given)
            if artifact.metadata["model"]["kind"] != kind:
                raise ValueError(
                    f"--{kind} {given} holds a {artifact.metadata['model']['kind']} model"
                )
            if (
                artifact.metadata["dataset"]["files"] != data.files
                or artifact.metadata["dataset"]["name"] != data.name
            ):
                raise ValueError(
                    f"--{kind} {given} was trained on other data than --dataset {data.name}"
                )
            run.log(f"using pre-trained {kind} from {given}")
            parts[kind] = artifact.model
        else:
            part_checkpoint = (
                checkpoint.with_name(f"{checkpoint.name}.{kind}") if checkpoint else None
            )
            part_args = copy.copy(args)
            part_args.precision = run.precision_for(kind)
            parts[kind] = train_one(
                kind, data, part_args, run, parts_dir / kind, part_checkpoint, baseline
            )
            run.log(f"pre-trained {kind}: {parts_dir / kind}")
    model = neumf_from_pretrained(parts["gmf"].cpu(), parts["mlp"].cpu(), alpha=args.alpha)
    epochs = args.pretrain_epochs or args.epochs
    best_model, best, history = fit(
        model,
        data,
        args,
        run,
        "sgd",
        args.pretrain_lr,
        epochs,
        "neumf-pre",
        checkpoint,
        args.resume,
        keep_start=True,  # the merged model is already good; SGD may only overfit it
    )
    write_artifact(out, best_model, data, args, run, "neumf-pre", best, history, baseline)
    return best_model


def write_artifact(out, model, data, args, run, name, best, history, baseline):
    if not run.main or out is None:
        return None
    k = args.topk
    metrics = {
        f"hr@{k}": best[f"hr@{k}"],
        f"ndcg@{k}": best[f"ndcg@{k}"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "seconds": sum(h["seconds"] for h in history),
        "baseline_popular": baseline,
        "history": history,
    }
    training = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    training.update(model_name=name, world_size=run.world)
    path = save_artifact(
        out,
        model,
        data.catalog(),
        {
            "name": name,
            "dataset": data.describe(),
            "training": training,
            "metrics": metrics,
        },
    )
    if run.metrics_dir is not None:
        run.metrics_dir.mkdir(parents=True, exist_ok=True)
        (run.metrics_dir / f"metrics-{name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def weights_digest(model: NCF) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@one_line_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    for option in ("factors", "negatives", "epochs", "batch_size", "topk"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1")
    if not all(0 < lr < math.inf for lr in (args.lr, args.pretrain_lr)):
        raise ValueError("learning rates must be positive numbers")
    for option in ("l2", "weight_decay"):
        if not 0 <= getattr(args, option) < math.inf:
            raise ValueError(f"--{option.replace('_', '-')} must be a number >= 0")
    run = Run(args)
    out = args.out or (
        Path(os.environ["SM_MODEL_DIR"])
        if run.sagemaker
        else Path(os.environ.get("ARTIFACT_DIR") or f"artifacts/{args.dataset}-{args.model}")
    )
    # SageMaker syncs /opt/ml/checkpoints to S3 when the job has a checkpoint location.
    sagemaker_checkpoints = Path(os.environ.get("NCF_OPT_ML", "/opt/ml")) / "checkpoints"
    checkpoint = (
        sagemaker_checkpoints / "ncf.ckpt"
        if run.sagemaker and sagemaker_checkpoints.is_dir()
        else out.with_name(out.name + ".ckpt")
    )
    data = load_training_data(args)
    run.log(
        f"dataset={data.name} users={data.num_users} items={data.num_items} "
        f"train={len(data.train_users)} test={len(data.test_users)} device={run.device} "
        f"precision={args.precision} world={run.world}"
    )
    baseline = Evaluator(data, run.device, k=args.topk).popularity_metrics()
    run.log(
        f"baseline_popular HR@{args.topk}={baseline[f'hr@{args.topk}']:.4f} "
        f"NDCG@{args.topk}={baseline[f'ndcg@{args.topk}']:.4f}"
    )
    try:
        if args.model == "neumf-pre":
            parts_dir = (
                run.metrics_dir / "pretrain"
                if run.metrics_dir
                else out.with_name(out.name + "-pretrain")
            )
            model = train_neumf_pre(data, args, run, out, checkpoint, parts_dir, baseline)
        else:
            model = train_one(args.model, data, args, run, out, checkpoint, baseline)
    except KeyboardInterrupt:
        run.log(f"interrupted: the last finished epoch is in {checkpoint}; rerun with --resume")
        sys.exit(130)
    if run.main:
        metrics = json.loads((out / "metadata.json").read_text())["metrics"]
        run.log(
            f"best epoch={metrics['best_epoch']} HR@{args.topk}={metrics[f'hr@{args.topk}']:.4f} "
            f"NDCG@{args.topk}={metrics[f'ndcg@{args.topk}']:.4f}"
        )
        run.log(f"artifact: {out}")
    if run.world > 1:
        # Every rank ends with the same weights and metrics; print them so that can be checked.
        final = Evaluator(data, run.device, k=args.topk).model_metrics(model.to(run.device))
        print(
            f"rank={run.rank} HR@{args.topk}={final[f'hr@{args.topk}']:.6f} "
            f"weights={weights_digest(model)}",
            flush=True,
        )
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
