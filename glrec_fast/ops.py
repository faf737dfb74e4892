"""The public ops: ``propagate``, ``gated_fusion``, ``neighbor_sample``, ``block_mean_concat`` (a
GraphSAGE layer's input on a sampled block), ``dense_layer`` (that layer's GEMM and tanh),
``gram_rows`` (a graph filter's first product, over each row's two-hop neighbourhood),
``topk_rows`` (each row's best k, for ranking) and ``row_adam_`` (the row-sparse optimiser step of
``optim.RowAdam``).

One op, one name, many devices: each op is defined once here as ``torch.ops.glrec.<name>``; the
compiled extension (``glrec_fast._C``) registers its C++ (and CUDA) kernels under the same name,
Triton kernels register for CUDA, and the device of the input tensors picks the kernel. Any
device/op pair without a kernel gets the pure-torch reference from ``reference.py``, announced
once with the reason. Autograd lives here, so it is the same for every kernel.

``GLREC_BACKEND=reference`` makes the public wrappers call ``reference.py`` directly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backend, reference

SCHEMAS = {
    "propagate": "propagate(Tensor rowptr, Tensor col, Tensor dinv, Tensor x, int num_layers) -> Tensor",
    "gated_fusion": ("gated_fusion(Tensor e_graph, Tensor e_text, Tensor context, Tensor gate_weight, "
                     "Tensor gate_bias) -> Tensor"),
    "gated_fusion_backward": ("gated_fusion_backward(Tensor grad_out, Tensor e_graph, Tensor e_text, "
                              "Tensor context, Tensor gate_weight, Tensor gate_bias) "
                              "-> (Tensor, Tensor, Tensor, Tensor)"),
    "neighbor_sample": ("neighbor_sample(Tensor rowptr, Tensor col, Tensor seeds, int[] fanouts, bool replace=False, "
                        "int seed=0) -> (Tensor[] nodes, Tensor[] rows, Tensor[] cols, Tensor[] edge_ids)"),
    # [h[:n] | mean of each block row's sampled neighbours]; t_rowptr/t_col (the transposed CSR) serve
    # the backward. index: the table row of each local row (h the ID table, col then in table rows);
    # order: the backward's output row s is local row order[s]'s gradient. out_dtype: the result's
    # dtype (float32 or bfloat16; default h's or grad's), sums in float32 either way.
    "block_mean_concat": ("block_mean_concat(Tensor rowptr, Tensor col, Tensor t_rowptr, Tensor t_col, Tensor h, "
                          "Tensor? index=None, ScalarType? out_dtype=None) -> Tensor"),
    "csr_transpose": "csr_transpose(Tensor rowptr, Tensor col, int num_cols) -> (Tensor, Tensor, Tensor)",
    "block_mean_concat_backward": ("block_mean_concat_backward(Tensor rowptr, Tensor t_rowptr, Tensor t_col, "
                                   "Tensor grad, Tensor? order=None, ScalarType? out_dtype=None) -> Tensor"),
    # Rows of pattern(R[rows]) T R with the output's columns permuted (a graph filter's r P~).
    "gram_rows": ("gram_rows(Tensor rowptr, Tensor col, Tensor val, Tensor t_rowptr, Tensor t_col, Tensor t_val, "
                  "Tensor rows, Tensor out_index) -> Tensor"),
    # Each row's k largest values and their columns, best first; ties in a fixed hashed column order.
    "topk_rows": "topk_rows(Tensor x, int k) -> (Tensor, Tensor)",
    # act(x weight^T + bias), act tanh when `tanh` (a GraphSAGE layer), and its backward: (dx, dweight, dbias)
    # for the upstream gradient; y is the forward's output (tanh's derivative reads it).
    "dense_layer": "dense_layer(Tensor x, Tensor weight, Tensor? bias, bool tanh) -> Tensor",
    "dense_layer_backward": ("dense_layer_backward(Tensor grad, Tensor x, Tensor weight, Tensor y, bool tanh) "
                             "-> (Tensor, Tensor, Tensor)"),
    # optim.RowAdam's step on the rows of a row-sparse gradient, in place (rows unique).
    "row_adam_": ("row_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, Tensor grad, "
                  "float step_size, float beta1, float beta2, float eps, float bc2_sqrt) -> ()"),
    # GrokkingMonitor.observe (glrec_fast/grokking.py): in-place update of the monitor's device state.
    "grokking_observe": ("grokking_observe(Tensor(a!) state, Tensor(b!) ring, Tensor(c!) event_buf, "
                         "Tensor(d!) event_count, Tensor(e!) history_row, Tensor vals, float[] config, int step, "
                         "int slot) -> ()"),
}

_lib = torch.library.Library("glrec", "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

_C = _backend.load_extension()  # registers TORCH_LIBRARY_IMPL(glrec, CPU/CUDA) kernels


# --------------------------------------------------------------------------- reference kernels
def _ref_propagate_kernel(rowptr, col, dinv, x, num_layers):
    return reference.propagate_csr(rowptr, col, dinv, x, num_layers)


def _ref_gated_fusion_kernel(e_graph, e_text, context, gate_weight, gate_bias):
    return reference.gated_fusion(e_graph, e_text, context, gate_weight, gate_bias)


def _ref_neighbor_sample_kernel(rowptr, col, seeds, fanouts, replace=False, seed=0):
    return reference.neighbor_sample(rowptr, col, seeds, fanouts, replace, seed)


def _ref_grokking_observe_kernel(state, ring, event_buf, event_count, history_row, vals, config, step, slot):
    reference.grokking_observe(state, ring, event_buf, event_count, history_row, vals, config, step, slot)


def _ref_row_adam_kernel(param, exp_avg, exp_avg_sq, rows, grad, step_size, beta1, beta2, eps, bc2_sqrt):
    reference.row_adam_(param, exp_avg, exp_avg_sq, rows, grad, step_size, beta1, beta2, eps, bc2_sqrt)


_REFERENCE_KERNELS = {
    "row_adam_": _ref_row_adam_kernel,
    "grokking_observe": _ref_grokking_observe_kernel,
    "propagate": _ref_propagate_kernel,
    "gated_fusion": _ref_gated_fusion_kernel,
    "gated_fusion_backward": reference.gated_fusion_backward,
    "neighbor_sample": _ref_neighbor_sample_kernel,  # not differentiable: no autograd registered
    "block_mean_concat": reference.block_mean_concat,
    "csr_transpose": reference.csr_transpose,   # not differentiable: no autograd registered
    "block_mean_concat_backward": reference.block_mean_concat_backward,
    "dense_layer": reference.dense_layer,
    "dense_layer_backward": reference.dense_layer_backward,
    "gram_rows": reference.gram_rows,   # not differentiable: no autograd registered
    "topk_rows": reference.topk_rows,   # not differentiable: no autograd registered
}

# CUDA: Triton kernels where Triton imports.
_TRITON_CUDA = {}
if torch.cuda.is_available():
    ok, why = _backend.triton_status()
    if ok:
        from .kernels import gated_fusion as _k_fusion  # noqa: E402
        from .kernels import propagate as _k_prop  # noqa: E402
        _TRITON_CUDA = {
            "propagate": _k_prop.propagate,
            "gated_fusion": _k_fusion.gated_fusion_forward,
            "gated_fusion_backward": _k_fusion.gated_fusion_backward,
        }
    else:
        _backend.announce("triton", f"glrec_fast: Triton unavailable, CUDA ops use the pure-torch "
                                    f"reference because of {why}")

KERNELS: dict[str, dict[str, str]] = {}  # op -> device -> which kernel serves it (env_report)
for _name, _ref in _REFERENCE_KERNELS.items():
    KERNELS[_name] = {"CPU": "C++ (_C)", "CUDA": "CUDA (_C)"}
    if _C is None or not _backend.extension_has(_name, "CPU"):   # (a refused _C may have registered)
        _lib.impl(_name, _ref, "CPU")
        KERNELS[_name]["CPU"] = "reference"
    if _C is None or not _backend.extension_has(_name, "CUDA"):
        _lib.impl(_name, _TRITON_CUDA.get(_name, _ref), "CUDA")
        KERNELS[_name]["CUDA"] = "Triton" if _name in _TRITON_CUDA else "reference"


# --------------------------------------------------------------------------- fake (meta) kernels
@torch.library.register_fake("glrec::propagate")
def _fake_propagate(rowptr, col, dinv, x, num_layers):
    return torch.empty_like(x)


@torch.library.register_fake("glrec::gated_fusion")
def _fake_gated_fusion(e_graph, e_text, context, gate_weight, gate_bias):
    return torch.empty_like(e_graph)


@torch.library.register_fake("glrec::neighbor_sample")
def _fake_neighbor_sample(rowptr, col, seeds, fanouts, replace=False, seed=0):
    ctx = torch.library.get_ctx()  # every output size depends on the data

    def vec():
        return seeds.new_empty((ctx.new_dynamic_size(),))
    hops = len(fanouts)
    return ([vec() for _ in range(hops + 1)], [vec() for _ in range(hops)], [vec() for _ in range(hops)],
            [vec() for _ in range(hops)])


# Elementwise ops only, so the reference itself runs on meta tensors (the no-sync test relies on it).
torch.library.register_fake("glrec::grokking_observe")(_ref_grokking_observe_kernel)


@torch.library.register_fake("glrec::block_mean_concat")
def _fake_block_mean_concat(rowptr, col, t_rowptr, t_col, h, index=None, out_dtype=None):
    return h.new_empty((rowptr.size(0) - 1, 2 * h.size(1)), dtype=out_dtype or h.dtype)


@torch.library.register_fake("glrec::csr_transpose")
def _fake_csr_transpose(rowptr, col, num_cols):
    return col.new_empty((num_cols + 1,)), col.new_empty(col.shape), col.new_empty(col.shape)


@torch.library.register_fake("glrec::gram_rows")
def _fake_gram_rows(rowptr, col, val, t_rowptr, t_col, t_val, rows, out_index):
    return val.new_empty((rows.numel(), t_rowptr.numel() - 1))


@torch.library.register_fake("glrec::topk_rows")
def _fake_topk_rows(x, k):
    return x.new_empty((x.size(0), k)), x.new_empty((x.size(0), k), dtype=torch.long)


@torch.library.register_fake("glrec::block_mean_concat_backward")
def _fake_block_mean_concat_backward(rowptr, t_rowptr, t_col, grad, order=None, out_dtype=None):
    return grad.new_empty((t_rowptr.size(0) - 1, grad.size(1) // 2), dtype=out_dtype or grad.dtype)


@torch.library.register_fake("glrec::gated_fusion_backward")
def _fake_gated_fusion_backward(grad_out, e_graph, e_text, context, gate_weight, gate_bias):
    return (torch.empty_like(e_graph), torch.empty_like(e_text), torch.empty_like(gate_weight),
            torch.empty_like(gate_bias))


# --------------------------------------------------------------------------- autograd
def _propagate_setup(ctx, inputs, output):
    rowptr, col, dinv, _x, num_layers = inputs
    ctx.save_for_backward(rowptr, col, dinv)
    ctx.num_layers = num_layers


def _propagate_backward(ctx, grad):
    # The normalised adjacency is symmetric, so the backward of the layer mean is the same
    # propagation applied to the incoming gradient.
    rowptr, col, dinv = ctx.saved_tensors
    gx = torch.ops.glrec.propagate(rowptr, col, dinv, grad.contiguous(), ctx.num_layers)
    return None, None, None, gx, None


torch.library.register_autograd("glrec::propagate", _propagate_backward, setup_context=_propagate_setup)


def _fusion_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fusion_backward(ctx, grad):
    e_graph, e_text, context, gate_weight, gate_bias = ctx.saved_tensors
    d_eg, d_et, d_w, d_b = torch.ops.glrec.gated_fusion_backward(grad.contiguous(), e_graph, e_text,
                                                                 context, gate_weight, gate_bias)
    return d_eg, d_et, None, d_w, d_b


torch.library.register_autograd("glrec::gated_fusion", _fusion_backward, setup_context=_fusion_setup)


def _block_mean_setup(ctx, inputs, output):
    rowptr, _col, t_rowptr, t_col, h, index, _out_dtype = inputs
    ctx.save_for_backward(rowptr, t_rowptr, t_col, index)
    ctx.h_rows, ctx.h_dtype = h.size(0), h.dtype


def _block_mean_backward(ctx, grad):
    rowptr, t_rowptr, t_col, index = ctx.saved_tensors
    gh = torch.ops.glrec.block_mean_concat_backward(rowptr, t_rowptr, t_col, grad.contiguous(), out_dtype=ctx.h_dtype)
    if index is not None:   # local rows are h[index]: their gradients add up in h's rows
        gh = gh.new_zeros((ctx.h_rows, gh.size(1))).index_add_(0, index, gh)
    return None, None, None, None, gh, None, None


torch.library.register_autograd("glrec::block_mean_concat", _block_mean_backward, setup_context=_block_mean_setup)


@torch.library.register_fake("glrec::dense_layer")
def _fake_dense_layer(x, weight, bias, tanh):
    return x.new_empty((x.size(0), weight.size(0)))


def _dense_setup(ctx, inputs, output):
    x, weight, bias, tanh = inputs
    ctx.save_for_backward(x, weight, output if tanh else None)
    ctx.tanh, ctx.has_bias = tanh, bias is not None


def _dense_grads(ctx, grad):
    """(dx, dweight, dbias or None) from what ``_dense_setup`` / ``_DenseLayerAndCorner`` saved."""
    x, weight, y = ctx.saved_tensors   # y: None without tanh (the kernel then ignores its y)
    dx, dw, db = torch.ops.glrec.dense_layer_backward(grad.contiguous(), x, weight, x if y is None else y, ctx.tanh)
    return dx, dw, db if ctx.has_bias else None


def _dense_backward(ctx, grad):
    return *_dense_grads(ctx, grad), None


torch.library.register_autograd("glrec::dense_layer", _dense_backward, setup_context=_dense_setup)


# --------------------------------------------------------------------------- public wrappers
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_float(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float32, bfloat16 or float16, got {t.dtype}")


def propagate(graph, x: torch.Tensor, num_layers: int) -> torch.Tensor:
    """LightGCN propagation: the mean of layers 0..num_layers of ``x`` over ``graph``.

    ``x``: ``[num_users + num_items, d]``, users first, on the graph's device. Differentiable in ``x``.
    Precondition (checked where a ``BipartiteGraph`` is built): the joint CSR is symmetric
    (``A = A^T``), because the backward is the same propagation of the incoming gradient. The raw
    ``torch.ops.glrec.propagate(rowptr, col, dinv, x, num_layers)`` does not check it: on an
    asymmetric CSR its forward is ``D^-1/2 A D^-1/2`` but its gradient would be wrong.
    """
    _check_float("x", x, 2)
    if x.size(0) != graph.num_nodes:
        raise ValueError(f"x: expected {graph.num_nodes} rows (num_users {graph.num_users} + num_items "
                         f"{graph.num_items}), got {x.size(0)}")
    if x.device != graph.rowptr.device:
        raise ValueError(f"x: on {x.device} but the graph is on {graph.rowptr.device}; move one with .to()")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers: expected a non-negative int, got {num_layers!r}")
    if _backend.backend() == "reference":
        return reference.propagate(graph, x, num_layers)
    return torch.ops.glrec.propagate(graph.rowptr, graph.col, graph.dinv, x.contiguous(), num_layers)


def gated_fusion(e_graph, e_text, context, gate_weight, gate_bias) -> torch.Tensor:
    """``g * e_graph + (1 - g) * e_text`` with ``g = sigmoid(W[c,0]*e_graph + W[c,1]*e_text + b[c])``.

    ``e_graph, e_text: [N, d]``; ``context: [N]`` int64 in ``[0, C)``; ``gate_weight: [C, 2, d]``;
    ``gate_bias: [C, d]``. Differentiable in every float argument.
    """
    _check_float("e_graph", e_graph, 2)
    _check_float("e_text", e_text, 2)
    _check_float("gate_weight", gate_weight, 3)
    _check_float("gate_bias", gate_bias, 2)
    if e_text.shape != e_graph.shape:
        raise ValueError(f"e_text: expected shape {tuple(e_graph.shape)} like e_graph, got {tuple(e_text.shape)}")
    if e_text.dtype != e_graph.dtype:
        raise ValueError(f"e_text: expected dtype {e_graph.dtype} like e_graph, got {e_text.dtype}")
    n, d = e_graph.shape
    if not isinstance(context, torch.Tensor) or context.dim() != 1 or context.numel() != n:
        raise ValueError(f"context: expected a 1-d tensor of {n} context codes, got "
                         f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__}")
    if context.dtype != torch.long:
        raise ValueError(f"context: expected int64 (torch.long), got {context.dtype}")
    C = gate_bias.size(0)
    if gate_weight.shape != (C, 2, d):
        raise ValueError(f"gate_weight: expected shape ({C}, 2, {d}), got {tuple(gate_weight.shape)}")
    if gate_bias.shape != (C, d):
        raise ValueError(f"gate_bias: expected shape ({C}, {d}), got {tuple(gate_bias.shape)}")
    for name, t in (("e_text", e_text), ("context", context), ("gate_weight", gate_weight), ("gate_bias", gate_bias)):
        if t.device != e_graph.device:
            raise ValueError(f"{name}: on {t.device} but e_graph is on {e_graph.device}")
    if n:
        lo, hi = (int(v) for v in torch.aminmax(context))  # one host sync for the range check
        if lo < 0 or hi >= C:
            raise ValueError(f"context: codes must lie in [0, {C}) (gate_bias has {C} rows), got [{lo}, {hi}]")
    if _backend.backend() == "reference":
        return reference.gated_fusion(e_graph, e_text, context, gate_weight, gate_bias)
    return torch.ops.glrec.gated_fusion(e_graph.contiguous(), e_text.contiguous(), context.contiguous(),
                                        gate_weight.contiguous(), gate_bias.contiguous())


def _check_out_dtype(out_dtype):
    if out_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype: expected None, torch.float32 or torch.bfloat16, got {out_dtype!r}")


def block_mean_concat(h: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, t_rowptr: torch.Tensor,
                      t_col: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[h[:n] | mean_{e in row i} h[col[e]]]`` for the ``n = rowptr.numel() - 1`` rows of a block's CSR
    (``rowptr, col``: ``[n, m]`` over ``h``'s ``m`` rows; a row without edges gets a zero mean), so a
    GraphSAGE mean-aggregator layer is one GEMM of the result with ``[W_self | W_neigh]``.
    ``t_rowptr, t_col``: the same edges as the transposed CSR ``[m, n]`` (``sampling.Blocks.mean_csr``
    gives both), which the backward reads. Differentiable in ``h``. ``out_dtype`` (default ``h``'s):
    the result's dtype, float32 or bfloat16; the means are summed in float32 either way. The
    compiled kernel serves float32 and bfloat16 on the CPU; anything else runs
    ``reference.block_mean_concat``."""
    _check_float("h", h, 2)
    _check_out_dtype(out_dtype)
    if rowptr.numel() - 1 > h.size(0):
        raise ValueError(f"rowptr: expected at most h.size(0) + 1 = {h.size(0) + 1} entries, got {rowptr.numel()}")
    if t_rowptr.numel() != h.size(0) + 1:
        raise ValueError(f"t_rowptr: expected h.size(0) + 1 = {h.size(0) + 1} entries, got {t_rowptr.numel()}")
    if _backend.backend() == "reference" or h.dtype not in (torch.float32, torch.bfloat16):
        return reference.block_mean_concat(rowptr, col, t_rowptr, t_col, h, out_dtype=out_dtype)
    return torch.ops.glrec.block_mean_concat(rowptr, col, t_rowptr, t_col, h.contiguous(), out_dtype=out_dtype)


