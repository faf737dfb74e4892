"""LightGCN (He et al., 2020): the mean of K rounds of symmetric-normalised propagation.

Propagation goes through ``glrec_fast.ops.propagate`` (fused C++ on CPU, Triton on CUDA, reference
elsewhere), which also provides the backward pass. As in the paper's code, the whole graph is
propagated for every batch, so the op's speed is the training speed.

``propagate_dtype="bfloat16"`` runs the propagation (forward and backward) on bfloat16 copies of the
table: the op keeps its layer tables in bfloat16 and sums in float32, so every gathered row is half
the bytes (bench/RESULTS.md, "Fair kernel baselines"); parameters and optimiser stay float32.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import Recommender


class LightGCN(Recommender):
    PROPAGATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def __init__(self, graph, dim: int = 64, num_layers: int = 3, init_std: float = 0.1,
                 propagate_dtype: str = "float32"):
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers: expected >= 0, got {num_layers}")
        if propagate_dtype not in self.PROPAGATE_DTYPES:
            raise ValueError(f"propagate_dtype: expected one of {list(self.PROPAGATE_DTYPES)}, got {propagate_dtype!r}")
        self.propagate_dtype = self.PROPAGATE_DTYPES[propagate_dtype]
        self.graph = graph
        self.num_users, self.num_items = graph.num_users, graph.num_items
        self.num_layers = num_layers
        self.ego = nn.Embedding(graph.num_nodes, dim)  # users first, then items
        nn.init.normal_(self.ego.weight, std=init_std)

    def propagated(self) -> torch.Tensor:
        w = self.ego.weight
        if self.propagate_dtype == w.dtype:
            return ops.propagate(self.graph, w, self.num_layers)
        return ops.propagate(self.graph, w.to(self.propagate_dtype), self.num_layers).to(w.dtype)

    def embeddings(self):
        out = self.propagated()
        return out[: self.num_users], out[self.num_users:]

    def ego_params(self, users, pos, neg):
        return [self.rows(self.ego, users), self.rows(self.ego, self.num_users + pos),
                self.rows(self.ego, self.num_users + neg)]
