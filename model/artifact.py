"""The trained-model artifact: one self-describing directory, written by training, read by serving.

model.safetensors   network weights (no pickle: loading cannot run code)
catalog.safetensors raw-id maps, each user's training items (CSR) and item popularity
item_titles.json    titles aligned with item indices (absent when the dataset has none)
metadata.json       model config, dataset + input hashes, training config, metrics,
                    package versions, creation time, sha256 of the files above
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from model.ncf import NCF, ModelConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CATALOG_FILE = "catalog.safetensors"
TITLES_FILE = "item_titles.json"
METADATA_FILE = "metadata.json"


class ArtifactError(Exception):
    """An artifact that is missing, corrupted or does not match its metadata."""


@dataclass
class Catalog:
    """What serving needs besides the weights; index i of each array is model index i."""

    user_ids: np.ndarray  # (U,) int64 raw dataset user ids
    item_ids: np.ndarray  # (I,) int64 raw dataset item ids
    seen_indptr: np.ndarray  # (U+1,) int64: user u's training items are
    seen_items: np.ndarray  # (nnz,) int64      seen_items[seen_indptr[u]:seen_indptr[u+1]]
    item_popularity: np.ndarray  # (I,) int64 training interactions per item
    item_titles: list[str] | None = None

    @classmethod
    def from_interactions(cls, user_ids, item_ids, train_users, train_items, item_titles=None):
        num_users, num_items = len(user_ids), len(item_ids)
        order = np.lexsort((train_items, train_users))
        counts = np.bincount(train_users, minlength=num_users)
        return cls(
            user_ids=np.asarray(user_ids, dtype=np.int64),
            item_ids=np.asarray(item_ids, dtype=np.int64),
            seen_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            seen_items=np.asarray(train_items, dtype=np.int64)[order],
            item_popularity=np.bincount(train_items, minlength=num_items).astype(np.int64),
            item_titles=item_titles,
        )

    def seen(self, user: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[user] : self.seen_indptr[user + 1]]

    def check(self, num_users: int, num_items: int):
        problems = []
        if self.user_ids.shape != (num_users,):
            problems.append(f"{len(self.user_ids)} user ids for {num_users} users")
        if self.item_ids.shape != (num_items,):
            problems.append(f"{len(self.item_ids)} item ids for {num_items} items")
        if self.item_popularity.shape != (num_items,):
            problems.append("item popularity does not cover the items")
        if self.seen_indptr.shape != (num_users + 1,) or self.seen_indptr[-1] != len(
            self.seen_items
        ):
            problems.append("seen-items index does not match the users")
        elif len(self.seen_items) and not (
            0 <= self.seen_items.min() <= self.seen_items.max() < num_items
        ):
            problems.append("seen items outside the catalogue")
        if self.item_titles is not None and len(self.item_titles) != num_items:
            problems.append(f"{len(self.item_titles)} titles for {num_items} items")
        if problems:
            raise ArtifactError("catalog does not match the model: " + "; ".join(problems))


@dataclass
class Artifact:
    path: Path
    model: NCF
    catalog: Catalog
    metadata: dict

    @property
    def version(self) -> str:
        return self.metadata["version"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict:
    import numpy
    import safetensors

    return {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }


def save_artifact(path, model: NCF, catalog: Catalog, metadata: dict) -> Path:
    """Write the artifact atomically: a crash mid-write never leaves a half artifact at `path`.

    `metadata` holds the caller's sections (dataset, training, metrics); model config,
    versions, creation time, version string and file hashes are added here.
    """
    path = Path(path)
    catalog.check(model.config.num_users, model.config.num_items)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        check_finite(state, "model")
        save_torch(state, staging / WEIGHTS_FILE)
        arrays = {
            "user_ids": catalog.user_ids,
            "item_ids": catalog.item_ids,
            "seen_indptr": catalog.seen_indptr,
            "seen_items": catalog.seen_items,
            "item_popularity": catalog.item_popularity,
        }
        save_numpy(
            {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in arrays.items()},
            staging / CATALOG_FILE,
        )
        files = [WEIGHTS_FILE, CATALOG_FILE]
        if catalog.item_titles is not None:
            (staging / TITLES_FILE).write_text(json.dumps(catalog.item_titles, ensure_ascii=False))
            files.append(TITLES_FILE)
        created = datetime.now(UTC)
        meta = {
            "format_version": FORMAT_VERSION,
            "version": metadata.get("version") or created.strftime("%Y%m%d%H%M%S"),
            "model": model.config.to_dict(),
            **{k: v for k, v in metadata.items() if k != "version"},
            "versions": package_versions(),
            "created": created.isoformat(timespec="seconds"),
            "files": {name: sha256_file(staging / name) for name in files},
        }
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def check_finite(state: dict, where: str):
    """A NaN or infinite weight (a diverged training) would rank every item alike."""
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ArtifactError(f"{where}: non-finite (NaN or infinite) weights in {', '.join(bad)}")


def read_metadata(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    try:
        meta = json.loads((path / METADATA_FILE).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no {METADATA_FILE}; not an artifact directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / METADATA_FILE}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise ArtifactError(f"{path}: artifact format {found!r}, this code reads {FORMAT_VERSION}")
    return meta


def load_artifact(path, device="cpu", verify: bool = True) -> Artifact:
    """Load an artifact; any corruption or mismatch raises ArtifactError with a clear message."""
    path = Path(path)
    meta = read_metadata(path)
    for name, expected in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{path}: {name} is missing")
        if verify and sha256_file(file) != expected:
            raise ArtifactError(
                f"{file}: sha256 does not match metadata.json (corrupted or replaced)"
            )
    try:
        config = ModelConfig(**meta["model"])
        model = NCF(config)
        state = load_torch(path / WEIGHTS_FILE)
        check_finite(state, str(path / WEIGHTS_FILE))
        model.load_state_dict(state)
        arrays = load_numpy(path / CATALOG_FILE)
        titles = None
        if (path / TITLES_FILE).is_file():
            titles = json.loads((path / TITLES_FILE).read_text())
        catalog = Catalog(**arrays, item_titles=titles)
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: cannot load artifact: {str(e).splitlines()[0]}") from None
    catalog.check(config.num_users, config.num_items)
    model.to(device).eval()
    return Artifact(path=path, model=model, catalog=catalog, metadata=meta)
