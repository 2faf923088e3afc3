"""Hostile input: loading never runs code from a file, and a hostile manifest is refused before
anything is allocated or read.

* A crafted pickle whose unpickling would run code (it writes a marker file; the test first
  proves that it does, with an unrestricted ``torch.load``) is refused on every route, and the
  marker never appears. DCP's own ``.metadata`` (a pickle) is never unpickled.
* Manifests with path traversal, absolute paths, absurd sizes or shapes, or an unknown format
  version are refused by the manifest parser: no tensor is allocated (``torch.empty`` and
  friends are watched), no checkpoint byte is read (``LocalStorage`` is watched), and the live
  objects are untouched.
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_support import build, check_loaded, save_step

from optimus_ckpt import CheckpointCorruptError, Checkpointer, UnsafeCheckpointError
from optimus_ckpt.codec import decode
from optimus_ckpt.layout import step_dir_name
from optimus_ckpt.storage import LocalStorage
from optimus_ckpt.verify import verify_checkpoint

MARKER = "pwned.txt"


class Evil:
    """Unpickling this calls exec(), which writes the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.fixture
def evil_files(tmp_path: Path) -> dict[str, Any]:
    marker = str(tmp_path / MARKER)
    weights = {k: v.clone() for k, v in build(1)[0].state_dict().items()}
    files = {
        "zip": tmp_path / "evil.pt",  # torch.save's zip format, with a payload beside weights
        "legacy": tmp_path / "evil_legacy.pt",  # torch's legacy (pre-1.6) format
        "pickle": tmp_path / "evil.pkl",  # a bare pickle
        "state_dict": tmp_path / "evil_sd.pt",  # a bare state dict with one poisoned entry
    }
    torch.save({"model": weights, "payload": Evil(marker)}, files["zip"])
    torch.save({"model": weights, "payload": Evil(marker)}, files["legacy"],
               _use_new_zipfile_serialization=False)  # fmt: skip
    files["pickle"].write_bytes(pickle.dumps(Evil(marker)))
    torch.save({**weights, "poison": Evil(marker)}, files["state_dict"])
    return {"marker": marker, "files": {k: str(v) for k, v in files.items()}}


def test_the_payload_really_runs_code(evil_files: dict[str, Any]) -> None:
    """The control: an unrestricted unpickler runs the payload. (Only this test does so.)"""
    torch.load(evil_files["files"]["zip"], weights_only=False)
    assert os.path.exists(evil_files["marker"])


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle", "state_dict"])
def test_a_malicious_pickle_is_refused_and_its_code_does_not_run(
    evil_files: dict[str, Any], kind: str, tmp_path: Path
) -> None:
    path = evil_files["files"][kind]
    model, _, _ = build(7)
    ckpt = Checkpointer(tmp_path / "ckpts")
    for call in (ckpt.plan, ckpt.load):
        with pytest.raises(UnsafeCheckpointError) as info:
            call(path, "eval", model=model)
        msg = str(info.value)
        assert path in msg and "refused" in msg and "unrestricted unpickling" in msg, msg
    result = verify_checkpoint(path)
    assert not result.ok and result.check == "refused", result
    assert not os.path.exists(evil_files["marker"])
    check_loaded(7, model, *build(7)[1:])


def test_dcp_metadata_pickle_is_never_unpickled(tmp_path: Path, evil_files: dict[str, Any]) -> None:
    directory = str(tmp_path / "ckpts")
    save_step(Checkpointer(directory), 1)
    path = os.path.join(directory, step_dir_name(1))
    size = os.path.getsize(os.path.join(path, ".metadata"))
    payload = pickle.dumps(Evil(evil_files["marker"]))
    with open(os.path.join(path, ".metadata"), "wb") as f:  # same size: structure checks pass
        f.write(payload + b"\0" * (size - len(payload)))
    for verify in (False, True):
        model, opt, loader = build()
        Checkpointer(directory).load(path, model=model, optimizer=opt,
                                     dataloaders={"train": loader}, verify=verify)  # fmt: skip
        check_loaded(1, model, opt, loader)
    result = verify_checkpoint(path)  # the full check reads it as bytes: a checksum mismatch
    assert not result.ok and result.check == "checksum" and ".metadata" in result.error
    assert not os.path.exists(evil_files["marker"])


def test_stored_state_never_unpickles(evil_files: dict[str, Any]) -> None:
    """Small state is JSON; the tags that could smuggle objects are refused."""
    blob = base64.b64encode(pickle.dumps(Evil(evil_files["marker"]))).decode()
    for hostile in (
        {"__optimus__": "ndarray", "dtype": "|O", "shape": [1], "v": blob},
        {"__optimus__": "npscalar", "dtype": "|O", "v": blob},
        {"__optimus__": "pickle", "v": blob},
    ):
        with pytest.raises(ValueError):
            decode(hostile)
    assert not os.path.exists(evil_files["marker"])


# ------------------------------------------------------------------ hostile manifests
def _first_chunk(m: dict[str, Any]) -> dict[str, Any]:
    return dict(next(iter(m["tensors"].values()))["chunks"][0])


def _set_chunk(m: dict[str, Any], **kw: Any) -> None:
    next(iter(m["tensors"].values()))["chunks"][0].update(kw)


