"""Training-curve figure: per-branch validation metric, training loss, fusion prior / gate, events.

    from glrec_fast.plots import plot_training_curves
    hist = mon.history                       # GrokkingMonitor.history (one host sync)
    hist["gate_mean"] = gate_means           # optional: list aligned with hist["step"] (or dict name -> list)
    plot_training_curves(hist, mon.events(), "runs/x/curves.png")

matplotlib is optional for the package: it is imported here, on use, and drawn through the Agg
canvas directly (no ``matplotlib.use``), so the caller's own backend is left alone.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

__all__ = ["plot_training_curves"]

_KIND_MARKER = {"grok": "^", "ungrok": "v"}


def _curves(history: Mapping, key: str, n: int) -> dict[str, list[float]]:
    """``history[key]`` as {name: list of n floats}; a plain list becomes {key: list}."""
    value = history.get(key)
    if value is None:
        return {}
    if isinstance(value, Mapping):
        curves = {str(k): list(v) for k, v in value.items()}
    elif isinstance(value, Sequence) and not isinstance(value, str):
        curves = {key: list(value)}
    else:
        raise ValueError(f"history[{key!r}]: expected a list or a dict name -> list, got {type(value).__name__}")
    for name, ys in curves.items():
        if len(ys) != n:
            raise ValueError(f"history[{key!r}][{name!r}]: has {len(ys)} values but history['step'] has {n}")
    return curves


def plot_training_curves(history: Mapping, events: Sequence[Mapping] | None, path: str | os.PathLike,
                         title: str | None = None, dpi: int = 110) -> str:
    """Write a PNG with three stacked panels sharing the step axis:

    1. validation metric per branch, with a marker per event (▲ grok, ▼ ungrok) and a dotted line;
    2. training loss per branch (log scale when all values are positive);
    3. fusion prior per branch and, when ``history`` has ``"gate_mean"``, the mean gate value.

    ``history`` needs ``"step"`` and ``"val_metric"`` (GrokkingMonitor.history has both, plus
    ``"train_loss"`` and ``"fusion_prior"``); every curve must have one value per step (NaN = gap).
    Returns the path written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plot_training_curves needs matplotlib (pip install matplotlib): {e!r}") from e
    if not isinstance(history, Mapping) or "step" not in history or "val_metric" not in history:
        raise ValueError("history: expected a dict with 'step' and 'val_metric' (e.g. GrokkingMonitor.history)")
    steps = list(history["step"])
    n = len(steps)
    val = _curves(history, "val_metric", n)
    loss = _curves(history, "train_loss", n)
    prior = _curves(history, "fusion_prior", n)
    gate = _curves(history, "gate_mean", n)
    events = list(events or [])
    for i, ev in enumerate(events):
        for key in ("step", "branch", "kind"):
            if key not in ev:
                raise ValueError(f"events[{i}]: missing {key!r} (expected GrokkingMonitor.events() records)")

    fig = Figure(figsize=(8, 8.5))
    FigureCanvasAgg(fig)
    ax_val, ax_loss, ax_fuse = fig.subplots(3, 1, sharex=True)
    colors = {}
    for name, ys in val.items():
        (line,) = ax_val.plot(steps, ys, label=name, lw=1.4)
        colors[name] = line.get_color()
    for ev in events:
        color = colors.get(ev["branch"], "k")
        ax_val.axvline(ev["step"], color=color, ls=":", lw=1)
        y = ev.get("value", float("nan"))
        if isinstance(y, (int, float)) and math.isfinite(y):
            ax_val.plot([ev["step"]], [y], marker=_KIND_MARKER.get(ev["kind"], "o"), color=color, ms=9, ls="none")
        ax_val.annotate(f"{ev['kind']} {ev['branch']}", (ev["step"], 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color=color)
    ax_val.set_ylabel("validation metric")
    ax_val.legend(loc="center right", fontsize=8)

    positive = all(y > 0 for ys in loss.values() for y in ys if isinstance(y, float) and math.isfinite(y))
    for name, ys in loss.items():
        ax_loss.plot(steps, ys, label=name, lw=1.2, color=colors.get(name))
    if loss and positive:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss")
    if loss:
        ax_loss.legend(loc="upper right", fontsize=8)

    for name, ys in prior.items():
        ax_fuse.plot(steps, ys, label=f"prior {name}", lw=1.2, color=colors.get(name), drawstyle="steps-post")
    ax_fuse.set_ylabel("fusion prior")
    if gate:
        ax_gate = ax_fuse.twinx()
        for name, ys in gate.items():
            ax_gate.plot(steps, ys, label=name, lw=1.2, ls="--", color="0.3")
        ax_gate.set_ylabel("mean gate (1 = graph)")
        ax_gate.legend(loc="lower right", fontsize=8)
    if prior:
        ax_fuse.legend(loc="upper left", fontsize=8)
    ax_fuse.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
