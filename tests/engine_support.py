"""Shared helpers for the checkpoint-engine tests (not a test module).

A small but complete training run (model with buffers, AdamW with real steps, LambdaLR, a data
source, a StatefulDataLoader, metrics, an EMA "extra", RNG), deep snapshots of every piece of its
state, and a bit-for-bit comparison that names the first difference it finds.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import random
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*set_vital.*")
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

# The optional components of a run, by their names in a checkpoint ("model" is always saved).
OPTIONAL = ("optimizer", "scheduler", "data_sources", "dataloaders.train", "metrics", "extra.ema")
ALL_NAMES = ("model", *OPTIONAL, "rng")
LOAD_FLAGS = (
    "load_model",
    "load_optimizer",
    "load_scheduler",
    "load_data_sources",
    "load_dataloaders",
    "load_metrics",
    "load_iteration",
)
# Which strategy field governs each component (rng and extra follow load_iteration).
FLAG_OF = {
    "model": "load_model",
    "optimizer": "load_optimizer",
    "scheduler": "load_scheduler",
    "data_sources": "load_data_sources",
    "dataloaders.train": "load_dataloaders",
    "metrics": "load_metrics",
    "extra.ema": "load_iteration",
    "rng": "load_iteration",
}
PRESET_NAMES = ("resume", "finetune", "eval", "scratch", "reset_optimizer")


class Net(nn.Module):
    """Linear -> BatchNorm (float and int64 buffers) -> ReLU -> Linear head."""

    def __init__(self, width: int = 6, hidden: int = 12, out: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(width, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.body(x))))


class Wrapped(nn.Module):
    """Adds a prefix to every key, as DDP (``module``) or torch.compile (``_orig_mod``) do."""

    def __init__(self, inner: nn.Module, attr: str = "module") -> None:
        super().__init__()
        setattr(self, attr, inner)
        self._attr = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._attr)(x)  # type: ignore[no-any-return]


class DataSource:
    """A data source position: plain ints, a list and a tuple."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self.order = list(range(seed, seed + 5))
        self.window = (seed, seed * 2)

    def advance(self, n: int) -> None:
        self.offset += n
        self.epoch += n // 3
        self.order.reverse()
        self.window = (self.window[1], self.window[0] + n)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
            "order": list(self.order),
            "window": self.window,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.seed, self.epoch, self.offset = sd["seed"], sd["epoch"], sd["offset"]
        self.order, self.window = list(sd["order"]), tuple(sd["window"])


class Metrics:
    """Running metrics: floats, a dict with int keys, and a small tensor (stored inline)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.by_class: dict[int, float] = {}
        self.hist = torch.zeros(4)

    def update(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.by_class[self.count % 3] = value
        self.hist[self.count % 4] += value

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total": self.total,
            "by_class": dict(self.by_class),
            "hist": self.hist.clone(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.count, self.total = sd["count"], sd["total"]
        self.by_class = dict(sd["by_class"])
        self.hist = sd["hist"].clone()


class EMA:
    """Exponential moving average of the model's weights (an ``extra`` with large tensors)."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def update(self, model: nn.Module) -> None:
        self.updates += 1
        with torch.no_grad():
            for k, v in model.state_dict().items():
                self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.decay, self.updates = sd["decay"], sd["updates"]
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}


def lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + step)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data_source: DataSource
    loader: StatefulDataLoader
    metrics: Metrics
    ema: EMA

    def objects(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """Keyword arguments for save/load/plan holding the objects named (all by default)."""
        names = set(ALL_NAMES if names is None else names)
        out: dict[str, Any] = {}
        if "model" in names:
            out["model"] = self.model
        if "optimizer" in names:
            out["optimizer"] = self.optimizer
        if "scheduler" in names:
            out["scheduler"] = self.scheduler
        if "data_sources" in names:
            out["data_sources"] = self.data_source
        if "dataloaders.train" in names:
            out["dataloaders"] = {"train": self.loader}
        if "metrics" in names:
            out["metrics"] = self.metrics
        if "extra.ema" in names:
            out["extra"] = {"ema": self.ema}
        return out

    def train(self, steps: int, *, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(1000 + seed)
        it = iter(self.loader)
        for _ in range(steps):
            next(it)
            x = torch.randn(5, 6, generator=gen)
            self.optimizer.zero_grad()
            loss = self.model(x).square().mean()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.data_source.advance(2)
            self.metrics.update(float(loss.detach()))
            self.ema.update(self.model)


def make_run(seed: int, steps: int, model: nn.Module | None = None) -> Run:
    """A run built from ``seed`` and trained ``steps`` real steps (0: fresh objects)."""
    torch.manual_seed(seed)
    model = Net() if model is None else model
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    loader = StatefulDataLoader(list(range(64)), batch_size=4)
    run = Run(model, opt, sched, DataSource(seed), loader, Metrics(), EMA(model))
    if steps:
        run.model.train()
        run.train(steps, seed=seed)
    return run


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state().clone(),
        "numpy": copy.deepcopy(np.random.get_state()),
    }


def set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])


def snapshot(run: Run) -> dict[str, Any]:
    """A deep copy of every component's state, keyed by component name, plus the RNG states.

    RNG-neutral: a StatefulDataLoader's ``state_dict()`` may draw a seed from torch's RNG, so the
    RNG state is taken first and put back at the end.
    """
    rng = rng_state()
    state = {
        "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "optimizer": copy.deepcopy(run.optimizer.state_dict()),
        "scheduler": copy.deepcopy(run.scheduler.state_dict()),
        "data_sources": copy.deepcopy(run.data_source.state_dict()),
        "dataloaders.train": copy.deepcopy(run.loader.state_dict()),
        "metrics": copy.deepcopy(run.metrics.state_dict()),
        "extra.ema": copy.deepcopy(run.ema.state_dict()),
        "rng": rng,
    }
    set_rng(rng)
    return state


def bits(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def diff(a: Any, b: Any, path: str = "") -> str | None:
    """The first difference between ``a`` and ``b`` (bit for bit, types included), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        return None if bits(a) == bits(b) else f"{path}: tensor values differ"
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return f"{path}: arrays differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):  # OrderedDict and dict compare alike
        if list(a) != list(b) and set(a) != set(b):
            return f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            d = diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} {a!r} vs {type(b).__name__} {b!r}"
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, float):
        same = struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
        return None if same else f"{path}: {a!r} vs {b!r}"
    if isinstance(a, np.generic):
        return None if a.tobytes() == b.tobytes() else f"{path}: {a!r} vs {b!r}"
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def assert_same(a: Any, b: Any, what: str = "") -> None:
    d = diff(a, b)
    assert d is None, f"{what}: {d}"


def model_keys(model: nn.Module) -> list[str]:
    return list(model.state_dict())


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def component_ignored(name: str, patterns: Iterable[str]) -> bool:
    """Whether an ignore pattern matches ``name`` or one of its dotted prefixes."""
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def report_dict(report: Any) -> dict[str, Any]:
    """A report's dict without the fields that differ between plan() and load() by design."""
    d = report.to_dict()
    for k in ("seconds", "dry_run", "verified"):
        d.pop(k)
    return d
