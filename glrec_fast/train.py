"""``python -m glrec_fast.train``: load data, build a model, train with BPR, evaluate, checkpoint.

    python -m glrec_fast.train                       # the embedded default (synthetic data)
    python -m glrec_fast.train --dataset ml-100k --split random --model lightgcn --epochs 50 --out runs/ml
    python -m glrec_fast.train --config my.yaml --lr 0.002 --resume
    torchrun --nproc_per_node=2 -m glrec_fast.train --dataset ml-100k --model lightgcn --device cpu --out runs/ml2

Writes to ``--out``: ``metrics.json`` (``{"valid": {...}, "test": {...}}``), ``config.yaml`` (the
resolved configuration), ``train.log``, ``best.pt`` (the best model's final embeddings, for
``glrec_fast.recommend``), ``data.pt`` (the training pairs and id maps best.pt ranks with, written
once per run; keep it beside best.pt) and ``last.pt`` (everything ``--resume`` needs). Checkpoints are written
atomically. A NaN or infinite loss stops the run with a clear message and keeps the last good
checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch

from . import allocator, checkpoint, config, distributed, metrics
from .graph import BipartiteGraph

log = logging.getLogger("glrec_fast.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- setup
def _setup_logging(out: str, ctx: distributed.Context = distributed.Context()) -> None:
    """INFO to stderr and out/train.log; other ranks of a distributed run log warnings to stderr only."""
    root = logging.getLogger("glrec_fast")
    root.setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_glrec", False):
            root.removeHandler(h)
    prefix = f"[rank {ctx.rank}] " if ctx.active else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(out, "train.log")))
    for h in handlers:
        h.setFormatter(fmt)
        h._glrec = True
        root.addHandler(h)
    root.propagate = False


def _device(name: str) -> torch.device:
    """The run's device, with its index (``cuda`` -> ``cuda:<current>``: tensors report one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but torch sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def _numpy_state() -> list:
    """numpy's global RNG state as tensors and plain numbers (a checkpoint loads with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from(state) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg):
    from .data import load_dataset
    kw = {}
    if cfg["dataset"] == "synthetic":
        kw = dict(num_users=cfg["synthetic_users"], num_items=cfg["synthetic_items"],
                  num_interactions=cfg["synthetic_interactions"])
    if cfg["valid_fraction"]:
        kw["valid_fraction"] = cfg["valid_fraction"]
    return load_dataset(cfg["dataset"], split=cfg["split"], seed=cfg["seed"], **kw)


def build_model(cfg, ds, graph: BipartiteGraph, device):
    """Model by name; each builder imports its module lazily so optional parts stay optional."""
    name = cfg["model"]
    if name == "mf":
        from .models.mf import MF
        return MF(ds.num_users, ds.num_items, cfg["emb_dim"], cfg["init_std"])
    if name == "lightgcn" and not cfg["sampled"]:
        from .models.lightgcn import LightGCN
        return LightGCN(graph, cfg["emb_dim"], cfg["num_layers"], cfg["init_std"], cfg["propagate_dtype"])
    if name in ("graphsage", "lightgcn"):
        from .models import graphsage
        return graphsage.build(cfg, ds, graph)
    if name == "hybrid" and cfg["fusion"] == "score":
        from .models import score_hybrid
        return score_hybrid.build(cfg, ds, graph, device)
    if name == "hybrid":
        from .models import hybrid
        return hybrid.build(cfg, ds, graph, device)
    if name in ("gfcf", "bspm"):
        from .models import filters
        return filters.build(cfg, graph, ds)
    raise ValueError(f"model: unknown {name!r}; expected {' | '.join(MODELS)}")


MODELS = ("mf", "lightgcn", "graphsage", "hybrid", "gfcf", "bspm")
ITEM_BIAS_MODELS = ("mf", "lightgcn", "graphsage")   # --item_bias: models scored by one (user, item) inner product


def check_config(cfg: dict) -> None:
    """Every choice and range in the configuration, and that the dataset is on this machine, checked
    before anything is loaded: raises ValueError (or DatasetNotFoundError) naming the key, what it
    got and what it expects. The models check their own arguments again when built from Python."""
    from .data.registry import locate
    from .data.splits import SPLITS
    from .models.filters import SOLVERS
    from .models.hybrid import COLD_GATES, FUSIONS, GATE_FEATURES, GRAPH_BRANCHES, USER_GATES
    from .models.lightgcn import LightGCN
    from .models.score_hybrid import FILTER_BRANCHES, TEXT_BRANCHES
    from .text.encoders import ENCODER_NAMES

    choices = {"model": MODELS, "split": (None, *SPLITS), "loss": (None, "bpr", "softmax"), "lr_schedule": ("constant", "cosine"),
               "init": ("normal", "spectral"), "sharpen_solver": SOLVERS, "encoder": ENCODER_NAMES,
               "graph_branch": ("auto", *GRAPH_BRANCHES, *FILTER_BRANCHES), "fusion": (*FUSIONS, "score"), "cold_gate": COLD_GATES, "user_gate": USER_GATES,
               "gate_features": GATE_FEATURES, "text_branch": TEXT_BRANCHES,
               "propagate_dtype": tuple(LightGCN.PROPAGATE_DTYPES)}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ValueError(f"{key}: expected one of {' | '.join(str(a) for a in allowed)}, got {cfg[key]!r}")
    at_least = {"emb_dim": 1, "epochs": 1, "batch_size": 1, "eval_every": 1, "eval_batch_size": 1,
                "num_negatives": 1, "text_hidden": 1, "grok_every": 1, "grok_sample_users": 1, "sharpen_steps": 1,
                "num_layers": 0, "patience": 0, "eval_users": 0, "filter_rank": 0, "synthetic_users": 1, "synthetic_items": 1,
                "synthetic_interactions": 1, "num_threads": 1, "text_neighbours": 1}
    for key, lo in at_least.items():
        if cfg[key] is not None and cfg[key] < lo:
            raise ValueError(f"{key}: expected an integer >= {lo}, got {cfg[key]!r}")
    positive = ("lr", "temperature", "init_std", "time_budget", "dist_timeout", "text_power")
    for key in positive:
        if cfg[key] is not None and (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float))
                                     or not cfg[key] > 0):
            raise ValueError(f"{key}: expected a number > 0, got {cfg[key]!r}")
    for key in ("reg_weight", "weight_decay", "aux_weight", "cold_weight", "gate_reg", "ideal_weight", "sharpen_time"):
        if not cfg[key] >= 0:
            raise ValueError(f"{key}: expected a number >= 0, got {cfg[key]!r}")
    for key, lo, hi in (("valid_fraction", 0.0, 1.0), ("cold_drop", 0.0, 1.0)):
        if not lo <= cfg[key] < hi:
            raise ValueError(f"{key}: expected a fraction in [{lo}, {hi}), got {cfg[key]!r}")
    for key in ("static_weight", "gate_init"):
        if not 0.0 <= cfg[key] <= 1.0:
            raise ValueError(f"{key}: expected a share in [0, 1], got {cfg[key]!r}")
    if not cfg["topk"] or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in cfg["topk"]):
        raise ValueError(f"topk: expected a list of positive integers, got {cfg['topk']!r}")
    if not cfg["fanouts"] or any(isinstance(f, bool) or not isinstance(f, int) or (f < 1 and f != -1)
                                 for f in cfg["fanouts"]):
        raise ValueError(f"fanouts: expected a list of positive integers (-1 = every neighbour), got {cfg['fanouts']!r}")
    dev = str(cfg["device"])
    if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ValueError(f"device: expected auto | cpu | cuda | cuda:N, got {dev!r}")
    for key, value in (("loss", "softmax"), ("init", "spectral")):
        if cfg[key] == value and cfg["model"] in ("gfcf", "bspm"):
            raise ValueError(f"{key}: {value} is for trained models; {cfg['model']} is training-free")
    if cfg["graph_branch"] in FILTER_BRANCHES and not (cfg["model"] == "hybrid" and cfg["fusion"] == "score"):
        raise ValueError(f"graph_branch: {cfg['graph_branch']} (a fitted filter) mixes with the text branch at score "
                         f"level only; use --model hybrid --fusion score, or a graph branch of "
                         f"{' | '.join(GRAPH_BRANCHES)}")
    locate(cfg["dataset"])


def prepare_model(cfg, model, graph) -> None:
    """The loss and initialisation choices that act on a built model (``check_config`` checked them)."""
    if not model.trainable:
        return
    if cfg["loss"] == "softmax":
        model.cosine = True
        if cfg["item_bias"] and cfg["model"] in ITEM_BIAS_MODELS:
            model.add_item_bias(cfg["temperature"])
    if cfg["init"] == "spectral":
        from .models.losses import spectral_embeddings
        t = time.time()
        user, item = spectral_embeddings(graph, cfg["emb_dim"], seed=cfg["seed"])
        model.init_spectral(user, item, cfg["init_std"])
        log.info("spectral initialisation: top-%d singular factors of the normalised graph (%.1fs)",
                 cfg["emb_dim"], time.time() - t)


def cosine_lr_at(lr: float, step: int, total_steps: int) -> float:
    """``--lr_schedule cosine``: the learning rate of step ``step`` (0-based) of ``total_steps``,
    from ``lr`` at the first step down a half cosine to 0 after the last."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- sampling
