"""Training-loop hook that runs the GrokkingMonitor on a fixed validation sample, per branch.

Every ``grok_every`` steps it scores a fixed sample of validation users with each branch's
embeddings (graph, text, fused for the hybrid; the model itself otherwise), computes NDCG@20 on the
device (training items masked), and feeds the monitor. A model trained on sampled neighbourhoods
(GraphSAGE, sampled LightGCN) is never asked for full-graph embeddings here, which would cost a
whole-graph inference every few steps and defeat the sampling: it scores its users against a fixed
candidate set (their validation items and ``CANDIDATES`` random items) with vectors computed on a
fresh sample (``SampledTraining.sample_embeddings``); the hybrid with a GraphSAGE branch watches
its text branch only, and says so. Nothing is read back to the host during
training: the metric, the losses and the weight norms stay 0-dim device tensors, and the
monitor's fusion prior is copied into the hybrid's ``fusion_prior`` buffer on the device. Events,
the history and the plot are read once, at the end.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from .grokking import GrokkingMonitor
from .metrics import batch_mask, csr_of_pairs

log = logging.getLogger("glrec_fast.train")


CANDIDATES = 1000   # random items beside the sampled users' validation items (sampled models)


class GrokkingCallback:
    def __init__(self, cfg: dict):
        self.every = int(cfg["grok_every"])
        self.sample_users = int(cfg["grok_sample_users"])
        self.respond = bool(cfg["grok_respond"])
        self.seed = int(cfg["seed"])
        self.mon = None

    # ------------------------------------------------------------------ setup
    def on_start(self, model, ds, graph, cfg, device):
        pairs = ds.valid if ds.valid.numel() else None
        if pairs is None:
            log.info("grokking monitor: off (no validation split to watch; the test split is never used)")
            return
        users = torch.unique(pairs[:, 0])
        gen = torch.Generator().manual_seed(self.seed)
        users = users[torch.randperm(users.numel(), generator=gen)[: self.sample_users]].sort().values
        self.users = users.to(device)
        self.truth = batch_mask(*csr_of_pairs(pairs, ds.num_users), users, ds.num_items, device)
        self.seen = batch_mask(*csr_of_pairs(ds.train, ds.num_users), users, ds.num_items, device)
        self.n_rel = self.truth.sum(1).clamp(min=1)
        k = min(20, ds.num_items)
        disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32) + 2.0)
        self.disc = disc.to(device)
        self.idcg = torch.cumsum(disc, 0).to(device)
        self.k = k
        self.model = model
        from .sampling import SampledTraining
        self.cand = None
        if isinstance(model, SampledTraining):
            own = self.truth.any(0).nonzero().squeeze(1).cpu()
            extra = torch.randperm(ds.num_items, generator=gen)[:CANDIDATES]
            self.cand = torch.unique(torch.cat([own, extra])).to(device)
            self.truth, self.seen = self.truth[:, self.cand], self.seen[:, self.cand]
            log.info("grokking monitor: %s trains on sampled neighbourhoods, so it is watched on sampled vectors "
                     "against %d candidate items (the users' validation items and %d random ones), never with "
                     "full-graph inference", type(model).__name__, self.cand.numel(), CANDIDATES)
        if hasattr(model, "branch_embeddings"):
            self.branches = list(model.branch_embeddings().keys())
            if getattr(model, "graph_branch", None) == "graphsage":
                self.branches = ["text"]
                log.info("grokking monitor: the hybrid's graph branch is GraphSAGE (sampled): only the text branch is "
                         "watched (the graph and fused branches would need full-graph inference every %d steps)",
                         self.every)
        else:
            self.branches = ["model"]
        # BPR losses start at log 2 and fall slowly on recommendation data (0.69 -> ~0.4 in a few
        # epochs on ml-100k), so "fit" is 75% of the first value rather than the default 50%.
        self.mon = GrokkingMonitor(branches=self.branches, min_jump=0.01, fit_ratio=0.75, respond=self.respond,
                                   device=device)
        self.gate_means: list[torch.Tensor] = []
        log.info("grokking monitor: branches %s, every %d steps, %d validation users", self.branches,
                 self.every, users.numel())

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def _ndcg(self, u, i_emb) -> torch.Tensor:
        """NDCG@20 of the sample users' vectors ``u`` against ``i_emb`` (every item, or the candidates)."""
        scores = (u @ i_emb.T).masked_fill(self.seen, -math.inf)
        top = torch.topk(scores, min(self.k, scores.size(1)), dim=1).indices
        hits = self.truth.gather(1, top).float()
        dcg = (hits * self.disc[: hits.size(1)]).sum(1)
        idcg = self.idcg[(self.n_rel.clamp(max=self.k) - 1)]
        return (dcg / idcg).mean()

    @torch.no_grad()
    def on_step(self, step, loss, parts):
        if self.mon is None or step % self.every:
            return
        m = self.model
        was = m.training
        m.eval()
        if self.cand is not None:
            rows = {"model": m.sample_embeddings(self.users, self.cand)}
        elif self.branches == ["text"] and hasattr(m, "text_user"):
            rows = {"text": (m.text_user()[self.users], m.text_item())}
        else:
            embs = m.branch_embeddings() if hasattr(m, "branch_embeddings") else {"model": m.embeddings()}
            rows = {b: (embs[b][0][self.users], embs[b][1]) for b in self.branches}
        m.train(was)
        val = {b: self._ndcg(*rows[b]) for b in self.branches}
        losses = {"graph": parts.get("bpr_graph", parts.get("bpr")), "text": parts.get("bpr_text", parts.get("bpr")),
                  "fused": parts.get("bpr"), "model": parts.get("bpr", loss)}
        train_loss = {b: (losses.get(b) if losses.get(b) is not None else loss) for b in self.branches}
        wn = {}
        if hasattr(m, "ego") and "graph" in self.branches:
            wn["graph"] = m.ego.weight.norm()
        if hasattr(m, "projector") and "text" in self.branches:
            wn["text"] = torch.nn.utils.get_total_norm(list(m.projector.parameters()))
        if hasattr(m, "gate_weight") and "fused" in self.branches:
            wn["fused"] = torch.sqrt(m.gate_weight.pow(2).sum() + m.gate_bias.pow(2).sum())
        if "model" in self.branches:
            wn["model"] = torch.nn.utils.get_total_norm(list(m.parameters()))
        self.mon.observe(step, train_loss=train_loss, val_metric=val, weight_norm=wn or None)
        if self.respond and hasattr(m, "fusion_prior") and {"graph", "text"} <= set(self.branches):
            m.fusion_prior.copy_(self.mon.gate_logit_offset("graph", "text"))
        if hasattr(m, "gate_values") and "fused" in self.branches and m.fusion == "gated":
            g_i, t_i = embs["graph"][1], embs["text"][1]
            self.gate_means.append(m.gate_values(g_i, t_i, m.item_context).mean())
        else:
            self.gate_means.append(torch.full((), float("nan"), device=val[self.branches[0]].device))

    def on_epoch_end(self, epoch, row):
        pass

    # ------------------------------------------------------------------ resume (stored in last.pt)
    def state_dict(self):
        if self.mon is None:
            return None
        gm = torch.stack(self.gate_means).cpu() if self.gate_means else torch.zeros(0)
        return {"monitor": self.mon.state_dict(), "gate_means": gm}

    def load_state_dict(self, state):
        if self.mon is None:
            return
        self.mon.load_state_dict(state["monitor"])
        dev = self.mon.device
        self.gate_means = [g.to(dev) for g in state["gate_means"]]

    # ------------------------------------------------------------------ end: read back once
    def on_end(self, model, out):
        if self.mon is None:
            return {}
        events = self.mon.events()
        hist = self.mon.history
        if self.gate_means:
            hist["gate_mean"] = torch.stack(self.gate_means).cpu().tolist()
        for e in events:
            log.info("grokking monitor: %s on branch %s at step %d (jump %+.4f)", e["kind"], e["branch"],
                     e["step"], e["jump"])
        if not events:
            log.info("grokking monitor: no grok/ungrok event in %d observations", len(hist["step"]))
        path = None
        if hist["step"]:
            try:
                from .plots import plot_training_curves
                path = plot_training_curves(hist, events, os.path.join(out, "training_curves.png"),
                                            title="per-branch validation ndcg@20 (fixed sample)")
            except ImportError as e:
                log.warning("training-curve plot skipped because of %r", e)
        return {"grokking": {"events": events, "branches": self.branches, "observations": len(hist["step"]),
                             "plot": path, "final_prior": self.mon.fusion_prior.cpu().tolist()}}

