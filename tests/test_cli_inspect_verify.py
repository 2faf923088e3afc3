"""``optimus-ckpt inspect`` and ``verify`` (and the CLI's help and exit codes), in subprocesses.

One directory holds every kind of checkpoint a crash or a bad disk leaves behind: complete ones,
a truncated data file, a flipped byte, a garbage manifest, an unfinished (staging) save and a step
directory without its manifest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_support import (
    as_json,
    code,
    manifest,
    models_module,
    run_cli,
    save_training_checkpoint,
    tensor_chunk,
    training_objects,
)

from optimus_ckpt import Checkpointer

FLIPPED_KEY = "model.encoder.0.weight"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("zoo")
    models = models_module(root)
    ckpts = root / "ckpts"
    paths = {step: save_training_checkpoint(ckpts, step, models, seed=step) for step in
             (10, 20, 30, 40, 60)}  # fmt: skip

    # step 20: a data file cut short (a full disk, a killed copy)
    truncated = tensor_chunk(paths[20], "model.head.weight")["file"]
    data = paths[20] / truncated
    os.truncate(data, data.stat().st_size - 100)
    # step 30: one flipped bit inside a tensor's bytes (sizes still right: only checksums see it)
    chunk = tensor_chunk(paths[30], FLIPPED_KEY)
    with open(paths[30] / chunk["file"], "r+b") as f:
        f.seek(chunk["offset"] + 5)
        byte = f.read(1)
        f.seek(chunk["offset"] + 5)
        f.write(bytes([byte[0] ^ 0x10]))
    # step 40: a garbage manifest
    (paths[40] / "optimus.json").write_bytes(
        b'{"format": "optimus_ckpt", "step": 4\x00\xff garbage'
    )
    # step 50: an unfinished save; step 60: a step directory whose manifest never got written
    staging = ckpts / "step_0000000050.partial-0123456789ab"
    staging.mkdir()
    (staging / "rank_00000.json").write_text("{}")
    (paths[60] / "optimus.json").unlink()
    return {
        "root": root,
        "ckpts": ckpts,
        "paths": paths,
        "staging": staging,
        "truncated_file": truncated,
        "flipped_file": chunk["file"],
        "models": models,
    }


def test_help_lists_commands_and_exit_codes_without_importing_torch() -> None:
    out = code(run_cli("--help"), 0).stdout
    for command in ("inspect", "plan", "verify", "convert"):
        assert command in out
    assert "exit codes:" in out
    for line in ("0  success", "1  a check failed", "2  usage error", "3  not found"):
        assert line in out
    probe = (
        "import sys\n"
        "from optimus_ckpt.cli import main\n"
        "for argv in (['--help'], ['plan', '--help'], ['convert', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH False" in proc.stdout
    assert "MODULE:FACTORY" in proc.stdout  # plan --help documents --model


def test_not_found_and_usage_exit_codes(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for command in ("inspect", "verify", "plan"):
        proc = code(run_cli(command, missing), 3)
        assert "does not exist" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoints" in code(run_cli("inspect", empty), 3).stderr
    proc = code(run_cli("inspect", missing, "--json"), 3)
    assert as_json(proc)["exit_code"] == 3
    code(run_cli("frobnicate", tmp_path), 2)  # argparse: unknown command


def test_inspect_directory_flags_incomplete_and_corrupt_newest_first(zoo: dict[str, Any]) -> None:
    proc = code(run_cli("inspect", zoo["ckpts"]), 1)  # 1: corrupt checkpoints present
    lines = proc.stdout.splitlines()
    rows = [ln for ln in lines if " step_00000000" in ln]
    assert [int(r.split()[0]) for r in rows] == [60, 50, 40, 30, 20, 10]
    status = {int(r.split()[0]): r.split()[1] for r in rows}
    assert status == {60: "INCOMPLETE", 50: "INCOMPLETE", 40: "CORRUPT", 30: "complete",
                      20: "CORRUPT", 10: "complete"}  # fmt: skip
    row = {int(r.split()[0]): r for r in rows}
    assert "(latest)" in row[30] and "(latest)" not in row[10]
    assert "model, optimizer, scheduler, dataloaders.train, metrics, extra.ema, rng" in row[10]
    assert "staging" in row[50] and "no optimus.json" in row[60]
    assert "not valid JSON" in row[40] and zoo["truncated_file"] in row[20]
    assert "3 checkpoint(s) corrupt or incomplete" in proc.stdout  # not the unfinished save
    # an aligned table: every row starts its STATUS column at the same place
    header = next(ln for ln in lines if ln.lstrip().startswith("STEP"))
    col = header.index("STATUS")
    assert all(r[col - 2 : col] == "  " and r[col] != " " for r in rows)

    data = as_json(code(run_cli("inspect", zoo["ckpts"], "--json"), 1))
    recs = {r["step"]: r for r in data["checkpoints"]}
    assert [r["step"] for r in data["checkpoints"]] == [60, 50, 40, 30, 20, 10]
    assert {s: r["status"] for s, r in recs.items()} == {
        60: "incomplete", 50: "incomplete", 40: "corrupt", 30: "complete", 20: "corrupt",
        10: "complete",
    }  # fmt: skip
    assert data["latest"] == str(zoo["paths"][30])
    assert recs[30]["latest"] and not recs[10]["latest"]
    assert "size check failed" in recs[20]["problem"]
    assert zoo["truncated_file"] in recs[20]["problem"]
    assert recs[10]["problem"] is None and recs[10]["world_size"] == 1


def test_inspect_one_checkpoint(zoo: dict[str, Any]) -> None:
    path = zoo["paths"][10]
    objects = training_objects(zoo["models"], seed=10)
    model_sd = objects["model"].state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in model_sd.values())

    out = code(run_cli("inspect", path), 0).stdout
    assert re.search(r"^Status\s+complete", out, re.M)
    assert re.search(r"^Step\s+10$", out, re.M)
    assert re.search(r"^World size\s+1$", out, re.M)
    model_row = next(ln for ln in out.splitlines() if ln.startswith("model "))
    assert model_row.split()[:3] == ["model", "shared", str(len(model_sd))]
    assert f"float32 x{len(model_sd)}" in model_row
    assert re.search(r"^dataloaders\.train\s+per-rank\s+0", out, re.M)
    assert "top-level keys: lr, model, run" in out
    assert "  run: seed10" in out

    data = as_json(code(run_cli("inspect", path, "--json", "--keys"), 0))
    assert data["status"] == "complete" and data["step"] == 10 and data["kind"] == "optimus"
    comps = data["components"]
    assert comps["model"]["tensors"] == len(model_sd)
    assert comps["model"]["bytes"] == model_bytes
    assert comps["model"]["dtypes"] == {"float32": len(model_sd)}
    n_params = len(list(objects["model"].parameters()))
    assert comps["optimizer"]["tensors"] == 3 * n_params  # step, exp_avg, exp_avg_sq
    assert comps["metrics"]["per_rank"] and not comps["scheduler"]["per_rank"]
    keys = {k["key"]: k for k in data["keys"]}
    assert keys["model.head.weight"]["shape"] == [2, 16]
    assert keys["model.head.weight"]["bytes"] == 2 * 16 * 4
    assert data["config_keys"] == ["lr", "model", "run"]
    assert "classes: 2" in data["config_yaml"]
    assert data["files"] == len(manifest(path)["files"])


def test_inspect_flags_a_truncated_file_and_a_garbage_manifest(zoo: dict[str, Any]) -> None:
    proc = code(run_cli("inspect", zoo["paths"][20]), 1)
    assert re.search(r"^Status\s+CORRUPT", proc.stdout, re.M)
    assert zoo["truncated_file"] in proc.stdout and "truncated" in proc.stdout

    data = as_json(code(run_cli("inspect", zoo["paths"][40], "--json"), 1))
    assert data["status"] == "corrupt"
    assert "manifest check failed" in data["problem"] and "optimus.json" in data["problem"]


def test_verify_directory_names_every_bad_file(zoo: dict[str, Any]) -> None:
    data = as_json(code(run_cli("verify", zoo["ckpts"], "--json"), 1))
    assert data["ok"] is False
    results = {r["step"]: r for r in data["checkpoints"]}
    assert sorted(results) == [10, 20, 30, 40, 60]
    assert results[10]["ok"] and results[10]["failures"] == []
    assert results[10]["tensors_checked"] == len(manifest(zoo["paths"][10])["tensors"])

    (f20,) = results[20]["failures"]
    assert f20["file"] == zoo["truncated_file"] and f20["check"] == "size"
    (f30,) = results[30]["failures"]
    assert f30["file"] == zoo["flipped_file"] and f30["check"] == "checksum"
    assert f30["tensors"] == [FLIPPED_KEY]
    (f40,) = results[40]["failures"]
    assert f40["file"] == "optimus.json" and f40["check"] == "manifest"
    (f60,) = results[60]["failures"]  # named like a committed checkpoint, but no manifest
    assert f60["file"] == "optimus.json" and f60["check"] == "manifest"
    assert "missing" in f60["message"]
    (skipped,) = data["skipped"]  # an unfinished save is not a checkpoint (yet)
    assert os.path.basename(skipped["path"]) == "step_0000000050.partial-0123456789ab"


def test_verify_one_checkpoint(zoo: dict[str, Any]) -> None:
    proc = code(run_cli("verify", zoo["paths"][30]), 1)
    assert proc.stdout.startswith("FAILED")
    assert f"{zoo['flipped_file']}: checksum check failed" in proc.stdout
    assert FLIPPED_KEY in proc.stdout
    assert f"bad file(s): {zoo['flipped_file']}" in proc.stdout

    # the console script, with the progress bar forced on (stderr is a pipe here)
    proc = code(run_cli("verify", zoo["paths"][10], "--progress", script=True), 0)
    assert proc.stdout.startswith("OK")
    assert "verify step_0000000010 [###" in proc.stderr and "100.0%" in proc.stderr
    proc = code(run_cli("verify", zoo["paths"][10]), 0)
    assert proc.stderr == ""  # no terminal: no bar

    proc = code(run_cli("verify", zoo["staging"]), 1)
    assert "not a complete checkpoint" in proc.stderr


def test_verify_catches_a_flip_in_a_small_file(tmp_path: Path, zoo: dict[str, Any]) -> None:
    copy = tmp_path / "step_0000000010"
    shutil.copytree(zoo["paths"][10], copy)
    rank_file = copy / "rank_00000.json"
    raw = bytearray(rank_file.read_bytes())
    i = raw.index(b'"value"')
    raw[i + 1] ^= 0x01  # same size, different content
    rank_file.write_bytes(bytes(raw))
    data = as_json(code(run_cli("verify", copy, "--json"), 1))
    (failure,) = data["checkpoints"][0]["failures"]
    assert failure["file"] == "rank_00000.json" and failure["check"] == "checksum"


def test_plan_falls_back_past_broken_checkpoints_as_load_does(zoo: dict[str, Any]) -> None:
    plan = as_json(code(run_cli("plan", zoo["ckpts"], "load_strategy=eval", "--json"), 0))
    objects = training_objects(zoo["models"], seed=99)
    report = Checkpointer(zoo["ckpts"]).load(zoo["ckpts"], "eval", model=objects["model"])
    load = json.loads(report.to_json())
    for key in ("source", "components", "bytes_read", "warnings", "skipped_checkpoints"):
        assert plan[key] == load[key], key
    assert plan["source"] == str(zoo["paths"][30])  # the newest that passes the load's checks
