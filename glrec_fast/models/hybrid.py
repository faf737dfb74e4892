"""FusedHybridRec: a graph branch and a language branch, mixed per item by a context-aware gate.

Branches
  * graph: LightGCN over the training graph (``glrec_fast.ops.propagate``), giving ``g_u, g_i``;
    or, with ``graph_branch="graphsage"``, GraphSAGE trained on sampled neighbourhoods (``fanouts``)
    for graphs too large to propagate whole every step.
  * text:  frozen content vectors (an LM's item text embeddings; users: the mean of their training
    items' vectors, plus user text where a dataset has it) through a small trainable MLP, ``t_u, t_i``.

Fusion (``glrec_fast.ops.gated_fusion``): per context ``c`` and dimension,
``g = sigmoid(W[c,0] * e_graph + W[c,1] * e_text + b[c] + prior)``, ``fused = g*e_graph + (1-g)*e_text``.
Contexts: items cold / warm-head / warm-tail (a cold item is never head), users cold / warm.
With ``user_gate="item_context"`` (the default) a user's mix also depends on the context of the item
being scored: score(u, i) = fuse_u[ctx(u), ctx(i)](g_u, t_u) . fuse_i[ctx(i)](g_i, t_i). All gates
live in one ``[9, 2, d]`` table: rows 0-2 the item gates, rows 3-8 the user gates (user context x
item context). ``user_gate="shared"`` gives each user one fused vector for every item (rows 3 and 6).

Why the user gate reads the item context (measured on ml-100k's cold split, bench/RESULTS.md): with
one user vector for all items, that vector is fitted to the warm items that dominate training, and
cold items, which can only be reached through the user . text cross term, lose a third of their
ndcg@20 against a static mix; replacing only the trained model's user gates by the static weight
brought cold ndcg@20 from 0.146 back to 0.193. Ranking stays a dot product: ``embeddings()`` returns
users as the concatenation of their three per-item-context vectors and items with their vector in
the block of their own context (zeros elsewhere), so ``user_emb @ item_emb.T`` is exactly the score.

``gate_features="continuous"`` adds, per row, a small network's offset to the gate logit, read from
the row's continuous context instead of its bucket alone: log training degree (standardised), cold
flag, the cosine of its graph and text vectors (no gradient) and whether it is a user. The network's
last layer starts at zero, so training starts exactly at the bucket gate (at ``gate_init``, the tuned
static weight) and ``gate_reg`` pulls it back there; the fused op then runs with one gate per row.

``gate_reg`` (L2 on every gate parameter's distance from its start, default ``GATE_REG``) is what
keeps a gate with nothing to learn at the static mix it starts from. Unpulled, the gates drifted and
lost to that mix on real data (amazon-beauty random split, seed 0, test ndcg@20 0.0547 against the
static mix's 0.0618, stopping at epoch 15 against 38); at 0.01 they moved by 0.003 and still lost 2.8%;
at 0.1 the gated model equals the static mix (0.0617 vs 0.0618, best epoch 38; ml-100k cold split, 3
seeds: 0.2310 vs 0.2312, valid above it on each seed). bench/RESULTS.md, "The gate pulled to its start".
For mixing at score level instead (the branches trained apart), see ``score_hybrid.ScoreHybrid``.

``prior`` is the grokking monitor's bounded offset (positive favours the graph branch).
``fusion="static"`` replaces the gate by one fixed weight ``static_weight`` (tuned on the
validation split by the caller); ``fusion="graph"`` / ``"text"`` keep one branch.

Cold start: a cold item has no graph signal, so its graph embedding is zero and its gate is the
cold gate. Training drops the graph embedding of a random ``cold_drop`` fraction of warm items in
every batch and routes them through the cold gates, so the branches learn to serve cold items.
``cold_gate`` says what the gates that score cold items (the cold item gate and the users' gates for
cold items) may learn: "fixed" (default) keeps them at ``gate_init`` (give it the static weight
tuned on valid), "scalar" learns one share per gate, "vector" learns them per dimension from their
inputs like the warm gates. Measured on ml-100k's cold split (3 seeds, bench/RESULTS.md): learned
cold gates drift away from what ranks held-out cold items (simulated cold items are dropped warm
items, scored against warm negatives): learned per dimension they reach cold ndcg@20 0.129 against
0.237 fixed and 0.227 for the static mix; a scalar gate or a cold-vs-cold loss term
(``cold_weight``) drifted the same way in one-seed probes. The warm gates learn freely.

Training loss: BPR on the fused scores plus ``aux_weight`` x (BPR on graph-only scores + BPR on
text-only scores). The auxiliary terms keep each branch a ranker on its own, which is what lets the
grokking monitor evaluate every branch separately and lets the gate compare two meaningful signals.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..graph import ITEM_COLD, ITEM_CONTEXT_NAMES, USER_COLD, USER_CONTEXT_NAMES
from .base import Recommender, bpr_loss

NUM_ITEM_CONTEXTS = 3            # ITEM_COLD, ITEM_HEAD, ITEM_TAIL
NUM_USER_CONTEXTS = 2            # USER_COLD, USER_WARM
USER_GATE_OFFSET = NUM_ITEM_CONTEXTS  # user gate = USER_GATE_OFFSET + NUM_ITEM_CONTEXTS * user_ctx + item_ctx
NUM_GATES = NUM_ITEM_CONTEXTS + NUM_USER_CONTEXTS * NUM_ITEM_CONTEXTS
FUSIONS = ("gated", "static", "graph", "text")
USER_GATES = ("item_context", "shared")
GRAPH_BRANCHES = ("lightgcn", "graphsage")
COLD_GATES = ("vector", "scalar", "fixed")
GATE_FEATURES = ("buckets", "continuous")
NUM_GATE_FEATURES = 4            # log training degree (standardised), cold flag, graph-text agreement, is-user


def user_gate_ids(user_ctx: torch.Tensor | int, item_ctx: torch.Tensor | int) -> torch.Tensor | int:
    """Row of the gate table for users of context ``user_ctx`` scoring items of context ``item_ctx``."""
    return USER_GATE_OFFSET + NUM_ITEM_CONTEXTS * user_ctx + item_ctx


# The default pull of every gate toward gate_init (see the module docstring).
GATE_REG = 0.1


class FusedHybridRec(Recommender):
    def __init__(self, graph, content: torch.Tensor, user_content: torch.Tensor | None = None,
                 graph_branch: str = "lightgcn", fusion: str = "gated", dim: int = 64, num_layers: int = 3,
                 text_hidden: int = 128, cold_drop: float = 0.2, aux_weight: float = 0.5,
                 static_weight: float = 0.5, init_std: float = 0.1, gate_init: float = 0.5,
                 user_gate: str = "item_context", cold_weight: float = 0.0, cold_gate: str = "fixed",
                 fanouts=(10, 10), sample_seed: int = 0, gate_reg: float = GATE_REG, gate_features: str = "buckets",
                 gate_hidden: int = 16):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {fusion!r}")
        if cold_gate not in COLD_GATES:
            raise ValueError(f"cold_gate: expected one of {COLD_GATES}, got {cold_gate!r}")
        if user_gate not in USER_GATES:
            raise ValueError(f"user_gate: expected one of {USER_GATES}, got {user_gate!r}")
        if gate_features not in GATE_FEATURES:
            raise ValueError(f"gate_features: expected one of {GATE_FEATURES}, got {gate_features!r}")
        if graph_branch not in GRAPH_BRANCHES:
            raise ValueError(f"graph_branch: expected one of {GRAPH_BRANCHES}, got {graph_branch!r}")
        content = torch.as_tensor(content, dtype=torch.float32)
        if content.dim() != 2 or content.size(0) != graph.num_items:
            raise ValueError(f"content: expected [num_items={graph.num_items}, content_dim], got "
                             f"{tuple(content.shape)}")
        if not torch.isfinite(content).all():
            raise ValueError("content: contains NaN or infinite values")
        if user_content is None:
            user_content = _mean_of_items(content, graph)
        user_content = torch.as_tensor(user_content, dtype=torch.float32)
        if user_content.shape != (graph.num_users, content.size(1)):
            raise ValueError(f"user_content: expected [num_users={graph.num_users}, {content.size(1)}], "
                             f"got {tuple(user_content.shape)}")
        if not 0.0 <= cold_drop < 1.0:
            raise ValueError(f"cold_drop: expected a fraction in [0, 1), got {cold_drop}")
        if not 0.0 <= static_weight <= 1.0:
            raise ValueError(f"static_weight: expected a weight in [0, 1], got {static_weight}")
        if not cold_weight >= 0.0:
            raise ValueError(f"cold_weight: expected a non-negative loss weight, got {cold_weight}")
        if not 0.0 < gate_init < 1.0:
            raise ValueError(f"gate_init: expected a share of the graph branch in (0, 1), got {gate_init}")
        self.graph = graph
        self.num_users, self.num_items = graph.num_users, graph.num_items
        self.fusion, self.num_layers = fusion, num_layers
        # Per-item-context user vectors only mean something for the learned gate.
        self.per_context_users = fusion == "gated" and user_gate == "item_context"
        self.user_gate = user_gate
        self.cold_drop, self.aux_weight, self.static_weight = float(cold_drop), float(aux_weight), float(static_weight)
        self.cold_weight = float(cold_weight)
        if not gate_reg >= 0.0:
            raise ValueError(f"gate_reg: expected a non-negative weight, got {gate_reg}")
        self.gate_reg = float(gate_reg)
        self.register_buffer("content", content)
        self.register_buffer("user_content", user_content)
        self.register_buffer("item_context", graph.item_context.clone())
        self.register_buffer("user_context", graph.user_context.clone())
        # Grokking monitor's offset on the gate logits (0-dim, positive favours the graph branch).
        self.register_buffer("fusion_prior", torch.zeros(()))
        self.graph_branch = graph_branch
        if graph_branch == "graphsage":
            # Mini-batch graph branch: each BPR batch's users and items are embedded from sampled
            # neighbourhoods (fanouts per hop); ranking uses GraphSAGE's full-neighbourhood inference.
            from .graphsage import GraphSAGE
            self.sage = GraphSAGE(graph, dim, fanouts, init_std, sample_seed=sample_seed)
            self.ego = self.sage.ego  # the ID table the L2 term and the monitor's weight norm read
        else:
            self.ego = nn.Embedding(graph.num_nodes, dim)
            nn.init.normal_(self.ego.weight, std=init_std)
        cd = content.size(1)
        self.projector = nn.Sequential(nn.Linear(cd, text_hidden), nn.GELU(), nn.Linear(text_hidden, dim))
        # Every gate starts at g = gate_init with zero input weights, i.e. exactly the static mix with
        # weight gate_init; what the gate learns is the per-context, per-dimension deviation from it.
        self.gate_init = float(gate_init)
        self.gate_start_logit = math.log(gate_init / (1 - gate_init))
        self.gate_weight = nn.Parameter(torch.zeros(NUM_GATES, 2, dim))
        self.gate_bias = nn.Parameter(torch.full((NUM_GATES, dim), self.gate_start_logit))
        # The gates that score cold items (the cold item gate and, with per-item-context users, the user
        # gates for cold items): "vector" learns them like the others, "scalar" learns one share per
        # gate with no inputs, "fixed" keeps them at gate_init (the tuned static weight).
        self.cold_gate = cold_gate
        rows = [ITEM_COLD] + ([user_gate_ids(u, ITEM_COLD) for u in USER_CONTEXT_NAMES]
                              if self.per_context_users else [])
        cold_rows = torch.zeros(NUM_GATES, dtype=torch.bool)
        cold_rows[rows] = True
        self.register_buffer("cold_rows", cold_rows)
        self.cold_logit = nn.Parameter(torch.full((NUM_GATES,), self.gate_start_logit),
                                       requires_grad=cold_gate == "scalar")
        # Continuous context (gate_features="continuous"): a small network adds a per-row, per-dimension
        # offset to the bucket gate's logit from each row's features (gate_inputs()). Its last layer
        # starts at zero, so the gate starts exactly at the bucket gate (the static mix at gate_init),
        # and gate_reg pulls its weights back there.
        self.gate_features = gate_features
        self.gate_net = None
        if gate_features == "continuous":
            self.gate_net = nn.Sequential(nn.Linear(NUM_GATE_FEATURES, gate_hidden), nn.GELU(),
                                          nn.Linear(gate_hidden, dim))
            nn.init.zeros_(self.gate_net[2].weight)
            nn.init.zeros_(self.gate_net[2].bias)
            for side, deg in (("item", graph.item_degree), ("user", graph.user_degree)):
                logd = torch.log1p(deg.to(torch.float32))
                mean, std = logd.mean(), logd.std().clamp(min=1e-6)
                self.register_buffer(f"{side}_logdeg", (logd - mean) / std)
                # the standardised value of degree 0: what a cold (or dropped, simulated cold) row reads
                self.register_buffer(f"{side}_logdeg0", -mean / std)

    # ------------------------------------------------------------------ branches
    def graph_embeddings(self):
        if self.fusion == "text":
            return None, None
        if self.graph_branch == "graphsage":
            g_u, g_i = self.sage.embeddings()
        else:
            out = ops.propagate(self.graph, self.ego.weight, self.num_layers)
            g_u, g_i = out[: self.num_users], out[self.num_users:]
        # A cold item or user (no training interaction) has no graph signal: its graph embedding is
        # zero (not its random initial vector), the value the cold-start simulation gives dropped
        # warm items; its score comes from the text branch alone.
        return (g_u.masked_fill((self.user_context == USER_COLD).unsqueeze(1), 0.0),
                g_i.masked_fill((self.item_context == ITEM_COLD).unsqueeze(1), 0.0))

    def text_item(self, items=None):
        return self.projector(self.content if items is None else self.content[items])

    def text_user(self, users=None):
        return self.projector(self.user_content if users is None else self.user_content[users])

    def _fuse(self, e_graph, e_text, gate_ids, side: str, ids=None):
        """Fused vectors of rows whose gates are ``gate_ids``; ``side`` ("item" / "user") and ``ids``
        (the rows' item or user ids, None = all in order) feed the continuous gate's features."""
        if self.fusion == "graph":
            return e_graph
        if self.fusion == "text":
            return e_text
        if self.fusion == "static":
            a = self.static_weight
            return a * e_graph + (1 - a) * e_text
        return ops.gated_fusion(e_graph, e_text, *self._row_gates(e_graph, e_text, gate_ids, side, ids))

    def _row_gates(self, e_graph, e_text, gate_ids, side, ids):
        """(gate ids, gate_weight, gate_bias) for the fusion op. Buckets: the shared per-context table.
        Continuous: one gate per row, its bucket's parameters plus the network's offset on the bias."""
        w, b = self._gate_params()
        if self.gate_net is None:
            return gate_ids, w, b
        offset = self.gate_net(self.gate_inputs(e_graph, e_text, gate_ids, side, ids))
        if self.cold_gate != "vector":   # gates that score cold items keep their fixed/scalar value
            offset = offset * (~self.cold_rows[gate_ids]).unsqueeze(1).to(offset.dtype)
        rows = torch.arange(e_graph.size(0), device=e_graph.device)
        return rows, w[gate_ids], b[gate_ids] + offset

    def gate_inputs(self, e_graph, e_text, gate_ids, side: str, ids=None) -> torch.Tensor:
        """[N, 4] features of the continuous gate: the row's log training degree (standardised; 0
        interactions for a cold row, including warm items the cold-start simulation drops), its cold
        flag, the agreement of its two branch vectors (cosine, no gradient) and whether it is a user."""
        if side == "item":
            cold = gate_ids == ITEM_COLD
            logdeg = self.item_logdeg if ids is None else self.item_logdeg[ids]
            logdeg = torch.where(cold, self.item_logdeg0, logdeg)
        elif side == "user":
            cold = (gate_ids - USER_GATE_OFFSET) // NUM_ITEM_CONTEXTS == USER_COLD
            logdeg = self.user_logdeg if ids is None else self.user_logdeg[ids]
        else:
            raise ValueError(f"side: expected 'item' or 'user', got {side!r}")
        agree = torch.nn.functional.cosine_similarity(e_graph.detach().float(), e_text.detach().float(), dim=1)
        is_user = torch.full_like(agree, float(side == "user"))
        return torch.stack([logdeg.to(agree.dtype), cold.to(agree.dtype), agree, is_user], 1)

    def _gate_params(self):
        """(gate_weight, gate_bias) as the fusion op sees them: cold rows per ``cold_gate``, plus the prior."""
        w, b = self.gate_weight, self.gate_bias
        if self.cold_gate != "vector":
            keep = (~self.cold_rows).to(w.dtype)
            w = w * keep[:, None, None]
            b = torch.where(self.cold_rows[:, None], self.cold_logit[:, None].expand_as(b), b)
        return w, b + self.fusion_prior

    def _user_ids(self, user_ctx, item_ctx):
        return user_gate_ids(user_ctx, item_ctx if self.per_context_users else 0)

    def fused_users(self, g_u, t_u) -> torch.Tensor:
        """Fused user vectors for ranking: ``[U, d]``, or ``[U, 3d]`` (one block per item context)."""
        u_ctx = self.user_context
        if not self.per_context_users:
            return self._fuse(g_u, t_u, self._user_ids(u_ctx, 0), "user")
        return torch.cat([self._fuse(g_u, t_u, self._user_ids(u_ctx, c), "user") for c in range(NUM_ITEM_CONTEXTS)], 1)

    def fused_items(self, g_i, t_i) -> torch.Tensor:
        """Fused item vectors for ranking: ``[I, d]``, or ``[I, 3d]`` with the vector in its context's block."""
        f = self._fuse(g_i, t_i, self.item_context, "item")
        return _in_context_blocks(f, self.item_context) if self.per_context_users else f

    def gate_values(self, e_graph, e_text, gate_ids, side: str = "item", ids=None):
        """The gate g per row and dimension (1 = all graph, 0 = all text), for reports and plots."""
        from ..reference import gate_values
        return gate_values(e_graph, e_text, *self._row_gates(e_graph, e_text, gate_ids, side, ids))

    # ------------------------------------------------------------------ training
    def prefetch(self, users, pos, neg):
        """Sample the next batch's neighbourhoods on a worker thread (GraphSAGE branch only)."""
        if self.graph_branch == "graphsage" and self.fusion != "text":
            self.sage.prefetch(users, pos, neg)

    def _graph_batch(self, users, items):
        """Graph-branch vectors of a batch's users and items (cold ones zero)."""
        if self.graph_branch == "graphsage":
            B = users.numel()
            blocks = self.sage.blocks_for(users, items[:B], items[B:])
            h = self.sage.block_embeddings(blocks)[blocks.seed_local]
            gu_b, gi_b = h[:B], h[B:]
            return (gu_b.masked_fill((self.user_context[users] == USER_COLD).unsqueeze(1), 0.0),
                    gi_b.masked_fill((self.item_context[items] == ITEM_COLD).unsqueeze(1), 0.0))
        g_u, g_i = self.graph_embeddings()
        return g_u[users], g_i[items]

    def _batch(self, users, items):
        """Every vector a loss needs for ``users`` [B] and ``items`` [M] (positives first):
        (text users, text items, graph users, graph items, the items' contexts), with the training
        cold-start simulation applied to the items."""
        t_u, t_i = self.text_user(users), self.text_item(items)
        i_ctx = self.item_context[items]
        gu_b = gi_b = None
        if self.fusion != "text":
            gu_b, gi_b = self._graph_batch(users, items)
            if self.training and self.cold_drop > 0:
                # Cold-start simulation: drop the graph embedding of a random fraction of warm items
                # (the same items for every occurrence in this batch) and route them to the cold gate.
                drop_item = torch.rand(self.num_items, device=items.device) < self.cold_drop
                drop = drop_item[items] & (i_ctx != ITEM_COLD)
                gi_b = gi_b.masked_fill(drop.unsqueeze(1), 0.0)
                i_ctx = torch.where(drop, torch.full_like(i_ctx, ITEM_COLD), i_ctx)
        return t_u, t_i, gu_b, gi_b, i_ctx

    @property
    def _users_per_context(self) -> bool:
        """A user has one fused vector per item context (ranking's [U, 3d] layout)."""
        return self.per_context_users and self.fusion in ("gated", "static")

    def _users_for(self, gu_b, t_u, users, u_ctx, item_ctx):
        """Vectors of ``users`` (contexts ``u_ctx``) for scoring items of context ``item_ctx`` (per row,
        or an int); without per-context users the item context does not matter."""
        if self.fusion in ("graph", "text"):
            return gu_b if self.fusion == "graph" else t_u
        return self._fuse(gu_b, t_u, self._user_ids(u_ctx, item_ctx), "user", users)

    def _items_fused(self, gi_b, t_i, items, i_ctx):
        if self.fusion in ("graph", "text"):
            return gi_b if self.fusion == "graph" else t_i
        return self._fuse(gi_b, t_i, i_ctx, "item", items)

    def _extra_terms(self, users, items, parts, batch, head, name):
        """Each branch's own loss at ``aux_weight``, the cold-vs-cold term and the gate pull: the same
        for both losses. ``head(u, i)`` is the loss (BPR or softmax) of users against [pos | neg]
        items; ``batch`` is ``_batch``'s output; the terms are logged as ``{name}_graph`` etc."""
        t_u, t_i, gu_b, gi_b, _ = batch
        total = 0.0
        if self.fusion in ("gated", "static") and self.aux_weight > 0:
            l_g, l_t = head(gu_b, gi_b), head(t_u, t_i)
            total = total + self.aux_weight * (l_g + l_t)
            parts.update({f"{name}_graph": l_g.detach(), f"{name}_text": l_t.detach()})
        if self.fusion in ("gated", "static") and self.cold_weight > 0:
            # Cold-vs-cold ranking, the way cold items are evaluated: every item of the batch through
            # the cold path (graph embedding dropped, cold item gate, the user's gate for cold
            # items), so the cold path learns to order cold items among themselves and not only to
            # lift a dropped item above warm negatives.
            c_i = self._fuse(torch.zeros_like(t_i), t_i, torch.full_like(items, ITEM_COLD), "item", items)
            c_u = self._fuse(gu_b, t_u, self._user_ids(self.user_context[users], ITEM_COLD), "user", users)
            l_c = head(c_u, c_i)
            total = total + self.cold_weight * l_c
            parts[f"{name}_cold"] = l_c.detach()
        if self.fusion == "gated" and self.gate_reg > 0:
            # L2 pull of every gate in use toward its start (the static mix at gate_init): the gate may
            # move only as far as the data keeps paying for it. Rows the fusion does not read (the cold
            # gates' vectors unless cold_gate="vector") are left alone.
            used = (~self.cold_rows if self.cold_gate != "vector" else torch.ones_like(self.cold_rows)).to(
                self.gate_bias.dtype)
            g_reg = (self.gate_weight.pow(2).sum((1, 2)) + (self.gate_bias - self.gate_start_logit).pow(2).sum(1)) @ used
            if self.gate_net is not None:
                g_reg = g_reg + sum(p.pow(2).sum() for p in self.gate_net.parameters())
            total = total + self.gate_reg * g_reg
            parts["gate_reg"] = g_reg.detach()
        return total

    def _l2(self, users, items, parts):
        if self.fusion == "text":
            return 0.0
        w = self.ego.weight
        reg = (w[users].pow(2).sum() + w[self.num_users + items].pow(2).sum()) / (2 * users.numel())
        parts["reg"] = reg.detach()
        return reg

    def loss(self, users, pos, neg, reg_weight: float):
        """BPR on (user, positive, negative) triples: the fused score, plus ``aux_weight`` times each
        branch's own BPR, the cold-vs-cold term, the gate pull and L2 on the batch's raw rows."""
        items = torch.cat([pos, neg])
        B = users.numel()
        batch = t_u, t_i, gu_b, gi_b, i_ctx = self._batch(users, items)
        f_i = self._items_fused(gi_b, t_i, items, i_ctx)
        u_ctx = self.user_context[users]
        if self._users_per_context:
            # The user's vector for the positive and for the negative, each through the user gate of
            # that item's context (a dropped item counts as cold, so the cold simulation trains it too).
            f_u2 = self._users_for(torch.cat([gu_b, gu_b]), torch.cat([t_u, t_u]), users.repeat(2), u_ctx.repeat(2),
                                   i_ctx)
            f_up, f_un = f_u2[:B], f_u2[B:]
        else:
            f_up = f_un = self._users_for(gu_b, t_u, users, u_ctx, 0)
        loss_main = bpr_loss((f_up * f_i[:B]).sum(-1), (f_un * f_i[B:]).sum(-1))
        parts = {"bpr": loss_main.detach()}

        def pairwise(u, i):
            return bpr_loss((u * i[:B]).sum(-1), (u * i[B:]).sum(-1))
        total = loss_main + self._extra_terms(users, items, parts, batch, pairwise, "bpr")
        return total + reg_weight * self._l2(users, items, parts), parts

    def _blocks(self, u_by_ctx, f_i, i_ctx):
        """Batch vectors in ``embeddings()``'s layout: users [B, 3d] (one block per item context),
        items [M, 3d] (the vector in its context's block), so ``u . i`` scores through the right gate."""
        if not self._users_per_context:
            return u_by_ctx[0], f_i
        return torch.cat(u_by_ctx, 1), _in_context_blocks(f_i, i_ctx)

    def softmax_loss(self, users, pos, negs, temperature: float, reg_weight: float):
        """``losses.sampled_softmax`` of each (user, positive) against the shared ``negs``, on the
        fused vectors in ranking's layout, plus the same auxiliary and regularising terms as ``loss``
        (each branch's own softmax at ``aux_weight``)."""
        from .losses import sampled_softmax
        items = torch.cat([pos, negs])
        B = users.numel()
        batch = t_u, t_i, gu_b, gi_b, i_ctx = self._batch(users, items)
        f_i = self._items_fused(gi_b, t_i, items, i_ctx)
        contexts = range(NUM_ITEM_CONTEXTS) if self._users_per_context else (0,)
        u_ctx = self.user_context[users]
        u, f = self._blocks([self._users_for(gu_b, t_u, users, u_ctx, c) for c in contexts], f_i, i_ctx)

        def listwise(u, i):
            return sampled_softmax(u, i[:B], i[B:], pos, negs, temperature)
        loss_main = listwise(u, f)
        parts = {"softmax": loss_main.detach()}
        total = loss_main + self._extra_terms(users, items, parts, batch, listwise, "softmax")
        return total + reg_weight * self._l2(users, items, parts), parts

    # ------------------------------------------------------------------ ranking
    def branch_embeddings(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(user, item) embeddings of each branch: 'graph', 'text' and 'fused' (as available)."""
        g_u, g_i = self.graph_embeddings()
        t_u, t_i = self.text_user(), self.text_item()
        out = {}
        if g_u is not None:
            out["graph"] = (g_u, g_i)
        out["text"] = (t_u, t_i)
        if self.fusion in ("gated", "static"):
            out["fused"] = (self.fused_users(g_u, t_u), self.fused_items(g_i, t_i))
        return out

    def embeddings(self):
        br = self.branch_embeddings()
        key = {"graph": "graph", "text": "text"}.get(self.fusion, "fused")
        return br[key]

    @torch.no_grad()
    def gate_report(self) -> dict[str, float]:
        """Mean gate value (share of the graph branch) per item/user context."""
        if self.fusion != "gated":
            return {}
        g_u, g_i = self.graph_embeddings()
        t_u, t_i = self.text_user(), self.text_item()
        gi = self.gate_values(g_i, t_i, self.item_context).mean(1)
        out = {}
        for code, name in ITEM_CONTEXT_NAMES.items():
            sel = self.item_context == code
            if bool(sel.any()):
                out[f"gate/item_{name}"] = float(gi[sel].mean())
        item_ctxs = ITEM_CONTEXT_NAMES.items() if self.per_context_users else [(0, None)]
        for c, cname in item_ctxs:
            gu = self.gate_values(g_u, t_u, self._user_ids(self.user_context, c), "user").mean(1)
            for code, name in USER_CONTEXT_NAMES.items():
                sel = self.user_context == code
                if bool(sel.any()):
                    key = f"gate/user_{name}" + (f"/item_{cname}" if cname else "")
                    out[key] = float(gu[sel].mean())
        return out


def _in_context_blocks(f: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """[N, d] vectors -> [N, NUM_ITEM_CONTEXTS * d], each row in the block of its item context."""
    blocks = torch.nn.functional.one_hot(ctx, NUM_ITEM_CONTEXTS).to(f.dtype)
    return (blocks.unsqueeze(2) * f.unsqueeze(1)).reshape(f.size(0), -1)


def _mean_of_items(content: torch.Tensor, graph) -> torch.Tensor:
    """Each user's content vector: the mean of their training items' vectors (zeros if none)."""
    deg = graph.user_degree.clamp(min=1).to(content.dtype).unsqueeze(1)
    rows = torch.repeat_interleave(torch.arange(graph.num_users), graph.user_degree)
    out = torch.zeros(graph.num_users, content.size(1), dtype=content.dtype)
    out.index_add_(0, rows, content[graph.user_col])
    return out / deg


def _check_text(ds) -> None:
    if getattr(ds, "item_text", None) is None:
        raise ValueError(f"--model hybrid: dataset {ds.name!r} has no item text for the language branch; "
                         f"use a dataset with text (ml-100k, synthetic, RecBole .item files) or --model lightgcn")


def item_content(cfg: dict, ds, device, enc=None) -> torch.Tensor:
    """The dataset's item text vectors [num_items, d] from ``enc`` (default: ``cfg``'s encoder), disk-cached."""
    from .. import text
    _check_text(ds)
    if enc is None:
        enc = text.get_encoder(cfg["encoder"], device=device, model_path=cfg.get("encoder_path"))
    return text.encode_items(ds, enc)


def build(cfg: dict, ds, graph, device) -> FusedHybridRec:
    """The hybrid for ``python -m glrec_fast.train --model hybrid`` (encodes item text, cached)."""
    from .. import text
    _check_text(ds)
    enc = text.get_encoder(cfg["encoder"], device=device, model_path=cfg.get("encoder_path"))
    content = item_content(cfg, ds, device, enc)
    user_text_vecs = None
    if getattr(ds, "user_text", None) is not None:
        user_text_vecs = text.encode_items(list(ds.user_text), enc)  # cached like item text
    user_content = text.user_vectors(content, ds.train, ds.num_users, user_text_vecs)
    return FusedHybridRec(graph, content, user_content, graph_branch=cfg["graph_branch"], fusion=cfg["fusion"],
                          dim=cfg["emb_dim"], num_layers=cfg["num_layers"], text_hidden=cfg["text_hidden"],
                          cold_drop=cfg["cold_drop"], aux_weight=cfg["aux_weight"],
                          static_weight=cfg["static_weight"], init_std=cfg["init_std"],
                          gate_init=cfg["gate_init"], user_gate=cfg["user_gate"],
                          cold_weight=cfg["cold_weight"], cold_gate=cfg["cold_gate"], fanouts=cfg["fanouts"],
                          sample_seed=cfg["seed"], gate_reg=cfg["gate_reg"], gate_features=cfg["gate_features"])


# ----------------------------------------------------------------------------- score-level fusion
class ScoreFusion:
    """Score-level static mix of two rankers: ``a * z(graph scores) + (1 - a) * z(text scores)``.

    Any two scorers mix this way (a trained LightGCN, a fitted graph filter, the content-only
    model). ``z`` standardises each user's row of scores (mean 0, std 1 over the items), so the one
    weight means the same thing for branches whose raw scores live on different scales. Items a
    branch cannot score (a graph filter gives cold items a constant) keep that branch's constant,
    so among cold items the ranking is the text branch's. ``tune_score_weight`` picks ``a`` on
    validation; no retraining is needed for any ``a``.
    """

    fresh_tiles = True

    def __init__(self, graph_scorer, text_scorer, weight: float, cold_weight: float | None = None,
                 cold: torch.Tensor | None = None):
        for name, w in (("weight", weight), ("cold_weight", weight if cold_weight is None else cold_weight)):
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"{name}: expected a share of the graph branch in [0, 1], got {w!r}")
        if (cold_weight is None) != (cold is None):
            raise ValueError("cold_weight and cold (the bool mask of cold items) go together")
        self.graph_scorer, self.text_scorer, self.weight = graph_scorer, text_scorer, float(weight)
        # Items with no training interaction (``cold``) mix with their own weight: a filter branch
        # scores them all alike, so their weight sets where they rank against warm items.
        self.cold_weight = None if cold_weight is None else float(cold_weight)
        self.cold = None if cold is None else cold.to(torch.bool)
        self._mix_cold = self.cold is not None and self.cold_weight != self.weight and bool(self.cold.any())

    @staticmethod
    def standardise(s: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Each row to mean 0, std 1; ``inplace`` writes into ``s`` (a tile its scorer made fresh)."""
        if s.dtype != torch.float32:
            s, inplace = s.float(), True
        mean = s.mean(dim=1, keepdim=True)
        s = s.sub_(mean) if inplace else s - mean
        # Two passes (mean, then the norm of the centred row): 5x faster on the CPU than std_mean.
        std = torch.linalg.vector_norm(s, dim=1, keepdim=True).div_(math.sqrt(max(s.size(1) - 1, 1)))
        return s.div_(std.clamp_(min=1e-12))

    @staticmethod
    def branch_z(scorer, users) -> torch.Tensor:
        """A branch's standardised scores of ``users`` (in place when its tiles are fresh; a ``ZMix`` is
        already on this scale)."""
        if getattr(scorer, "standardised", False):
            return scorer(users)
        return ScoreFusion.standardise(scorer(users), inplace=getattr(scorer, "fresh_tiles", False))

    def __call__(self, users):
        a = self.weight
        zg = self.branch_z(self.graph_scorer, users)
        zt = self.branch_z(self.text_scorer, users)
        cold_mix = None
        if self._mix_cold:
            cold = self.cold.to(zg.device)
            cold_mix = zg[:, cold].mul_(self.cold_weight).add_(zt[:, cold], alpha=1.0 - self.cold_weight)
        out = zg.mul_(a).add_(zt, alpha=1.0 - a)
        if cold_mix is not None:
            out[:, cold] = cold_mix
        return out

    def reorder(self, order):
        cold = None if self.cold is None else self.cold[order.to(self.cold.device)]
        return ScoreFusion(_reordered(self.graph_scorer, order), _reordered(self.text_scorer, order), self.weight,
                           self.cold_weight, cold)


