"""Datasets as implicit feedback, in the NCF paper's leave-one-out protocol.

Every interaction is a positive. Each user's latest interaction is held out for testing
and ranked against 99 sampled items the user never interacted with. Sources:
  demo                 built-in synthetic data (no files; the default everywhere)
  <name>.train.rating  the NCF paper's own split (ml-1m, pinterest-20), used as published
  u.data / ratings.dat / ratings.csv
                       raw GroupLens releases, split here (deterministic for a seed)
Datasets live in $NCF_DATA_DIR/<name>/ (default data/).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from model.artifact import Catalog, sha256_file

TEST_NEGATIVES = 99
TASTE = 5.0  # demo: weight of planted taste against popularity
NCF_SPLITS = ("ml-1m", "pinterest-20")
RAW_RELEASES = (
    "ml-100k",
    "ml-10m",
    "ml-20m",
    "ml-25m",
    "ml-latest",
    "ml-latest-small",
)
DATASETS = ("demo", *NCF_SPLITS, *RAW_RELEASES)


class DataError(Exception):
    """Missing, malformed or unusable input data."""


@dataclass
class Interactions:
    """A dataset in model indices: users 0..U-1, items 0..I-1."""

    name: str
    num_users: int
    num_items: int
    train_users: np.ndarray  # (P,) int64, unique (user, item) pairs
    train_items: np.ndarray  # (P,)
    test_users: np.ndarray  # (T,) users with a held-out item
    test_items: np.ndarray  # (T,) each one's held-out (latest) item
    test_negatives: np.ndarray  # (T, 99) items to rank it against
    user_ids: np.ndarray  # (U,) raw dataset ids
    item_ids: np.ndarray  # (I,)
    item_titles: list[str] | None = None
    files: dict[str, str] = field(default_factory=dict)  # input file name -> sha256

    def catalog(self) -> Catalog:
        return Catalog.from_interactions(
            self.user_ids, self.item_ids, self.train_users, self.train_items, self.item_titles
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "train_interactions": len(self.train_users),
            "test_users": len(self.test_users),
            "files": self.files,
        }


def data_dir() -> Path:
    return Path(os.environ.get("NCF_DATA_DIR", "data"))


def load_dataset(name: str, root: Path | None = None, seed: int = 0) -> Interactions:
    """Load a dataset by name from root/<name>/ (root defaults to $NCF_DATA_DIR)."""
    if name == "demo":
        return make_demo(seed=seed)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    folder = Path(root if root is not None else data_dir()) / name
    return load_folder(folder, name, seed)


def load_folder(folder: Path, name: str, seed: int = 0) -> Interactions:
    """Read whichever format the folder holds (an NCF split, or a raw GroupLens release)."""
    if (folder / f"{name}.train.rating").is_file():
        return read_ncf_split(folder, name)
    for file_name, reader in (
        ("ratings.dat", read_ratings_dat),
        ("u.data", read_u_data),
        ("ratings.csv", read_ratings_csv),
    ):
        for candidate in (folder / file_name, folder / "raw" / file_name):
            if candidate.is_file():
                frame = reader(candidate)
                titles = read_titles(candidate.parent)
                return from_interactions(name, frame, seed=seed, titles=titles, files=[candidate])
    hint = f" (run `make data DATASET={name}`)" if name in DATASETS else ""
    raise DataError(
        f"{folder}: no {name}.train.rating, ratings.dat, u.data or ratings.csv{hint}; "
        "set NCF_DATA_DIR to the folder holding the datasets"
    )


# --- readers ----------------------------------------------------------------------------


def _read_table(path: Path, text: bytes, columns: int, names: list[str], skip_header=False):
    """Parse delimiter-normalised text into an integer/float frame, with line-numbered errors."""
    try:
        frame = pd.read_csv(
            io.BytesIO(text),
            sep="\t",
            header=None,
            skiprows=1 if skip_header else 0,
            usecols=range(columns),
            names=names,
            dtype=np.float64 if "rating" in names else np.int64,
            engine="c",
        )
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: malformed data ({_first_line(e)})") from None
    if frame.empty:
        raise DataError(f"{path}: no interactions")
    if frame.isna().any().any():
        bad = int(np.flatnonzero(frame.isna().any(axis=1).to_numpy())[0]) + 1 + int(skip_header)
        raise DataError(f"{path}: line {bad}: expected {columns} fields")
    return frame


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from None


def _integer_columns(path, frame, columns):
    values = frame[columns].to_numpy()
    if not np.all(values == np.round(values)):
        raise DataError(f"{path}: ids must be integers")
    return values.astype(np.int64)


def read_ratings_dat(path: Path) -> pd.DataFrame:
    """GroupLens `UserID::MovieID::Rating::Timestamp` (ml-1m, ml-10m)."""
    text = _read_bytes(path).replace(b"::", b"\t")
    frame = _read_table(path, text, 4, ["user", "item", "rating", "timestamp"])
    return _raw_frame(path, frame)


def read_u_data(path: Path) -> pd.DataFrame:
    """ml-100k `user\\titem\\trating\\ttimestamp`."""
    frame = _read_table(path, _read_bytes(path), 4, ["user", "item", "rating", "timestamp"])
    return _raw_frame(path, frame)


def read_ratings_csv(path: Path) -> pd.DataFrame:
    """`userId,movieId,rating,timestamp` with a header (ml-20m/25m/latest); ratings may be 3.5."""
    text = _read_bytes(path).replace(b",", b"\t")
    frame = _read_table(path, text, 4, ["user", "item", "rating", "timestamp"], skip_header=True)
    return _raw_frame(path, frame)


def _raw_frame(path, frame: pd.DataFrame) -> pd.DataFrame:
    ids = _integer_columns(path, frame, ["user", "item", "timestamp"])
    return pd.DataFrame({"user": ids[:, 0], "item": ids[:, 1], "timestamp": ids[:, 2]})


def read_titles(folder: Path) -> dict[int, str] | None:
    """Raw item id -> title, from movies.dat, u.item or movies.csv when present."""
    if (folder / "movies.dat").is_file():
        lines = (folder / "movies.dat").read_bytes().decode("latin-1").splitlines()
        parts = [line.split("::") for line in lines if line]
        return {int(p[0]): p[1] for p in parts if len(p) >= 2}
    if (folder / "u.item").is_file():
        lines = (folder / "u.item").read_bytes().decode("latin-1").splitlines()
        parts = [line.split("|") for line in lines if line]
        return {int(p[0]): p[1] for p in parts if len(p) >= 2}
    if (folder / "movies.csv").is_file():
        movies = pd.read_csv(folder / "movies.csv", usecols=["movieId", "title"])
        return dict(zip(movies.movieId.astype(int), movies.title.astype(str), strict=True))
    return None


def read_ncf_split(folder: Path, name: str) -> Interactions:
    """The NCF paper's files: <name>.train.rating, .test.rating, .test.negative (0-based ids)."""
    files = {
        suffix: folder / f"{name}.{suffix}"
        for suffix in ("train.rating", "test.rating", "test.negative")
    }
    for path in files.values():
        if not path.is_file():
            raise DataError(
                f"{path}: missing (an NCF split needs train.rating, test.rating and test.negative)"
            )
    train = _read_table(
        files["train.rating"], _read_bytes(files["train.rating"]), 2, ["user", "item"]
    )
    test = _read_table(files["test.rating"], _read_bytes(files["test.rating"]), 2, ["user", "item"])
    # "(user,item)\tneg1\tneg2..." -> tab-separated integers
    negative_text = re.sub(rb"[(),]", b"\t", _read_bytes(files["test.negative"]))
    try:
        rows = [
            np.array(line.split(), dtype=np.int64)
            for line in negative_text.splitlines()
            if line.strip()
        ]
    except ValueError as e:
        raise DataError(f"{files['test.negative']}: malformed data ({_first_line(e)})") from None
    if not rows or len({len(r) for r in rows}) != 1 or len(rows[0]) < 3:
        raise DataError(
            f"{files['test.negative']}: every line needs (user,item) and the same number of negatives"
        )
    negatives = np.stack(rows)
    test_users, test_items = test.user.to_numpy(), test.item.to_numpy()
    if not (
        np.array_equal(negatives[:, 0], test_users) and np.array_equal(negatives[:, 1], test_items)
    ):
        raise DataError(
            f"{files['test.negative']}: lines do not follow {files['test.rating'].name}"
        )
    train_users, train_items = train.user.to_numpy(), train.item.to_numpy()
    every_id = [train_users, train_items, test_users, test_items, negatives[:, 2:]]
    if min(int(a.min()) for a in every_id) < 0:
        raise DataError(f"{folder}: negative ids")
    item_map = folder / "raw" / "ncf_item_map.tsv"
    num_users = int(max(train_users.max(), test_users.max())) + 1
    num_items = int(max(train_items.max(), test_items.max(), negatives[:, 2:].max())) + 1
    user_ids = np.arange(num_users, dtype=np.int64)
    item_ids = np.arange(num_items, dtype=np.int64)
    titles = None
    hashes = {p.name: sha256_file(p) for p in files.values()}
    if item_map.is_file():
        # A GroupLens-derived split: NCF user = UserID - 1, items through the published map.
        mapping = _read_table(item_map, _read_bytes(item_map), 2, ["ncf", "raw"])
        num_items = max(num_items, int(mapping.ncf.max()) + 1)
        item_ids = np.arange(num_items, dtype=np.int64)
        item_ids[mapping.ncf.to_numpy()] = mapping.raw.to_numpy()
        user_ids = user_ids + 1
        hashes["raw/" + item_map.name] = sha256_file(item_map)
        raw_titles = read_titles(folder / "raw")
        if raw_titles:
            titles = [raw_titles.get(int(i), "") for i in item_ids]
    pairs = np.unique(train_users * num_items + train_items)
    return _checked(
        Interactions(
            name=name,
            num_users=num_users,
            num_items=num_items,
            train_users=pairs // num_items,
            train_items=pairs % num_items,
            test_users=test_users,
            test_items=test_items,
            test_negatives=negatives[:, 2:],
            user_ids=user_ids,
            item_ids=item_ids,
            item_titles=titles,
            files=hashes,
        )
    )


