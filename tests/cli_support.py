"""Shared helpers for the command-line tests (not a test module).

Imported as ``cli_support`` (pytest puts tests/ on sys.path). Every command runs in a subprocess,
as a user runs it: ``python -m optimus_ckpt ...`` or the ``optimus-ckpt`` console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from optimus_ckpt import Checkpointer

# A model factory file for ``plan --model``: ``build`` matches the saved model, ``new_head``
# has a 3-way head where the checkpoint has a 2-way one, ``wider`` adds a parameter.
MODELS_PY = """\
import torch


class Net(torch.nn.Module):
    def __init__(self, classes=2, extra=False):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),
                                           torch.nn.Linear(16, 16))
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, classes)
        if extra:
            self.adapter = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.head(self.norm(self.encoder(x)))


def build():
    return Net()


def new_head():
    return Net(classes=3)


def wider():
    return Net(extra=True)
"""


class Counter:
    """Small state with state_dict()/load_state_dict() (a dataloader position, a metric, EMA)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = int(state["value"])


def models_module(where: Path) -> Any:
    """Write ``models.py`` into ``where`` and import it (the same factories the CLI uses)."""
    import importlib.util

    path = where / "models.py"
    path.write_text(MODELS_PY)
    spec = importlib.util.spec_from_file_location(f"cli_models_{abs(hash(str(where)))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_objects(models: Any, factory: str = "build", seed: int = 0) -> dict[str, Any]:
    """Model, AdamW (with state after one step), scheduler and small state, deterministic."""
    torch.manual_seed(seed)
    model = getattr(models, factory)()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "dataloaders": {"train": Counter(seed + 7)},
        "metrics": Counter(seed + 3),
        "extra": {"ema": Counter(seed + 11)},
    }


def save_training_checkpoint(directory: Path, step: int, models: Any, seed: int = 0) -> Path:
    objects = training_objects(models, seed=seed)
    config = {"lr": 0.001, "model": {"classes": 2, "hidden": 16}, "run": f"seed{seed}"}
    path = Checkpointer(directory, fsync=False).save(step, config=config, **objects)
    return Path(path)


def console_script() -> str:
    """The installed ``optimus-ckpt`` script beside this interpreter."""
    path = Path(sys.executable).parent / "optimus-ckpt"
    if not path.exists():
        found = shutil.which("optimus-ckpt")
        assert found, "the optimus-ckpt console script is not installed (pip install -e .)"
        return found
    return str(path)


def run_cli(
    *args: str | os.PathLike[str], script: bool = False, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [console_script()] if script else [sys.executable, "-m", "optimus_ckpt"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    return subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def code(proc: subprocess.CompletedProcess[str], expected: int) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == expected, (
        f"exit code {proc.returncode}, expected {expected}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "optimus.json").read_text())


def tensor_chunk(checkpoint: Path, key: str) -> dict[str, Any]:
    """The first stored chunk of tensor ``key`` (file, offset, nbytes) from the manifest."""
    return dict(manifest(checkpoint)["tensors"][key]["chunks"][0])