class ZMix:
    """Two scorers' standardised scores mixed: ``share * z(second) + (1 - share) * z(first)``.

    The language side of a three-branch score mix: ``ScoreFusion(graph, ZMix(trained, knn, s), a)``
    ranks by ``a z_g + (1 - a) s z_knn + (1 - a) (1 - s) z_trained``. Its tiles are already on
    ``ScoreFusion``'s scale (``standardised``: not standardised again, so the three weights are those of
    one mix of z-scores). ``tune_score_shares`` picks ``share`` and ``a`` together on validation."""

    standardised = True
    fresh_tiles = True

    def __init__(self, first, second, share: float):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share: expected the second scorer's share in [0, 1], got {share!r}")
        self.first, self.second, self.share = first, second, float(share)

    def __call__(self, users):
        return _mix_z(ScoreFusion.branch_z(self.second, users), ScoreFusion.branch_z(self.first, users), self.share)

    def reorder(self, order):
        return ZMix(_reordered(self.first, order), _reordered(self.second, order), self.share)


def _reordered(scorer, order):
    """``scorer`` with its item columns in ``order`` (its own ``reorder`` when it has one)."""
    if hasattr(scorer, "reorder"):
        return scorer.reorder(order)
    return lambda us: (lambda t: t.index_select(1, order.to(t.device)))(scorer(us))