def _dense_compiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Checks :func:`dense_layer`'s arguments; True where the compiled kernel serves them."""
    _check_float("x", x, 2)
    _check_float("weight", weight, 2)
    if x.size(1) != weight.size(1):
        raise ValueError(f"x, weight: expected x [m, k] and weight [n, k], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.size(0),):
        raise ValueError(f"bias: expected shape ({weight.size(0)},), got {tuple(bias.shape)}")
    return (_backend.backend() != "reference" and x.device.type == "cpu"
            and KERNELS["dense_layer"]["CPU"] == "C++ (_C)"
            and all(t is None or t.dtype == torch.float32 for t in (x, weight, bias))
            and x.size(1) % 16 == 0 and weight.size(0) % 16 == 0)


def dense_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                tanh: bool = False) -> torch.Tensor:
    """``x weight^T + bias``, then ``tanh`` when asked (``reference.dense_layer``): a GraphSAGE layer
    on its ``[h_self | h_mean]`` input. Differentiable in ``x``, ``weight`` and ``bias``. The compiled
    kernel serves float32 CPU tensors whose in and out features are multiples of 16 (the GEMM and the
    tanh in one pass, and a backward that reads ``x`` once for ``dweight``); anything else, bfloat16
    included (oneDNN's bfloat16 GEMM is the faster there), runs the reference."""
    if not _dense_compiled(x, weight, bias):
        return reference.dense_layer(x, weight, bias, tanh)
    return torch.ops.glrec.dense_layer(x.contiguous(), weight, bias, bool(tanh))