def sample_negatives(users: torch.Tensor, num_items: int, train_keys: torch.Tensor,
                     gen: torch.Generator, max_tries: int = 20) -> torch.Tensor:
    """One uniformly drawn item per user that the user has not interacted with in training.

    ``train_keys`` is the sorted tensor of ``user * num_items + item`` training keys (one
    ``searchsorted`` per round; a binary search in each user's CSR row instead was 2.5x slower per
    batch of 8,192 on Gowalla, so the step keeps this table). Collisions are re-drawn (vectorised);
    after ``max_tries`` rounds the rare leftovers (users who saw nearly every item) keep their last draw.
    """
    neg = torch.randint(0, num_items, users.shape, generator=gen)
    if train_keys.numel() == 0:
        return neg
    for _ in range(max_tries):
        keys = users * num_items + neg
        idx = torch.searchsorted(train_keys, keys).clamp(max=train_keys.numel() - 1)
        bad = train_keys[idx] == keys
        n_bad = int(bad.sum())
        if n_bad == 0:
            break
        neg[bad] = torch.randint(0, num_items, (n_bad,), generator=gen)
    return neg


# ----------------------------------------------------------------------------- evaluation
EVAL_TILE_BYTES = 1 << 30   # one evaluation score tile ([users, items] float32) stays under 1 GiB
FULL_GRAPH_HINT_EDGES = 5_000_000   # above this, full-graph training gets a one-line hint to sample


