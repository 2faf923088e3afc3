"""Corruption: a truncated data file, flipped bytes, a missing file, a garbage or truncated
manifest, a rank file with a bad CRC. Each gives a clear error naming the file and the check that
failed; structure checks always run, content checksums with ``verify=True``. A load from a
directory of checkpoints falls back to the newest one that passes its checks, with a warning in
the report naming each one it skipped. Nothing live is touched by a load that fails.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from reliability_support import build, check_loaded, save_step

from optimus_ckpt import CheckpointCorruptError, Checkpointer, UnsafeCheckpointError
from optimus_ckpt.layout import latest_checkpoint, step_dir_name
from optimus_ckpt.verify import verify_checkpoint, verify_path


@pytest.fixture
def ckpts(tmp_path: Path) -> dict[str, Any]:
    directory = str(tmp_path / "ckpts")
    ckpt = Checkpointer(directory)
    for step in (1, 2, 3):
        save_step(ckpt, step)
    paths = {s: os.path.join(directory, step_dir_name(s)) for s in (1, 2, 3)}
    return {"dir": directory, "ckpt": ckpt, "paths": paths}


def manifest(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "optimus.json")) as f:
        return dict(json.load(f))


def model_chunk(path: str) -> tuple[str, int, int]:
    """(file, offset, nbytes) of the model's largest tensor."""
    tensors = manifest(path)["tensors"]
    key = max((k for k in tensors if k.startswith("model.")),
              key=lambda k: tensors[k]["chunks"][0]["nbytes"])  # fmt: skip
    c = tensors[key]["chunks"][0]
    return c["file"], c["offset"], c["nbytes"]


