"""Graph models trained on sampled neighbourhoods (mini-batch): GraphSAGE and sampled LightGCN.

Both sample the joint user-item graph around each BPR batch (``glrec_fast.sampling``: one
``neighbor_sample`` call per batch, prefetched on a worker thread when the training loop calls
``model.prefetch`` one batch ahead) and keep the ``Recommender`` interface:
``forward(users, pos, neg) -> (pos_scores, neg_scores, reg)``, ``embeddings()`` for evaluation.

- ``GraphSAGE`` (Hamilton et al., 2017) with the mean aggregator over learned ID embeddings:
  ``h_v' = act(W_self h_v + W_neigh mean_{u in S(v)} h_u + b)`` (no activation after the last
  layer). Training uses the sampled ``S(v)``; evaluation computes every node layer by layer over
  the full neighbourhoods, in row chunks (the usual GraphSAGE inference). ``layer_dtype="bfloat16"``
  (``--propagate_dtype bfloat16``) runs the sampled layers' inputs, GEMMs and activations in
  bfloat16 (means summed in float32, parameters, optimiser and evaluation in float32).
- ``SampledLightGCN``: LightGCN's parameters and full-graph evaluation, trained on sampled blocks
  with the full graph's normalisation and each sampled sum scaled by ``deg / k`` (unbiased; see
  ``sampling.lightgcn_sampled``) -- for graphs too large to propagate whole every step.

A sampled model has ``len(fanouts)`` layers.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .. import allocator, ops
from ..sampling import Blocks, SampledTraining, lightgcn_sampled
from .base import Recommender
from .lightgcn import LightGCN

log = logging.getLogger(__name__)



class GraphSAGE(SampledTraining, Recommender):
    LAYER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def __init__(self, graph, dim: int = 64, fanouts=(10, 10), init_std: float = 0.1, replace: bool = False,
                 sample_seed: int = 0, eval_chunk: int = 16384, layer_dtype: str = "float32"):
        super().__init__()
        if layer_dtype not in self.LAYER_DTYPES:
            raise ValueError(f"layer_dtype: expected one of {list(self.LAYER_DTYPES)}, got {layer_dtype!r}")
        self.layer_dtype = self.LAYER_DTYPES[layer_dtype]
        if self.layer_dtype == torch.bfloat16:
            allocator.bound_onednn_cache()
        self._init_sampling(fanouts, replace, sample_seed)
        self.graph = graph
        self.num_users, self.num_items = graph.num_users, graph.num_items
        self.num_layers = len(self.fanouts)
        self.eval_chunk = int(eval_chunk)
        self.ego = nn.Embedding(graph.num_nodes, dim)  # users first, then items (joint ids)
        nn.init.normal_(self.ego.weight, std=init_std)
        self.lin_self = nn.ModuleList(nn.Linear(dim, dim) for _ in range(self.num_layers))
        self.lin_neigh = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(self.num_layers))

    def _layer(self, t: int, x: torch.Tensor, seed_rows: int | None = None):
        """Layer ``t`` on ``x = [h_self | h_mean]``: one GEMM with ``[W_self | W_neigh]``. With
        ``seed_rows`` (not None), also the ID rows of the first ``seed_rows`` rows (``x``'s self half)."""
        w = torch.cat([self.lin_self[t].weight, self.lin_neigh[t].weight], 1).to(x.dtype)
        b, tanh = self.lin_self[t].bias.to(x.dtype), t < self.num_layers - 1
        if seed_rows is not None:
            return ops.dense_layer_and_corner(x, w, b, tanh, seed_rows, self.ego.embedding_dim)
        return ops.dense_layer(x, w, b, tanh=tanh)

    # ------------------------------------------------------------------ training: sampled blocks
    def _first_input(self, blocks: Blocks, h0: torch.Tensor | None) -> torch.Tensor:
        """Layer 0's input ``[h0_self | mean]``. Without ``h0`` and with row-sparse gradients it reads
        the ID table itself (``ops.table_mean_concat``): no copy of the block's rows, and their
        gradient written in the optimiser's row order."""
        hop = self.num_layers - 1
        csr = blocks.mean_csr(hop)
        if h0 is None and self.row_sparse:
            return ops.table_mean_concat(self.ego.weight, blocks.nodes, *blocks.sorted_nodes(), *csr,
                                         table_col=blocks.table_cols(hop), out_dtype=self.layer_dtype)
        return ops.block_mean_concat(self.block_rows(blocks) if h0 is None else h0, *csr, out_dtype=self.layer_dtype)

    def sample(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Blocks:
        blocks = super().sample(users, pos, neg)
        if self.row_sparse:   # what _first_input reads off the table; on the sampler's thread when prefetched
            blocks.table_cols(self.num_layers - 1)
        return blocks

    def _layers(self, blocks: Blocks, x: torch.Tensor, seed_rows: int | None = None):
        """The final embeddings of the block's seeds from layer 0's input ``x``; with ``seed_rows``,
        ``(embeddings, the first seed_rows rows' ID rows)``."""
        h = self._layer(0, x, seed_rows)
        if seed_rows is not None:
            h, rows = h
        for t in range(1, self.num_layers):
            hop = self.num_layers - 1 - t  # layer t uses the edges of hops 0..hop
            h = self._layer(t, ops.block_mean_concat(h, *blocks.mean_csr(hop)))
        return (h.float(), rows.float()) if seed_rows is not None else h.float()

    def block_embeddings(self, blocks: Blocks, h0: torch.Tensor | None = None) -> torch.Tensor:
        """Final embeddings of the unique seeds (local-id order) computed on ``blocks``."""
        return self._layers(blocks, self._first_input(blocks, h0))

    def block_forward(self, blocks: Blocks) -> tuple[torch.Tensor, torch.Tensor]:
        # The seeds' ID rows are the self half of layer 0's first rows: no second read of the table.
        return self._layers(blocks, self._first_input(blocks, None), seed_rows=blocks.sizes[0])

    def row_tables(self):
        return [self.ego]

    def ego_params(self, users, pos, neg):
        return [self.rows(self.ego, users), self.rows(self.ego, self.num_users + pos),
                self.rows(self.ego, self.num_users + neg)]

    # ------------------------------------------------------------------ evaluation: full graph
    def _mean_adj_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of the row-normalised joint adjacency (mean over every neighbour), CSR."""
        g = self.graph
        rp = g.rowptr[a:b + 1]
        lo, hi = int(rp[0]), int(rp[-1])
        deg = (rp[1:] - rp[:-1]).clamp(min=1).to(self.ego.weight.dtype)
        vals = torch.repeat_interleave(1.0 / deg, rp[1:] - rp[:-1], output_size=hi - lo)
        with warnings.catch_warnings():  # torch's one-time "sparse CSR is beta" notice
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(rp - lo, g.col[lo:hi], vals, (b - a, g.num_nodes), check_invariants=False)

    def embeddings(self):
        h = self.ego.weight
        n = self.graph.num_nodes
        for t in range(self.num_layers):
            parts = []
            for a in range(0, n, self.eval_chunk):  # bounds the temporaries to eval_chunk rows
                b = min(n, a + self.eval_chunk)
                parts.append(self._layer(t, torch.cat([h[a:b], torch.sparse.mm(self._mean_adj_rows(a, b), h)], 1)))
            h = torch.cat(parts) if parts else h
        return h[: self.num_users], h[self.num_users:]


class SampledLightGCN(SampledTraining, LightGCN):
    """LightGCN trained on sampled blocks (full-graph normalisation, sums scaled by deg / k)."""

    def __init__(self, graph, dim: int = 64, fanouts=(10, 10, 10), init_std: float = 0.1, replace: bool = False,
                 sample_seed: int = 0):
        super().__init__(graph, dim, len(list(fanouts)), init_std)
        self._init_sampling(fanouts, replace, sample_seed)

    def block_embeddings(self, blocks: Blocks, h0: torch.Tensor | None = None) -> torch.Tensor:
        return lightgcn_sampled(self.block_rows(blocks) if h0 is None else h0, self.graph, blocks)

    def row_tables(self):
        return [self.ego]
    # embeddings() (evaluation) is LightGCN's: exact full-graph propagation through ops.propagate.


def build(cfg: dict, ds, graph) -> Recommender:
    """``--model graphsage`` or ``--model lightgcn --sampled`` from a training config."""
    from ..config import defaults
    fanouts = cfg["fanouts"]  # validated by the model (sampling.SampledTraining)
    # The default num_layers (the full-graph LightGCN's 3) says nothing about a sampled model: warn
    # only when it was changed and disagrees with the fanouts.
    if (isinstance(fanouts, list) and cfg.get("num_layers") not in (None, defaults()["num_layers"])
            and cfg["num_layers"] != len(fanouts)):
        log.warning("%s: %d layers, one per fanout in fanouts=%s (num_layers=%s is not used by a sampled model)",
                    cfg["model"], len(fanouts), fanouts, cfg["num_layers"])
    if cfg["model"] == "graphsage":
        return GraphSAGE(graph, cfg["emb_dim"], fanouts, cfg["init_std"], sample_seed=cfg["seed"],
                         layer_dtype=cfg["propagate_dtype"])
    if cfg["model"] == "lightgcn":
        return SampledLightGCN(graph, cfg["emb_dim"], fanouts, cfg["init_std"], sample_seed=cfg["seed"])
    raise ValueError(f"model: {cfg['model']!r} has no sampled variant; expected graphsage or lightgcn")