# --- raw interactions -> leave-one-out split ---------------------------------------------


def from_interactions(
    name: str,
    frame: pd.DataFrame,
    seed: int = 0,
    titles: dict[int, str] | None = None,
    files=(),
    num_negatives: int = TEST_NEGATIVES,
) -> Interactions:
    """Raw (user, item, timestamp) rows -> implicit feedback, latest item per user held out.

    Repeated (user, item) rows count once (at their latest time). Users with a single item
    stay in training with nothing held out. Ties in time are broken by item id, so the split
    is deterministic.
    """
    if frame.empty:
        raise DataError(f"{name}: no interactions")
    user_ids, users = np.unique(frame.user.to_numpy(), return_inverse=True)
    item_ids, items = np.unique(frame.item.to_numpy(), return_inverse=True)
    num_users, num_items = len(user_ids), len(item_ids)
    times = frame.timestamp.to_numpy()
    # Sort by (user, time, item) and keep the last row of each (user, item): a user's history.
    order = np.lexsort((items, times, users))
    users, items, times = users[order], items[order], times[order]
    pair = users.astype(np.int64) * num_items + items
    _, last = np.unique(pair[::-1], return_index=True)
    keep = np.sort(len(pair) - 1 - last)
    users, items, times = users[keep], items[keep], times[keep]
    order = np.lexsort((items, times, users))
    users, items = users[order], items[order]
    # The latest row of each user is the last one in this order.
    is_last = np.r_[users[1:] != users[:-1], True]
    counts = np.bincount(users, minlength=num_users)
    held_out = is_last & (counts[users] >= 2)
    test_users, test_items = users[held_out], items[held_out]
    train_users, train_items = users[~held_out], items[~held_out]
    negatives = sample_test_negatives(users, items, test_users, num_items, num_negatives, seed)
    return _checked(
        Interactions(
            name=name,
            num_users=num_users,
            num_items=num_items,
            train_users=train_users.astype(np.int64),
            train_items=train_items.astype(np.int64),
            test_users=test_users.astype(np.int64),
            test_items=test_items.astype(np.int64),
            test_negatives=negatives,
            user_ids=user_ids.astype(np.int64),
            item_ids=item_ids.astype(np.int64),
            item_titles=[titles.get(int(i), "") for i in item_ids] if titles else None,
            files={Path(p).name: sha256_file(p) for p in files},
        )
    )


