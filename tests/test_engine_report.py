"""The LoadReport: plan() predicts load() for every preset, iteration semantics, RNG restored only
when the run continues, the config diff, the readable table, JSON, and logging."""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any

import numpy as np
import pytest
import torch
from engine_support import (
    PRESET_NAMES,
    Net,
    assert_same,
    make_run,
    report_dict,
    rng_state,
    seed_all,
    snapshot,
)
from omegaconf import OmegaConf

from optimus_ckpt import PRESETS, Checkpointer, LoadStrategy, Outcome

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

STEP = 21


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    run = make_run(seed=0, steps=2)
    seed_all(31)
    state = snapshot(run)
    config = {"optim": {"lr": 0.05, "betas": [0.9, 0.99]}, "steps": 100, "name": "run-a"}
    path = Checkpointer(tmp_path_factory.mktemp("report"), fsync=False).save(
        STEP, config=config, **run.objects()
    )
    return path, state


VARIANTS: list[tuple[str, Any, Any]] = [
    *((name, name, None) for name in PRESET_NAMES),
    ("resume-ignore", LoadStrategy(extra_ignore_keys=["model.head.*", "extra.*", "nope"]), None),
    ("finetune-new-head", "finetune", 5),
    ("non-strict-resume", LoadStrategy(strict=False, load_optimizer=False), 5),
]


@pytest.mark.parametrize(
    ("strategy", "head"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS]
)
def test_plan_predicts_load_and_changes_nothing(
    saved: tuple[str, dict[str, Any]], strategy: Any, head: int | None
) -> None:
    path, _ = saved
    live = make_run(seed=1, steps=1, model=Net(out=head) if head else None)
    ckpt = Checkpointer(os.path.dirname(path))
    before = snapshot(live)
    plan = ckpt.plan(path, strategy, **live.objects())
    assert plan.dry_run and str(plan).startswith("Load plan:")
    assert_same(snapshot(live), before, "plan() changed state")
    report = ckpt.load(path, strategy, **live.objects())
    assert report_dict(plan) == report_dict(report)
    assert not report.dry_run and str(report).startswith("Load report:")


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_iteration_follows_load_iteration(saved: tuple[str, dict[str, Any]], preset: str) -> None:
    path, _ = saved
    live = make_run(seed=1, steps=0)
    report = Checkpointer(os.path.dirname(path)).load(path, preset, **live.objects())
    assert report.step == STEP
    assert report.iteration == (STEP if PRESETS[preset].load_iteration else 0)
    assert ("rng" in report.loaded) == PRESETS[preset].load_iteration


def test_iteration_is_zero_without_load_iteration_even_with_optimizer(
    saved: tuple[str, dict[str, Any]],
) -> None:
    path, _ = saved
    live = make_run(seed=1, steps=0)
    s = LoadStrategy(load_iteration=False)
    report = Checkpointer(os.path.dirname(path)).load(path, s, **live.objects())
    assert report.iteration == 0
    assert "optimizer" in report.loaded and "rng" not in report.loaded
    assert report.components["extra.ema"].outcome is Outcome.SKIPPED_BY_STRATEGY


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_restored_only_when_the_run_continues(tmp_path: Any) -> None:
    run = make_run(seed=0, steps=1)
    seed_all(77)
    path = Checkpointer(tmp_path, fsync=False).save(5, model=run.model)
    after_save = _draws()  # what the saved run draws next

    seed_all(3)
    Checkpointer(tmp_path).load(path, "resume", model=make_run(seed=1, steps=0).model)
    assert _draws() == after_save

    for preset in ("finetune", "eval", "scratch"):
        model = Net()
        seed_all(3)
        expected = rng_state()
        report = Checkpointer(tmp_path).load(path, preset, model=model)
        assert report.components["rng"].outcome is Outcome.SKIPPED_BY_STRATEGY
        assert_same(rng_state(), expected, f"RNG after a {preset} load")

    model = Net()
    seed_all(3)
    expected = rng_state()
    s = LoadStrategy(extra_ignore_keys=["rng"], load_optimizer=False)
    report = Checkpointer(tmp_path).load(path, s, model=model)
    assert report.components["rng"].outcome is Outcome.IGNORED
    assert_same(rng_state(), expected, "RNG after a load that ignores it")


