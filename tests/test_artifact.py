import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_torch

from model.artifact import ArtifactError, Catalog, load_artifact, save_artifact
from model.ncf import NCF, ModelConfig


@pytest.fixture
def saved(tmp_path, demo_data):
    torch.manual_seed(0)
    model = NCF(ModelConfig("neumf", demo_data.num_users, demo_data.num_items))
    path = save_artifact(
        tmp_path / "art", model, demo_data.catalog(), {"name": "neumf", "metrics": {"hr@10": 0.5}}
    )
    return path, model, demo_data


def test_round_trip(saved):
    path, model, data = saved
    artifact = load_artifact(path)
    users, items = torch.arange(50), torch.arange(50)
    torch.testing.assert_close(artifact.model(users, items), model(users, items), rtol=0, atol=0)
    catalog = artifact.catalog
    np.testing.assert_array_equal(catalog.user_ids, data.user_ids)
    np.testing.assert_array_equal(catalog.item_ids, data.item_ids)
    assert catalog.item_titles == data.item_titles
    user = int(data.train_users[0])
    assert set(catalog.seen(user).tolist()) == set(
        data.train_items[data.train_users == user].tolist()
    )
    np.testing.assert_array_equal(
        catalog.item_popularity, np.bincount(data.train_items, minlength=data.num_items)
    )
    meta = artifact.metadata
    assert meta["model"]["kind"] == "neumf" and meta["metrics"]["hr@10"] == 0.5
    assert {"torch", "numpy"} <= set(meta["versions"]) and meta["created"] and artifact.version
    assert set(meta["files"]) == {"model.safetensors", "catalog.safetensors", "item_titles.json"}


def test_overwrite_is_atomic_and_leaves_no_staging(saved):
    path, model, data = saved
    save_artifact(path, model, data.catalog(), {"name": "again"})
    assert load_artifact(path).metadata["name"] == "again"
    assert [p.name for p in path.parent.iterdir()] == ["art"]


def test_corrupted_weights_are_refused(saved):
    path, _, _ = saved
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_artifact(path)


def test_non_finite_weights_are_refused(saved, tmp_path):
    path, model, data = saved
    model.predict.bias.data.fill_(float("nan"))
    with pytest.raises(ArtifactError, match="non-finite .* predict.bias"):
        save_artifact(tmp_path / "nan", model, data.catalog(), {})
    assert not [p.name for p in tmp_path.iterdir() if "nan" in p.name]  # nor a staging folder
    # Written by other means; verify=False skips the hashes, so only the check stops it.
    save_torch(
        {k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors"
    )
    with pytest.raises(ArtifactError, match="non-finite"):
        load_artifact(path, verify=False)


def test_missing_file_and_bad_metadata_are_refused(saved, tmp_path):
    path, _, _ = saved
    with pytest.raises(ArtifactError, match="no such artifact"):
        load_artifact(tmp_path / "nowhere")
    (path / "item_titles.json").unlink()
    with pytest.raises(ArtifactError, match="item_titles.json is missing"):
        load_artifact(path)
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(path)


def test_mismatched_metadata_is_refused(saved):
    path, _, _ = saved
    meta = json.loads((path / "metadata.json").read_text())
    meta["model"]["num_items"] += 1
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="cannot load artifact"):
        load_artifact(path)
    meta["format_version"] = 99
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format 99"):
        load_artifact(path)


def test_catalog_must_fit_the_model(tmp_path):
    model = NCF(ModelConfig("gmf", 3, 4))
    catalog = Catalog.from_interactions(np.arange(3), np.arange(5), np.array([0]), np.array([1]))
    with pytest.raises(ArtifactError, match="5 item ids for 4 items"):
        save_artifact(tmp_path / "a", model, catalog, {})
    assert not (tmp_path / "a").exists()