def resolve_graph_branch(cfg: dict, ds) -> dict:
    """``graph_branch: auto`` (the default): the hybrid's graph branch that won on validation. For the
    score-level hybrid that is the GF-CF graph filter, its setting chosen on the validation split
    (``tune_filter``) when there is one: filter + titles beat LightGCN + titles on validation on both
    splits of amazon-beauty and ml-100k, and it needs no graph training (bench/RESULTS.md, "The
    default hybrid"). The gated and static fusions mix trained graph vectors: LightGCN."""
    if cfg["graph_branch"] != "auto":
        return cfg
    if cfg["model"] == "hybrid" and cfg["fusion"] == "score":
        tune = cfg["tune_filter"] or bool(ds.valid.numel())
        log.info("graph_branch auto: the GF-CF graph filter%s", ", its setting chosen on validation" if tune else
                 " with its default setting (no validation split to choose on)")
        return dict(cfg, graph_branch="gfcf", tune_filter=tune)
    return dict(cfg, graph_branch="lightgcn")


DEFAULT_LR = 1e-3   # the LightGCN paper's
HYBRID_LR = 5e-3    # the hybrids' (every hybrid number in bench/RESULTS.md was trained at it)


def resolve_lr(cfg: dict) -> dict:
    """``lr: null`` (the default): ``HYBRID_LR`` for ``--model hybrid``, ``DEFAULT_LR`` otherwise. The score
    hybrid's trained text branch learns slowly at 1e-3: on amazon-beauty (seed 0) the default hybrid's
    best validation at 1e-3 came after 27 epochs (17 minutes), and 5e-3 passed it after 7 (bench/RESULTS.md,
    "The three-branch mix")."""
    if cfg["lr"] is not None:
        return cfg
    lr = HYBRID_LR if cfg["model"] == "hybrid" else DEFAULT_LR
    log.info("lr: %g (the default for --model %s)", lr, cfg["model"])
    return dict(cfg, lr=lr)


def resolve_loss(cfg: dict) -> dict:
    """``loss: null`` (the default): ``softmax`` for the score hybrid whose graph branch is a fitted filter
    (the default hybrid: its one trained branch is the text model), ``bpr`` otherwise; call it on a
    config whose ``graph_branch`` is resolved (``resolve_graph_branch``). On amazon-beauty (seed 0) the
    default hybrid with the text branch trained by sampled softmax had, after its first epoch, the
    validation score BPR reached after 28 (bench/RESULTS.md, "The text branch by sampled softmax")."""
    from .models.score_hybrid import FILTER_BRANCHES
    if cfg["loss"] is not None:
        return cfg
    score_filter = (cfg["model"] == "hybrid" and cfg["fusion"] == "score"
                    and cfg["graph_branch"] in FILTER_BRANCHES)
    loss = "softmax" if score_filter else "bpr"
    log.info("loss: %s (the default for --model %s%s)", loss, cfg["model"],
             " with a filter graph branch at score level" if score_filter else "")
    return dict(cfg, loss=loss)


