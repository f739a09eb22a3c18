import numpy as np
import torch

from training.sampling import NegativeSampler


def sampler_for(pairs, num_items):
    users = torch.tensor([u for u, _ in pairs])
    items = torch.tensor([i for _, i in pairs])
    return NegativeSampler(users, items, num_items)


def test_negatives_are_never_positives(demo_data):
    sampler = NegativeSampler(
        torch.as_tensor(demo_data.train_users),
        torch.as_tensor(demo_data.train_items),
        demo_data.num_items,
    )
    users, items, labels = sampler.epoch(4, torch.Generator().manual_seed(0))
    assert len(users) == 5 * len(demo_data.train_users)
    assert labels.sum().item() == len(demo_data.train_users)
    positives = set(
        zip(demo_data.train_users.tolist(), demo_data.train_items.tolist(), strict=True)
    )
    negatives = zip(users[labels == 0].tolist(), items[labels == 0].tolist(), strict=True)
    assert not any(pair in positives for pair in negatives)
    # the positives are all there, shuffled in
    assert (
        set(zip(users[labels == 1].tolist(), items[labels == 1].tolist(), strict=True)) == positives
    )
    assert not torch.equal(
        labels[: len(demo_data.train_users)], torch.ones(len(demo_data.train_users))
    )


def test_negatives_are_uniform_over_unseen_items():
    # user 0 saw items 0..4 of 20; user 1 saw 19 of 20
    sampler = sampler_for([(0, i) for i in range(5)] + [(1, i) for i in range(19)], 20)
    draws = sampler.sample(torch.zeros(150_000, dtype=torch.long), torch.Generator().manual_seed(1))
    counts = np.bincount(draws.numpy(), minlength=20)
    assert counts[:5].sum() == 0
    expected = 150_000 / 15
    chi2 = ((counts[5:] - expected) ** 2 / expected).sum()
    assert chi2 < 36.1, chi2  # 14 dof, p = 0.001
    only_choice = sampler.sample(
        torch.ones(1000, dtype=torch.long), torch.Generator().manual_seed(2)
    )
    assert (only_choice == 19).all()


def test_sampling_is_deterministic_for_a_seed(demo_data):
    sampler = NegativeSampler(
        torch.as_tensor(demo_data.train_users),
        torch.as_tensor(demo_data.train_items),
        demo_data.num_items,
    )
    a = sampler.epoch(2, torch.Generator().manual_seed(5))
    b = sampler.epoch(2, torch.Generator().manual_seed(5))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
