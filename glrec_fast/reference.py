"""Pure-PyTorch versions of every op: the ground truth for tests and the baseline for benchmarks.

Tests and benchmarks import these; nobody re-writes a baseline. They are written the way a careful
user of plain PyTorch would write them (``torch.sparse.mm`` per layer, then ``stack`` + ``mean``),
and are differentiable through ordinary autograd.
"""
from __future__ import annotations

import torch


# --------------------------------------------------------------------------- propagate
def propagate_csr(rowptr: torch.Tensor, col: torch.Tensor, dinv: torch.Tensor, x: torch.Tensor,
                  num_layers: int, adj: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of layers 0..K of ``x_{k+1} = D^-1/2 A D^-1/2 x_k`` over the joint CSR graph.

    ``adj`` may pass a prebuilt normalised sparse matrix (as LightGCN's reference code caches it).
    Accumulation is float32 whatever the storage dtype of ``x``.
    """
    if adj is None:
        n = rowptr.numel() - 1
        rows = torch.repeat_interleave(torch.arange(n, device=rowptr.device), rowptr[1:] - rowptr[:-1])
        vals = dinv[rows] * dinv[col]
        adj = torch.sparse_csr_tensor(rowptr, col, vals, (n, n))
    out_dtype = x.dtype
    h = x.float()
    layers = [h]
    for _ in range(num_layers):
        h = torch.sparse.mm(adj, h)
        layers.append(h)
    return torch.stack(layers, 0).mean(0).to(out_dtype)


def propagate(graph, x: torch.Tensor, num_layers: int) -> torch.Tensor:
    """``propagate_csr`` on a ``BipartiteGraph`` (users first), with its cached sparse matrix."""
    return propagate_csr(graph.rowptr, graph.col, graph.dinv, x, num_layers, adj=graph.norm_adj())


# --------------------------------------------------------------------------- gated fusion
def gated_fusion(e_graph: torch.Tensor, e_text: torch.Tensor, context: torch.Tensor,
                 gate_weight: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    """Per-context, per-dimension gate.

    ``g = sigmoid(W[c, 0] * e_graph + W[c, 1] * e_text + b[c])``, ``fused = g * e_graph + (1 - g) * e_text``
    with ``e_graph, e_text: [N, d]``, ``context: [N]`` long in ``[0, C)``, ``gate_weight: [C, 2, d]``,
    ``gate_bias: [C, d]``. Computed in float32, returned in ``e_graph``'s dtype.
    """
    w = gate_weight[context].float()          # [N, 2, d]
    b = gate_bias[context].float()            # [N, d]
    eg, et = e_graph.float(), e_text.float()
    g = torch.sigmoid(w[:, 0] * eg + w[:, 1] * et + b)
    return (g * eg + (1 - g) * et).to(e_graph.dtype)


def gate_values(e_graph, e_text, context, gate_weight, gate_bias) -> torch.Tensor:
    """The gate ``g`` itself (for reports and plots)."""
    w = gate_weight[context].float()
    return torch.sigmoid(w[:, 0] * e_graph.float() + w[:, 1] * e_text.float() + gate_bias[context].float())