def _mix_z(x: torch.Tensor, y: torch.Tensor, a: float) -> torch.Tensor:
    """``a * x + (1 - a) * y``, with -inf (an excluded item) staying -inf at a = 0 and a = 1
    (``0 * -inf`` is nan)."""
    return torch.nan_to_num_(x * a + y * (1.0 - a), nan=-math.inf, posinf=math.inf, neginf=-math.inf)


@torch.no_grad()
def tune_score_weight(graph_scorer, text_scorer, valid: torch.Tensor, num_users: int, num_items: int,
                      exclude=(), grid=None, key: str = "ndcg@20", batch_size: int = 1024,
                      candidates: int = 256) -> tuple[float, list]:
    """The weight ``a`` of ``ScoreFusion`` with the best validation ``key`` (at cut-off 20) over ``grid``
    (default 0 to 1 in steps of 0.05; ties go to the smaller weight), and the (a, valid metrics) table.

    Each user batch is scored once per branch and the excluded pairs masked once; every weight's top
    20 then comes from :func:`mixed_top_k` on ``candidates`` items per branch, so a weight costs a few
    [batch, 2 * candidates] operations instead of a full [batch, items] tile and ranking. The top 20
    are exactly the full ranking's (checked per user, recomputed in full where the check fails)."""
    table = tune_score_shares(graph_scorer, text_scorer, None, (0.0,), valid, num_users, num_items, exclude, grid,
                              batch_size, candidates)[0.0]
    best = max(table, key=lambda t: (t[1].get(key, -1.0), -t[0]))
    return best[0], table