def sample_test_negatives(users, items, test_users, num_items, count, seed, chunk=1024):
    """`count` distinct items per test user, uniform among the items it never interacted with.

    `users` must be sorted (with `items` aligned) and `test_users` ascending.

    Chunks of users get a random key per item, +inf on their own items; the `count` smallest
    keys are then a uniform sample without replacement of the unseen items.
    """
    if len(test_users) == 0:
        return np.zeros((0, count), dtype=np.int64)
    seen_count = np.bincount(users, minlength=test_users.max() + 1)[test_users]
    if (num_items - seen_count < count).any():
        raise DataError(
            f"some users have fewer than {count} unseen items to sample test negatives from"
        )
    rng = np.random.default_rng(seed)
    row_of_user = np.full(users.max() + 1, -1)
    out = np.empty((len(test_users), count), dtype=np.int64)
    for start in range(0, len(test_users), chunk):
        block = test_users[start : start + chunk]
        row_of_user[block] = np.arange(len(block))
        keys = rng.random((len(block), num_items))
        # users is sorted, so the block's interactions are one contiguous slice
        lo = np.searchsorted(users, block.min(), side="left")
        hi = np.searchsorted(users, block.max(), side="right")
        block_users, block_items = users[lo:hi], items[lo:hi]
        mine = row_of_user[block_users] >= 0
        keys[row_of_user[block_users[mine]], block_items[mine]] = np.inf
        row_of_user[block] = -1
        picked = np.argpartition(keys, count - 1, axis=1)[:, :count]
        out[start : start + chunk] = np.sort(picked, axis=1)
    return out


