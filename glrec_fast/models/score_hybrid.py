"""ScoreHybrid: a graph branch and the language branch trained side by side, mixed at score level.

``python -m glrec_fast.train --model hybrid --fusion score --graph_branch {lightgcn,graphsage,gfcf,bspm}``

* graph branch: a trained LightGCN / GraphSAGE (its own BPR or softmax loss), or a training-free
  graph filter (GF-CF / BSPM) fitted once when the model is built;
* text branch (``text_branch``): ``knn``, the training-free ``text_knn.TextKNN`` (each user's
  training items' nearest items in the LM's embedding space); ``trained``, the content-only model
  (``FusedHybridRec(fusion="text")``: frozen LM vectors of the item text through a small MLP trained
  with BPR; users from their training items' vectors); or ``auto`` (the default): both, the trained
  one training while every validation picks whichever mixes better (the fitted one is ready from
  the first evaluation, so a good model exists within seconds and training only has to beat it);
* score: ``ScoreFusion``: ``a * z(graph scores) + (1 - a) * z(text scores)`` with ``z`` the per-user
  standardisation, so one weight means the same thing for branches on different scales; items with
  no training interaction (cold) mix with their own weight ``a_cold``.

The branches do not interact in training (the loss is the sum of their own losses), so the mix
weight ``a`` can be chosen without retraining: at every validation the training loop calls
``tune(valid, exclude)``, which picks ``a`` on 0..0.95 in steps of 0.05 (``tune_score_weight``), and
the best epoch keeps its ``a``. When neither branch trains (a graph filter and TextKNN), the model is
fitted once and ``a`` chosen on every validation user; nothing else runs. A filter branch never
changes, so its scores of the users validation ranks are kept in memory (``FILTER_MEMO_BYTES``) and
computed once per run. Items without a training interaction (cold items) get a graph score
of 0, a constant per user, so among cold items the ranking is the text branch's alone.

Measured on amazon-beauty (bench/RESULTS.md, "Score-level hybrid"): the score mix of the graph
filter and MiniLM titles beats every single branch by 22% ndcg@20, where the embedding-level gate
of ``FusedHybridRec`` scored below its own graph branch.
"""
from __future__ import annotations

import torch

from ..graph import ITEM_COLD
from .base import Recommender
from .hybrid import ScoreFusion, tune_cold_weight, tune_score_weight

FILTER_BRANCHES = ("gfcf", "bspm")
TEXT_BRANCHES = ("auto", "knn", "trained")
# The mix weights tune() tries: 0 to 0.95 in steps of 0.05. Weight 1 is the graph branch alone, which
# scores every cold item alike (ties broken by item id): on ml-100k's cold split one seed's validation
# picked it (overall ndcg@20 within noise of 0.9-0.95) and its test-cold ndcg@20 fell from 0.10 to 0.008.
HYBRID_GRID = tuple(round(0.05 * j, 2) for j in range(20))
TUNE_USERS = 5000   # validation users ScoreHybrid.tune ranks (a seeded sample when there are more)
# A filter branch's scores never change during training, so the ones evaluation asks for are kept
# (GraphFilter.memoise): up to this many bytes of float32 rows, ~22k users x 12k items on amazon-beauty.
FILTER_MEMO_BYTES = 2 << 30


def cold_zero_scorer(user_emb: torch.Tensor, item_emb: torch.Tensor, cold: torch.Tensor):
    """An embedding scorer whose cold items score 0 (their graph vectors are untrained noise)."""
    from ..metrics import EmbeddingScorer
    return EmbeddingScorer(user_emb, item_emb.masked_fill(cold.to(item_emb.device).unsqueeze(1), 0.0))