def eval_batch_users(cfg, num_items: int) -> int:
    """Users per evaluation batch: ``eval_batch_size``, lowered so that a score tile fits EVAL_TILE_BYTES
    (at a million items 1,024 users would be a 4 GiB tile; the metrics do not depend on the batch)."""
    return max(1, min(int(cfg["eval_batch_size"]), EVAL_TILE_BYTES // (4 * max(1, num_items))))


def _scale_hints(cfg, graph) -> None:
    """One-line hints when a run's choices will not scale to its graph."""
    n = graph.num_edges
    full_graph = (cfg["model"] == "lightgcn" and not cfg["sampled"]) or (
        cfg["model"] == "hybrid" and cfg["graph_branch"] == "lightgcn" and cfg["fusion"] != "score")
    if full_graph and n > FULL_GRAPH_HINT_EDGES:
        log.warning("hint: %s propagates the whole graph (%s interactions) on every step; on a graph this size "
                    "sampled training is far cheaper per step: --model graphsage, --model lightgcn --sampled true, "
                    "or --graph_branch graphsage for the hybrid", cfg["model"], f"{n:,}")
    per = eval_batch_users(cfg, graph.num_items)
    if per < int(cfg["eval_batch_size"]):
        log.info("evaluation: %d users per batch instead of eval_batch_size=%d, so that one [users x %s items] "
                 "score tile stays under %d MiB", per, cfg["eval_batch_size"], f"{graph.num_items:,}",
                 EVAL_TILE_BYTES >> 20)


def validation_users(cfg, ds) -> torch.Tensor | None:
    """The users training validates on: None for every validation user (``eval_users`` 0, or no more
    users than it), else a fixed sample of ``eval_users`` drawn with the run's seed. The final report
    always ranks every one."""
    n = cfg["eval_users"]
    users = torch.unique(ds.valid[:, 0]) if ds.valid.numel() else ds.valid.new_zeros(0)
    if n == 0 or users.numel() <= n:
        return None
    pick = torch.randperm(users.numel(), generator=torch.Generator().manual_seed(cfg["seed"]))[:n]
    return users[pick].sort().values


def evaluate_split(model, ds, graph, split: str, cfg, device, ctx=distributed.Context(), users=None) -> dict:
    """Full-ranking metrics of ``split``'s pairs (only those of ``users`` when given)."""
    pairs = getattr(ds, split)
    if users is not None:
        pairs = pairs[torch.isin(pairs[:, 0], users)]
    if pairs.numel() == 0:
        return {}
    exclude = [graph] + ([ds.valid] if split == "test" and ds.valid.numel() else [])   # graph: the training pairs
    model.eval()
    try:
        return metrics.evaluate(model.scorer(), pairs, ds.num_users, ds.num_items, exclude=exclude,
                                ks=cfg["topk"], item_context=graph.item_context,
                                batch_size=eval_batch_users(cfg, ds.num_items), device=device, shard=ctx.eval_shard(),
                                reduce=ctx.sum_ if ctx.eval_shard() else None)
    finally:
        model.train()


# ----------------------------------------------------------------------------- training
def train(cfg: dict, callbacks=()) -> dict:
    """Run one training job described by ``cfg`` (see configs/default.yaml). Returns metrics.

    Started by ``torchrun``, every rank runs this function (``glrec_fast.distributed``)."""
    check_config(cfg)
    ctx, dist_device = distributed.setup(cfg["device"], cfg["dist_timeout"])
    try:
        return _train(cfg, callbacks, ctx, dist_device or _device(cfg["device"]))
    except RuntimeError as e:
        said = distributed.peer_timeout(e, ctx, cfg["dist_timeout"])
        if said is None:
            raise
        raise said from e
    finally:
        distributed.teardown(ctx)


def _train(cfg: dict, callbacks, ctx: distributed.Context, device: torch.device) -> dict:
    out = cfg["out"]
    main_rank = ctx.is_main
    save = checkpoint.save if main_rank else (lambda obj, path: None)   # rank 0 writes every file
    _setup_logging(out, ctx)
    allocator.keep_freed_memory()   # before the data build: its temporaries are reused too
    cfg = resolve_lr(cfg)
    if ctx.active:
        log.info("distributed: %d ranks, backend %s, this rank on %s; global batch %d = %d ranks x ~%d",
                 ctx.world_size, ctx.backend, device, cfg["batch_size"], ctx.world_size,
                 cfg["batch_size"] // ctx.world_size)
        if cfg["batch_size"] < ctx.world_size:
            raise distributed.LaunchError(f"batch_size: {cfg['batch_size']} is the global batch and must be >= the "
                             f"world size {ctx.world_size}")
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    elif ctx.backend == "gloo" and main_rank:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or ctx.world_size)
        hint = distributed.idle_cpus_hint(distributed.cpu_count(), local_world, torch.get_num_threads())
        if hint:
            log.warning("distributed: %s", hint)
    seed_everything(cfg["seed"])
    t0 = time.time()
    ds = load_data(cfg)
    log.info("data: %s", ds.summary() if hasattr(ds, "summary") else ds)
    graph = BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    load_s = time.time() - t0
    log.info("graph: %s (load %.1fs)", graph, load_s)
    cfg = resolve_loss(resolve_graph_branch(cfg, ds))
    _scale_hints(cfg, graph)
    t_start = time.time()   # --time_budget counts from here: initialisation, training and validation
    model = build_model(cfg, ds, graph, device).to(device)
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    if main_rank:
        checkpoint.write_text(os.path.join(out, "config.yaml"), config.dump(cfg))
    if not model.trainable:
        if ctx.world_size > 1:
            raise distributed.LaunchError(f"model: {cfg['model']} is fitted once without training; run it in one "
                             f"process (python -m glrec_fast.train), not under torchrun")
        return _fit_filter(cfg, model, ds, graph, device, out, t0)
    _set_sample_seed(model, ctx.sample_seed(cfg["seed"]))
    if not cfg["resume"]:
        prepare_model(cfg, model, graph)
    else:
        prepare_model(dict(cfg, init="normal"), model, graph)   # the weights come from the checkpoint
    graph_dev = graph.to(device) if device.type != "cpu" else graph
    opt = _optimizer(model, cfg)
    step_fn, sync_rows = distributed.step_function(model, ctx, device)
    budget_s = float(cfg["time_budget"]) * 60.0 if cfg["time_budget"] else math.inf
    softmax = cfg["loss"] == "softmax"
    cosine_lr = cfg["lr_schedule"] == "cosine"
    total_steps = cfg["epochs"] * max(1, math.ceil(ds.train.size(0) / cfg["batch_size"]))

    state = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": -1, "bad_evals": 0, "history": [],
             "world_size": ctx.world_size}
    best_export = None
    if cfg["resume"]:
        if not os.path.isfile(last_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {last_path!r} to continue from")
        ck = checkpoint.load(last_path)
        saved_world = ck["state"].get("world_size", 1)
        if saved_world != ctx.world_size:
            raise distributed.LaunchError(f"--resume: {last_path!r} was written by a run of {saved_world} process(es); "
                             f"resume it with the same world size (now {ctx.world_size})")
        ctx.check_same_checkpoint(last_path, ck["state"]["epoch"], ck["state"]["step"])
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        for group in opt.param_groups:  # the resumed run's --lr applies (e.g. lowering it after a divergence)
            group["lr"] = cfg["lr"]
        state = ck["state"]
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(_numpy_state_from(ck["rng"]["numpy"]))
        random.setstate(ck["rng"]["python"])
        if os.path.isfile(best_path):
            best_export = checkpoint.load(best_path)
        log.info("resumed from %s at epoch %d", last_path, state["epoch"])

    data_ref = _write_data(ds, out, write=main_rank)   # once per run; best.pt refers to it
    train_pairs = ds.train.to(torch.long)
    train_keys = torch.sort(train_pairs[:, 0] * ds.num_items + train_pairs[:, 1]).values
    gen = torch.Generator()
    has_valid = ds.valid.numel() > 0
    valid_users = validation_users(cfg, ds)
    valid_pairs = ds.valid if valid_users is None else ds.valid[torch.isin(ds.valid[:, 0], valid_users)]
    if valid_users is not None:
        log.info("validation while training: a fixed sample of %s of the %s validation users (eval_users=%s); "
                 "the final report ranks every one", f"{valid_users.numel():,}",
                 f"{torch.unique(ds.valid[:, 0]).numel():,}", cfg["eval_users"])
    if not has_valid:
        log.info("no validation split: no early stopping; the last epoch's model is kept")
    for cb in callbacks:
        cb.on_start(model=model, ds=ds, graph=graph_dev, cfg=cfg, device=device)
    if cfg["resume"]:
        # Callbacks with state (the grokking monitor) continue where the interrupted run stopped.
        saved = ck.get("callbacks", {})
        for cb in callbacks:
            name = type(cb).__name__
            if hasattr(cb, "load_state_dict") and name in saved:
                cb.load_state_dict(saved[name])
    tb = _tensorboard(cfg, out) if main_rank else None

    from tqdm.auto import tqdm
    for epoch in range(state["epoch"], cfg["epochs"]):
        model.train()
        t_ep = time.time()
        # One generator seed per epoch, so a resumed run draws exactly what an unbroken run would. The
        # epoch's order is one permutation; each batch gathers its pairs from it (no shuffled copies
        # of the training set: at 50M interactions those were 1.2 GB per epoch).
        gen.manual_seed(cfg["seed"] * 1000003 + epoch)
        n_train = train_pairs.size(0)
        perm = torch.randperm(n_train, generator=gen)
        n_batches = math.ceil(n_train / cfg["batch_size"])
        if n_train - (n_batches - 1) * cfg["batch_size"] < ctx.world_size:
            n_batches -= 1   # a last batch too small to give every rank a triple is left out
        # softmax: num_negatives per batch, shared by the batch, drawn for the whole epoch up front so
        # that a sampled model can prefetch the next batch's blocks. BPR: one negative per triple,
        # drawn per global batch from a generator of its own (the same on every rank and on a re-draw).
        if softmax:
            negs_all = torch.randint(0, ds.num_items, (n_batches, cfg["num_negatives"]), generator=gen)
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                   disable=None if main_rank else True)

        def batch(j):
            """This rank's shard of global batch ``j``: (users, positives, negatives) on the device."""
            lo, hi = j * cfg["batch_size"], min((j + 1) * cfg["batch_size"], n_train)
            sl = ctx.shard(lo, hi)
            pairs = train_pairs[perm[sl]]
            if softmax:
                negs = negs_all[j]   # shared by the whole global batch
            else:
                g = torch.Generator().manual_seed(((cfg["seed"] * 1000003 + epoch) * 1000003 + j) % (1 << 63))
                negs = sample_negatives(train_pairs[perm[lo:hi], 0], ds.num_items, train_keys, g)
                negs = negs[sl.start - lo:sl.stop - lo]
            return tuple(t.to(device, non_blocking=True) for t in (pairs[:, 0], pairs[:, 1], negs))

        upcoming = batch(0) if n_batches else None
        for b in bar:
            users, pos, neg = upcoming if isinstance(upcoming, tuple) else upcoming.result()
            if b + 1 < n_batches:
                # Sampled models (sampling.SampledTraining): the next batch is built and its neighbourhood
                # drawn on a worker thread while this batch trains; its sample is the same as one drawn on
                # the spot. Hybrids with a sampled branch get the next batch's neighbourhood only.
                if hasattr(model, "prefetch_from"):
                    upcoming = model.prefetch_from(functools.partial(batch, b + 1))
                else:
                    upcoming = batch(b + 1)   # built once: its BPR negatives are a search of every training key
                    if hasattr(model, "prefetch"):
                        model.prefetch(*upcoming)
            if softmax:
                loss, parts = step_fn("softmax_loss", users, pos, neg, cfg["temperature"], cfg["reg_weight"])
            else:
                loss, parts = step_fn("loss", users, pos, neg, cfg["reg_weight"])
            if cosine_lr:
                set_lr(opt, cosine_lr_at(cfg["lr"], state["step"], total_steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync_rows()   # row-sparse table gradients: all-gathered across ranks (DDP syncs the rest)
            opt.step()
            loss, parts = ctx.average(loss, parts)   # every rank sees the same numbers
            loss_sum += loss.detach()
            state["step"] += 1
            for cb in callbacks:
                cb.on_step(step=state["step"], loss=loss.detach(), parts=parts)
            if b % 50 == 49 or b == n_batches - 1:  # one host sync every 50 steps
                if not math.isfinite(float(loss_sum)):
                    raise TrainingDiverged(
                        f"loss became {float(loss.detach())} at epoch {epoch + 1}, batch {b + 1}; stopped. "
                        f"The last good checkpoint is {last_path if os.path.isfile(last_path) else '(none yet)'}; "
                        f"try a lower --lr (now {cfg['lr']}) or --reg_weight")
                bar.set_postfix(loss=f"{float(loss_sum) / (b + 1):.4f}")
            if budget_s < math.inf and ctx.agree(time.time() - t_start >= budget_s):
                break
        out_of_time = budget_s < math.inf and ctx.agree(time.time() - t_start >= budget_s)
        if out_of_time and b + 1 < n_batches:
            log.info("time budget of %.1f min spent after %d of %d batches of epoch %d: stopping",
                     budget_s / 60, b + 1, n_batches, epoch + 1)
        epoch_loss = float(loss_sum) / (b + 1)
        state["epoch"] = epoch + 1
        row = {"epoch": epoch + 1, "loss": epoch_loss, "epoch_time_s": time.time() - t_ep,
               "elapsed_s": time.time() - t_start}
        evaluate_now = (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"] or out_of_time
        stop = out_of_time
        if evaluate_now:
            t_ev = time.time()
            if has_valid:
                if hasattr(model, "tune"):   # a score-level hybrid picks its mix weight on valid
                    model.tune(valid_pairs, exclude=[ds.train], batch_size=eval_batch_users(cfg, ds.num_items))
                vm = evaluate_split(model, ds, graph, "valid", cfg, device, ctx, users=valid_users)
                row.update({f"valid/{k}": v for k, v in vm.items() if k in ("recall@20", "ndcg@20")})
                score = vm.get("ndcg@20", -math.inf)
                if score > state["best"]:
                    state.update(best=score, best_epoch=epoch + 1, bad_evals=0)
                    best_export = _export(model, ds, cfg, epoch + 1, vm, data_ref)
                    save(best_export, best_path)
                else:
                    state["bad_evals"] += 1
                    stop = stop or (cfg["patience"] > 0 and state["bad_evals"] >= cfg["patience"])
            else:
                best_export = _export(model, ds, cfg, epoch + 1, {}, data_ref)
                save(best_export, best_path)
            row["eval_time_s"] = time.time() - t_ev
            if cfg["trace_test"]:
                # Reporting only (time-to-quality curves): nothing is chosen on these numbers, and
                # their cost is taken off the time budget's clock.
                t_tr = time.time()
                tm = evaluate_split(model, ds, graph, "test", cfg, device, ctx)
                row.update({f"test/{k}": v for k, v in tm.items() if k in ("recall@20", "ndcg@20")})
                t_start += time.time() - t_tr
        state["history"].append(row)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in row.items() if k != "epoch"))
        for cb in callbacks:
            cb.on_epoch_end(epoch=epoch + 1, row=row)
        if tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, epoch + 1)
            tb.flush()
        cb_states = {type(cb).__name__: cb.state_dict() for cb in callbacks if hasattr(cb, "state_dict")}
        save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                         "config": cfg, "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                                                "python": random.getstate()},
                         "callbacks": {k: v for k, v in cb_states.items() if v is not None}}, last_path)
        if stop:
            if not out_of_time:
                log.info("early stop: valid ndcg@20 has not improved for %d evaluations (best %.4f at epoch %d)",
                         cfg["patience"], state["best"], state["best_epoch"])
            break

    if tb is not None:
        tb.close()
    # Final report with the best model (by valid ndcg@20) or the last one when there is no valid split.
    if best_export is None:
        best_export = _export(model, ds, cfg, state["epoch"], {}, data_ref)
        save(best_export, best_path)
    model.load_state_dict(best_export["model"])
    # The best model's valid metrics were computed when it was exported (same weights, same
    # deterministic evaluation): reuse them instead of ranking every valid user again, which on a
    # 200k-user x 100k-item graph is a quarter of an hour on this CPU -- unless training validated
    # on a sample of the users (eval_users): the report ranks every one.
    report_s = {}
    t_ev = time.time()
    valid = (valid_users is None and best_export.get("valid")) or evaluate_split(model, ds, graph, "valid", cfg,
                                                                                 device, ctx)
    report_s["valid"], t_ev = time.time() - t_ev, time.time()
    results = {"valid": valid, "test": evaluate_split(model, ds, graph, "test", cfg, device, ctx)}
    report_s["test"] = time.time() - t_ev
    extra = {"best_epoch": best_export["epoch"], "epochs_run": state["epoch"], "history": state["history"],
             "dataset": ds.summary() if hasattr(ds, "summary") else str(ds), "model": cfg["model"],
             "train_pairs": int(train_pairs.size(0)), "load_time_s": load_s, "report_eval_time_s": report_s,
             "train_time_s": time.time() - t0}
    if hasattr(model, "gate_report"):
        extra["gates"] = model.gate_report()  # mean share of the graph branch per context
    extra.update(_branch_hparams(model))
    if main_rank:
        for cb in callbacks:
            extra.update(cb.on_end(model=model, out=out) or {})
        checkpoint.write_json(os.path.join(out, "metrics.json"), {**results, **extra})
    log.info("results (best epoch %d):\n%s", best_export["epoch"], metrics.format_table(results))
    return {**results, **extra}


