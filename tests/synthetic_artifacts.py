"""Small artifacts with random weights for the recommender and handler tests (no training)."""

import numpy as np
import torch

from model.artifact import Artifact, Catalog
from model.ncf import NCF, ModelConfig

NUM_USERS, NUM_ITEMS = 40, 300


def make_artifact(kind: str, seed: int = 0, titles: bool = True) -> Artifact:
    generator = torch.Generator().manual_seed(seed)
    model = NCF(ModelConfig(kind, NUM_USERS, NUM_ITEMS, factors=8, layers=[16, 12, 8]))
    # Wide weights: the paper's N(0, 0.01) initialisation leaves every score at ~0.5, where
    # comparing rankings would compare float noise.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.7)
    model.eval()
    rng = np.random.default_rng(seed)
    # Raw ids unlike the indices, and unsorted: lookups must map them, not assume them.
    user_ids = rng.permutation(NUM_USERS) * 7 + 1000
    item_ids = rng.permutation(NUM_ITEMS) * 3 + 5
    train_users = np.repeat(np.arange(NUM_USERS), 30)
    train_items = np.concatenate([rng.choice(NUM_ITEMS, 30, replace=False) for _ in user_ids])
    catalog = Catalog.from_interactions(
        user_ids,
        item_ids,
        train_users,
        train_items,
        [f"Item {i}" for i in item_ids] if titles else None,
    )
    return Artifact(path=None, model=model, catalog=catalog, metadata={"version": "v-test"})