class ScoreHybrid(Recommender):
    """See the module docstring. ``graph_model``: a Recommender or a fitted ``GraphFilter``;
    ``text_model``: a fitted ``TextKNN`` or a ``FusedHybridRec`` with ``fusion="text"``; ``weight``:
    the graph branch's share."""

    def __init__(self, graph, graph_model: torch.nn.Module, text_model: torch.nn.Module, weight: float = 0.5,
                 text_knn=None):
        super().__init__()
        from .text_knn import TextKNN
        if getattr(text_model, "fusion", None) != "text" and not isinstance(text_model, TextKNN):
            raise ValueError("text_model: expected a TextKNN or the content-only model, FusedHybridRec(fusion='text')")
        if text_knn is not None and (not isinstance(text_knn, TextKNN) or isinstance(text_model, TextKNN)):
            raise ValueError("text_knn: expected a fitted TextKNN to compete with a trained text_model")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight: expected a share of the graph branch in [0, 1], got {weight!r}")
        self.graph = graph
        self.num_users, self.num_items = graph.num_users, graph.num_items
        self.graph_model, self.text_model, self.text_knn = graph_model, text_model, text_knn
        self.register_buffer("weight", torch.tensor(float(weight)))
        # The cold items' own weight (tune() chooses it after ``weight``; until then the same).
        self.register_buffer("cold_weight", torch.tensor(float(weight)))
        # With text_knn: which text branch the mix uses (0: text_model, 1: text_knn), chosen by tune().
        self.register_buffer("text_choice", torch.tensor(0))
        self.register_buffer("item_context", graph.item_context.clone())
        self.graph_trained = bool(getattr(graph_model, "trainable", False))
        self.text_trained = bool(getattr(text_model, "trainable", False))
        if not self.graph_trained:
            graph_model.memoise(FILTER_MEMO_BYTES)
        self.tuning: list = []   # the last (weight, valid metrics) table

    @property
    def trainable(self) -> bool:
        """False when both branches are fitted (filter + TextKNN): the trainer fits and tunes once."""
        return self.graph_trained or self.text_trained

    @property
    def hparams(self) -> dict:
        return {"graph": getattr(self.graph_model, "hparams", type(self.graph_model).__name__),
                "text": getattr(self.text_in_use(), "hparams", "trained"), "weight": round(float(self.weight), 4)}

    def fit(self) -> "ScoreHybrid":
        """Nothing to do: ``build`` fits the training-free branches; ``tune`` chooses the weight."""
        return self

    # ------------------------------------------------------------------ options set by the trainer
    @property
    def cosine(self) -> bool:
        return any(bool(getattr(m, "cosine", False)) for m in (self.graph_model, self.text_model)
                   if getattr(m, "trainable", False))

    @cosine.setter
    def cosine(self, value: bool) -> None:
        for m in (self.graph_model, self.text_model):
            if getattr(m, "trainable", False):
                m.cosine = bool(value)

    def init_spectral(self, user, item, std):
        if not self.graph_trained:
            raise NotImplementedError("init spectral: the graph branch is a fitted filter (nothing to initialise)")
        self.graph_model.init_spectral(user, item, std)

    def prefetch(self, users, pos, neg):
        if hasattr(self.graph_model, "prefetch"):
            self.graph_model.prefetch(users, pos, neg)

    # ------------------------------------------------------------------ training
    def _sum(self, kind: str, *args):
        loss, out = 0.0, {}
        for name, m, trained in (("text", self.text_model, self.text_trained),
                                 ("graph", self.graph_model, self.graph_trained)):
            if trained:
                lm, parts = getattr(m, kind)(*args)
                loss = loss + lm
                out.update({f"{k}_{name}": v for k, v in parts.items()})
        return loss, out

    def loss(self, users, pos, neg, reg_weight: float):
        """Each branch's own BPR (the branches share nothing, so their sum trains both)."""
        return self._sum("loss", users, pos, neg, reg_weight)

    def softmax_loss(self, users, pos, negs, temperature: float, reg_weight: float):
        return self._sum("softmax_loss", users, pos, negs, temperature, reg_weight)

    # ------------------------------------------------------------------ ranking
    def text_in_use(self):
        """The text branch the mix uses now (``text_knn`` when tune() chose it)."""
        return self.text_knn if self.text_knn is not None and int(self.text_choice) == 1 else self.text_model

    def branch_scorers(self, text=None):
        """(graph scorer, text scorer) of the text branch in use (or ``text``): cold items score 0 in
        the graph branch."""
        if self.graph_trained:
            ex = self.graph_model.export()
            dev = self.weight.device
            g = cold_zero_scorer(ex["user_emb"].to(dev), ex["item_emb"].to(dev), self.item_context == ITEM_COLD)
        else:
            g = self.graph_model.scorer()
        return g, (text if text is not None else self.text_in_use()).scorer()

    @torch.no_grad()
    def scorer(self):
        return ScoreFusion(*self.branch_scorers(), float(self.weight), float(self.cold_weight),
                           self.item_context == ITEM_COLD)

    @torch.no_grad()
    def tune(self, valid: torch.Tensor, exclude=(), batch_size: int = 1024, max_users: int | None = TUNE_USERS,
             seed: int = 0) -> float:
        """Set the weight to the one with the best validation ndcg@20 over ``HYBRID_GRID``, measured on a
        fixed seeded sample of at most ``max_users`` validation users (None: all). One scalar is chosen,
        and every weight is scored on the same users, so a sample suffices; the training loop calls this
        at every evaluation. Each user batch is scored once per branch (a filter branch's scores come
        from its memo after the first time) and each weight ranks only the two branches' top
        candidates (``tune_score_weight``). When the graph has cold items, their own weight follows
        (``cold_weight``, ``tune_cold_weight``) on the same users. With a ``text_knn`` beside a trained
        text branch, both are tuned this way and the text branch of the better mix is used (ties: the
        trained one). The cold weight matters here:
        a filter branch scores every cold item alike, so that weight sets where cold items rank among
        warm ones (on amazon-beauty's cold split the graph share chosen for cold items is far below
        the warm items'; bench/RESULTS.md "A training-free text branch")."""
        users = torch.unique(valid[:, 0])
        if max_users is not None and users.numel() > max_users:
            pick = torch.randperm(users.numel(), generator=torch.Generator().manual_seed(seed))[:max_users]
            valid = valid[torch.isin(valid[:, 0], users[pick])]
        was = self.training
        self.eval()
        try:
            cold = self.item_context == ITEM_COLD
            best = None
            for choice, text in enumerate([self.text_model] + ([self.text_knn] if self.text_knn is not None else [])):
                scorers = self.branch_scorers(text)
                a, table = tune_score_weight(*scorers, valid, self.num_users, self.num_items,
                                             exclude=exclude, grid=HYBRID_GRID, batch_size=batch_size)
                a_cold, value = a, dict(table)[a].get("ndcg@20", -1.0)
                if bool(cold.any()):   # each text branch is judged with its cold weight tuned too
                    a_cold, cold_table = tune_cold_weight(*scorers, a, cold, valid, self.num_users, self.num_items,
                                                          exclude=exclude, grid=HYBRID_GRID, batch_size=batch_size)
                    value = dict(cold_table)[a_cold].get("ndcg@20", -1.0)
                if best is None or value > best[0]:
                    best = (value, choice, a, a_cold, table)
            _, choice, a, a_cold, self.tuning = best
            self.text_choice.fill_(choice)
            self.weight.fill_(a)
            self.cold_weight.fill_(a_cold)
        finally:
            self.train(was)
        return a

    def gate_report(self) -> dict[str, float]:
        """The mix as metrics.json's "gates" reports it: the graph branch's share of the score."""
        out = {"score/graph_weight": float(self.weight), "score/graph_weight_cold": float(self.cold_weight)}
        if self.text_knn is not None:   # 1: the training-free text branch won on validation
            out["score/text_knn"] = float(self.text_choice)
        return out

    def branch_embeddings(self) -> dict:
        """Per-branch embeddings for the grokking monitor (a filter branch has none)."""
        out = {}
        if self.graph_trained:
            out["graph"] = self.graph_model.embeddings()
        if self.text_trained:
            out["text"] = self.text_model.embeddings()
        return out

    def embeddings(self):
        raise NotImplementedError("ScoreHybrid ranks by a mix of standardised scores, not one dot product; "
                                  "use scorer()")

    @torch.no_grad()
    def export(self) -> dict:
        """What ``recommend`` needs: both branches' exports and the weight."""
        return {"score_fusion": {"weight": float(self.weight), "cold_weight": float(self.cold_weight),
                                 "graph_branch_kind": "filter" if not self.graph_trained
                                 else "embeddings"},
                "graph_branch": self.graph_model.export(), "text_branch": self.text_in_use().export()}

    @staticmethod
    def scorer_from_export(ck: dict, graph):
        """The ranking function of a best.pt written by a ScoreHybrid run (``graph``: its training graph)."""
        from ..metrics import EmbeddingScorer
        g_ex, t_ex = ck["graph_branch"], ck["text_branch"]
        if "filter" in g_ex:
            from .filters import GraphFilter
            g = GraphFilter.from_export(graph, g_ex).scorer()
        else:
            g = cold_zero_scorer(g_ex["user_emb"], g_ex["item_emb"], graph.item_context == ITEM_COLD)
        if "text_knn" in t_ex:
            from .text_knn import TextKNN
            t = TextKNN.from_export(graph, t_ex).scorer()
        else:
            t = EmbeddingScorer(t_ex["user_emb"], t_ex["item_emb"])
        sf = ck["score_fusion"]
        return ScoreFusion(g, t, sf["weight"], sf.get("cold_weight", sf["weight"]), graph.item_context == ITEM_COLD)


def build(cfg: dict, ds, graph, device) -> ScoreHybrid:
    """``--model hybrid --fusion score``: the graph branch named by ``graph_branch`` and the text branch
    named by ``text_branch``."""
    from . import hybrid, text_knn
    knn = text_knn.build(cfg, ds, graph, device) if cfg["text_branch"] in ("knn", "auto") else None
    if cfg["text_branch"] == "knn":
        text_model, knn = knn, None
    else:
        text_model = hybrid.build(dict(cfg, fusion="text", graph_branch="lightgcn"), ds, graph, device)
    branch = cfg["graph_branch"]
    if branch in FILTER_BRANCHES:
        from . import filters
        graph_model = filters.build(dict(cfg, model=branch), graph, ds).fit()
    elif branch == "graphsage":
        from . import graphsage
        graph_model = graphsage.build(dict(cfg, model="graphsage"), ds, graph)
    else:
        from .lightgcn import LightGCN
        graph_model = LightGCN(graph, cfg["emb_dim"], cfg["num_layers"], cfg["init_std"], cfg["propagate_dtype"])
    return ScoreHybrid(graph, graph_model, text_model, weight=cfg["static_weight"], text_knn=knn)