def _set_sample_seed(model, seed: int) -> None:
    """Every sampled part of ``model`` (sampling.SampledTraining) draws with ``seed``."""
    from .sampling import SampledTraining
    for m in model.modules():
        if isinstance(m, SampledTraining):
            m.sample_seed = int(seed)


def _tensorboard(cfg, out):
    """A SummaryWriter under out/tb when --tensorboard is on and tensorboard is installed."""
    if not cfg["tensorboard"]:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        from ._backend import announce
        announce("tensorboard", f"glrec_fast.train: --tensorboard requested but not available, logging to "
                                f"train.log only, because of {e!r} (pip install tensorboard)")
        return None
    return SummaryWriter(os.path.join(out, "tb"))


def _optimizer(model, cfg):
    """optim.RowAdam over every parameter. Embedding tables get only the batch-row L2 of BPR
    (reg_weight); dense weights may take decoupled weight decay. A model whose tables are read
    row by row (``sparse_tables``) switches to row-sparse gradients here: each step then updates
    only the rows it read."""
    from .optim import RowAdam
    if model.sparse_tables():
        model.row_sparse = True
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    emb = [p for p in model.parameters() if id(p) in emb_ids]
    dense = [p for p in model.parameters() if id(p) not in emb_ids]
    groups = [{"params": emb, "weight_decay": 0.0}]
    if dense:
        groups.append({"params": dense, "weight_decay": cfg["weight_decay"]})
    return RowAdam(groups, lr=cfg["lr"])


