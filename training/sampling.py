"""Negative sampling for an epoch: a handful of tensor operations, on the training device.

Negatives are drawn uniformly over all items and those that hit a positive are redrawn;
a positive is recognised by binary search of its (user * num_items + item) key in the
sorted keys of all training pairs. Rejection keeps the draw exactly uniform over each
user's unseen items, and with ~5% density few rounds are needed.
"""

from __future__ import annotations

import torch

MAX_ROUNDS = 1000


class NegativeSampler:
    def __init__(self, users: torch.Tensor, items: torch.Tensor, num_items: int):
        self.users, self.items, self.num_items = users, items, num_items
        self.keys = torch.sort(users * num_items + items).values

    def is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = users * self.num_items + items
        position = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        return self.keys[position] == keys

    def sample(self, users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One item per entry of `users`, uniform among the items that user has not seen."""
        items = torch.randint(self.num_items, users.shape, generator=generator, device=users.device)
        redraw = torch.arange(len(users), device=users.device)
        for _ in range(MAX_ROUNDS):
            redraw = redraw[self.is_positive(users[redraw], items[redraw])]
            if len(redraw) == 0:
                return items
            items[redraw] = torch.randint(
                self.num_items, redraw.shape, generator=generator, device=users.device
            )
        raise RuntimeError(
            "negative sampling did not converge: some user has seen (almost) every item"
        )

    def epoch(self, negatives: int, generator: torch.Generator):
        """Shuffled (users, items, labels) of all positives plus `negatives` negatives each."""
        negative_users = self.users.repeat(negatives)
        negative_items = self.sample(negative_users, generator)
        users = torch.cat([self.users, negative_users])
        items = torch.cat([self.items, negative_items])
        labels = torch.zeros(len(users), device=users.device)
        labels[: len(self.users)] = 1.0
        order = torch.randperm(len(users), generator=generator, device=users.device)
        return users[order], items[order], labels[order]