def flip(file: str, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def truncate_data(path: str) -> str:
    name, _, _ = model_chunk(path)
    file = os.path.join(path, name)
    os.truncate(file, os.path.getsize(file) - 100)
    return name


def flip_tensor_data(path: str) -> str:
    name, offset, nbytes = model_chunk(path)
    flip(os.path.join(path, name), offset + nbytes // 2)
    return name


def delete_data(path: str) -> str:
    name, _, _ = model_chunk(path)
    os.remove(os.path.join(path, name))
    return name


def garbage_manifest(path: str) -> str:
    with open(os.path.join(path, "optimus.json"), "wb") as f:
        f.write(b"\x00\xffPK garbage \x13\x37" * 40)
    return "optimus.json"


def truncate_manifest(path: str) -> str:
    file = os.path.join(path, "optimus.json")
    os.truncate(file, os.path.getsize(file) // 2)
    return "optimus.json"


def flip_manifest_digit(path: str) -> str:
    """Still valid JSON, still plausible: only the manifest's own checksum catches it."""
    file = os.path.join(path, "optimus.json")
    with open(file) as f:
        text = f.read()
    i = text.index('"offset": ') + len('"offset": ')
    digit = text[i]
    text = text[:i] + ("1" if digit != "1" else "2") + text[i + 1 :]
    with open(file, "w") as f:
        f.write(text)
    return "optimus.json"


def flip_rank_file(path: str) -> str:
    file = os.path.join(path, "rank_00000.json")
    with open(file) as f:
        text = f.read()
    i = text.index('"position": ') + len('"position": ')
    text = text[:i] + ("7" if text[i] != "7" else "8") + text[i + 1 :]  # same size, other value
    with open(file, "w") as f:
        f.write(text)
    return "rank_00000.json"


# corruption -> (what the error says, is it caught by every load, without verify=True)
MISSING = "structure check failed: file listed in the manifest is missing"
MANIFEST_FLIP = "checksum check failed: the manifest's own crc32"
CORRUPTIONS: dict[str, tuple[Callable[[str], str], str, bool]] = {
    "truncated data file": (truncate_data, "size check failed", True),
    "flipped bytes in tensor data": (flip_tensor_data, "checksum check failed for tensor", False),
    "missing data file": (delete_data, MISSING, True),
    "garbage manifest": (garbage_manifest, "manifest check failed: not valid JSON", True),
    "truncated manifest": (truncate_manifest, "manifest check failed: not valid JSON", True),
    "flipped digit in manifest": (flip_manifest_digit, MANIFEST_FLIP, True),
    "rank file with bad CRC": (flip_rank_file, "checksum check failed (crc32)", True),
}


def resume(ckpt: Checkpointer, source: str | None, verify: bool) -> tuple[Any, tuple[Any, ...]]:
    objs = build(99)  # non-zero state, to prove a failed load leaves it alone
    model, opt, loader = objs
    report = ckpt.load(source, model=model, optimizer=opt, dataloaders={"train": loader},
                       verify=verify)  # fmt: skip
    return report, objs


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corruption_is_named_and_the_load_falls_back(
    ckpts: dict[str, Any], corruption: str
) -> None:
    corrupt, says, structural = CORRUPTIONS[corruption]
    ckpt, newest = ckpts["ckpt"], ckpts["paths"][3]
    name = corrupt(newest)
    file = os.path.join(newest, name)

    # loading that checkpoint itself: a clear error naming the file and the failed check;
    # nothing live is touched
    for verify in (True, False) if structural else (True,):
        with pytest.raises(CheckpointCorruptError) as info:
            resume(ckpt, newest, verify)
        msg = str(info.value)
        assert file in msg and says in msg, msg
    untouched = build(99)
    with pytest.raises(CheckpointCorruptError):
        model, opt, loader = build(99)
        ckpt.load(newest, model=model, optimizer=opt, dataloaders={"train": loader}, verify=True)
    check_loaded(99, model, opt, loader)
    del untouched

    # loading from the directory: falls back to step 2, with a warning naming step 3
    report, (model, opt, loader) = resume(ckpt, None, verify=True)
    assert report.source == ckpts["paths"][2] and report.iteration == 2
    assert report.skipped_checkpoints == [newest]
    warning = next(w for w in report.warnings if "skipped a checkpoint" in w)
    assert newest in warning and says in warning, warning
    assert "WARNING: skipped a checkpoint that failed its checks" in str(report)
    check_loaded(2, model, opt, loader)

    # the command line's check finds it too, naming the same check
    result = verify_checkpoint(newest)
    assert not result.ok and says in result.error and file in result.error, result
    assert [r.ok for r in verify_path(ckpts["dir"])] == [False, True, True]
    # structure-only checking (no reads of contents) sees all but the flipped bytes and the rank
    # file's checksum (which every load that reads the rank file checks)
    by_structure = structural and corruption != "rank file with bad CRC"
    assert verify_checkpoint(newest, content=False).ok is (not by_structure)


def test_without_verify_a_flip_in_tensor_data_loads_as_is(ckpts: dict[str, Any]) -> None:
    """Structure checks cannot see a flipped byte (same size): that is what verify=True is for.
    Checkpointer(verify=True) turns it on for every load."""
    flip_tensor_data(ckpts["paths"][3])
    report, _ = resume(ckpts["ckpt"], None, verify=False)
    assert report.source == ckpts["paths"][3] and not report.verified
    report, objs = resume(Checkpointer(ckpts["dir"], verify=True), None, verify=None)  # type: ignore[arg-type]
    assert report.source == ckpts["paths"][2] and report.verified
    check_loaded(2, *objs)


def test_a_corrupt_rank_file_does_not_matter_to_a_model_only_load(ckpts: dict[str, Any]) -> None:
    flip_rank_file(ckpts["paths"][3])
    model, _, _ = build()
    report = ckpts["ckpt"].load(strategy="eval", model=model, verify=True)
    assert report.source == ckpts["paths"][3] and not report.skipped_checkpoints


def test_every_checkpoint_corrupt_lists_them_all(ckpts: dict[str, Any]) -> None:
    truncate_data(ckpts["paths"][3])
    flip_tensor_data(ckpts["paths"][2])
    delete_data(ckpts["paths"][1])
    with pytest.raises(CheckpointCorruptError) as info:
        resume(ckpts["ckpt"], None, verify=True)
    msg = str(info.value)
    assert "No checkpoint passed its checks; also skipped:" in msg
    for s in (1, 2, 3):
        assert ckpts["paths"][s] in msg


def test_latest_ignores_a_garbage_manifest_but_the_load_names_it(ckpts: dict[str, Any]) -> None:
    garbage_manifest(ckpts["paths"][3])
    assert latest_checkpoint(ckpts["dir"]) == ckpts["paths"][2]
    assert ckpts["ckpt"].latest() == ckpts["paths"][2]
    report, _ = resume(ckpts["ckpt"], None, verify=False)
    assert report.skipped_checkpoints == [ckpts["paths"][3]]


def test_a_step_directory_without_manifest_is_skipped_with_a_warning(
    ckpts: dict[str, Any],
) -> None:
    os.remove(os.path.join(ckpts["paths"][3], "optimus.json"))
    report, objs = resume(ckpts["ckpt"], None, verify=False)
    assert report.source == ckpts["paths"][2]
    assert any("has no optimus.json" in w for w in report.warnings), report.warnings
    check_loaded(2, *objs)


def test_hostile_newest_checkpoint_is_refused_not_skipped(ckpts: dict[str, Any]) -> None:
    """A manifest that points outside its checkpoint is an attack, not bit rot: refused loudly."""
    m = manifest(ckpts["paths"][3])
    m.pop("manifest_crc32")
    first = next(iter(m["tensors"].values()))
    first["chunks"][0]["file"] = "../step_0000000002/__0_0.distcp"
    with open(os.path.join(ckpts["paths"][3], "optimus.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(UnsafeCheckpointError, match="path traversal"):
        resume(ckpts["ckpt"], None, verify=False)


def test_random_flips_are_detected_or_harmless(ckpts: dict[str, Any], tmp_path: Path) -> None:
    """A byte flipped anywhere in any file of a checkpoint: a load with verify=True either
    refuses it with a named check, or (a byte no load reads: DCP's own zip headers and
    .metadata) loads exactly the saved state. Never silently wrong state."""
    rng = random.Random(11)
    src = ckpts["paths"][3]
    files = sorted(os.listdir(src))
    detected = harmless = 0
    for trial in range(40):
        copy = str(tmp_path / f"flip{trial}" / step_dir_name(3))
        shutil.copytree(src, copy)
        name = files[trial % len(files)]
        size = os.path.getsize(os.path.join(copy, name))
        flip(os.path.join(copy, name), rng.randrange(size))
        try:
            _, objs = resume(Checkpointer(os.path.dirname(copy)), copy, verify=True)
        except (CheckpointCorruptError, UnsafeCheckpointError) as e:
            assert os.path.join(copy, name) in str(e) or "optimus.json" in str(e), str(e)
            detected += 1
        else:
            check_loaded(3, *objs)
            harmless += 1
            if name not in (".metadata",) and not name.endswith(".distcp"):
                raise AssertionError(f"a flip in {name} went unnoticed")
        finally:
            shutil.rmtree(os.path.dirname(copy))
    assert detected >= 20 and detected + harmless == 40