def _set_tensor(m: dict[str, Any], **kw: Any) -> None:
    next(iter(m["tensors"].values())).update(kw)


def _add_file(m: dict[str, Any], name: str) -> None:
    m["files"][name] = {"size": 1, "crc32": None}


# mutation of the manifest -> (error class, what the error says)
HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], type[Exception], str]] = {
    "relative path traversal (../x)": (
        lambda m: _add_file(m, "../x"), UnsafeCheckpointError, "path traversal"),
    "chunk file in another checkpoint": (
        lambda m: _set_chunk(m, file="../step_0000000001/__0_0.distcp"),
        UnsafeCheckpointError, "path traversal"),
    "absolute path (/etc/passwd)": (
        lambda m: _set_chunk(m, file="/etc/passwd"), UnsafeCheckpointError, "absolute path"),
    "rank file outside": (
        lambda m: m.update(rank_files=["../../../etc/passwd"]),
        UnsafeCheckpointError, "path traversal"),
    "absurd file size": (
        lambda m: m["files"][_first_chunk(m)["file"]].update(size=2**62),
        UnsafeCheckpointError, "size of"),
    "absurd shape": (
        lambda m: _set_tensor(m, shape=[2**40, 2**40]), UnsafeCheckpointError,
        "absurdly large"),
    "negative dimension": (
        lambda m: _set_tensor(m, shape=[-1, 64]), UnsafeCheckpointError, "shape of"),
    "too many dimensions": (
        lambda m: _set_tensor(m, shape=[1] * 100), UnsafeCheckpointError, "100 dims"),
    "chunk bigger than its shape": (
        lambda m: _set_chunk(m, nbytes=2**40), UnsafeCheckpointError, "claims"),
    "chunk past the end of its file": (
        lambda m: _set_chunk(m, offset=2**40), UnsafeCheckpointError, "past the end"),
    "unknown dtype": (
        lambda m: _set_tensor(m, dtype="object"), UnsafeCheckpointError, "dtype 'object'"),
    "absurd world size": (
        lambda m: m.update(world_size=2**40), UnsafeCheckpointError, "world_size"),
    "unknown format version": (
        lambda m: m.update(format_version=2), UnsafeCheckpointError,
        "unknown checkpoint format version 2"),
    "format version as a string": (
        lambda m: m.update(format_version="1"), UnsafeCheckpointError,
        "unknown checkpoint format version '1'"),
    "no format version": (
        lambda m: m.pop("format_version"), UnsafeCheckpointError,
        "unknown checkpoint format version None"),
    "deeply nested JSON (a parser bomb)": (
        lambda m: m.update(__nested__=True), CheckpointCorruptError, "not valid JSON"),
}  # fmt: skip


class Watch:
    """Records every tensor allocation and every checkpoint read during a load."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("empty", "zeros", "ones", "full", "empty_like", "frombuffer"):
            monkeypatch.setattr(torch, name, self._spy(f"torch.{name}", getattr(torch, name)))
        for name in ("read_bytes", "read_into"):
            real = getattr(LocalStorage, name)
            monkeypatch.setattr(LocalStorage, name, self._spy(f"LocalStorage.{name}", real))

    def _spy(self, label: str, real: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(label)
            return real(*args, **kwargs)

        return spy


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifest_is_refused_before_anything_is_allocated_or_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    mutate, error, says = HOSTILE[case]
    directory = str(tmp_path / "ckpts")
    for step in (1, 2):
        save_step(Checkpointer(directory), step)
    path = os.path.join(directory, step_dir_name(2))
    file = os.path.join(path, "optimus.json")
    with open(file) as f:
        m = json.load(f)
    m.pop("manifest_crc32")  # a forger would recompute it: the refusal must not rely on it
    mutate(m)
    text = json.dumps(m)
    if m.pop("__nested__", None):
        text = text[:-1] + ', "nested": ' + "[" * 100000 + "]" * 100000 + "}"
    with open(file, "w") as f:
        f.write(text)

    model, opt, loader = build(9)
    ckpt = Checkpointer(directory)
    watch = Watch(monkeypatch)
    for call in (ckpt.plan, ckpt.load):
        with pytest.raises(error) as info:
            call(path, model=model, optimizer=opt, dataloaders={"train": loader})
        msg = str(info.value)
        assert file in msg and says in msg, msg
    assert watch.calls == [], watch.calls  # nothing allocated, nothing read
    monkeypatch.undo()
    check_loaded(9, model, opt, loader)
    result = verify_checkpoint(path)
    assert not result.ok and says in result.error

    # From the directory: a hostile manifest is refused loudly (an attack, not bit rot); an
    # unreadable one is skipped with a warning, like any other corruption.
    if error is UnsafeCheckpointError:
        with pytest.raises(UnsafeCheckpointError, match=r"refusing manifest|format version"):
            ckpt.load(model=model, optimizer=opt, dataloaders={"train": loader})
        check_loaded(9, model, opt, loader)
    else:
        report = ckpt.load(model=model, optimizer=opt, dataloaders={"train": loader})
        assert report.skipped_checkpoints == [path]
        check_loaded(1, model, opt, loader)
