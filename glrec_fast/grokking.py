"""GrokkingMonitor: device-resident change-point detection of grokking, per branch.

Grokking: a model fits its training data, then long afterwards its validation metric jumps from
the memorising level to the generalising one. The monitor watches each branch (graph, text/language,
fused) and, when one groks, moves a bounded per-branch fusion prior toward it; the hybrid model adds
``mon.gate_logit_offset()`` to its gate logits.

    mon = GrokkingMonitor(branches=["graph", "text", "fused"], min_jump=0.01).to(device)
    for step ...:
        ...                                              # train
        if step % eval_every == 0:
            mon.observe(step, train_loss=loss.detach(),  # one 0-dim tensor, or a dict per branch
                        val_metric={"graph": ndcg_g, "text": ndcg_t, "fused": ndcg_f},
                        weight_norm={"graph": wn_g, "text": wn_t, "fused": wn_f})   # optional
            model.fusion_prior.copy_(mon.gate_logit_offset("graph", "text"))
    mon.events()      # [{"step", "branch", "kind": "grok" | "ungrok", "jump", ...}]  (one host sync)
    mon.history       # per-call values for plots (one host sync); glrec_fast.plots draws them

Never stalls the device: all state is device tensors and ``observe`` only queues tensor ops whose
results stay on the device (elementwise ``where``/``clamp``/arithmetic, one ``index_copy_`` into the
event ring buffer, row writes into the history buffer at python-int positions). Nothing is read
back: no ``.item()``, no ``bool(tensor)``, no python branch on a tensor value. The tests run
``observe`` on ``meta`` tensors (which hold no values) and, with CUDA, under
``torch.cuda.set_sync_debug_mode("error")``. Only ``events()`` and ``history`` read back.

The update is one op, ``torch.ops.glrec.grokking_observe``: a C++ kernel on CPU (one loop over the
branches, ~24 us per observe() on the 2-core CI machine, most of it gathering the inputs) and the
pure-torch ``reference.grokking_observe`` elsewhere (~150 queued elementwise ops; ~410 us of dispatch on
CPU). ``GLREC_BACKEND=reference`` forces the reference.

Detection, per branch (every quantity is a [num_branches] tensor, updated in lockstep):

1. *Fit* (the precondition). ``ema`` = EMA of the training loss, ``init`` = its first value. The
   branch fits when ``ema <= fit_ratio * |init|`` and ``|ema - ema(window calls ago)| <= flat_tol *
   |init|`` (low and flat); it is *armed* once it has fit for ``patience`` consecutive calls. Before
   that a validation rise is ordinary learning, not grokking: nothing fires and the validation
   baseline restarts at every call.
2. *Change point*. While armed, a two-sided Page–Hinkley test on the validation metric x:
   ``mean`` = running mean since arming, ``m_up += (x - mean) - drift``, ``PH_up = m_up - min(m_up)``,
   and the mirror image ``PH_down`` for drops. ``grok`` fires when ``PH_up > threshold`` and
   ``x - baseline > min_jump`` (baseline = the mean before x); ``ungrok`` (the metric collapses)
   when ``PH_down > threshold`` and ``baseline - x > min_jump``. ``drift``, ``threshold`` and
   ``min_jump`` are in the metric's units and grow on noisy curves: sigma is estimated from
   successive differences (winsorised, so a jump does not inflate it) and the effective values
   are ``max(drift, drift_sigmas*sigma)``, ``max(min_jump, jump_sigmas*sigma)``,
   ``max(threshold, threshold_sigmas*sigma)``.
3. *Weight norm* (supporting evidence). Grokking under weight decay comes with a falling weight
   norm (memorising weight is traded for a compact generalising solution). When the weight-norm
   EMA fell by more than ``weight_norm_tol`` (relative) over the last ``window`` calls, the grok
   threshold is multiplied by ``weight_norm_discount``. Never sufficient alone: a run that only
   memorises under weight decay loses weight norm too (the 15%-data control does).
4. *Refractory*. After an event the branch's statistics stay reset until ``refractory`` calls
   have passed *with a settled metric* (moved less than ``drift + 4 sigma`` over the window), so
   one long transition gives one event and the next baseline is the new level.

Response: on a grok of branch b ``fusion_prior[b] += prior_step``, on an ungrok ``-= prior_step``,
clamped to ``[-prior_bound, prior_bound]``; ``respond=False`` only detects.

``window``, ``patience`` and ``refractory`` count ``observe()`` calls. A branch missing from a
call's dicts (or given NaN) is not observed in that call: its statistics keep their values.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch

from . import _backend, ops, reference  # noqa: F401  (ops defines torch.ops.glrec.grokking_observe)
from .reference import EVENT_FIELDS, HISTORY_FIELDS, KERNEL_CONFIG, STATE_ROWS  # the op's layout

__all__ = ["GrokkingMonitor", "EVENT_KINDS", "EVENT_FIELDS", "HISTORY_FIELDS"]

EVENT_KINDS = ("grok", "ungrok")
_ROW = {name: i for i, name in enumerate(STATE_ROWS)}
_STATE = ("state", "ring", "event_buf", "event_count")
_REAL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                          torch.int16, torch.int32, torch.int64})


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: tensors report an indexed device, so comparisons need one."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class GrokkingMonitor:
    """Watches each branch's training loss and validation metric for grokking (see module doc).

    Args:
        branches: branch names, e.g. ``["graph", "text", "fused"]``.
        window: calls over which "flat" training loss, the weight-norm trend and "settled" are
            measured.
        patience: consecutive fit calls before a branch is armed (default ``window``).
        ema_alpha: smoothing of the training-loss and weight-norm EMAs (per call).
        fit_ratio: the training-loss EMA must be at most this fraction of its first value ...
        flat_tol: ... and have moved at most this fraction of the first value over ``window`` calls.
        min_jump: smallest shift of the validation metric that counts, in the metric's units
            (accuracy: 0.2 = twenty points; NDCG@20 on a recommender: ~0.01).
        drift: Page–Hinkley allowance per call (default ``min_jump / 4``).
        threshold: Page–Hinkley alarm level (default ``8 * min_jump``): the summed excess over
            the baseline needed to fire, so a sustained shift J fires after ~``threshold / J`` calls.
        drift_sigmas, jump_sigmas, threshold_sigmas: noise multipliers (see module doc).
        weight_norm_tol, weight_norm_discount: the weight-norm evidence (see module doc).
        refractory: settled calls after an event before the branch can fire again
            (default ``window``).
        respond: move ``fusion_prior`` on events (``False``: detect only).
        prior_step, prior_bound: the fusion prior's move per event and its clamp.
        max_events: capacity of the device ring buffer of events (older ones are overwritten).
        keep_history: record every call for ``history`` (a device buffer grown by doubling).
        device, dtype: where the state lives (``.to(device)`` moves it later).
    """

    def __init__(self, branches: Sequence[str] = ("graph", "text", "fused"), *, window: int = 10,
                 patience: int | None = None, ema_alpha: float = 0.3, fit_ratio: float = 0.5,
                 flat_tol: float = 0.05, min_jump: float = 0.1, drift: float | None = None,
                 threshold: float | None = None, drift_sigmas: float = 0.5, jump_sigmas: float = 4.0,
                 threshold_sigmas: float = 10.0, weight_norm_tol: float = 0.01,
                 weight_norm_discount: float = 0.5, refractory: int | None = None, respond: bool = True,
                 prior_step: float = 0.5, prior_bound: float = 2.0, max_events: int = 256,
                 keep_history: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        if isinstance(branches, str) or not isinstance(branches, Sequence) or len(branches) == 0:
            raise ValueError(f"branches: expected a non-empty list of branch names, got {branches!r}")
        names = [str(b) for b in branches]
        if len(set(names)) != len(names):
            raise ValueError(f"branches: names must be unique, got {names}")
        patience = window if patience is None else patience
        refractory = window if refractory is None else refractory
        drift = min_jump / 4 if drift is None else drift
        threshold = 8 * min_jump if threshold is None else threshold
        _check_int("window", window, 1)
        _check_int("patience", patience, 1)
        _check_int("refractory", refractory, 0)
        _check_int("max_events", max_events, 1)
        for name, value in (("ema_alpha", ema_alpha), ("fit_ratio", fit_ratio),
                            ("weight_norm_discount", weight_norm_discount)):
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"{name}: expected a value in (0, 1], got {value!r}")
        for name, value in (("flat_tol", flat_tol), ("min_jump", min_jump), ("drift", drift),
                            ("threshold", threshold), ("drift_sigmas", drift_sigmas),
                            ("jump_sigmas", jump_sigmas), ("threshold_sigmas", threshold_sigmas),
                            ("weight_norm_tol", weight_norm_tol), ("prior_step", prior_step),
                            ("prior_bound", prior_bound)):
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{name}: expected a finite value >= 0, got {value!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64 for the monitor state, got {dtype!r}")
        self.branches = names
        self.config = dict(window=int(window), patience=int(patience), ema_alpha=float(ema_alpha),
                           fit_ratio=float(fit_ratio), flat_tol=float(flat_tol), min_jump=float(min_jump),
                           drift=float(drift), threshold=float(threshold), drift_sigmas=float(drift_sigmas),
                           jump_sigmas=float(jump_sigmas), threshold_sigmas=float(threshold_sigmas),
                           weight_norm_tol=float(weight_norm_tol),
                           weight_norm_discount=float(weight_norm_discount), refractory=int(refractory),
                           respond=bool(respond), prior_step=float(prior_step), prior_bound=float(prior_bound),
                           max_events=int(max_events), keep_history=bool(keep_history))
        self._index = {b: i for i, b in enumerate(names)}
        self.device, self.dtype = _concrete(torch.device("cpu" if device is None else device)), dtype
        self._init_state()

    # ------------------------------------------------------------------ state
    def _init_state(self):
        B, W, E = len(self.branches), self.config["window"], self.config["max_events"]
        kw = dict(device=self.device, dtype=self.dtype)
        state = torch.zeros(len(STATE_ROWS), B, **kw)
        for name in ("train_ema", "weight_norm_ema", "val_last", "train_init", "ph_mean"):
            state[_ROW[name]] = float("nan")               # "not observed yet"
        self.state = state
        self.ring = torch.full((W, 3, B), float("nan"), **kw)   # the levels of the last `window` calls
        # E ring slots plus B scratch rows that absorb the writes of branches that did not fire, so
        # one index_copy_ of B distinct rows records any number of events without a host count.
        self.event_buf = torch.zeros(E + B, len(EVENT_FIELDS), device=self.device, dtype=_event_dtype(self.device))
        self.event_count = torch.zeros((), device=self.device, dtype=torch.int64)
        self._hist = torch.empty(0, len(HISTORY_FIELDS), B, **kw)
        self._hist_steps: list[int] = []
        self.calls = 0
        self._constants()

    def _constants(self):
        self._kernel_config = [float(self.config[k]) for k in KERNEL_CONFIG]
        self._nan = torch.full((), float("nan"), device=self.device, dtype=self.dtype)
        self._no_history = torch.empty(0, device=self.device, dtype=self.dtype)

    @property
    def fusion_prior(self) -> torch.Tensor:
        """[num_branches] device tensor (a view of the state, updated in place by observe())."""
        return self.state[_ROW["fusion_prior"]]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _STATE}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "GrokkingMonitor":
        """Move (and optionally cast) all state; returns self."""
        device = self.device if device is None else _concrete(torch.device(device))
        dtype = self.dtype if dtype is None else dtype
        for k, v in self._tensors().items():
            if k == "event_buf":
                setattr(self, k, v.to(device=device, dtype=_event_dtype(device)))
            else:
                setattr(self, k, v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype))
        self._hist = self._hist.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        self._constants()
        return self

    def state_dict(self) -> dict:
        """Everything needed to resume: branch names, config, call counter, state, history."""
        n = len(self._hist_steps)
        return {"branches": list(self.branches), "config": dict(self.config), "calls": self.calls,
                "tensors": {k: v.detach().clone() for k, v in self._tensors().items()},
                "history": self._hist[:n].detach().clone(), "history_steps": list(self._hist_steps)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from ``state_dict()`` (tensors are moved to this monitor's device)."""
        if list(state.get("branches", [])) != self.branches:
            raise ValueError(f"state_dict: branches {state.get('branches')!r} do not match this monitor's "
                             f"{self.branches!r}")
        cfg = state.get("config", {})
        for key in ("window", "max_events"):  # these fix buffer shapes
            if cfg.get(key) != self.config[key]:
                raise ValueError(f"state_dict: config[{key!r}]={cfg.get(key)!r} does not match this "
                                 f"monitor's {self.config[key]!r}")
        tensors = state.get("tensors", {})
        for k, v in self._tensors().items():
            if k not in tensors:
                raise ValueError(f"state_dict: missing tensor {k!r}")
            if tuple(tensors[k].shape) != tuple(v.shape):
                raise ValueError(f"state_dict: tensor {k!r} has shape {tuple(tensors[k].shape)}, expected "
                                 f"{tuple(v.shape)}")
        for k, v in self._tensors().items():
            setattr(self, k, tensors[k].to(device=self.device, dtype=v.dtype).clone())
        self.config.update({k: v for k, v in cfg.items() if k in self.config})
        self.calls = int(state["calls"])
        self._hist_steps = list(state.get("history_steps", []))
        hist = state.get("history")
        if hist is None or hist.size(0) != len(self._hist_steps):
            raise ValueError("state_dict: 'history' must hold one row per entry of 'history_steps'")
        self._hist = hist.to(device=self.device, dtype=self.dtype).clone()
        self._constants()

    # ------------------------------------------------------------------ inputs
    def _inputs(self, train_loss, val_metric, weight_norm) -> torch.Tensor:
        """[3, num_branches] (train loss, weight norm, val metric) from dicts of 0-dim tensors (NaN
        for a branch left out) or one 0-dim tensor for all branches. Metadata checks only; error
        messages are built only on failure (this runs every observe() and is most of its cost)."""
        parts = []
        for name, value in (("train_loss", train_loss), ("weight_norm", weight_norm), ("val_metric", val_metric)):
            if value is None:
                if name != "weight_norm":
                    raise ValueError(f"{name}: required, got None")
                parts += [self._nan] * len(self.branches)
            elif isinstance(value, Mapping):
                if len(value) == 0 or any(k not in self._index for k in value):
                    raise ValueError(f"{name}: expected a dict with keys among {self.branches}, got keys "
                                     f"{list(value)}")
                parts += [self._scalar(name, b, value[b]) if b in value else self._nan for b in self.branches]
            else:
                if name == "val_metric" and len(self.branches) > 1:
                    raise ValueError(f"val_metric: expected a dict branch -> 0-dim tensor for branches "
                                     f"{self.branches} (one tensor is accepted only for a one-branch monitor)")
                parts += [self._scalar(name, None, value)] * len(self.branches)
        # One stack (dtype promotion included) instead of per-branch casts.
        return torch.stack(parts).to(self.dtype).view(3, len(self.branches))

    def _scalar(self, name: str, branch, t) -> torch.Tensor:
        # self.device is concrete (cuda:N, never bare cuda), so this equality is the same-device test.
        if isinstance(t, torch.Tensor):
            if t.dim() == 0 and t.device == self.device and t.dtype in _REAL_DTYPES:
                return t
            where = name if branch is None else f"{name}[{branch!r}]"
            if t.dim() != 0:
                raise ValueError(f"{where}: expected a 0-dim tensor, got shape {tuple(t.shape)}")
            if t.dtype not in _REAL_DTYPES:
                raise ValueError(f"{where}: expected a real-valued tensor, got {t.dtype}")
            if t.device.type != "cpu":
                # A device -> host copy would wait for the device: refuse instead of stalling.
                raise ValueError(f"{where}: tensor is on {t.device} but the monitor is on {self.device}; "
                                 f"call mon.to({str(t.device)!r})")
            return t.to(self.device, non_blocking=True)  # host -> device: no wait on the device
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return torch.full((), float(t), device=self.device, dtype=self.dtype)
        where = name if branch is None else f"{name}[{branch!r}]"
        raise TypeError(f"{where}: expected a 0-dim tensor (or a python number), got {type(t).__name__}")

    # ------------------------------------------------------------------ observe
    def observe(self, step: int, train_loss, val_metric, weight_norm=None) -> None:
        """Record one evaluation. ``train_loss``: one 0-dim tensor for all branches, or a dict
        branch -> 0-dim tensor; ``val_metric``: dict branch -> 0-dim tensor (higher is better);
        ``weight_norm``: optional, same forms as ``train_loss``. Queues device ops only: no sync."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step: expected a python int, got {type(step).__name__}")
        with torch.no_grad():
            self._observe(step, self._inputs(train_loss, val_metric, weight_norm))
        self.calls += 1

    def _observe(self, step: int, vals: torch.Tensor) -> None:
        row = self._history_row() if self.config["keep_history"] else self._no_history
        # torch.ops.glrec.grokking_observe: the C++ kernel on CPU (one call instead of ~150 tiny
        # ops), the pure-torch reference elsewhere (CUDA: queued elementwise kernels, no sync).
        kernel = reference.grokking_observe if _backend.backend() == "reference" else torch.ops.glrec.grokking_observe
        kernel(self.state, self.ring, self.event_buf, self.event_count, row, vals, self._kernel_config, step,
               self.calls % self.config["window"])
        if row.numel():
            self._hist_steps.append(step)

    def _history_row(self) -> torch.Tensor:
        n = len(self._hist_steps)
        if n == self._hist.size(0):  # grow by doubling: an allocation and a device copy, no sync
            grown = torch.empty(max(64, 2 * n), *self._hist.shape[1:], device=self.device, dtype=self.dtype)
            grown[:n] = self._hist
            self._hist = grown
        return self._hist[n]

    # ------------------------------------------------------------------ responses
    def gate_logit_offset(self, graph_branch: str = "graph", text_branch: str = "text") -> torch.Tensor:
        """0-dim tensor ``fusion_prior[graph_branch] - fusion_prior[text_branch]`` to add to the
        hybrid gate logits (positive favours the graph branch). Stays on the device: no sync."""
        for name, b in (("graph_branch", graph_branch), ("text_branch", text_branch)):
            if b not in self._index:
                raise ValueError(f"{name}: {b!r} is not a branch of this monitor ({self.branches})")
        return self.fusion_prior[self._index[graph_branch]] - self.fusion_prior[self._index[text_branch]]

    # ------------------------------------------------------------------ read-back (syncs)
    def events(self) -> list[dict]:
        """Detected events, oldest first (one host sync). Each dict: step, branch, kind ("grok" |
        "ungrok"), jump (value - baseline), value, baseline (the metric's mean before the jump),
        statistic and threshold (Page–Hinkley), weight_norm_change (relative, over the window; NaN
        without weight norms), prior (the branch's fusion prior after the event)."""
        E = self.config["max_events"]
        packed = torch.cat([self.event_count.to(self.event_buf.dtype).expand(1, len(EVENT_FIELDS)),
                            self.event_buf[:E]]).cpu()
        count = int(packed[0, 0])
        if count > E:
            warnings.warn(f"GrokkingMonitor: {count} events so far, only the last max_events={E} are kept",
                          RuntimeWarning, stacklevel=2)
        n = min(count, E)
        out = []
        for i in range(count - n, count):
            rec = dict(zip(EVENT_FIELDS, packed[1 + i % E].tolist()))
            rec["step"] = int(rec["step"])
            rec["branch"] = self.branches[int(rec["branch"])]
            rec["kind"] = EVENT_KINDS[int(rec["kind"])]
            out.append(rec)
        return out

    @property
    def history(self) -> dict:
        """Every call's values for plots (one host sync): ``{"step": [...], "branches": [...],
        field: {branch: [...]}}`` for the fields in ``HISTORY_FIELDS`` (baseline: the Page–Hinkley
        reference, NaN while not armed; armed: 0/1). NaN where a branch was not observed."""
        n = len(self._hist_steps)
        data = self._hist[:n].to(device="cpu", dtype=torch.float64)
        out: dict = {"step": list(self._hist_steps), "branches": list(self.branches)}
        for f, field in enumerate(HISTORY_FIELDS):
            out[field] = {b: data[:, f, i].tolist() for i, b in enumerate(self.branches)}
        return out

    def __repr__(self) -> str:
        return (f"GrokkingMonitor(branches={self.branches}, device={self.device}, calls={self.calls}, "
                f"min_jump={self.config['min_jump']}, respond={self.config['respond']})")


def _event_dtype(device: torch.device) -> torch.dtype:
    # float64 holds steps exactly up to 2**53; MPS has no float64 (exact steps up to 2**24 there).
    return torch.float32 if device.type == "mps" else torch.float64


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