class _DenseLayerAndCorner(torch.autograd.Function):
    """The compiled ``dense_layer`` and a copy of ``x[:rows, :cols]``; the copy's gradient is added
    into the layer's ``dx`` in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, tanh, rows, cols):
        y = torch.ops.glrec.dense_layer(x, weight, bias, tanh)
        ctx.save_for_backward(x, weight, y if tanh else None)
        ctx.tanh, ctx.has_bias, ctx.rows, ctx.cols = tanh, bias is not None, rows, cols
        return y, x[:rows, :cols].clone()

    @staticmethod
    def backward(ctx, grad_y, grad_corner):
        dx, dw, db = _dense_grads(ctx, grad_y)
        dx[:ctx.rows, :ctx.cols] += grad_corner
        return dx, dw, db, None, None, None


def dense_layer_and_corner(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tanh: bool,
                           rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense_layer(x, weight, bias, tanh), x[:rows, :cols])`` as one differentiable call: GraphSAGE's
    first layer and its seeds' ID rows (the L2 term's), both read off the layer's input. Apart, autograd
    would give the slice an ``x``-shaped zero-filled gradient and add it to the layer's: two passes over
    ``x`` (~100 MB at 20M interactions) per step. With the compiled kernel the slice's gradient goes
    into the layer's ``dx`` in place; elsewhere this is the two calls apart."""
    if not 0 <= rows <= x.size(0) or not 0 <= cols <= x.size(1):
        raise ValueError(f"rows, cols: expected 0 <= rows <= {x.size(0)} and 0 <= cols <= {x.size(1)}, "
                         f"got {rows}, {cols}")
    if not _dense_compiled(x, weight, bias):
        return reference.dense_layer(x, weight, bias, tanh), x[:rows, :cols]
    return _DenseLayerAndCorner.apply(x.contiguous(), weight, bias, bool(tanh), int(rows), int(cols))


