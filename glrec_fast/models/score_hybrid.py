"""ScoreHybrid: a graph branch and the language branch trained side by side, mixed at score level.

``python -m glrec_fast.train --model hybrid --fusion score --graph_branch {lightgcn,graphsage,gfcf,bspm}``

* graph branch: a trained LightGCN / GraphSAGE (its own BPR or softmax loss), or a training-free
  graph filter (GF-CF / BSPM) fitted once when the model is built;
* text branch (``text_branch``): ``knn``, the training-free ``text_knn.TextKNN`` (each user's
  training items' nearest items in the LM's embedding space); ``trained``, the content-only model
  (``FusedHybridRec(fusion="text")``: frozen LM vectors of the item text through a small MLP trained
  with BPR; users from their training items' vectors); or ``auto`` (the default): both, mixed, the
  trained one training while every validation chooses how much of each (the fitted one is ready
  from the first evaluation, so a good model exists within seconds and training only adds to it);
* score: ``ScoreFusion``: ``a * z(graph scores) + (1 - a) * z(text scores)`` with ``z`` the per-user
  standardisation, so one weight means the same thing for branches on different scales; with both
  text branches the text side is ``s * z(kNN) + (1 - s) * z(trained)`` (``hybrid.ZMix``): the two
  carry different signal (which items resemble the user's; what the text predicts about taste and
  popularity), and on amazon-beauty the mix of all three beat the better two-branch mix by 4.8%
  (bench/RESULTS.md, "Next: mix all three branches"). Items with no training interaction (cold) mix
  with their own weight ``a_cold``.

The branches do not interact in training (the loss is the sum of their own losses), so the mix
weights can be chosen without retraining: at every validation the training loop calls
``tune(valid, exclude)``, which picks ``a`` on 0..0.95 in steps of 0.05 (and ``s`` on 0..1 in steps
of 0.1; ``tune_score_shares``), and the best epoch keeps them. When neither branch trains (a graph filter and TextKNN), the model is
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
from .hybrid import ScoreFusion, ZMix, tune_cold_weight, tune_score_shares

FILTER_BRANCHES = ("gfcf", "bspm")
TEXT_BRANCHES = ("auto", "knn", "trained")
# The mix weights tune() tries: 0 to 0.95 in steps of 0.05. Weight 1 is the graph branch alone, which
# scores every cold item alike (ties broken by item id): on ml-100k's cold split one seed's validation
# picked it (overall ndcg@20 within noise of 0.9-0.95) and its test-cold ndcg@20 fell from 0.10 to 0.008.
HYBRID_GRID = tuple(round(0.05 * j, 2) for j in range(20))
# The kNN text branch's shares of the text side tune() tries (text_branch auto): 0 (the trained branch
# alone) to 1 (kNN alone) in steps of 0.1. On amazon-beauty the three-way probe's best mixes put
# 0.15-0.2 of the text side on kNN (bench/three_way_mix.py).
KNN_SHARES = tuple(round(0.1 * j, 1) for j in range(11))
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
            raise ValueError("text_knn: expected a fitted TextKNN to mix with a trained text_model")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight: expected a share of the graph branch in [0, 1], got {weight!r}")
        self.graph = graph
        self.num_users, self.num_items = graph.num_users, graph.num_items
        self.graph_model, self.text_model, self.text_knn = graph_model, text_model, text_knn
        self.register_buffer("weight", torch.tensor(float(weight)))
        # The cold items' own weight (tune() chooses it after ``weight``; until then the same).
        self.register_buffer("cold_weight", torch.tensor(float(weight)))
        # With text_knn: its share of the text side (0: text_model alone, 1: text_knn alone), set by tune().
        self.register_buffer("knn_share", torch.tensor(0.0))
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
        """What the log and metrics.json say was fitted: the graph branch's settings, the text side's
        branches (a TextKNN's settings; "trained") with the kNN share, and the graph weight."""
        knn = self.knn_in_use()
        text = {"knn": knn.hparams} if knn is not None else {}
        if self.text_trained and (self.text_knn is None or float(self.knn_share) < 1.0):
            text["trained"] = True
        if self.text_knn is not None:
            text["knn_share"] = round(float(self.knn_share), 4)
        return {"graph": getattr(self.graph_model, "hparams", type(self.graph_model).__name__),
                "text": text, "weight": round(float(self.weight), 4)}

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
    def knn_in_use(self):
        """The TextKNN the mix reads now (the text branch, or ``text_knn`` with a share above 0), or None."""
        if self.text_knn is None:
            return None if self.text_trained else self.text_model
        return self.text_knn if float(self.knn_share) > 0.0 else None

    def text_scorer(self, share: float | None = None):
        """The text side's scorer at the kNN ``share`` (default: the tuned one)."""
        s = float(self.knn_share) if share is None else float(share)
        return text_side(self.text_model.scorer(), None if self.text_knn is None else self.text_knn.scorer(), s)

    def branch_scorers(self, text=None):
        """(graph scorer, text scorer): the text side as tuned, or the one branch ``text``; cold items
        score 0 in the graph branch."""
        if self.graph_trained:
            ex = self.graph_model.export()
            dev = self.weight.device
            g = cold_zero_scorer(ex["user_emb"].to(dev), ex["item_emb"].to(dev), self.item_context == ITEM_COLD)
        else:
            g = self.graph_model.scorer()
        return g, (text.scorer() if text is not None else self.text_scorer())

    @torch.no_grad()
    def scorer(self):
        return ScoreFusion(*self.branch_scorers(), float(self.weight), float(self.cold_weight),
                           self.item_context == ITEM_COLD)

    @torch.no_grad()
    def tune(self, valid: torch.Tensor, exclude=(), batch_size: int = 1024, max_users: int | None = TUNE_USERS,
             seed: int = 0) -> float:
        """Set the mix (graph weight, kNN share, cold items' weight) that ``choose_mix`` picks on validation
        ndcg@20, measured on a fixed seeded sample of at most ``max_users`` validation users (None: all).
        Every setting is scored on the same users, so a sample suffices; the training loop calls this at
        every evaluation. Each user batch is scored once per branch (a filter branch's scores come from
        its memo after the first time) and each setting ranks only the branches' top candidates
        (``tune_score_shares``). The cold weight matters: a filter branch scores every cold item alike,
        so that weight sets where cold items rank among warm ones, and which text side is best can
        change with it (on ml-100k's cold split it did; bench/RESULTS.md "A training-free text
        branch"). Returns the graph weight."""
        users = torch.unique(valid[:, 0])
        if max_users is not None and users.numel() > max_users:
            pick = torch.randperm(users.numel(), generator=torch.Generator().manual_seed(seed))[:max_users]
            valid = valid[torch.isin(valid[:, 0], users[pick])]
        was = self.training
        self.eval()
        try:
            knn = None if self.text_knn is None else self.text_knn.scorer()
            s, a, a_cold, self.tuning = choose_mix(self.branch_scorers()[0], self.text_model.scorer(), knn,
                                                   self.item_context == ITEM_COLD, valid, self.num_users,
                                                   self.num_items, exclude=exclude, batch_size=batch_size)
            self.knn_share.fill_(s)
            self.weight.fill_(a)
            self.cold_weight.fill_(a_cold)
        finally:
            self.train(was)
        return a

    def gate_report(self) -> dict[str, float]:
        """The mix as metrics.json's "gates" reports it: the graph branch's share of the score."""
        out = {"score/graph_weight": float(self.weight), "score/graph_weight_cold": float(self.cold_weight)}
        if self.text_knn is not None:   # the training-free text branch's share of the text side
            out["score/text_knn_share"] = float(self.knn_share)
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
        """What ``recommend`` needs: the branches' exports and the weights (a text side that mixes both
        text branches adds "text_knn_branch" and its share)."""
        s = float(self.knn_share) if self.text_knn is not None else 0.0
        out = {"score_fusion": {"weight": float(self.weight), "cold_weight": float(self.cold_weight),
                                "graph_branch_kind": "filter" if not self.graph_trained else "embeddings"},
               "graph_branch": self.graph_model.export(),
               "text_branch": (self.text_knn if s == 1.0 else self.text_model).export()}
        if 0.0 < s < 1.0:
            out["score_fusion"]["knn_share"] = s
            out["text_knn_branch"] = self.text_knn.export()
        return out

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
        from .text_knn import TextKNN
        if "text_knn" in t_ex:
            t = TextKNN.from_export(graph, t_ex).scorer()
        else:
            t = EmbeddingScorer(t_ex["user_emb"], t_ex["item_emb"])
        sf = ck["score_fusion"]
        if "text_knn_branch" in ck:
            t = ZMix(t, TextKNN.from_export(graph, ck["text_knn_branch"]).scorer(), sf["knn_share"])
        return ScoreFusion(g, t, sf["weight"], sf.get("cold_weight", sf["weight"]), graph.item_context == ITEM_COLD)


def text_side(trained_scorer, knn_scorer, share: float):
    """The text side of the mix: ``share`` of kNN (``ZMix``; the one branch at the ends, or the trained
    scorer alone when there is no kNN)."""
    if knn_scorer is None or share == 0.0:
        return trained_scorer
    return knn_scorer if share == 1.0 else ZMix(trained_scorer, knn_scorer, share)


@torch.no_grad()
def choose_mix(graph_scorer, text_scorer, knn_scorer, cold: torch.Tensor, valid: torch.Tensor, num_users: int,
               num_items: int, exclude=(), batch_size: int = 1024) -> tuple[float, float, float, list]:
    """``ScoreHybrid.tune``'s choice on ``valid``: (kNN share, graph weight, cold items' weight, the chosen
    share's (weight, metrics) table). The share and weight with the best ndcg@20 over ``KNN_SHARES``
    (only 0 without ``knn_scorer``) x ``HYBRID_GRID`` (ties: smaller share, then smaller weight); with
    cold items, that share, the trained branch alone and kNN alone are each judged again with their
    cold weight tuned (``tune_cold_weight``; ties: in that order)."""
    tables = tune_score_shares(graph_scorer, text_scorer, knn_scorer, KNN_SHARES if knn_scorer is not None else (0.0,),
                               valid, num_users, num_items, exclude=exclude, grid=HYBRID_GRID, batch_size=batch_size)
    best = {s: max(t, key=lambda r: (r[1].get("ndcg@20", -1.0), -r[0])) for s, t in tables.items()}
    first = min(best, key=lambda s: (-best[s][1].get("ndcg@20", -1.0), s))
    has_cold = bool(cold.any())
    choice = None
    for s in [first] + ([e for e in (0.0, 1.0) if e in best and e != first] if has_cold else []):
        a, value = best[s][0], best[s][1].get("ndcg@20", -1.0)
        a_cold = a
        if has_cold:
            a_cold, cold_table = tune_cold_weight(graph_scorer, text_side(text_scorer, knn_scorer, s), a, cold, valid,
                                                  num_users, num_items, exclude=exclude, grid=HYBRID_GRID,
                                                  batch_size=batch_size)
            value = dict(cold_table)[a_cold].get("ndcg@20", -1.0)
        if choice is None or value > choice[0]:
            choice = (value, s, a, a_cold)
    _, s, a, a_cold = choice
    return s, a, a_cold, tables[s]


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
