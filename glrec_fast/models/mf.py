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

    def row_tables(self):
        return [self.user, self.item]

    def batch_embeddings(self, users, pos, negs):
        # Gather only the batch rows (no need to materialise the full tables).
        return self.rows(self.user, users), self.rows(self.item, pos), self.rows(self.item, negs)

    def forward(self, users, pos, neg):
        u, p, n = self.batch_embeddings(users, pos, neg)
        reg = (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / (2 * users.numel())
        return (u * p).sum(-1), (u * n).sum(-1), reg

    def ego_params(self, users, pos, neg):
        return list(self.batch_embeddings(users, pos, neg))

    @torch.no_grad()
    def init_spectral(self, user, item, std):
        scale = std / torch.cat([user, item]).std().clamp(min=1e-12)
        self.user.weight.copy_(user * scale)
        self.item.weight.copy_(item * scale)
