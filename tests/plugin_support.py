"""Shared helpers for the plugin and strategy tests (not a test module).

Imported as ``plugin_support`` (pytest puts tests/ on sys.path: the folder has no __init__.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

FLAGS = (
    "load_model",
    "load_optimizer",
    "load_scheduler",
    "load_data_sources",
    "load_dataloaders",
    "load_metrics",
    "load_iteration",
    "strict",
)
LOADS = tuple(n for n in FLAGS if n != "strict")

# What each shipped preset means (the definitions), written out independently of the YAML.
_ALL = {name: True for name in FLAGS}
_MODEL_ONLY = {name: name == "load_model" for name in LOADS}
EXPECTED_PRESETS: dict[str, dict[str, Any]] = {
    "resume": {**_ALL, "extra_ignore_keys": None},
    "finetune": {**_MODEL_ONLY, "strict": False, "extra_ignore_keys": None},
    "eval": {**_MODEL_ONLY, "strict": True, "extra_ignore_keys": None},
    "scratch": {**{n: False for n in LOADS}, "strict": True, "extra_ignore_keys": None},
    "reset_optimizer": {
        **_ALL,
        "load_optimizer": False,
        "load_scheduler": False,
        "extra_ignore_keys": None,
    },
}

# The messages a user sees for each mistake (README.md quotes each one; a test checks it).
ERRORS = {
    "misspelled_preset": "Could not find 'load_strategy/finetun'",
    "preset_options": "Available options in 'load_strategy':",
    "wrong_type": "Value 'maybe' is not a valid bool (type str)",
    "wrong_type_key": "full_key: load_strategy.load_model",
    "misspelled_field": "Key 'load_modle' not in 'LoadStrategyConfig'",
    "unknown_key": "Unknown key 'load_modle' in load_strategy. Did you mean 'load_model'?",
    "optimizer_without_model": (
        "load_optimizer=True needs load_model=True: optimizer state is keyed to the model's "
        "parameters. Fix: set load_strategy.load_optimizer=false, or load_strategy.load_model=true."
    ),
    "dataloaders_without_sources": (
        "load_dataloaders=True needs load_data_sources=True: a dataloader's state contains its "
        "data source's. Fix: set load_strategy.load_dataloaders=false, or "
        "load_strategy.load_data_sources=true."
    ),
    "no_defaults_entry": "Could not override 'load_strategy'. No match in the defaults list.",
    "python_preset": (
        "Unknown load strategy preset 'finetun'. Did you mean 'finetune'? "
        "Available presets: eval, finetune, reset_optimizer, resume, scratch."
    ),
    "python_type": (
        "LoadStrategy.strict must be true or false, got 'yes' (str). "
        "Fix: load_strategy.strict=true or =false."
    ),
}

# --- a small Hydra app, run in a subprocess ---------------------------------------------------

APP_PY = '''\
"""A small Hydra app for the tests: writes what it saw as JSON into its output directory."""
import json
import os
import sys

AT_START = {"optimus_ckpt": "optimus_ckpt" in sys.modules, "torch": "torch" in sys.modules}

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    hc = HydraConfig.get()
    seen = {
        "at_start": AT_START,
        "torch_in_task": "torch" in sys.modules,
        "optimus_ckpt_file": getattr(sys.modules.get("optimus_ckpt"), "__file__", None),
        "choice": hc.runtime.choices.get("load_strategy"),
        "node": OmegaConf.to_container(cfg.load_strategy, resolve=True),
        "load_from": cfg.get("load_from"),
    }
    build = os.environ.get("APP_BUILD", "instantiate")
    if build == "instantiate":
        from hydra.utils import instantiate
        strategy = instantiate(cfg.load_strategy)
    elif build == "resolve":
        from optimus_ckpt import resolve_strategy
        strategy = resolve_strategy(cfg.load_strategy)
    elif build == "to_object":
        strategy = OmegaConf.to_object(cfg.load_strategy)
    else:  # "none": never touch optimus_ckpt from the app
        strategy = None
    if strategy is not None:
        seen["type"] = type(strategy).__name__
        seen["strategy"] = strategy.to_dict()
    with open(os.path.join(hc.runtime.output_dir, "seen.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
'''

APP_CONFIG = """\
defaults:
  - load_strategy: resume
  - _self_

ckpt_dir: ckpts
load_from: ${optimus_ckpt.latest:${ckpt_dir}}
"""


def write_app(where: Path, app_py: str = APP_PY, config: str = APP_CONFIG) -> Path:
    """Write the test app (``app.py`` and ``conf/config.yaml``) into ``where``."""
    (where / "conf").mkdir(parents=True, exist_ok=True)
    (where / "app.py").write_text(app_py)
    (where / "conf" / "config.yaml").write_text(config)
    return where


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(extra)
    return env


def run_app(
    where: Path,
    *args: str,
    python: str = sys.executable,
    build: str = "instantiate",
    script: str = "app.py",
) -> subprocess.CompletedProcess[str]:
    """Run the app in ``where`` (its cwd), outputs under ``where/outputs`` and ``where/multirun``."""
    cmd = [
        python,
        script,
        *args,
        f"hydra.run.dir={where / 'outputs'}",
        f"hydra.sweep.dir={where / 'multirun'}",
    ]
    return subprocess.run(
        cmd,
        cwd=where,
        env=clean_env(APP_BUILD=build),
        capture_output=True,
        text=True,
        timeout=180,
    )


def seen(where: Path, job: str | None = None) -> dict[str, Any]:
    """What the app wrote: ``outputs/seen.json``, or ``multirun/<job>/seen.json``."""
    folder = where / "outputs" if job is None else where / "multirun" / job
    return json.loads((folder / "seen.json").read_text())


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"app failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def failed(proc: subprocess.CompletedProcess[str]) -> str:
    """The app's stderr, after checking that it failed."""
    assert proc.returncode != 0, f"app should have failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stderr


# --- checkpoint directories built by hand ------------------------------------------------------


def make_checkpoint(
    directory: Path, step: int, *, manifest: bool = True, staging: str | None = None
) -> Path:
    """A step directory as the engine lays it out; ``manifest=False`` leaves it uncommitted,
    ``staging="abc"`` gives it the staging name ``step_...partial-abc``."""
    from optimus_ckpt.layout import FORMAT_NAME, MANIFEST_NAME, STAGING_INFIX, step_dir_name

    name = step_dir_name(step)
    if staging is not None:
        name = f"{name}{STAGING_INFIX}{staging}"
    path = directory / name
    path.mkdir(parents=True)
    (path / "model.bin").write_bytes(b"\0" * 8)
    if manifest:
        (path / MANIFEST_NAME).write_text(json.dumps({"format": FORMAT_NAME, "step": step}))
    return path
