"""Pack an artifact into model-store/ncf.mar with the real torch-model-archiver.

    python -m archive.build [--artifact artifacts/demo-neumf-pre] [--out model-store]

The .mar holds ncf_handler.py (the handler), the `handler` and `model` packages it imports,
artifact/ (model.safetensors, catalog.safetensors, item_titles.json, metadata.json; nothing
else that may lie in the artifact folder) and archive/model-config.yaml. Its version is
the artifact's version.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from handler import ARTIFACT_DIR
from model.artifact import (
    CATALOG_FILE,
    METADATA_FILE,
    TITLES_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    load_artifact,
    read_metadata,
)

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "ncf"
HANDLER = REPO / "handler" / "ncf_handler.py"
MODEL_CONFIG = REPO / "archive" / "model-config.yaml"
PACKAGES = ("handler", "model")  # imported by the handler inside the extracted .mar
ARTIFACT_FILES = (WEIGHTS_FILE, CATALOG_FILE, TITLES_FILE, METADATA_FILE)
DEFAULT_ARTIFACT = REPO / "artifacts" / "demo-neumf-pre"


def archiver() -> str:
    # The venv's own archiver first: the one matching the TorchServe that will serve it.
    found = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent))
    found = found or shutil.which("torch-model-archiver")
    if found is None:
        raise FileNotFoundError("torch-model-archiver not found; run `make install`")
    return found


def stage(artifact: Path, staging: Path) -> None:
    """Lay out the extra files: the archiver copies a folder's contents to the .mar's root."""
    for package in PACKAGES:
        (staging / package).mkdir(parents=True)
        for source in sorted((REPO / package).glob("*.py")):
            shutil.copy2(source, staging / package / source.name)
    (staging / ARTIFACT_DIR).mkdir()
    for name in ARTIFACT_FILES:
        if (artifact / name).is_file():  # item_titles.json is optional
            shutil.copy2(artifact / name, staging / ARTIFACT_DIR / name)


def model_config_with(changes: dict, out: Path) -> Path:
    """archive/model-config.yaml with `changes` applied (a nested dict changes its section
    key by key), written to `out`: for a .mar that differs from the shipped one in a few
    settings only."""
    config = yaml.safe_load(MODEL_CONFIG.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    out.write_text(yaml.safe_dump(config))
    return out


def run_archiver(
    name: str, version: str, handler: Path, model_config: Path, out: Path, extra: Path | None = None
) -> Path:
    """torch-model-archiver: out/<name>.mar (replacing an older one); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-mar-") as scratch:
        # The archiver assembles the archive in $TMPDIR/<model name> and deletes whatever is
        # there first: a private TMPDIR keeps concurrent builds from clobbering each other.
        command = [
            archiver(),
            "--model-name", name,
            "--version", version,
            "--handler", str(handler),
            "--config-file", str(model_config),
            "--export-path", str(out),
            "--force",
        ]  # fmt: skip
        if extra is not None:
            command += ["--extra-files", str(extra)]
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": scratch})
    return out / f"{name}.mar"


def build(artifact: Path, out: Path, model_config: Path = MODEL_CONFIG) -> Path:
    """Write out/ncf.mar from `artifact` (replacing an older one) and return its path."""
    # Load it fully (hashes checked) so that a broken artifact fails here, not in a worker.
    version = load_artifact(artifact).version
    with tempfile.TemporaryDirectory(prefix="ncf-files-") as staging:
        stage(artifact, Path(staging))
        return run_archiver(MODEL_NAME, version, HANDLER, model_config, out, Path(staging))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT, help="artifact folder")
    p.add_argument("--out", type=Path, default=REPO / "model-store", help="model store folder")
    args = p.parse_args(argv)
    try:
        mar = build(args.artifact, args.out)
    except (ArtifactError, FileNotFoundError, subprocess.CalledProcessError) as error:
        print(f"archive.build: {error}", file=sys.stderr)
        return 1
    version = read_metadata(args.artifact)["version"]
    print(f"{mar} ({mar.stat().st_size / 1e6:.1f} MB, version {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
