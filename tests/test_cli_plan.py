"""``optimus-ckpt plan``: strategies composed from Hydra overrides, and a plan that equals what
``Checkpointer.load`` then reports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_support import (
    as_json,
    code,
    models_module,
    run_cli,
    save_training_checkpoint,
    training_objects,
)

from optimus_ckpt import PRESETS, Checkpointer, LoadMismatchError, LoadStrategy

# What must agree between the CLI's plan and the load that follows it.
SAME = (
    "source", "step", "iteration", "strategy", "components", "loaded", "bytes_read",
    "missing_keys", "unexpected_keys", "shape_mismatches", "ignored_keys",
    "unmatched_ignore_patterns", "renamed_prefixes", "dtype_conversions", "warnings",
)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("plan")
    models = models_module(root)
    ckpts = root / "ckpts"
    save_training_checkpoint(ckpts, 5, models, seed=1)
    path = save_training_checkpoint(ckpts, 12, models, seed=2)  # the newest: plan picks it
    return {"root": root, "models": models, "ckpts": ckpts, "path": path}


def _load_report(setup: dict[str, Any], strategy: Any, objects: dict[str, Any]) -> dict[str, Any]:
    report = Checkpointer(setup["ckpts"]).load(setup["ckpts"], strategy, **objects)
    assert not report.dry_run
    return dict(json.loads(report.to_json()))


def _assert_same(plan: dict[str, Any], load: dict[str, Any]) -> None:
    for key in SAME:
        assert plan[key] == load[key], f"{key}: plan {plan[key]!r} != load {load[key]!r}"


def test_plan_without_a_model_equals_the_resume_load(setup: dict[str, Any]) -> None:
    plan = as_json(code(run_cli("plan", setup["ckpts"], "--json"), 0))
    assert plan["dry_run"] is True and plan["would_fail"] is False
    assert plan["source"] == str(setup["path"])
    assert plan["model"].startswith("stand-in")
    # the load a training script then does, with objects of its own (other values, same shapes)
    objects = training_objects(setup["models"], seed=9)
    load = _load_report(setup, "resume", objects)
    _assert_same(plan, load)
    assert plan["loaded"] == ["model", "optimizer", "scheduler", "dataloaders.train", "metrics",
                              "extra.ema", "rng"]  # fmt: skip
    assert plan["iteration"] == 12
    assert objects["dataloaders"]["train"].value == 2 + 7  # it really loaded step 12's state
    groups = {g["group"]: g for g in plan["groups"]}
    assert list(groups) == ["model.encoder", "model.norm", "model.head"]
    assert groups["model.encoder"]["load"] == 4 and groups["model.head"]["load"] == 2
    assert sum(g["bytes"] for g in groups.values()) == plan["components"]["model"]["bytes"]


def test_plan_finetune_with_a_new_head_equals_the_load(setup: dict[str, Any]) -> None:
    overrides = [
        "load_strategy=finetune",
        "load_strategy.extra_ignore_keys=[model.norm.*,model.nothing.*]",
    ]
    args = ("plan", setup["ckpts"], *overrides, "--model", "models.py:new_head")
    plan = as_json(code(run_cli(*args, "--json", cwd=setup["root"]), 0))
    model = setup["models"].new_head()
    fresh_head = model.head.weight.detach().clone()
    strategy = LoadStrategy(**{**PRESETS["finetune"].to_dict(),
                               "extra_ignore_keys": ["model.norm.*", "model.nothing.*"]})  # fmt: skip
    load = _load_report(setup, strategy, {"model": model})
    _assert_same(plan, load)
    assert plan["loaded"] == ["model"] and plan["iteration"] == 0
    assert sorted(k for k, _a, _b in plan["shape_mismatches"]) == ["head.bias", "head.weight"]
    assert sorted(plan["ignored_keys"]) == ["norm.bias", "norm.weight"]
    assert plan["unmatched_ignore_patterns"] == ["model.nothing.*"]
    assert torch.equal(model.head.weight, fresh_head)  # mismatched: kept its fresh values
    groups = {g["group"]: g for g in plan["groups"]}
    assert groups["model.head"]["shape_mismatch"] == 2 and groups["model.head"]["bytes"] == 0
    assert groups["model.norm"]["ignored"] == 2
    assert groups["model.encoder"]["load"] == 4
    assert groups["model.encoder"]["bytes"] == plan["components"]["model"]["bytes"]

    out = code(run_cli(*args, cwd=setup["root"]), 0).stdout
    assert re.search(r"^Strategy\s+loads model; non-strict; ignores model\.norm\.\*", out, re.M)
    assert re.search(r"^model\s+loaded\s+4\s", out, re.M)
    assert re.search(r"^  model\.encoder\s+load 4\s+4\s", out, re.M)
    assert re.search(r"^  model\.norm\s+ignored 2\s+-\s+-", out, re.M)
    assert re.search(r"^  model\.head\s+shape mismatch \(kept\) 2\s", out, re.M)
    assert re.search(r"^optimizer\s+skipped by strategy.*load_strategy\.load_optimizer=false",
                     out, re.M)  # fmt: skip
    assert "head.weight: checkpoint [2, 16] vs model [3, 16]" in out
    assert "Ignore patterns that matched nothing (a typo?): model.nothing.*" in out
    assert "would succeed" in out


def test_plan_exits_1_when_a_strict_load_would_fail(setup: dict[str, Any]) -> None:
    # an importable MODULE:FACTORY (the cwd is on the path)
    args = ("plan", setup["ckpts"], "load_strategy=eval", "--model", "models:new_head")
    plan = as_json(code(run_cli(*args, "--json", cwd=setup["root"]), 1))
    assert plan["would_fail"] is True
    assert "strict model load failed" in plan["error"]
    assert sorted(k for k, _a, _b in plan["shape_mismatches"]) == ["head.bias", "head.weight"]
    assert plan["strategy"]["strict"] is True
    model = setup["models"].new_head()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadMismatchError, match="strict model load failed"):
        Checkpointer(setup["ckpts"]).load(setup["ckpts"], "eval", model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # resume with a model that grew a module: missing keys, and its optimizer no longer fits
    out = code(run_cli("plan", setup["ckpts"], "--model", "models.py:wider", cwd=setup["root"]),
               1).stdout  # fmt: skip
    assert "Missing keys (keep their current values): 2" in out
    assert "  adapter.weight" in out and "  adapter.bias" in out
    assert "A load with this strategy would FAIL" in out
    assert "optimizer structure differs" in out


def test_plan_reports_bad_overrides_with_hydras_messages(setup: dict[str, Any]) -> None:
    proc = code(run_cli("plan", setup["path"], "load_strategy=finetun"), 2)
    assert "Could not find 'load_strategy/finetun'" in proc.stderr
    assert "finetune" in proc.stderr and "reset_optimizer" in proc.stderr  # the options
    proc = code(run_cli("plan", setup["path"], "load_strategy.load_modle=false"), 2)
    assert "Could not override 'load_strategy.load_modle'" in proc.stderr
    proc = code(run_cli("plan", setup["path"], "load_strategy.strict=maybe", "--json"), 2)
    assert "'maybe' is not a valid bool" in proc.stderr
    assert as_json(proc)["exit_code"] == 2
    proc = code(run_cli("plan", setup["path"], "--model", "no_such_module:build"), 2)
    assert "No module named 'no_such_module'" in proc.stderr


def test_plan_on_a_single_file_source(setup: dict[str, Any], tmp_path: Path) -> None:
    objects = training_objects(setup["models"], seed=4)
    file = tmp_path / "weights.pt"
    torch.save({"model": objects["model"].state_dict(), "step": 77}, file)
    plan = as_json(code(run_cli("plan", file, "load_strategy=eval", "--json"), 0))
    load = _load_report(
        {"ckpts": file}, "eval", {"model": setup["models"].build()}
    )  # same as load(file)
    _assert_same(plan, load)
    assert plan["source"] == str(file) and plan["step"] == 77 and plan["loaded"] == ["model"]