DATA_FILE = "data.pt"   # a run's training pairs and id maps, written once beside its best.pt


def _write_data(ds, out: str, write: bool = True) -> dict:
    """Write ``out/data.pt`` (the training pairs for masking and the original ids as plain lists)
    once per run and return the reference best.pt keeps to it: every improvement then rewrites only
    the model, not the whole training set (800 MB at 50M interactions)."""
    pairs = ds.train.contiguous()
    digest = hashlib.sha256(memoryview(pairs.numpy()).cast("B")).hexdigest()
    if write:
        checkpoint.save({"kind": "glrec_fast.data", "version": 1, "sha256": digest, "train": pairs,
                         "user_ids": ds.user_ids.tolist(), "item_ids": ds.item_ids.tolist()},
                        os.path.join(out, DATA_FILE))
    return {"file": DATA_FILE, "sha256": digest, "num_pairs": int(pairs.size(0))}


def _export(model, ds, cfg, epoch, valid_metrics, data_ref: dict):
    """best.pt: what ranking needs (embeddings, or a graph filter's factors) and a reference to the
    run's data.pt (``_write_data``); loadable with ``weights_only=True``, read by ``load_export``."""
    ex = model.export()
    return {"kind": "glrec_fast.export", "version": 3, "epoch": epoch, "valid": valid_metrics,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if model.trainable else {},
            **ex, "num_users": ds.num_users, "num_items": ds.num_items, "data": data_ref, "config": dict(cfg)}