@torch.no_grad()
def tune_score_shares(graph_scorer, text_scorer, second_text, shares, valid: torch.Tensor, num_users: int,
                      num_items: int, exclude=(), grid=None, batch_size: int = 1024,
                      candidates: int = 256) -> dict[float, list]:
    """The validation table of ``ScoreFusion(graph, ZMix(text, second_text, s), a)`` for every ``s`` in
    ``shares`` and ``a`` in ``grid``: {s: [(a, metrics)]} (``second_text`` None: ``shares`` must be (0,)).

    Each user batch is scored once per branch and masked once, and every (share, weight) ranks only the
    union of the three tiles' top candidates (``mixed_top_k``; exact, as in ``tune_score_weight``)."""
    grid = [round(0.05 * j, 2) for j in range(21)] if grid is None else [float(a) for a in grid]
    shares = [float(s) for s in shares]
    if second_text is None and shares != [0.0]:
        raise ValueError(f"shares: without a second text scorer the only share is 0, got {shares}")
    pairs = [(s, a) for s in shares for a in grid]
    # Each (share, weight) as one weight per tile: graph a, trained text (1-a)(1-s), kNN (1-a)s.
    weights = [(a, (1.0 - a) * (1.0 - s)) + (((1.0 - a) * s,) if second_text is not None else ()) for s, a in pairs]
    sums = _GridSums(valid, num_users, num_items, exclude, pairs)
    for ub in sums.batches(batch_size):
        tiles = [ScoreFusion.branch_z(f, ub).cpu() for f in (graph_scorer, text_scorer, second_text) if f is not None]
        for j, top in enumerate(mixed_top_k(sums.masked(*tiles, users=ub), weights, sums.k, candidates)):
            sums.add(j, top, ub)
    rows = sums.table()
    return {s: [(a, m) for (s2, a), m in rows if s2 == s] for s in shares}