def test_config_diff_is_reported(saved: tuple[str, dict[str, Any]]) -> None:
    path, _ = saved
    now = OmegaConf.create(
        {
            "optim": {"lr": 0.01, "betas": [0.9, 0.99]},
            "steps": "${total}",
            "total": 100,
            "warmup": 10,
        }
    )
    live = make_run(seed=1, steps=0)
    ckpt = Checkpointer(os.path.dirname(path))
    report = ckpt.load(path, "finetune", model=live.model, config=now)
    assert report.config_diff == [
        ("name", "run-a", None),
        ("optim.lr", 0.05, 0.01),
        ("total", None, 100),
        ("warmup", None, 10),
    ]  # "steps" resolves to 100 on both sides: no difference
    text = str(report)
    assert "config differences (checkpoint -> now): 4" in text
    assert "optim.lr: 0.05 -> 0.01" in text
    assert ckpt.plan(path, "finetune", model=live.model, config=now).config_diff == (
        report.config_diff
    )
    assert ckpt.load(path, "finetune", model=live.model).config_diff == []
    same = {"optim": {"lr": 0.05, "betas": [0.9, 0.99]}, "steps": 100, "name": "run-a"}
    assert ckpt.load(path, "finetune", model=live.model, config=same).config_diff == []


def test_report_table_json_and_logging(
    saved: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = saved
    live = make_run(seed=1, steps=0)
    objects = live.objects()
    del objects["metrics"]  # saved, asked for, not given: a warning
    s = LoadStrategy(extra_ignore_keys=["extra.ema", "optimzer"])
    with caplog.at_level(logging.INFO, logger="optimus_ckpt"):
        report = Checkpointer(os.path.dirname(path)).load(path, s, **objects)

    expected = {
        "model": Outcome.LOADED,
        "optimizer": Outcome.LOADED,
        "scheduler": Outcome.LOADED,
        "data_sources": Outcome.LOADED,
        "dataloaders.train": Outcome.LOADED,
        "metrics": Outcome.NOT_GIVEN,
        "extra.ema": Outcome.IGNORED,
        "rng": Outcome.LOADED,
    }
    assert {n: c.outcome for n, c in report.components.items()} == expected
    assert report.unmatched_ignore_patterns == ["optimzer"]

    text = str(report)
    lines = text.splitlines()
    assert lines[0] == f"Load report: {path}"
    assert f"checkpoint step {STEP}; continue from iteration {STEP}" in lines[1]
    assert lines[2].split() == ["component", "outcome", "tensors", "size", "note"]
    for name, outcome in expected.items():
        row = next(line for line in lines if line.split() and line.split()[0] == name)
        assert outcome.value in row
    assert "matches ignore pattern 'extra.ema'" in text
    assert "ignore patterns that matched nothing (typo?): optimzer" in text
    assert "WARNING: the checkpoint has 'metrics'" in text

    data = json.loads(report.to_json())
    assert data == json.loads(json.dumps(report.to_dict(), default=str))
    assert data["iteration"] == STEP and data["step"] == STEP and data["source"] == path
    assert data["components"]["extra.ema"]["outcome"] == "skipped by ignore rule"
    assert data["components"]["model"]["bytes"] == report.components["model"].bytes > 0
    assert data["loaded"] == report.loaded
    assert data["strategy"]["extra_ignore_keys"] == ["extra.ema", "optimzer"]
    assert data["bytes_read"] == report.bytes_read > 0

    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert text in infos
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'metrics'" in w and "metrics=..." in w for w in warns)
    assert any("'optimzer' matched nothing" in w for w in warns)
