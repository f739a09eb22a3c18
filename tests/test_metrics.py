import math

import numpy as np
import pytest
import torch

from model.ncf import NCF, ModelConfig
from training.data import Interactions
from training.metrics import Evaluator, full_ranking_metrics, hit_ndcg, ranks_among


def test_hit_ndcg_by_hand():
    ranks = torch.tensor([0, 1, 9, 10, 50])
    hr, ndcg = hit_ndcg(ranks, 10)
    assert hr == pytest.approx(3 / 5)
    assert ndcg == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)


def test_ties_count_against_the_target_but_its_own_duplicate_does_not():
    target = torch.tensor([0.5, 0.5])
    candidates = torch.tensor([[0.9, 0.5, 0.1], [0.5, 0.5, 0.1]])
    is_target = torch.tensor([[False, False, False], [True, False, False]])
    assert ranks_among(target, candidates, is_target).tolist() == [2, 1]


def test_nan_scores_count_against_the_target():
    nan = float("nan")
    target = torch.tensor([nan, 0.5, 0.5])
    candidates = torch.tensor([[0.9, 0.1, 0.2], [nan, 0.1, 0.2], [0.1, 0.2, 0.3]])
    is_target = torch.tensor([[True, False, False], [False, False, False], [False] * 3])
    assert ranks_among(target, candidates, is_target).tolist() == [2, 1, 0]


def test_diverged_model_scores_zero_not_one():
    data = tiny_dataset()
    metrics = Evaluator(data, k=2).metrics(lambda u, i: torch.full((len(u),), float("nan")))
    assert metrics == {"hr@2": 0.0, "ndcg@2": 0.0}


def tiny_dataset():
    # 3 users, 6 items; each ranked against 3 negatives
    return Interactions(
        name="tiny",
        num_users=3,
        num_items=6,
        train_users=np.array([0, 0, 1, 2, 2, 2]),
        train_items=np.array([0, 1, 0, 0, 1, 2]),
        test_users=np.array([0, 1, 2]),
        test_items=np.array([2, 5, 3]),
        test_negatives=np.array([[3, 4, 5], [1, 2, 3], [4, 5, 5]]),
        user_ids=np.arange(3),
        item_ids=np.arange(6),
    )


def test_evaluator_with_a_known_scorer():
    data = tiny_dataset()
    evaluator = Evaluator(data, k=2)
    table = torch.tensor(
        [
            [0, 0, 0.9, 0.95, 0.1, 0.2],  # user 0: target 2 is second -> rank 1
            [0, 0.8, 0.7, 0.6, 0, 0.5],  # user 1: target 5 below 1, 2, 3 -> rank 3
            [0, 0, 0, 0.9, 0.1, 0.2],
        ]  # user 2: top -> rank 0
    )
    assert evaluator.ranks(lambda u, i: table[u, i]).tolist() == [1, 3, 0]
    metrics = evaluator.metrics(lambda u, i: table[u, i])
    assert metrics["hr@2"] == pytest.approx(2 / 3)
    assert metrics["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)


def test_constant_model_scores_zero_not_one():
    data = tiny_dataset()
    metrics = Evaluator(data, k=2).metrics(lambda u, i: torch.zeros(len(u)))
    assert metrics == {"hr@2": 0.0, "ndcg@2": 0.0}


def test_popularity_baseline():
    data = tiny_dataset()  # item counts: 0 -> 3, 1 -> 2, 2 -> 1, others 0
    metrics = Evaluator(data, k=1).popularity_metrics()
    # user 0: target 2 (count 1) beats 3, 4, 5 (0): hit. user 1: target 5 (0) under 1 (2): miss.
    # user 2: target 3 (0) ties with 4 and 5: ties count against it, miss.
    assert metrics["hr@1"] == pytest.approx(1 / 3)


def test_full_ranking_matches_brute_force():
    data = tiny_dataset()
    torch.manual_seed(0)
    model = NCF(ModelConfig("gmf", 3, 6, factors=4))
    k = 2
    scores = torch.sigmoid(
        model(torch.arange(3).repeat_interleave(6), torch.arange(6).repeat(3))
    ).view(3, 6)
    expected_hits, expected_ndcg = [], []
    for u, target in zip(data.test_users, data.test_items, strict=True):
        seen = set(data.train_items[data.train_users == u].tolist())
        others = [i for i in range(6) if i not in seen and i != target]
        rank = sum(scores[u, i] >= scores[u, target] for i in others)
        expected_hits.append(rank < k)
        expected_ndcg.append(1 / math.log2(rank + 2) if rank < k else 0)
    metrics = full_ranking_metrics(model, data, k=k, users_per_chunk=2)
    assert metrics["hr@2"] == pytest.approx(np.mean(expected_hits))
    assert metrics["ndcg@2"] == pytest.approx(np.mean(expected_ndcg))
