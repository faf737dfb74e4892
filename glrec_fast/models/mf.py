"""Matrix factorisation trained with BPR: the baseline every graph model must beat."""
from __future__ import annotations

import torch
from torch import nn

from .base import Recommender


class MF(Recommender):
    def __init__(self, num_users: int, num_items: int, dim: int = 64, init_std: float = 0.1):
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)

    def embeddings(self):
        return self.user.weight, self.item.weight

    def forward(self, users, pos, neg):
        # Gather only the batch rows (no need to materialise the full tables).
        u, p, n = self.user(users), self.item(pos), self.item(neg)
        reg = (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / (2 * users.numel())
        return (u * p).sum(-1), (u * n).sum(-1), reg