def load_export(path) -> dict:
    """A best.pt export with its run's training pairs and ids (``train``, ``user_ids``, ``item_ids``)
    filled in from the data.pt beside it (exports of version 2 carry them inline)."""
    path = os.fspath(path)
    ck = checkpoint.load(path)
    if not isinstance(ck, dict) or ck.get("kind") != "glrec_fast.export":
        raise ValueError(f"checkpoint {path!r}: not a glrec_fast best.pt export "
                         f"(use the best.pt that `python -m glrec_fast.train --out DIR` writes)")
    ref = ck.get("data")
    if ref is None:
        return ck
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), ref["file"])
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"checkpoint {path!r}: its training data {data_path!r} is missing; a best.pt "
                                f"needs the {ref['file']} its run wrote beside it (copy both files together)")
    data = checkpoint.load(data_path)
    if not isinstance(data, dict) or data.get("sha256") != ref["sha256"]:
        raise ValueError(f"{data_path!r} holds other training data than the run that wrote {path!r} "
                         f"({ref['num_pairs']} pairs, sha256 {ref['sha256'][:12]}...); copy the {ref['file']} "
                         f"of the same run")
    return {**ck, "train": data["train"], "user_ids": data["user_ids"], "item_ids": data["item_ids"]}


def _branch_hparams(model) -> dict:
    """metrics.json's record of a score hybrid's fitted branches: "filter" (as --model gfcf reports it)
    and "text_knn"."""
    out = {}
    for key, branch in (("filter", getattr(model, "graph_model", None)),
                        ("text_knn", model.knn_in_use() if hasattr(model, "knn_in_use") else None)):
        if hasattr(branch, "hparams"):
            out[key] = branch.hparams
    return out


