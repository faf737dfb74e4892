"""The classic grokking benchmark, small enough for a 2-core CPU: (a + b) mod p.

An embedding-MLP (shared embedding of a and b, concatenated, one ReLU hidden layer) trained full
batch with AdamW on a fraction of all p*p pairs. With weight decay 1.0 and half the pairs it fits
the training pairs early (train accuracy 100% at ~step 170), validation accuracy stays near chance
(< 7%) for ~200 more steps, then jumps to 100% (crosses 50% at ~step 550). Without weight decay,
or with 15% of the pairs, it memorises and never generalises: the two controls.

Tuning (p=97, seed 0, measured on the 2-core dev machine): the issue's lr 1e-3 with embed 128 /
hidden 256 groks too (50% crossing at step ~1460) but a 3000-step run took 95 s; lr 3e-3 with
embed 64 / hidden 128 crosses at ~550 (seeds 1, 2: ~620) and an 800-step run takes 25-35 s with
one thread while other jobs share the cores (8-14 ms per full-batch step); lr 5e-3 groks sooner
(~390) but leaves fewer steps near chance. ``python -m glrec_fast.grokking_tasks`` prints the
proof runs.

``modular_addition_runs`` trains several configurations side by side (one per monitor branch)
so one ``GrokkingMonitor`` watches a grokking branch next to one that does not.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["ModularRun", "modular_addition_run", "modular_addition_runs", "ModularMLP"]


class ModularMLP(nn.Module):
    def __init__(self, p: int, embed_dim: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(p, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, p))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(pairs).flatten(1))


@dataclass
class ModularRun:
    """Per-evaluation curves (every ``eval_every`` steps) for each branch, and the monitor."""
    step: list[int]
    train_acc: dict[str, list[float]]
    val_acc: dict[str, list[float]]
    train_loss: dict[str, list[float]]
    weight_norm: dict[str, list[float]]
    monitor: object = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def first_step(self, curve: dict[str, list[float]], branch: str, level: float) -> int | None:
        """First evaluated step at which ``curve[branch]`` exceeds ``level`` (None if never)."""
        return next((s for s, v in zip(self.step, curve[branch]) if v > level), None)

    def crossing_step(self, branch: str, level: float = 0.5) -> int | None:
        """First evaluated step with validation accuracy above ``level``."""
        return self.first_step(self.val_acc, branch, level)

    def fit_step(self, branch: str, level: float = 0.99) -> int | None:
        """First evaluated step with training accuracy above ``level``."""
        return self.first_step(self.train_acc, branch, level)


def _split(p: int, train_frac: float, seed: int):
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac: expected a fraction in (0, 1), got {train_frac}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], 1)
    labels = (pairs[:, 0] + pairs[:, 1]) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n = int(train_frac * p * p)
    if n < 1 or n >= p * p:
        raise ValueError(f"train_frac={train_frac} leaves {n} of {p * p} pairs for training")
    tr, va = perm[:n], perm[n:]
    return pairs[tr], labels[tr], pairs[va], labels[va]


_DEFAULTS = dict(p=97, train_frac=0.5, weight_decay=1.0, lr=3e-3, betas=(0.9, 0.98), embed_dim=64, hidden=128)


def modular_addition_runs(configs: Mapping[str, Mapping], steps: int = 800, seed: int = 0, monitor=None,
                          eval_every: int = 5, device: str | torch.device = "cpu") -> ModularRun:
    """Train one model per entry of ``configs`` (branch name -> overrides of p, train_frac,
    weight_decay, lr, betas, embed_dim, hidden) in lockstep, full batch. Every ``eval_every`` steps
    each model is evaluated (train/val accuracy, weight norm) and, if given, ``monitor.observe`` is
    called once with all branches. Curves are collected as device tensors and read back once at
    the end, so the loop never syncs."""
    if not configs:
        raise ValueError("configs: expected at least one branch")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every: expected an int >= 1, got {eval_every!r}")
    if monitor is not None:
        missing = [b for b in configs if b not in monitor.branches]
        if missing:
            raise ValueError(f"monitor: has no branch {missing}; its branches are {monitor.branches}")
    device = torch.device(device)
    runs = {}
    for i, (name, overrides) in enumerate(configs.items()):
        unknown = set(overrides) - set(_DEFAULTS)
        if unknown:
            raise ValueError(f"configs[{name!r}]: unknown keys {sorted(unknown)}; expected some of {sorted(_DEFAULTS)}")
        cfg = {**_DEFAULTS, **overrides}
        xtr, ytr, xva, yva = (t.to(device) for t in _split(cfg["p"], cfg["train_frac"], seed))
        torch.manual_seed(seed)
        model = ModularMLP(cfg["p"], cfg["embed_dim"], cfg["hidden"]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                betas=tuple(cfg["betas"]))
        runs[name] = dict(cfg=cfg, model=model, opt=opt, data=(xtr, ytr, xva, yva), rec=[])
    eval_steps: list[int] = []
    t0 = time.perf_counter()
    for step in range(steps):
        evaluate = step % eval_every == 0 or step == steps - 1
        obs = {"train_loss": {}, "val_metric": {}, "weight_norm": {}}
        for name, r in runs.items():
            xtr, ytr, xva, yva = r["data"]
            logits = r["model"](xtr)
            loss = nn.functional.cross_entropy(logits, ytr)
            if evaluate:  # the state the optimizer step is about to change
                with torch.no_grad():
                    train_acc = (logits.argmax(1) == ytr).float().mean()
                    val_acc = (r["model"](xva).argmax(1) == yva).float().mean()
                    wn = torch.sqrt(sum(p.detach().pow(2).sum() for p in r["model"].parameters()))
                rec = torch.stack([train_acc, val_acc, loss.detach(), wn])
                r["rec"].append(rec)
                obs["train_loss"][name], obs["val_metric"][name], obs["weight_norm"][name] = rec[2], rec[1], rec[3]
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
        if evaluate:
            eval_steps.append(step)
            if monitor is not None:
                monitor.observe(step, obs["train_loss"], obs["val_metric"], obs["weight_norm"])
    seconds = time.perf_counter() - t0
    curves = {name: torch.stack(r["rec"]).cpu() for name, r in runs.items()}  # the one read-back
    return ModularRun(step=eval_steps,
                      train_acc={n: c[:, 0].tolist() for n, c in curves.items()},
                      val_acc={n: c[:, 1].tolist() for n, c in curves.items()},
                      train_loss={n: c[:, 2].tolist() for n, c in curves.items()},
                      weight_norm={n: c[:, 3].tolist() for n, c in curves.items()},
                      monitor=monitor, seconds=seconds, config={n: r["cfg"] for n, r in runs.items()})


def modular_addition_run(p: int = 97, train_frac: float = 0.5, weight_decay: float = 1.0, steps: int = 800,
                         seed: int = 0, monitor=None, branch: str | None = None, eval_every: int = 5,
                         **overrides) -> ModularRun:
    """One model; ``branch`` names it in the monitor (default: the monitor's first branch, or
    "model"). Returns per-evaluation train/val accuracy, loss, weight norm and the monitor."""
    if branch is None:
        branch = monitor.branches[0] if monitor is not None else "model"
    cfg = dict(p=p, train_frac=train_frac, weight_decay=weight_decay, **overrides)
    return modular_addition_runs({branch: cfg}, steps=steps, seed=seed, monitor=monitor, eval_every=eval_every)


def _main(argv=None) -> None:
    """``python -m glrec_fast.grokking_tasks [--steps N] [--threads T] [--plot PATH]``: the proof runs
    (grokking run + the two controls) with a monitor, one line per branch."""
    import argparse

    from .grokking import GrokkingMonitor
    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-jump", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=_DEFAULTS["lr"])
    ap.add_argument("--only", choices=["grok", "wd0", "frac15"], action="append",
                    help="run only these (repeatable; default: all three)")
    ap.add_argument("--plot", default=None, help="write the training-curve PNG of the grokking run here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {}
    for name, cfg in (("grok", {}), ("wd0", {"weight_decay": 0.0}), ("frac15", {"train_frac": 0.15})):
        if args.only and name not in args.only:
            continue
        mon = GrokkingMonitor([name], min_jump=args.min_jump)
        runs[name] = modular_addition_runs({name: {**cfg, "lr": args.lr}}, steps=args.steps, seed=args.seed,
                                           monitor=mon)
    print(f"{'run':8} {'config':32} {'seconds':>8} {'fit@':>6} {'val>50%@':>9} {'events':30} {'final val':>9}")
    for name, r in runs.items():
        cfg = r.config[name]
        events = [(e["step"], e["kind"]) for e in r.monitor.events()]
        desc = f"wd={cfg['weight_decay']} frac={cfg['train_frac']} lr={cfg['lr']}"
        print(f"{name:8} {desc:32} {r.seconds:8.1f} {str(r.fit_step(name)):>6} {str(r.crossing_step(name)):>9} "
              f"{str(events):30} {r.val_acc[name][-1]:9.3f}")
    if args.plot and "grok" in runs:
        from .plots import plot_training_curves
        r = runs["grok"]
        print("wrote", plot_training_curves(r.monitor.history, r.monitor.events(), args.plot,
                                            title="(a + b) mod 97, AdamW wd=1.0, 50% of pairs: validation accuracy"))


if __name__ == "__main__":
    _main()