class _GridSums:
    """The weight tuners' shared part: the validation pairs' lookups, the exclusion CSRs, and per grid
    weight the sums of each user's recall/ndcg@20 (``metrics.ranked_metrics``) over the user batches."""

    def __init__(self, valid: torch.Tensor, num_users: int, num_items: int, exclude, grid):
        from .. import metrics
        self.valid = valid.to(torch.long).cpu()
        metrics._check_pairs("valid", self.valid, num_users, num_items)
        self.excl = [metrics._exclusion_csr(j, p, num_users, num_items) for j, p in enumerate(exclude)]
        self.test_keys = torch.sort(self.valid[:, 0] * num_items + self.valid[:, 1]).values
        self.n_rel = torch.bincount(self.valid[:, 0], minlength=num_users)
        self.users = torch.unique(self.valid[:, 0])
        self.num_items, self.grid = num_items, list(grid)
        self.k = min(20, num_items)
        self.discount = metrics.discounts(self.k)
        self.sums = [dict() for _ in self.grid]

    def batches(self, batch_size: int):
        for start in range(0, self.users.numel(), batch_size):
            yield self.users[start:start + batch_size]

    def masked(self, *tiles, users):
        """The tiles with every excluded (user, item) pair set to -inf (in place)."""
        from .. import metrics
        for rp, it in self.excl:
            row, col = metrics.csr_rows(rp, it, users)
            for t in tiles:
                t[row, col] = -math.inf
        return tiles

    def add(self, j: int, top: torch.Tensor, users: torch.Tensor) -> None:
        from .. import metrics
        for (m, kk), v in metrics.ranked_metrics(top, users, self.test_keys, self.n_rel[users], self.num_items, (20,),
                                                 self.discount).items():
            self.sums[j][f"{m}@{kk}"] = self.sums[j].get(f"{m}@{kk}", 0.0) + float(v.sum())

    def table(self) -> list:
        n = self.users.numel()
        return [(a, {**{name: v / n for name, v in s.items()}, "n_users": n}) for a, s in zip(self.grid, self.sums)]