def _fit_filter(cfg, model, ds, graph, device, out, t0) -> dict:
    """A training-free model (gfcf, bspm, the hybrid of a filter and TextKNN): fit once, choose the
    hybrid's mix weight on every validation user, evaluate valid and test, export, report."""
    t_fit = time.time()
    model.fit()
    if hasattr(model, "tune"):
        if ds.valid.numel():
            model.tune(ds.valid, exclude=[ds.train], batch_size=eval_batch_users(cfg, ds.num_items), max_users=None)
        else:
            log.info("no validation split: the score mix keeps static_weight=%.2f", float(model.weight))
    fit_s = time.time() - t_fit
    log.info("fitted %s %s in %.1fs", cfg["model"], model.hparams, fit_s)
    t_ev = time.time()
    valid = evaluate_split(model, ds, graph, "valid", cfg, device)
    best = _export(model, ds, cfg, 0, valid, _write_data(ds, out))
    checkpoint.save(best, os.path.join(out, "best.pt"))
    results = {"valid": valid, "test": evaluate_split(model, ds, graph, "test", cfg, device)}
    extra = {"best_epoch": 0, "epochs_run": 0, "history": [], "model": cfg["model"], "filter": model.hparams,
             **_branch_hparams(model),
             "dataset": ds.summary() if hasattr(ds, "summary") else str(ds), "fit_time_s": fit_s,
             "eval_time_s": time.time() - t_ev, "train_time_s": time.time() - t0}
    if hasattr(model, "gate_report"):
        extra["gates"] = model.gate_report()
    checkpoint.write_json(os.path.join(out, "metrics.json"), {**results, **extra})
    log.info("results (fit %.1fs, evaluation %.1fs):\n%s", fit_s, extra["eval_time_s"], metrics.format_table(results))
    return {**results, **extra}


# ----------------------------------------------------------------------------- recommend
def scorer_from_export(ck: dict):
    """The ``users -> scores`` function a best.pt export describes (embeddings or a graph filter)."""
    if "score_fusion" in ck:
        from .models.score_hybrid import ScoreHybrid
        graph = BipartiteGraph.from_interactions(ck["train"], len(ck["user_ids"]), len(ck["item_ids"]))
        return ScoreHybrid.scorer_from_export(ck, graph)
    if "filter" in ck:
        from .models.filters import GraphFilter
        graph = BipartiteGraph.from_interactions(ck["train"], len(ck["user_ids"]), len(ck["item_ids"]))
        return GraphFilter.from_export(graph, ck).scorer()
    return metrics.EmbeddingScorer(ck["user_emb"], ck["item_emb"])


def recommend(checkpoint_path, user_ids, k: int = 20, exclude_seen: bool = True,
              batch_size: int = 1024) -> list[list]:
    """Top-``k`` items for each user: original user ids in, original item ids out.

    Users are scored ``batch_size`` at a time (memory bounded by one [batch, items] tile) and each
    user's training items are masked through a CSR of the training pairs.
    """
    ck = load_export(checkpoint_path)
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    index = {uid: j for j, uid in enumerate(ck["user_ids"])}
    index.update({str(uid): j for j, uid in enumerate(ck["user_ids"])})
    rows = []
    for uid in user_ids:
        j = index.get(uid, index.get(str(uid)))
        if j is None:
            raise ValueError(f"user_ids: {uid!r} is not a user of the checkpoint's training data "
                             f"({len(ck['user_ids'])} users)")
        rows.append(j)
    score = scorer_from_export(ck)
    num_items = len(ck["item_ids"])
    rowptr, items = metrics.csr_of_pairs(ck["train"], len(ck["user_ids"]))
    users_all = torch.tensor(rows, dtype=torch.long)
    out = []
    for start in range(0, users_all.numel(), batch_size):
        users = users_all[start:start + batch_size]
        scores = score(users).float()
        if exclude_seen:
            scores[metrics.csr_rows(rowptr, items, users)] = -math.inf
        top = torch.topk(scores, min(k, num_items), dim=1).indices
        out.extend([ck["item_ids"][i] for i in r] for r in top.tolist())
    return out


def default_callbacks(cfg) -> list:
    cbs = []
    if cfg["grokking"] and cfg["model"] not in ("gfcf", "bspm"):   # filters have no training to watch
        from .monitoring import GrokkingCallback
        cbs.append(GrokkingCallback(cfg))
    return cbs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Keys (configs/default.yaml):\n")
        print(config.defaults_text())
        return 0
    from .checkpoint import UnsafeCheckpointError
    from .data import DataError
    try:
        cfg = config.resolve(argv)
        check_config(cfg)
    except (ValueError, FileNotFoundError) as e:   # a user error: one line, no traceback
        print(f"glrec_fast.train: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg, callbacks=default_callbacks(cfg))
    except (DataError, UnsafeCheckpointError, distributed.LaunchError) as e:   # bad data, checkpoint or launch: one line
        print(f"glrec_fast.train: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        log.error("%s", e)
        print(f"glrec_fast.train: {e}", file=sys.stderr)
        return 3
    except distributed.PeerTimeout as e:   # torchrun: the launcher then ends the other ranks
        print(f"glrec_fast.train: {e}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    if distributed.launched():
        # torchrun: an uncaught error's traceback reaches the launcher, which ends every rank and
        # names this one as the root cause.
        from torch.distributed.elastic.multiprocessing.errors import record
        distributed.exit_rank(record(main)())
    sys.exit(main())
