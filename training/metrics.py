"""HR@K and NDCG@K in the NCF protocol, vectorised over all test users at once.

The held-out item's rank is the number of its candidates scored above it. Ties count
against it, as in the reference code (heapq.nlargest puts the earlier negatives first),
so a constant model scores HR 0, not 1. A NaN score counts against the held-out item too
(a diverged model scores HR 0, not 1: NaN compares false with everything). A negative list
that contains the held-out item itself (156 lines of the published ml-1m file) is not
counted against it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from training.data import Interactions


def hit_ndcg(ranks: torch.Tensor, k: int) -> tuple[float, float]:
    """Mean HR@k and NDCG@k from 0-based ranks (rank 0 = top)."""
    ranks = ranks.double()
    hit = ranks < k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
    return hit.double().mean().item(), ndcg.mean().item()


def ranks_among(target_scores, candidate_scores, candidate_is_target) -> torch.Tensor:
    target_scores = target_scores[:, None]
    above = candidate_scores > target_scores
    unordered = candidate_scores.isnan() | target_scores.isnan()
    tied = ((candidate_scores == target_scores) | unordered) & ~candidate_is_target
    return (above | tied).sum(dim=1)


class Evaluator:
    """Keeps the test set on the device, so evaluating every epoch costs only the forward."""

    def __init__(self, data: Interactions, device="cpu", k: int = 10, chunk_pairs: int = 1 << 20):
        self.data, self.k, self.device = data, k, torch.device(device)
        self.users = torch.tensor(data.test_users, device=self.device)
        self.targets = torch.tensor(data.test_items, device=self.device)
        self.negatives = torch.tensor(data.test_negatives, device=self.device)
        self.negative_is_target = self.negatives == self.targets[:, None]
        self.rows_per_chunk = max(1, chunk_pairs // (self.negatives.shape[1] + 1))

    @torch.no_grad()
    def ranks(self, score_fn) -> torch.Tensor:
        """score_fn(users (n,), items (n,)) -> scores (n,)."""
        out = []
        for start in range(0, len(self.users), self.rows_per_chunk):
            rows = slice(start, start + self.rows_per_chunk)
            items = torch.cat([self.targets[rows, None], self.negatives[rows]], dim=1)
            users = self.users[rows, None].expand_as(items)
            scores = score_fn(users.reshape(-1), items.reshape(-1)).float().view(items.shape)
            out.append(ranks_among(scores[:, 0], scores[:, 1:], self.negative_is_target[rows]))
        return torch.cat(out)

    def metrics(self, score_fn) -> dict:
        hr, ndcg = hit_ndcg(self.ranks(score_fn), self.k)
        return {f"hr@{self.k}": hr, f"ndcg@{self.k}": ndcg}

    def model_metrics(self, model) -> dict:
        was_training = model.training
        model.eval()
        try:
            return self.metrics(model)
        finally:
            model.train(was_training)

    def popularity_metrics(self) -> dict:
        """The baseline every model must beat: rank items by training interactions."""
        counts = np.bincount(self.data.train_items, minlength=self.data.num_items)
        popularity = torch.as_tensor(counts, dtype=torch.float32, device=self.device)
        return self.metrics(lambda users, items: popularity[items])


@torch.no_grad()
def full_ranking_metrics(model, data: Interactions, k: int = 10, device="cpu", users_per_chunk=256):
    """Rank each held-out item against every item the user has not trained on."""
    device = torch.device(device)
    model.eval()
    catalog = data.catalog()
    indptr = torch.as_tensor(catalog.seen_indptr, device=device)
    seen = torch.as_tensor(catalog.seen_items, device=device)
    all_items = torch.arange(data.num_items, device=device)
    test_users = torch.as_tensor(data.test_users, device=device)
    test_items = torch.as_tensor(data.test_items, device=device)
    ranks = []
    for start in range(0, len(test_users), users_per_chunk):
        users, targets = (
            test_users[start : start + users_per_chunk],
            test_items[start : start + users_per_chunk],
        )
        n = len(users)
        scores = (
            model(users.repeat_interleave(data.num_items), all_items.repeat(n)).float().view(n, -1)
        )
        # Training items are not candidates: mask them below everything.
        lengths = indptr[users + 1] - indptr[users]
        rows = torch.arange(n, device=device).repeat_interleave(lengths)
        starts = indptr[users].repeat_interleave(lengths)
        offsets = torch.arange(len(rows), device=device) - (
            torch.cumsum(lengths, 0) - lengths
        ).repeat_interleave(lengths)
        scores[rows, seen[starts + offsets]] = -math.inf
        target_scores = scores.gather(1, targets[:, None]).squeeze(1)
        is_target = all_items[None, :] == targets[:, None]
        ranks.append(ranks_among(target_scores, scores, is_target))
    hr, ndcg = hit_ndcg(torch.cat(ranks), k)
    return {f"hr@{k}": hr, f"ndcg@{k}": ndcg}
