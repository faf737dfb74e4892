"""TextKNN: a training-free language branch, item-to-item neighbours in the LM's embedding space.

    score(u, i) = sum over u's training items j of  s(j, i),
    s(j, i)     = max(0, cos(c_j, c_i)) ** power   if i is among j's ``neighbours`` nearest items, else 0

with ``c`` the frozen item text vectors (MiniLM / Qwen, ``glrec_fast.text``). Item j itself is never
its own neighbour. A cold item (no training interaction) is scored like any other: it is reached
from the warm items it resembles. A user without training items scores every item 0.

``fit()`` is one pass of chunked ``[chunk, I]`` cosine products and a top-k per row: ``I^2 d`` work,
``I x neighbours`` memory (never an ``I x I`` matrix). Scoring a batch of users adds each of their
training items' ``neighbours`` weights into the users' rows: ``nnz(batch) x neighbours``
scatter-adds. Nothing is trained, so the branch is ready in seconds.

Why it replaced the trained content model as the score hybrid's text branch (bench/RESULTS.md,
"A training-free text branch"): on amazon-beauty it ranks better alone than the BPR-trained
projector of the same vectors, the truncation to a few neighbours helps (it drops the long tail of
weak similarities), and mixed with the GF-CF filter it is at least as good on the random split and
clearly better on the cold split, where every hybrid's cold items are ranked by the text branch.
``reference.text_knn_dense`` is the dense ground truth for tests.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class TextKNN(nn.Module):
    """See the module docstring. ``content``: [num_items, d] item text vectors."""

    trainable = False
    fresh_tiles = True

    def __init__(self, graph, content: torch.Tensor, neighbours: int = 20, power: float = 2.0, chunk: int = 2048):
        super().__init__()
        content = torch.as_tensor(content, dtype=torch.float32)
        if content.dim() != 2 or content.size(0) != graph.num_items:
            raise ValueError(f"content: expected [num_items={graph.num_items}, content_dim], got {tuple(content.shape)}")
        if not torch.isfinite(content).all():
            raise ValueError("content: contains NaN or infinite values")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"text_neighbours: expected an int >= 1, got {neighbours!r}")
        if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
            raise ValueError(f"text_power: expected a finite number > 0, got {power!r}")
        self.graph = graph.to("cpu")
        self.num_users, self.num_items = graph.num_users, graph.num_items
        self.neighbours, self.power, self.chunk = neighbours, float(power), int(chunk)
        self.hparams = {"neighbours": neighbours, "power": float(power)}
        self.register_buffer("content", content)
        self.register_buffer("nbr_idx", torch.zeros(0, 0, dtype=torch.long))   # [I, k] neighbour ids
        self.register_buffer("nbr_val", torch.zeros(0, 0))                     # [I, k] their weights s(j, i)
        self._fitted = False

    @torch.no_grad()
    def fit(self) -> "TextKNN":
        c = torch.nn.functional.normalize(self.content, dim=1)   # a zero vector stays zero: cosine 0
        n = self.num_items
        k = min(self.neighbours, n - 1)
        idx = torch.empty(n, k, dtype=torch.long, device=c.device)
        val = torch.empty(n, k, device=c.device)
        for s in range(0, n, self.chunk):
            sim = c[s:s + self.chunk] @ c.T
            rows = torch.arange(sim.size(0), device=c.device)
            sim[rows, rows + s] = -math.inf          # an item is not its own neighbour
            v, i = torch.topk(sim, k, dim=1)
            idx[s:s + self.chunk], val[s:s + self.chunk] = i, v.clamp_(min=0).pow_(self.power)
        self.nbr_idx, self.nbr_val = idx, val
        self._fitted = True
        return self

    @torch.no_grad()
    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """[len(users), I] scores (module docstring), on the device of the fitted neighbour table."""
        if not self._fitted:
            raise RuntimeError("TextKNN: call fit() before scoring")
        from ..metrics import csr_rows
        g = self.graph
        row, col = csr_rows(g.user_rowptr, g.user_col, users.cpu())
        dev = self.nbr_idx.device
        row, col = row.to(dev), col.to(dev)
        out = torch.zeros(users.numel(), self.num_items, device=dev)
        flat = (row.unsqueeze(1) * self.num_items + self.nbr_idx[col]).reshape(-1)
        out.view(-1).index_add_(0, flat, self.nbr_val[col].reshape(-1))
        return out

    def scorer(self):
        return _KNNScorer(self)

    def export(self) -> dict:
        """What ranking needs without refitting (the neighbour table, not the text vectors)."""
        return {"text_knn": dict(self.hparams), "nbr_idx": self.nbr_idx.cpu(), "nbr_val": self.nbr_val.cpu()}

    @classmethod
    def from_export(cls, graph, ex: dict) -> "TextKNN":
        idx, val = ex["nbr_idx"], ex["nbr_val"]
        if idx.dim() != 2 or idx.shape != val.shape or idx.size(0) != graph.num_items:
            raise ValueError(f"text_knn export: expected neighbour tables [num_items={graph.num_items}, k], got "
                             f"{tuple(idx.shape)} and {tuple(val.shape)}")
        m = cls(graph, torch.zeros(graph.num_items, 1), **ex["text_knn"])
        m.nbr_idx, m.nbr_val = idx.to(torch.long), val.to(torch.float32)
        m._fitted = True
        return m


class _KNNScorer:
    """``users -> scores`` of a fitted TextKNN (every call builds a new tile)."""
    fresh_tiles = True

    def __init__(self, model: TextKNN):
        self.model = model

    def __call__(self, users):
        return self.model.scores(users)


def build(cfg: dict, ds, graph, device) -> TextKNN:
    """The fitted text branch of ``--fusion score --text_branch knn`` (item text encoded, cached)."""
    from .hybrid import item_content
    return TextKNN(graph, item_content(cfg, ds, device), neighbours=cfg["text_neighbours"],
                   power=cfg["text_power"]).to(device).fit()
