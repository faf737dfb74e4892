"""What every recommender in glrec_fast exposes, so train.py, metrics and recommend() treat them alike."""
from __future__ import annotations

import torch
from torch import nn


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: -log sigmoid(s_pos - s_neg), averaged over the batch."""
    return -torch.nn.functional.logsigmoid(pos_scores - neg_scores).mean()


class Recommender(nn.Module):
    """A model scored by the inner product of final user and item embeddings.

    Subclasses implement ``embeddings() -> (user_emb [U, d], item_emb [I, d])`` (the final,
    propagated/fused vectors, differentiable) and ``ego_params(users, pos, neg)`` (the raw
    parameters the L2 regulariser applies to, as in LightGCN: only the batch's rows).
    """

    num_users: int
    num_items: int
    trainable = True
    cosine = False   # rank by cosine similarity (set when training with the sampled softmax)
    row_sparse = False   # row reads of sparse_tables() give row-sparse gradients (set by train.py with optim.RowAdam)

    def _apply(self, fn, *args, **kwargs):
        # A model that holds a BipartiteGraph (not a parameter or buffer) keeps it on the
        # parameters' device, so .to(device) moves the graph too and its kernels run there.
        out = super()._apply(fn, *args, **kwargs)
        graph = self.__dict__.get("graph")
        p = next(self.parameters(), None)
        if graph is not None and p is not None and graph.device != p.device:
            self.graph = graph.to(p.device)
        return out

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sparse_tables(self) -> list[nn.Embedding]:
        """Tables that every training step reads only row by row (through :meth:`rows`), so that
        their gradients can be row-sparse: the model's ID tables (:meth:`row_tables`) and, beside
        them, the item bias. Full-graph models read whole tables: none."""
        tables = self.row_tables()
        bias = self._modules.get("item_bias")
        return [*tables, bias] if tables and bias is not None else tables

    def row_tables(self) -> list[nn.Embedding]:
        """The ID tables a model reads only row by row (MF, sampled models); see :meth:`sparse_tables`."""
        return []

    def add_item_bias(self, temperature: float) -> None:
        """``--item_bias``: a learned logit offset per item (zeros at first) beside the sampled
        softmax's ``cosine / temperature`` (``losses.sampled_softmax``), where item popularity has
        no other way in. Ranking keeps the logit's order: ``cos(u, i) + temperature * b_i``, an
        inner product once :meth:`export` appends a column to each side."""
        p = next(self.parameters())
        self.item_bias = nn.Embedding(self.num_items, 1, device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.item_bias.weight)
        self.register_buffer("bias_scale", torch.tensor(float(temperature), device=p.device, dtype=p.dtype))

    def rows(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """``table.weight[ids]``; its gradient is row-sparse when ``row_sparse`` is set."""
        return torch.nn.functional.embedding(ids, table.weight, sparse=self.row_sparse)

    def ego_params(self, users, pos, neg) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
        """Scores of BPR triples and the L2 term: ``(pos_scores, neg_scores, reg)``."""
        u_emb, i_emb = self.embeddings()
        u, p, n = u_emb[users], i_emb[pos], i_emb[neg]
        reg = sum(t.pow(2).sum() for t in self.ego_params(users, pos, neg)) / (2 * users.numel())
        return (u * p).sum(-1), (u * n).sum(-1), reg

    def loss(self, users, pos, neg, reg_weight: float) -> tuple[torch.Tensor, dict]:
        ps, ns, reg = self(users, pos, neg)
        bpr = bpr_loss(ps, ns)
        return bpr + reg_weight * reg, {"bpr": bpr.detach(), "reg": reg.detach()}

    def batch_embeddings(self, users, pos, negs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final vectors of a batch's users, positives and negatives (any number of negatives).
        Full-graph models gather rows of ``embeddings()``; sampled models compute them on blocks."""
        u_emb, i_emb = self.embeddings()
        return u_emb[users], i_emb[pos], i_emb[negs]

    def softmax_loss(self, users, pos, negs, temperature: float, reg_weight: float) -> tuple[torch.Tensor, dict]:
        """``losses.sampled_softmax`` of each (user, positive) against the shared negatives ``negs``."""
        from .losses import sampled_softmax
        u, p, n = self.batch_embeddings(users, pos, negs)
        sm = sampled_softmax(u, p, n, pos, negs, temperature, *self.bias_rows(pos, negs))
        reg = sum(t.pow(2).sum() for t in self.ego_params(users, pos, pos[:0])) / (2 * users.numel())
        return sm + reg_weight * reg, {"softmax": sm.detach(), "reg": reg.detach()}

    def bias_rows(self, pos, negs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The item bias of the positives [B] and the shared negatives [N] (``None, None`` without one)."""
        bias = self._modules.get("item_bias")
        if bias is None:
            return None, None
        return self.rows(bias, pos)[:, 0], self.rows(bias, negs)[:, 0]

    @torch.no_grad()
    def init_spectral(self, user: torch.Tensor, item: torch.Tensor, std: float) -> None:
        """Start the embedding tables at ``(user, item)`` (``losses.spectral_embeddings``), scaled so
        that their entries have standard deviation ``std`` like the random initialisation. This
        default serves every model whose ID table is ``self.ego`` (users first, then items)."""
        ego = getattr(self, "ego", None)
        if not isinstance(ego, nn.Embedding) or ego.weight.shape != (self.num_users + self.num_items, user.size(1)):
            raise NotImplementedError(f"{type(self).__name__}: spectral initialisation needs an ID table "
                                      f"[num_users + num_items, {user.size(1)}]")
        both = torch.cat([user, item])
        ego.weight.copy_(both * (std / both.std().clamp(min=1e-12)))

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """Final embeddings for ranking (what a checkpoint keeps for ``recommend``)."""
        was = self.training
        self.eval()
        u, i = self.embeddings()
        self.train(was)
        if self.cosine:
            u, i = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(i, dim=-1)
        bias = self._modules.get("item_bias")
        if bias is not None:   # score = [u, 1] . [i, temperature * b]
            u = torch.cat([u, u.new_ones(u.size(0), 1)], 1)
            i = torch.cat([i, (self.bias_scale * bias.weight).to(i.dtype)], 1)
        return {"user_emb": u.detach().float().cpu(), "item_emb": i.detach().float().cpu()}

    @torch.no_grad()
    def scorer(self):
        """A ``users -> [len(users), num_items]`` scorer with embeddings computed once."""
        from ..metrics import EmbeddingScorer
        ex = self.export()
        dev = next(self.parameters()).device
        return EmbeddingScorer(ex["user_emb"].to(dev), ex["item_emb"].to(dev))