@torch.no_grad()
def tune_cold_weight(graph_scorer, text_scorer, weight: float, cold: torch.Tensor, valid: torch.Tensor,
                     num_users: int, num_items: int, exclude=(), grid=None, key: str = "ndcg@20",
                     batch_size: int = 1024) -> tuple[float, list]:
    """``ScoreFusion``'s ``cold_weight`` with the best validation ``key`` (at cut-off 20) over ``grid``,
    warm items mixed at ``weight``; ties go to ``weight`` itself (one weight for every item), then to the
    smaller weight. Each user batch is scored and masked once; a candidate weight rewrites only the
    cold columns and ranks the full tile, so the choice is exact. Returns (weight, [(w, metrics)])."""
    grid = [round(0.05 * j, 2) for j in range(20)] if grid is None else [float(a) for a in grid]
    sums = _GridSums(valid, num_users, num_items, exclude, grid)
    cold = cold.to(torch.bool).cpu()
    for ub in sums.batches(batch_size):
        zg = ScoreFusion.branch_z(graph_scorer, ub).cpu()
        zt = ScoreFusion.branch_z(text_scorer, ub).cpu()
        cg, ct = zg[:, cold], zt[:, cold]
        tile, = sums.masked(zg.mul_(weight).add_(zt, alpha=1.0 - weight), users=ub)
        masked = torch.isneginf(tile[:, cold])
        for j, a in enumerate(grid):
            tile[:, cold] = (cg * a + ct * (1.0 - a)).masked_fill_(masked, -math.inf)
            sums.add(j, ops.topk_rows(tile, sums.k)[1], ub)
    table = sums.table()
    best = max(table, key=lambda t: (t[1].get(key, -1.0), t[0] == weight, -t[0]))
    return best[0], table


