"""
Download a benchmark dataset into $NCF_DATA_DIR/<name>/ (default: data/<name>/).

    python -m training.download ml-1m                 # what `make data DATASET=ml-1m` runs
    python -m training.download ml-100k --data-dir /tmp/data
    NCF_DOWNLOAD_BASE_URL=http://mirror/ncf python -m training.download ml-1m

Two sources: the NCF paper's split files (Data/ of hexiangnan/neural_collaborative_filtering)
and the GroupLens MovieLens zips. Downloads stream to <file>.part and resume from it with an
HTTP Range request, so an interrupted run can simply be run again. Files with a published
sha256 are verified; every file's sha256 is written to <name>/SHA256SUMS, which also marks the
dataset as complete (a second run re-hashes, finds everything in place and downloads nothing).

Layout (the data readers rely on it):
    ml-1m/ml-1m.{train.rating,test.rating,test.negative}      NCF split
    ml-1m/raw/{ratings.dat,movies.dat,users.dat,README}       GroupLens ml-1m.zip
    ml-1m/raw/ncf_item_map.tsv                                ncf_item_id<TAB>MovieID, derived
    pinterest-20/pinterest-20.{train.rating,test.rating,test.negative}
    ml-100k/u.data, ml-10m/ratings.dat, ml-20m/ratings.csv, ...  raw releases, unpacked flat
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import requests
import urllib3
from tqdm import tqdm

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"
NCF_DATA_URL = (
    "https://raw.githubusercontent.com/hexiangnan/neural_collaborative_filtering/master/Data"
)
DEMO = "demo"  # synthetic data built in to the training code: nothing to download
SUMS_FILE = "SHA256SUMS"  # sha256sum format; written last, so it doubles as "download complete"
TIMEOUT_S = 30.0  # connect and per-read timeout: a stalled server fails instead of hanging
CHUNK = 1 << 20

# -----------------------------------------------------------------------------
# the registry: what each dataset is made of and where it lands


@dataclass(frozen=True)
class Dataset:
    name: str
    about: str
    ncf_files: tuple[str, ...] = ()  # from the NCF repo's Data/, saved as <name>/<file>
    zip: str | None = None  # GroupLens release, e.g. "ml-1m.zip"
    zip_into: str = ""  # folder under <name>/ to unpack it into ("" = <name>/ itself)
    zip_files: tuple[str, ...] = ()  # files we need from the zip (an error if it lacks them)
    item_map: bool = False  # derive <zip_into>/ncf_item_map.tsv from <zip_into>/ratings.dat
    # published sha256 by path relative to <name>/; files not listed are only recorded
    sha256: dict[str, str] = field(default_factory=dict)

    def files(self) -> list[str]:
        """Paths (relative to <name>/) that must exist for the dataset to be complete."""
        sub = f"{self.zip_into}/" if self.zip_into else ""
        out = [*self.ncf_files, *(sub + f for f in self.zip_files)]
        return out + ([sub + "ncf_item_map.tsv"] if self.item_map else [])


def _ncf_split(name: str) -> tuple[str, ...]:
    return tuple(f"{name}.{part}" for part in ("train.rating", "test.rating", "test.negative"))


_CSV_RELEASE = ("ratings.csv", "movies.csv")
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset(
            "ml-1m",
            "MovieLens-1M, the NCF paper's split (+ GroupLens raw files in raw/)",
            ncf_files=_ncf_split("ml-1m"),
            zip="ml-1m.zip",
            zip_into="raw",
            zip_files=("ratings.dat", "movies.dat", "users.dat", "README"),
            item_map=True,
            sha256={
                "ml-1m.test.rating": "231ae11eb060b643a8c58c063cd17ffc743b54f569afb073d1abb6cf126b88b5",
                "ml-1m.test.negative": "127853228a76b7d21c0481e8ef8d00dd009cd5c88670dbdd9e9debfdb9f93de4",
                "raw/ncf_item_map.tsv": "b974f9805a1fcb819846ac8eb7c504a576e0a96f0ccf38c44d76e50031d070d4",
                "raw/movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
                "raw/users.dat": "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
            },
        ),
        Dataset(
            "pinterest-20",
            "Pinterest (users with >= 20 pins), the NCF paper's split",
            ncf_files=_ncf_split("pinterest-20"),
        ),
        Dataset(
            "ml-100k",
            "MovieLens-100K, raw GroupLens release",
            zip="ml-100k.zip",
            zip_files=("u.data", "u.item", "u.user"),
            sha256={
                "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
                "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
            },
        ),
        Dataset(
            "ml-10m",
            "MovieLens-10M, raw GroupLens release",
            zip="ml-10m.zip",
            zip_files=("ratings.dat", "movies.dat"),
        ),
        Dataset("ml-20m", "MovieLens-20M, raw", zip="ml-20m.zip", zip_files=_CSV_RELEASE),
        Dataset("ml-25m", "MovieLens-25M, raw", zip="ml-25m.zip", zip_files=_CSV_RELEASE),
        Dataset(
            "ml-latest",
            "MovieLens latest full, raw (changes between releases: no published hashes)",
            zip="ml-latest.zip",
            zip_files=_CSV_RELEASE,
        ),
        Dataset(
            "ml-latest-small",
            "MovieLens latest-small, raw",
            zip="ml-latest-small.zip",
            zip_files=_CSV_RELEASE,
            sha256={
                "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
                "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
            },
        ),
    ]
}
NAMES: tuple[str, ...] = (DEMO, *DATASETS)  # every name `--dataset`/`DATASET=` accepts


class DownloadError(Exception):
    """A failure worth one line to the user (network, hash, bad archive), never a traceback."""


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    return DATASETS[name]


def default_data_dir() -> Path:
    return Path(os.environ.get("NCF_DATA_DIR") or "data")


# -----------------------------------------------------------------------------
# where to download from


@dataclass(frozen=True)
class Urls:
    grouplens: str = GROUPLENS_URL
    ncf: str = NCF_DATA_URL


def resolve_urls(
    base_url: str | None = None,
    grouplens_url: str | None = None,
    ncf_url: str | None = None,
    env: dict[str, str] | None = None,
) -> Urls:
    """Options beat env vars; a per-source URL beats the single base URL.

    A single base (--base-url / NCF_DOWNLOAD_BASE_URL) means a flat mirror: every file at
    <base>/<file name> (the names of the two sources do not clash).
    """
    env = os.environ if env is None else env
    base = base_url or env.get("NCF_DOWNLOAD_BASE_URL")
    gl = grouplens_url or env.get("NCF_GROUPLENS_URL") or base or GROUPLENS_URL
    ncf = ncf_url or env.get("NCF_NCF_DATA_URL") or base or NCF_DATA_URL
    return Urls(grouplens=gl.rstrip("/"), ncf=ncf.rstrip("/"))


# -----------------------------------------------------------------------------
# building blocks: hash, fetch (with resume), unpack, derive


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(e: Exception, timeout: float) -> str:
    """A short cause instead of urllib3's nested repr of pools and connection objects."""
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code} {e.response.reason}"
    if isinstance(e, urllib3.exceptions.ProtocolError):
        return "connection lost mid-download"
    inner = e.args[0] if e.args else e
    inner = getattr(inner, "reason", inner)  # MaxRetryError -> NewConnectionError etc.
    text = str(inner).split(">: ", 1)[-1]  # drop "<urllib3.connection... object at 0x..>: "
    if isinstance(e, requests.Timeout) or "timed out" in text.lower():
        return f"timed out (no data for {timeout:g}s)"
    return text


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    session: requests.Session | None = None,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Download url to dest via dest.part, resuming a .part left by an interrupted run.

    On a network error the .part is kept (rerun to resume). If sha256 is given and does not
    match, the .part is deleted and DownloadError names both hashes.
    """
    session = session or requests.Session()
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    # identity: with gzip, Range and Content-Length count compressed bytes and resume breaks
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code == 416 and have:  # nothing left past our offset
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if total != str(have):  # .part is not a prefix of this file: start over
                    part.unlink()
                    return fetch(url, dest, sha256=sha256, session=session, timeout=timeout)
            else:
                r.raise_for_status()
                resumed = r.status_code == 206 and r.headers.get("Content-Range", "").startswith(
                    f"bytes {have}-"
                )
                if r.status_code == 206 and not resumed:  # a range we did not ask for
                    part.unlink(missing_ok=True)
                    return fetch(url, dest, sha256=sha256, session=session, timeout=timeout)
                if have and not resumed:
                    print(f"  server ignored the resume request; downloading {dest.name} again")
                    have = 0
                size = r.headers.get("Content-Length")
                total = have + int(size) if size is not None else None
                bar = tqdm(
                    total=total,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=None,
                    leave=False,
                )  # disable=None: no bar when stderr is not a terminal (CI, make in a pipe)
                with bar, open(part, "ab" if resumed else "wb") as f:
                    # read1, not iter_content: it hands over every byte received before a
                    # dropped connection, so the .part keeps all of them for the resume
                    while chunk := r.raw.read1(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                got = part.stat().st_size
                if total is not None and got != total:
                    raise DownloadError(
                        f"{url}: connection closed after {got} of {total} bytes; "
                        f"partial download kept in {part}, rerun to resume"
                    )
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        kept = ""
        if part.exists():
            kept = f"partial download ({part.stat().st_size} bytes) kept in {part}, rerun to resume"
        raise DownloadError(f"{url}: {_reason(e, timeout)}" + (f"; {kept}" if kept else "")) from e
    if sha256 is not None:
        got_sha = sha256_file(part)
        if got_sha != sha256:
            part.unlink()
            raise DownloadError(
                f"sha256 mismatch for {dest}: expected {sha256}, got {got_sha} (file deleted)"
            )
    part.replace(dest)  # only a complete file ever has the final name
    return dest


def unpack_zip(zip_path: Path, dest_dir: Path) -> list[Path]:
    """Unpack zip_path into dest_dir, dropping the zip's single top folder (ml-10M100K/ etc.).

    Members go to a staging folder first and are moved in only once all of them unpacked,
    so an interrupted unpack never leaves a truncated file under its final name.
    """
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [
                m
                for m in zf.infolist()
                if not m.is_dir() and not m.filename.startswith("__MACOSX/")
            ]
            parts = [PurePosixPath(m.filename).parts for m in members]
            if any(p[0] == "/" or ".." in p for p in parts):  # "zip slip"
                raise DownloadError(f"{zip_path}: unsafe member path, refusing to unpack")
            tops = {p[0] for p in parts}
            strip = len(tops) == 1 and all(len(p) > 1 for p in parts)
            rel = [PurePosixPath(*p[1:]) if strip else PurePosixPath(*p) for p in parts]
            stage = dest_dir / ".unpack"
            shutil.rmtree(stage, ignore_errors=True)
            for m, r in zip(members, rel, strict=True):
                out = stage / r
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        zip_path.unlink(missing_ok=True)  # a broken archive must be downloaded again
        raise DownloadError(f"{zip_path}: not a valid zip ({_one_line(e)}); deleted it") from e
    written = []
    for r in rel:
        out = dest_dir / r
        out.parent.mkdir(parents=True, exist_ok=True)
        (stage / r).replace(out)
        written.append(out)
    shutil.rmtree(stage, ignore_errors=True)
    return written


def derive_item_map(ratings_dat: Path, out: Path) -> int:
    """Write ncf_item_id<TAB>MovieID: NCF numbers movies by first appearance in ratings.dat."""
    # sep=":" reads "a::b::c::d" as a,,b,,c,,d with the fast C parser; MovieID is column 2
    movie = pd.read_csv(ratings_dat, sep=":", header=None, usecols=[2], dtype=np.int64)[2]
    order = pd.unique(movie.to_numpy())  # keeps the order of first appearance
    tmp = out.with_name(out.name + ".tmp")
    np.savetxt(tmp, np.column_stack([np.arange(len(order)), order]), fmt="%d", delimiter="\t")
    tmp.replace(out)
    return len(order)


# -----------------------------------------------------------------------------
# verification and the SHA256SUMS manifest


def _read_sums(root: Path) -> dict[str, str]:
    sums = {}
    path = root / SUMS_FILE
    if path.exists():
        for line in path.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name:
                sums[name] = digest
    return sums


def _all_files(root: Path) -> list[str]:
    skip = (".part", ".tmp")
    files = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    return sorted(
        f.as_posix()
        for f in files
        if f.name != SUMS_FILE and not f.name.endswith(skip) and ".unpack" not in f.parts
    )


def _check(root: Path, rel: str, expected: str, got: str | None = None) -> None:
    """Delete a file whose sha256 is not the expected one, and say so in one line."""
    got = got or sha256_file(root / rel)
    if got != expected:
        (root / rel).unlink()
        raise DownloadError(
            f"sha256 mismatch for {root / rel}: expected {expected}, got {got} (file deleted)"
        )


def is_complete(ds: Dataset, root: Path) -> bool:
    """True if SHA256SUMS exists, lists every needed file, and every listed file matches it.

    A listed file that no longer matches is deleted and raises DownloadError.
    """
    sums = _read_sums(root)
    if not sums or not all(f in sums for f in ds.files()):
        return False
    if not all((root / f).is_file() for f in sums):
        return False
    for rel, digest in sums.items():
        _check(root, rel, ds.sha256.get(rel, digest))
    return True


def verify_and_record(ds: Dataset, root: Path) -> tuple[list[str], list[str]]:
    """Check the published hashes, write every file's sha256 to SHA256SUMS.

    Returns (files verified against a published hash, files only recorded).
    """
    sums, verified, recorded = {}, [], []
    for rel in _all_files(root):
        sums[rel] = sha256_file(root / rel)
        if rel in ds.sha256:
            _check(root, rel, ds.sha256[rel], sums[rel])
            verified.append(rel)
        else:
            recorded.append(rel)
    tmp = root / (SUMS_FILE + ".tmp")
    tmp.write_text("".join(f"{d}  {rel}\n" for rel, d in sums.items()))
    tmp.replace(root / SUMS_FILE)
    return verified, recorded


# -----------------------------------------------------------------------------
# the whole job


def download(
    dataset: str | Dataset,
    data_dir: str | Path | None = None,
    *,
    urls: Urls | None = None,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Make <data_dir>/<name>/ complete and verified; returns that folder.

    Raises DownloadError on a network error (the .part is kept), a hash mismatch (the bad
    file is deleted) or a broken archive.
    """
    ds = get_dataset(dataset) if isinstance(dataset, str) else dataset
    root = Path(data_dir if data_dir is not None else default_data_dir()) / ds.name
    urls = urls or resolve_urls()
    if is_complete(ds, root):
        print(f"{ds.name}: all files present and verified in {root}; nothing to download")
        return root
    root.mkdir(parents=True, exist_ok=True)
    session = requests.Session()
    session.headers["User-Agent"] = "ncf-recommender/training.download"

    for name in ds.ncf_files:  # a file under its final name is complete (see fetch)
        if not (root / name).exists():
            print(f"{ds.name}: downloading {urls.ncf}/{name}")
            url = f"{urls.ncf}/{name}"
            fetch(url, root / name, sha256=ds.sha256.get(name), session=session, timeout=timeout)

    if ds.zip:
        sub = root / ds.zip_into
        if not all((sub / f).exists() for f in ds.zip_files):
            zip_path = root / ds.zip
            if not zip_path.exists():
                print(f"{ds.name}: downloading {urls.grouplens}/{ds.zip}")
                fetch(f"{urls.grouplens}/{ds.zip}", zip_path, session=session, timeout=timeout)
            print(f"{ds.name}: unpacking {ds.zip} (sha256 {sha256_file(zip_path)}) into {sub}")
            unpack_zip(zip_path, sub)
            missing = [f for f in ds.zip_files if not (sub / f).exists()]
            if missing:
                zip_path.unlink()
                raise DownloadError(f"{ds.zip} lacks {', '.join(missing)}; deleted it")
            zip_path.unlink()  # unpacked and no longer needed (ml-25m's zip is 250 MB)

    if ds.item_map:
        sub = root / ds.zip_into
        if not (sub / "ncf_item_map.tsv").exists():
            n = derive_item_map(sub / "ratings.dat", sub / "ncf_item_map.tsv")
            print(f"{ds.name}: derived {ds.zip_into}/ncf_item_map.tsv ({n} items)")

    verified, recorded = verify_and_record(ds, root)
    if verified:
        print(f"{ds.name}: sha256 verified against published hashes: {', '.join(verified)}")
    if recorded:
        print(
            f"{ds.name}: {len(recorded)} file(s) have no published sha256 and were NOT verified "
            f"against one; their sha256 is recorded in {root / SUMS_FILE}"
        )
    print(f"{ds.name}: ready in {root}")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.download",
        description="Download and verify a benchmark dataset into $NCF_DATA_DIR/<name>/.",
        epilog="datasets: " + ", ".join(NAMES),
    )
    p.add_argument("dataset", help="dataset name (see below)")
    p.add_argument("--data-dir", help="parent folder (default: $NCF_DATA_DIR or data/)")
    p.add_argument("--base-url", help="flat mirror for every file (env NCF_DOWNLOAD_BASE_URL)")
    p.add_argument(
        "--grouplens-url", help=f"GroupLens base (env NCF_GROUPLENS_URL; {GROUPLENS_URL})"
    )
    p.add_argument("--ncf-url", help=f"NCF Data/ base (env NCF_NCF_DATA_URL; {NCF_DATA_URL})")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds (connect and read)")
    args = p.parse_args(argv)

    if args.dataset == DEMO:
        print("demo: built-in synthetic data, generated by the training code; no download needed")
        return 0
    if args.dataset not in DATASETS:
        print(
            f"error: unknown dataset {args.dataset!r}; known: {', '.join(NAMES)}", file=sys.stderr
        )
        return 2
    urls = resolve_urls(args.base_url, args.grouplens_url, args.ncf_url)
    try:
        download(args.dataset, args.data_dir, urls=urls, timeout=args.timeout)
    except DownloadError as e:
        print(f"error: {_one_line(e, 1000)}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: still one line
        print(f"error: {_one_line(e, 1000)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun to resume the download", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
