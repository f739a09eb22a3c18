"""training.download against a local HTTP server (with Range support) serving synthetic files.

No network: every URL points at 127.0.0.1. The real datasets' published hashes cannot be
checked on synthetic content, so each test swaps in a registry entry carrying the synthetic
files' hashes (dataclasses.replace on the real entry, so the real layout is what is tested).
"""

import dataclasses
import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from training import download as dl

REPO = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -----------------------------------------------------------------------------
# a small HTTP server that honours Range (the stdlib SimpleHTTPRequestHandler does not)


class RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        srv = self.server
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        srv.requests.append((name, rng))
        path = srv.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not srv.ignore_range:
            start = int(m[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = int(m[2]) if m[2] else len(data) - 1
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        # one-shot faults: send only the first n bytes, then hang up / stall
        if (n := srv.cut.pop(name, None)) is not None:
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.close_connection = True
            return
        if (n := srv.stall.pop(name, None)) is not None:
            self.wfile.write(body[:n])
            self.wfile.flush()
            time.sleep(2.0)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.daemon_threads = True
    srv.root, srv.requests, srv.cut, srv.stall, srv.ignore_range = root, [], {}, {}, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# -----------------------------------------------------------------------------
# synthetic content in the real formats

RATINGS_DAT = (
    "1::1193::5::978300760\n1::661::3::978302109\n1::1193::4::978301968\n"
    "2::3408::4::978300275\n2::661::5::978824291\n3::1::3::978302268\n3::3408::1::978300000\n"
)
ITEM_MAP = "0\t1193\n1\t661\n2\t3408\n3\t1\n"  # first appearance order, from 0
TRAIN = b"".join(
    f"{u}\t{i}\t{(u + i) % 5 + 1}\t9783{u:02d}{i:03d}\n".encode()
    for u in range(3)
    for i in range(40)
)
TEST = b"0\t3\t5\t978824351\n1\t2\t3\t978300174\n2\t0\t4\t978298504\n"
NEG = b"(0,3)\t1\t2\n(1,2)\t0\t3\n(2,0)\t1\t3\n"


def make_zip(path: Path, top: str, files: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/", b"")  # GroupLens zips carry the folder entry too
        for name, data in files.items():
            zf.writestr(f"{top}/{name}", data)
    path.write_bytes(buf.getvalue())


ML1M_RAW = {
    "ratings.dat": RATINGS_DAT.encode(),
    "movies.dat": b"1::Toy Story (1995)::Animation|Children's|Comedy\n661::James (1996)::Drama\n",
    "users.dat": b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n",
    "README": b"synthetic stand-in for the GroupLens README\n",
}


@pytest.fixture
def ml1m(server, monkeypatch):
    """The real ml-1m entry, with the synthetic files' hashes standing in for the published."""
    www = server.root
    for name, data in [
        ("ml-1m.train.rating", TRAIN),
        ("ml-1m.test.rating", TEST),
        ("ml-1m.test.negative", NEG),
    ]:
        (www / name).write_bytes(data)
    make_zip(www / "ml-1m.zip", "ml-1m", ML1M_RAW)
    real = dl.DATASETS["ml-1m"]
    hashes = {
        "ml-1m.test.rating": sha(TEST),
        "ml-1m.test.negative": sha(NEG),
        "raw/ncf_item_map.tsv": sha(ITEM_MAP.encode()),
        "raw/movies.dat": sha(ML1M_RAW["movies.dat"]),
        "raw/users.dat": sha(ML1M_RAW["users.dat"]),
    }
    assert hashes.keys() == real.sha256.keys()  # the same files are checked as for real data
    ds = dataclasses.replace(real, sha256=hashes)
    monkeypatch.setitem(dl.DATASETS, "ml-1m", ds)
    return ds


def run(capsys, *argv):
    rc = dl.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# -----------------------------------------------------------------------------
# the happy path


def test_full_download_ml1m_layout(server, ml1m, tmp_path, capsys):
    data = tmp_path / "data"
    rc, out, err = run(capsys, "ml-1m", "--data-dir", data, "--base-url", server.url)
    assert rc == 0, err
    root = data / "ml-1m"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == [
        "SHA256SUMS",
        "ml-1m.test.negative",
        "ml-1m.test.rating",
        "ml-1m.train.rating",
        "raw/README",
        "raw/movies.dat",
        "raw/ncf_item_map.tsv",
        "raw/ratings.dat",
        "raw/users.dat",
    ]
    assert (root / "ml-1m.train.rating").read_bytes() == TRAIN
    assert (root / "raw/ratings.dat").read_bytes() == ML1M_RAW["ratings.dat"]
    assert (root / "raw/ncf_item_map.tsv").read_text() == ITEM_MAP
    # SHA256SUMS is `sha256sum -c` compatible and covers every file
    sums = dict(line.split("  ")[::-1] for line in (root / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == files[1:]
    assert all(sums[f] == sha((root / f).read_bytes()) for f in sums)
    assert "verified against published hashes" in out and "NOT verified" in out
    assert "raw/ncf_item_map.tsv" in out.split("published hashes:")[1].splitlines()[0]
    assert {name for name, _ in server.requests} == {
        "ml-1m.train.rating",
        "ml-1m.test.rating",
        "ml-1m.test.negative",
        "ml-1m.zip",
    }


def test_second_run_downloads_nothing(server, ml1m, tmp_path, capsys):
    args = ("ml-1m", "--data-dir", tmp_path / "d", "--base-url", server.url)
    assert run(capsys, *args)[0] == 0
    n = len(server.requests)
    rc, out, err = run(capsys, *args)
    assert rc == 0 and err == ""
    assert len(server.requests) == n
    assert "nothing to download" in out


def test_separate_source_urls_and_env(server, tmp_path, capsys, monkeypatch):
    """ml-10m: raw release unpacked flat (zip's top folder ml-10M100K/ dropped); two mirrors."""
    (server.root / "gl").mkdir()
    (server.root / "ncf").mkdir()
    raw = {
        "ratings.dat": b"1::122::5::838985046\n",
        "movies.dat": b"122::Boomerang (1992)::Comedy\n",
        "tags.dat": b"",
    }
    make_zip(server.root / "gl" / "ml-10m.zip", "ml-10M100K", raw)
    monkeypatch.setenv("NCF_DOWNLOAD_BASE_URL", server.url + "/nowhere")  # the specific ones win
    monkeypatch.setenv("NCF_GROUPLENS_URL", server.url + "/gl/")
    monkeypatch.setenv("NCF_NCF_DATA_URL", server.url + "/ncf")
    monkeypatch.setenv("NCF_DATA_DIR", str(tmp_path / "env-data"))
    rc, out, err = run(capsys, "ml-10m")
    assert rc == 0, err
    root = tmp_path / "env-data" / "ml-10m"
    assert sorted(p.name for p in root.iterdir()) == [
        "SHA256SUMS",
        "movies.dat",
        "ratings.dat",
        "tags.dat",
    ]
    assert (root / "ratings.dat").read_bytes() == raw["ratings.dat"]
    assert server.requests == [("gl/ml-10m.zip", None)]
    assert "NOT verified" in out


def test_resolve_urls_precedence():
    env = {"NCF_DOWNLOAD_BASE_URL": "http://m/", "NCF_NCF_DATA_URL": "http://n"}
    assert dl.resolve_urls(env={}) == dl.Urls(dl.GROUPLENS_URL, dl.NCF_DATA_URL)
    assert dl.resolve_urls(env=env) == dl.Urls("http://m", "http://n")
    assert dl.resolve_urls(grouplens_url="http://g", env=env) == dl.Urls("http://g", "http://n")
    assert dl.resolve_urls(base_url="http://b", env={}) == dl.Urls("http://b", "http://b")


def test_demo_needs_no_download(capsys):
    rc, out, err = run(capsys, "demo")
    assert rc == 0 and "no download" in out and err == ""


def test_registry_names():
    assert set(dl.DATASETS) == {
        "ml-1m",
        "pinterest-20",
        "ml-100k",
        "ml-10m",
        "ml-20m",
        "ml-25m",
        "ml-latest",
        "ml-latest-small",
    }
    assert dl.NAMES[0] == "demo" and set(dl.NAMES[1:]) == set(dl.DATASETS)
    assert all(name == ds.name for name, ds in dl.DATASETS.items())
    assert dl.DATASETS["ml-1m"].files()[-1] == "raw/ncf_item_map.tsv"


# -----------------------------------------------------------------------------
# hashes


def test_sha256_mismatch_deletes_and_fails(server, ml1m, tmp_path, capsys, monkeypatch):
    wrong = "0" * 64
    bad = dataclasses.replace(ml1m, sha256={**ml1m.sha256, "ml-1m.test.rating": wrong})
    monkeypatch.setitem(dl.DATASETS, "ml-1m", bad)
    rc, _, err = run(capsys, "ml-1m", "--data-dir", tmp_path, "--base-url", server.url)
    assert rc == 1
    line = assert_one_line_error(err)
    assert "ml-1m.test.rating" in line and wrong in line and sha(TEST) in line
    assert not (tmp_path / "ml-1m" / "ml-1m.test.rating").exists()
    assert not (tmp_path / "ml-1m" / "ml-1m.test.rating.part").exists()


def test_sha256_mismatch_in_zip_member(server, ml1m, tmp_path, capsys, monkeypatch):
    wrong = "f" * 64
    bad = dataclasses.replace(ml1m, sha256={**ml1m.sha256, "raw/movies.dat": wrong})
    monkeypatch.setitem(dl.DATASETS, "ml-1m", bad)
    rc, _, err = run(capsys, "ml-1m", "--data-dir", tmp_path, "--base-url", server.url)
    line = assert_one_line_error(err)
    assert rc == 1 and "raw/movies.dat" in line and wrong in line
    assert not (tmp_path / "ml-1m" / "raw" / "movies.dat").exists()
    assert not (tmp_path / "ml-1m" / "SHA256SUMS").exists()  # never marked complete


def test_local_corruption_found_on_rerun(server, ml1m, tmp_path, capsys):
    args = ("ml-1m", "--data-dir", tmp_path, "--base-url", server.url)
    assert run(capsys, *args)[0] == 0
    train = tmp_path / "ml-1m" / "ml-1m.train.rating"  # no published hash: SHA256SUMS guards it
    train.write_bytes(TRAIN[:-5])
    rc, _, err = run(capsys, *args)
    assert rc == 1 and "ml-1m.train.rating" in assert_one_line_error(err)
    assert not train.exists()
    rc, _, err = run(capsys, *args)  # the next run fetches it again
    assert rc == 0, err
    assert train.read_bytes() == TRAIN


# -----------------------------------------------------------------------------
# resume and network failures


def test_resume_from_part_uses_range(server, ml1m, tmp_path, capsys):
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "ml-1m.train.rating.part").write_bytes(TRAIN[:123])
    rc, _, err = run(capsys, "ml-1m", "--data-dir", tmp_path, "--base-url", server.url)
    assert rc == 0, err
    assert ("ml-1m.train.rating", "bytes=123-") in server.requests
    assert (root / "ml-1m.train.rating").read_bytes() == TRAIN
    assert not (root / "ml-1m.train.rating.part").exists()


def test_dropped_connection_keeps_part_then_resumes(server, ml1m, tmp_path, capsys):
    server.cut["ml-1m.zip"] = 100
    args = ("ml-1m", "--data-dir", tmp_path, "--base-url", server.url)
    rc, _, err = run(capsys, *args)
    assert rc == 1
    line = assert_one_line_error(err)
    assert "ml-1m.zip" in line and "rerun to resume" in line
    part = tmp_path / "ml-1m" / "ml-1m.zip.part"
    assert part.stat().st_size == 100
    rc, _, err = run(capsys, *args)
    assert rc == 0, err
    assert server.requests[-1] == ("ml-1m.zip", "bytes=100-")
    assert (tmp_path / "ml-1m" / "raw" / "ncf_item_map.tsv").read_text() == ITEM_MAP


def test_read_timeout_keeps_part(server, ml1m, tmp_path, capsys):
    server.stall["ml-1m.train.rating"] = 50
    args = ("ml-1m", "--data-dir", tmp_path, "--base-url", server.url, "--timeout", "0.5")
    rc, _, err = run(capsys, *args)
    assert rc == 1
    assert "timed out" in assert_one_line_error(err)
    assert (tmp_path / "ml-1m" / "ml-1m.train.rating.part").read_bytes() == TRAIN[:50]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (server.root / "f.bin").write_bytes(b"abcdefghij" * 10)
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(b"abcXX")  # would corrupt the file if appended to
    dl.fetch(f"{server.url}/f.bin", dest)
    assert dest.read_bytes() == b"abcdefghij" * 10


def test_complete_part_and_416(server, tmp_path):
    (server.root / "f.bin").write_bytes(b"0123456789")
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(b"0123456789")
    dl.fetch(f"{server.url}/f.bin", dest, sha256=sha(b"0123456789"))
    assert dest.read_bytes() == b"0123456789" and server.requests == [("f.bin", "bytes=10-")]


def test_server_down_one_line_error(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = run(
        capsys, "ml-100k", "--data-dir", tmp_path, "--base-url", f"http://127.0.0.1:{port}"
    )
    assert rc == 1
    line = assert_one_line_error(err)
    assert f"127.0.0.1:{port}/ml-100k.zip" in line and "refused" in line.lower()


def test_http_404_one_line_error(server, tmp_path, capsys):
    rc, _, err = run(capsys, "pinterest-20", "--data-dir", tmp_path, "--base-url", server.url)
    assert rc == 1 and "HTTP 404" in assert_one_line_error(err)


def test_bad_zip_is_deleted(server, tmp_path, capsys):
    (server.root / "ml-100k.zip").write_bytes(b"<html>not a zip</html>")
    rc, _, err = run(capsys, "ml-100k", "--data-dir", tmp_path, "--base-url", server.url)
    assert rc == 1 and "not a valid zip" in assert_one_line_error(err)
    assert not (tmp_path / "ml-100k" / "ml-100k.zip").exists()


def test_unknown_name_exit_2_one_line():
    # a real process: proves there is no traceback and the exit status is 2
    p = subprocess.run(
        [sys.executable, "-m", "training.download", "ml-3m"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert p.returncode == 2 and p.stdout == ""
    line = assert_one_line_error(p.stderr)
    assert "ml-3m" in line and all(name in line for name in dl.NAMES)


# -----------------------------------------------------------------------------
# the NCF item map


def test_derive_item_map_first_appearance(tmp_path):
    src = tmp_path / "ratings.dat"
    src.write_text(RATINGS_DAT)
    assert dl.derive_item_map(src, tmp_path / "map.tsv") == 4
    assert (tmp_path / "map.tsv").read_text() == ITEM_MAP


REFERENCE = Path(os.environ.get("NCF_REFERENCE_DATA", "/work/shared/data"))


@pytest.mark.skipif(
    not (REFERENCE / "ml-1m/raw/ncf_item_map.tsv").exists(), reason="no reference ml-1m"
)
def test_derive_item_map_matches_published_hash(tmp_path):
    """A ratings.dat whose movies first appear in the published map's order gives its bytes."""
    import numpy as np

    movie = np.loadtxt(REFERENCE / "ml-1m/raw/ncf_item_map.tsv", dtype=np.int64, usecols=1)
    rng = np.random.default_rng(0)
    repeats = rng.choice(movie, size=3 * len(movie))  # later re-ratings must not change the order
    seq = np.concatenate([movie[:10], movie[:5], movie[10:], repeats])
    lines = "".join(f"{i % 6040 + 1}::{m}::4::97830{i:04d}\n" for i, m in enumerate(seq.tolist()))
    (tmp_path / "ratings.dat").write_text(lines)
    dl.derive_item_map(tmp_path / "ratings.dat", tmp_path / "map.tsv")
    assert (
        sha((tmp_path / "map.tsv").read_bytes())
        == dl.DATASETS["ml-1m"].sha256["raw/ncf_item_map.tsv"]
    )


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="no reference data")
def test_published_hashes_match_reference_copies():
    """Guards the registry against typos: the reference copies are the published files."""
    for ds in dl.DATASETS.values():
        for rel, digest in ds.sha256.items():
            path = REFERENCE / ds.name / rel
            if path.exists():
                assert sha(path.read_bytes()) == digest, path