def mixed_top_k(tiles, weights, k: int, candidates: int) -> list[torch.Tensor]:
    """For each weight vector ``w`` in ``weights`` (one weight per tile): the item ids [b, k] of the top
    ``k`` of ``sum_j w_j * tiles[j]`` (best first; -inf marks excluded items in every tile; a tile whose
    weight is 0 is left out of the sum, so its -inf never makes a nan).

    Only the union of each tile's top ``candidates`` items is mixed: an item outside it has
    ``tiles[j] <= M_j`` (the tile's ``candidates``-th value) for every ``j``, so it scores at most
    ``sum_j w_j M_j`` (weights are >= 0); where a user's k-th candidate is above that bound, the
    candidates' top k is the full top k. Users where it is not (or where -inf leaves it undecided) are
    ranked in full."""
    b, n_items = tiles[0].shape
    k = min(k, n_items)
    candidates = max(candidates, k)

    def mix(xs, w):
        out = None
        for x, wj in zip(xs, w):
            if wj != 0.0:
                out = x * wj if out is None else out.add_(x, alpha=wj)
        return out

    if len(tiles) * candidates >= n_items:
        return [ops.topk_rows(mix(tiles, w), k)[1] for w in weights]
    tops = [ops.topk_rows(t, candidates) for t in tiles]
    cand = torch.cat([ix for _, ix in tops], 1)
    vals = [t.gather(1, cand) for t in tiles]
    # An item in several top lists counts once: its later copies are masked out.
    seen = torch.zeros(b, n_items, dtype=torch.bool)
    for j, (_, ix) in enumerate(tops):
        if j:
            dup = seen.gather(1, ix)
            for v in vals:
                v[:, j * candidates:(j + 1) * candidates].masked_fill_(dup, -math.inf)
        seen.scatter_(1, ix, True)
    bounds = [v[:, -1] for v, _ in tops]
    out = []
    for w in weights:
        val, pos = ops.topk_rows(mix(vals, w), k)
        top = cand.gather(1, pos)
        redo = ~(val[:, -1] > mix(bounds, w))
        if bool(redo.any()):
            top[redo] = ops.topk_rows(mix([t[redo] for t in tiles], w), k)[1]
        out.append(top)
    return out