def _checked(data: Interactions) -> Interactions:
    if len(data.train_users) == 0:
        raise DataError(f"{data.name}: no training interactions")
    if len(data.test_users) == 0:
        raise DataError(f"{data.name}: no user has two or more interactions, nothing to test on")
    full = np.bincount(data.train_users, minlength=data.num_users) >= data.num_items
    if full.any():
        raise DataError(
            f"{data.name}: {int(full.sum())} users interacted with every item; no negatives exist"
        )
    return data


# --- built-in synthetic data -------------------------------------------------------------


def make_demo(num_users=2000, num_items=1000, seed=0, dim=8) -> Interactions:
    """Synthetic implicit feedback with planted taste and a popularity long tail.

    Users and items get latent vectors; a user's items are drawn without replacement with
    probability ~ exp(TASTE * u.v + log popularity) (Gumbel top-k), where popularity is Zipf.
    A model that learns the taste beats the popularity baseline by a wide margin.
    """
    rng = np.random.default_rng(1234 + seed)
    user_factors = rng.normal(size=(num_users, dim)) / np.sqrt(dim)
    item_factors = rng.normal(size=(num_items, dim)) / np.sqrt(dim)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity = popularity[rng.permutation(num_items)]
    logits = TASTE * user_factors @ item_factors.T + np.log(popularity)
    gumbel = -np.log(-np.log(rng.random(logits.shape)))
    ranked = np.argsort(-(logits + gumbel), axis=1)
    history = np.minimum(10 + rng.geometric(1 / 30, size=num_users), num_items // 4)
    take = np.arange(num_items)[None, :] < history[:, None]
    users = np.repeat(np.arange(num_users), history)
    items = ranked[take]
    timestamps = rng.permutation(len(users)).astype(np.int64)  # order within a user is random
    frame = pd.DataFrame({"user": users + 1, "item": items + 1, "timestamp": timestamps})
    genres = ("Drama", "Comedy", "Action", "Sci-Fi", "Romance", "Thriller", "Animation", "Horror")
    titles = {
        i + 1: f"Demo {genres[int(np.argmax(item_factors[i]))]} #{i + 1}" for i in range(num_items)
    }
    return from_interactions("demo", frame, seed=seed, titles=titles)