class _TableRows(torch.autograd.Function):
    """``weight[nodes]`` (unique ids) with a row-sparse gradient whose rows come out sorted."""

    @staticmethod
    def forward(ctx, weight, nodes, order, sorted_ids):
        ctx.save_for_backward(order, sorted_ids)
        ctx.shape = weight.shape
        return weight.index_select(0, nodes)

    @staticmethod
    def backward(ctx, grad):
        order, sorted_ids = ctx.saved_tensors
        g = torch.sparse_coo_tensor(sorted_ids.unsqueeze(0), grad.index_select(0, order), ctx.shape,
                                    is_coalesced=True, check_invariants=False)
        return g, None, None, None


def table_rows(weight: torch.Tensor, nodes: torch.Tensor, order: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
    """``weight[nodes]`` for unique ``nodes``, whose gradient is a row-sparse tensor with its rows already
    sorted (``order = argsort(nodes)``, ``sorted_ids = nodes[order]``, as ``sampling.Blocks.sorted_nodes``
    gives them): the optimiser (``optim.RowAdam``) then skips coalescing ~300k row ids per step."""
    return _TableRows.apply(weight, nodes, order, sorted_ids)


class _TableMeanConcat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, nodes, order, sorted_ids, rowptr, table_col, t_rowptr, t_col, out_dtype):
        ctx.save_for_backward(rowptr, t_rowptr, t_col, order, sorted_ids)
        ctx.shape, ctx.dtype = weight.shape, weight.dtype
        return torch.ops.glrec.block_mean_concat(rowptr, table_col, t_rowptr, t_col, weight, nodes, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        rowptr, t_rowptr, t_col, order, sorted_ids = ctx.saved_tensors
        gh = torch.ops.glrec.block_mean_concat_backward(rowptr, t_rowptr, t_col, grad.contiguous(), order,
                                                        out_dtype=ctx.dtype)
        g = torch.sparse_coo_tensor(sorted_ids.unsqueeze(0), gh, ctx.shape, is_coalesced=True, check_invariants=False)
        return g, None, None, None, None, None, None, None, None


def table_mean_concat(weight: torch.Tensor, nodes: torch.Tensor, order: torch.Tensor, sorted_ids: torch.Tensor,
                      rowptr: torch.Tensor, col: torch.Tensor, t_rowptr: torch.Tensor, t_col: torch.Tensor,
                      table_col: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``block_mean_concat(table_rows(weight, nodes, order, sorted_ids), rowptr, col, t_rowptr, t_col)``
    with the ID rows read straight off the table: the first layer of a sampled GraphSAGE without the
    ``[m, d]`` copy of the block's rows, and the row-sparse gradient written in its sorted row order
    without a reordering pass (at 20M interactions, batch 8,192: ~300k rows each way per step).
    ``nodes`` are the block's unique global ids (its local rows), ``order``/``sorted_ids`` as
    :func:`table_rows` takes them; ``table_col`` is ``nodes[col]`` (``Blocks.table_cols``, built on the
    sampler's thread; computed here when None). ``out_dtype`` as :func:`block_mean_concat` takes it
    (the table's gradient keeps the table's dtype). The compiled CPU kernel serves a float32 table;
    elsewhere, the same product of :func:`table_rows` and :func:`block_mean_concat`."""
    _check_float("weight", weight, 2)
    _check_out_dtype(out_dtype)
    if t_rowptr.numel() != nodes.numel() + 1:
        raise ValueError(f"t_rowptr: expected nodes.numel() + 1 = {nodes.numel() + 1} entries, got {t_rowptr.numel()}")
    if (_backend.backend() == "reference" or weight.dtype != torch.float32
            or KERNELS["block_mean_concat"].get(weight.device.type.upper()) != "C++ (_C)"):
        return block_mean_concat(table_rows(weight, nodes, order, sorted_ids), rowptr, col, t_rowptr, t_col,
                                 out_dtype=out_dtype)
    if table_col is None:
        table_col = nodes[col]
    return _TableMeanConcat.apply(weight, nodes, order, sorted_ids, rowptr, table_col, t_rowptr, t_col, out_dtype)


def csr_transpose(rowptr: torch.Tensor, col: torch.Tensor, num_cols: int):
    """``(t_rowptr, t_col, order)``: the transpose of the CSR ``(rowptr, col)`` with ``num_cols`` columns,
    ``t_col`` holding each edge's row (edges of a column in their original order) and ``order`` their
    positions in ``col`` (``torch.argsort(col, stable=True)``). One counting sort on the CPU."""
    for name, t in (("rowptr", rowptr), ("col", col)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.long:
            raise ValueError(f"{name}: expected a 1-d int64 tensor")
    if isinstance(num_cols, bool) or not isinstance(num_cols, int) or num_cols < 0:
        raise ValueError(f"num_cols: expected a non-negative int, got {num_cols!r}")
    if _backend.backend() == "reference":
        return reference.csr_transpose(rowptr, col, num_cols)
    return torch.ops.glrec.csr_transpose(rowptr.contiguous(), col.contiguous(), num_cols)


def gram_rows(r: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, out_index: torch.Tensor | None = None) -> torch.Tensor:
    """``[len(rows), I]``: for each ``u`` in ``rows``, the 0/1 pattern of row ``u`` of ``r`` times ``t @ r``,
    with output column ``j`` written at ``out_index[j]`` (a permutation; None: in place).

    ``r``: a sparse CSR ``[U, I]`` float32 matrix, ``t``: a sparse CSR ``[I, U]`` (a graph filter passes
    ``R~`` and ``R~^T``: the result is ``r_u P~``, ``models/filters.py``). The compiled kernel walks each
    row's two-hop neighbourhood only; the reference (``reference.gram_rows``) is two torch CSR x dense
    products over a dense block of the rows' patterns. Not differentiable."""
    for name, m, shape in (("r", r, None), ("t", t, (r.size(1), r.size(0)) if r.dim() == 2 else None)):
        if not isinstance(m, torch.Tensor) or m.layout != torch.sparse_csr or m.dtype != torch.float32:
            raise ValueError(f"{name}: expected a float32 sparse CSR matrix, got "
                             f"{getattr(m, 'layout', type(m))} {getattr(m, 'dtype', '')}")
        if shape is not None and tuple(m.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (the transpose of r's), got {tuple(m.shape)}")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1:
        raise ValueError("rows: expected a 1-d tensor of row ids of r")
    rows = rows.to(device=r.device, dtype=torch.long).contiguous()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= r.size(0)):
        raise ValueError(f"rows: expected ids in [0, {r.size(0)}), got {int(rows.min())}..{int(rows.max())}")
    out_index = (torch.arange(r.size(1), device=r.device) if out_index is None
                 else out_index.to(device=r.device, dtype=torch.long).contiguous())
    if out_index.shape != (r.size(1),):
        raise ValueError(f"out_index: expected a permutation of the {r.size(1)} columns of r, got shape "
                         f"{tuple(out_index.shape)}")
    args = (r.crow_indices(), r.col_indices(), r.values(), t.crow_indices(), t.col_indices(), t.values(), rows,
            out_index)
    if _backend.backend() == "reference":
        return reference.gram_rows(*args)
    return torch.ops.glrec.gram_rows(*(a.contiguous() for a in args))


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) ``[B, k]``: each row's ``k`` largest entries of the 2-d ``x``, best first; NaN ranks
    first and ties go by a fixed pseudo-random order of the columns (``reference.topk_rows``), so where
    scores tie no range of item ids is favoured. Float32 CPU tiles take the compiled kernel (one pass per row over a
    k-slot heap: several times torch.topk's speed at ranking's k = 20); any other tile, or a process
    without the kernel, takes ``torch.topk``, which returns the same values but orders ties its own
    way. Not differentiable."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-d tensor of scores, got {getattr(x, 'shape', type(x))}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= x.size(1):
        raise ValueError(f"k: expected an int in [0, {x.size(1)}] (the row length), got {k!r}")
    if x.device.type == "cpu" and x.dtype == torch.float32 and KERNELS["topk_rows"]["CPU"] != "reference" \
            and _backend.backend() != "reference":
        return torch.ops.glrec.topk_rows(x if x.size(1) <= 1 or x.stride(1) == 1 else x.contiguous(), k)
    return torch.topk(x, k, dim=1)


class SampledSubgraph(NamedTuple):
    """What ``neighbor_sample`` returns (see its docstring for the exact layout)."""
    nodes: list[torch.Tensor]
    rows: list[torch.Tensor]
    cols: list[torch.Tensor]
    edge_ids: list[torch.Tensor]


def neighbor_sample(rowptr: torch.Tensor, col: torch.Tensor, seeds: torch.Tensor, fanouts,
                    replace: bool = False, seed: int = 0) -> SampledSubgraph:
    """Multi-hop uniform neighbour sampling over a CSR graph (not differentiable).

    ``rowptr: [N + 1]``, ``col: [nnz]``, ``seeds: [S]``: int64 on one device; ``fanouts``: one int
    per hop, ``-1`` = every neighbour, ``k >= 0`` = at most ``k`` distinct neighbours (with
    ``replace=True``: exactly ``k`` uniform draws, repeats allowed, none for an isolated node).
    ``seed`` fixes the sample: the compiled kernels give node ``v`` at hop ``l`` its own random
    stream keyed by ``(seed, l, v)``, so the result is the same for any thread count (and the
    same on CPU and CUDA); vary ``seed`` per batch.

    Returns ``SampledSubgraph(nodes, rows, cols, edge_ids)``, with ``L = len(fanouts)``:

    - ``nodes[0]``: the seeds, duplicates removed (first occurrence kept, order kept);
      ``nodes[l + 1]``: ``nodes[l]`` followed by the nodes first reached at hop ``l`` (in order of
      first appearance in that hop's edge list). Every ``nodes[l]`` is a prefix of ``nodes[L]``,
      so a node's *local id* (its position in ``nodes[L]``) never changes between hops.
    - hop ``l`` samples the neighbours of its frontier: the nodes added at hop ``l - 1`` (local ids
      ``[len(nodes[l-1]), len(nodes[l]))``, the seeds for ``l = 0``). Nodes already sampled at an
      earlier hop are not sampled again; their sampled neighbourhood is reused.
    - ``rows[l][j]``: local id of the frontier node of sampled edge ``j`` (the aggregating /
      destination node); ``cols[l][j]``: local id (``< len(nodes[l + 1])``) of the neighbour it
      aggregates from; ``edge_ids[l][j]``: the position of that edge in ``col``, so
      ``col[edge_ids[l]] == nodes[l + 1][cols[l]]``. Edges are grouped by row in frontier order.

    For an ``L``-layer GNN, layer ``t = 1..L`` computes the nodes ``nodes[L - t]`` from ``h^{t-1}``
    of ``nodes[L - t + 1]`` using the edges of hops ``0..L - t`` concatenated (sorted by row). See
    ``glrec_fast.sampling`` for helpers and ``models/graphsage.py`` for a user.

    Malformed input raises ``ValueError``/``TypeError`` naming the argument; ``rowptr``/``col``
    entries are validated where the sampler reads them (a full O(nnz) check per call would cost
    more than the sample).
    """
    for name, t in (("rowptr", rowptr), ("col", col), ("seeds", seeds)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-d tensor, got shape {tuple(t.shape)}")
        if t.dtype != torch.long:
            raise ValueError(f"{name}: expected int64 (torch.long), got {t.dtype}; convert with .long()")
        if t.device != rowptr.device:
            raise ValueError(f"{name}: on {t.device} but rowptr is on {rowptr.device}; move one with .to()")
    if rowptr.numel() < 1:
        raise ValueError("rowptr: expected num_nodes + 1 >= 1 entries, got an empty tensor")
    if isinstance(fanouts, (int, torch.Tensor)) or not hasattr(fanouts, "__iter__"):
        raise TypeError(f"fanouts: expected a list of ints (one per hop), got {type(fanouts).__name__}")
    fanouts = list(fanouts)
    for i, k in enumerate(fanouts):
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise ValueError(f"fanouts[{i}]: expected -1 (every neighbour) or an int >= 0, got {k!r}")
    if not isinstance(replace, bool):
        raise TypeError(f"replace: expected a bool, got {type(replace).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in the int64 range, got {seed!r}")
    if _backend.backend() == "reference":
        return SampledSubgraph(*reference.neighbor_sample(rowptr, col, seeds, fanouts, replace, seed))
    out = torch.ops.glrec.neighbor_sample(rowptr.contiguous(), col.contiguous(), seeds.contiguous(), fanouts,
                                          replace, seed)
    return SampledSubgraph(*out)


def row_adam_(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rows: torch.Tensor,
              grad: torch.Tensor, step_size: float, beta1: float, beta2: float, eps: float, bc2_sqrt: float) -> None:
    """One lazy-Adam step on rows ``rows`` (1-d int64, **unique**) of ``param`` and its moments, in place:
    ``grad`` holds those rows' gradients ``[len(rows), *param.shape[1:]]``. The arithmetic of
    ``reference.row_adam_``; the compiled kernel serves contiguous float32 tables on the CPU."""
    if rows.dtype != torch.long or rows.dim() != 1:
        raise ValueError(f"rows: expected a 1-d int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if grad.shape != (rows.numel(), *param.shape[1:]):
        raise ValueError(f"grad: expected shape {(rows.numel(), *param.shape[1:])}, got {tuple(grad.shape)}")
    fast = (_backend.backend() != "reference" and param.dtype == torch.float32 and grad.dtype == torch.float32
            and all(t.is_contiguous() for t in (param, exp_avg, exp_avg_sq)))
    if not fast:
        reference.row_adam_(param, exp_avg, exp_avg_sq, rows, grad, step_size, beta1, beta2, eps, bc2_sqrt)
        return
    torch.ops.glrec.row_adam_(param, exp_avg, exp_avg_sq, rows, grad.contiguous(), float(step_size), float(beta1),
                              float(beta2), float(eps), float(bc2_sqrt))


def kernel_report() -> dict:
    """Which kernel serves each op on each device (for env_report)."""
    return {name: dict(devs) for name, devs in KERNELS.items()}
