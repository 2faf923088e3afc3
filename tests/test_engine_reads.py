"""Proof that a load reads only what it loads: every read of a checkpoint file is recorded (at the
storage layer and at the ``preadv`` system call) and compared with the byte ranges the manifest
gives for each tensor. Unrequested and ignored tensors are never read; DCP's pickled ``.metadata``
is never opened; nothing is unpickled."""

from __future__ import annotations

import builtins
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from engine_support import make_run, seed_all

from optimus_ckpt import Checkpointer, LoadStrategy
from optimus_ckpt.storage import LocalStorage

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


@dataclass
class ReadLog:
    """Every read: (absolute path, offset, length), at the storage layer and at the syscall."""

    storage: list[tuple[str, int, int]] = field(default_factory=list)
    syscalls: list[tuple[str, int, int]] = field(default_factory=list)
    opened: list[str] = field(default_factory=list)

    def clear(self) -> None:
        self.storage.clear()
        self.syscalls.clear()
        self.opened.clear()

    def reads_of(self, path: str) -> list[tuple[int, int]]:
        path = os.path.realpath(path)
        return sorted(
            {(o, n) for p, o, n in self.storage + self.syscalls if os.path.realpath(p) == path}
        )

    def data_bytes(self, directory: str) -> int:
        """Bytes read at the storage layer from files in ``directory`` other than small JSON."""
        directory = os.path.realpath(directory)
        return sum(
            n
            for p, _, n in self.storage
            if os.path.dirname(os.path.realpath(p)) == directory and not p.endswith(".json")
        )


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReadLog]:
    log = ReadLog()
    read_into, read_bytes = LocalStorage.read_into, LocalStorage.read_bytes
    preadv, pread, os_open, py_open = os.preadv, os.pread, os.open, builtins.open

    def spy_read_into(self: LocalStorage, rel: str, offset: int, buffer: memoryview) -> None:
        log.storage.append((self.local_path(rel), offset, memoryview(buffer).nbytes))
        read_into(self, rel, offset, buffer)

    def spy_read_bytes(self: LocalStorage, rel: str, offset: int = 0, length: int = -1) -> bytes:
        data = read_bytes(self, rel, offset, length)
        log.storage.append((self.local_path(rel), offset, len(data)))
        return data

    def fd_path(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def spy_preadv(fd: int, buffers: Any, offset: int, *args: Any) -> int:
        n = preadv(fd, buffers, offset, *args)
        log.syscalls.append((fd_path(fd), offset, n))
        return n

    def spy_pread(fd: int, length: int, offset: int) -> bytes:
        data = pread(fd, length, offset)
        log.syscalls.append((fd_path(fd), offset, len(data)))
        return data

    def spy_open(path: Any, *args: Any, **kwargs: Any) -> int:
        log.opened.append(os.fspath(path))
        return os_open(path, *args, **kwargs)

    def spy_py_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | bytes | os.PathLike):
            log.opened.append(os.fsdecode(file))
        return py_open(file, *args, **kwargs)

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a load of an optimus checkpoint unpickled something")

    monkeypatch.setattr(LocalStorage, "read_into", spy_read_into)
    monkeypatch.setattr(LocalStorage, "read_bytes", spy_read_bytes)
    monkeypatch.setattr(os, "preadv", spy_preadv)
    monkeypatch.setattr(os, "pread", spy_pread)
    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(builtins, "open", spy_py_open)
    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    yield log


@dataclass
class Saved:
    path: str
    manifest: dict[str, Any]

    def ranges(self, prefix: str) -> list[tuple[str, int, int]]:
        """(file, offset, nbytes) of every chunk of every tensor whose key starts with prefix."""
        out = []
        for key, entry in self.manifest["tensors"].items():
            if key.startswith(prefix):
                for c in entry["chunks"]:
                    out.append((os.path.join(self.path, c["file"]), c["offset"], c["nbytes"]))
        return out

    def nbytes(self, prefix: str) -> int:
        return sum(n for _, _, n in self.ranges(prefix))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    run = make_run(seed=0, steps=2)
    seed_all(5)
    root = tmp_path_factory.mktemp("reads")
    path = Checkpointer(root, fsync=False).save(3, **run.objects())
    with open(os.path.join(path, "optimus.json")) as f:
        return Saved(path, json.load(f))


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def assert_never_read(log: ReadLog, ranges: list[tuple[str, int, int]], what: str) -> None:
    assert ranges, f"no byte ranges for {what}: the test is vacuous"
    for path, off, n in ranges:
        for r in log.reads_of(path):
            assert not overlaps(r, (off, n)), (
                f"{what}: bytes {off}-{off + n} of {path} were read ({r})"
            )


def assert_fully_read(log: ReadLog, ranges: list[tuple[str, int, int]], what: str) -> None:
    assert ranges, f"no byte ranges for {what}: the test is vacuous"
    for path, off, n in ranges:
        reads = log.reads_of(path)
        covered = sum(
            min(o + m, off + n) - max(o, off) for o, m in reads if overlaps((o, m), (off, n))
        )
        assert covered >= n, f"{what}: bytes {off}-{off + n} of {path} were not read"


def assert_no_pickle_opened(log: ReadLog) -> None:
    assert not [p for p in log.opened if p.endswith(".metadata")], log.opened


def test_eval_reads_only_model_bytes(saved: Saved, reads: ReadLog) -> None:
    live = make_run(seed=1, steps=0)
    report = Checkpointer(os.path.dirname(saved.path)).load(saved.path, "eval", **live.objects())
    assert report.loaded == ["model"]
    assert_fully_read(reads, saved.ranges("model."), "model")
    for other in ("optimizer.", "extra."):
        assert_never_read(reads, saved.ranges(other), other)
    model_bytes = saved.nbytes("model.")
    assert report.bytes_read == model_bytes
    assert reads.data_bytes(saved.path) == model_bytes
    # Per-process state (dataloaders, metrics, RNG) is not asked for: its file is not even read.
    assert not [p for p, _, _ in reads.storage if os.path.basename(p).startswith("rank_")]
    assert_no_pickle_opened(reads)


def test_ignored_head_is_never_read(saved: Saved, reads: ReadLog) -> None:
    live = make_run(seed=1, steps=0)
    head_before = live.model.head.weight.detach().clone()
    s = LoadStrategy(extra_ignore_keys=["model.head.*"])
    report = Checkpointer(os.path.dirname(saved.path)).load(saved.path, s, **live.objects())
    assert sorted(report.ignored_keys) == ["head.bias", "head.weight"]
    assert torch.equal(live.model.head.weight, head_before)
    assert_never_read(reads, saved.ranges("model.head."), "model.head.*")
    for loaded in ("model.body.", "model.norm.", "optimizer.", "extra.ema."):
        assert_fully_read(reads, saved.ranges(loaded), loaded)
    expected = saved.nbytes("model.") - saved.nbytes("model.head.")
    expected += saved.nbytes("optimizer.") + saved.nbytes("extra.")
    assert report.bytes_read == expected == reads.data_bytes(saved.path)
    assert_no_pickle_opened(reads)


@pytest.mark.parametrize(
    ("strategy", "never", "always"),
    [
        ("finetune", ("optimizer.", "extra."), ("model.",)),
        ("reset_optimizer", ("optimizer.",), ("model.", "extra.")),
        (LoadStrategy(extra_ignore_keys=["optimizer"]), ("optimizer.",), ("model.", "extra.")),
        (LoadStrategy(extra_ignore_keys=["extra.ema"]), ("extra.",), ("model.", "optimizer.")),
        ("resume", (), ("model.", "optimizer.", "extra.")),
    ],
    ids=["finetune", "reset_optimizer", "ignore-optimizer", "ignore-ema", "resume"],
)
def test_unrequested_components_are_never_read(
    saved: Saved, reads: ReadLog, strategy: Any, never: tuple[str, ...], always: tuple[str, ...]
) -> None:
    live = make_run(seed=1, steps=0)
    ckpt = Checkpointer(os.path.dirname(saved.path))
    for verify in (False, True):  # checksum verification reads only what the load reads, too
        reads.clear()
        report = ckpt.load(saved.path, strategy, verify=verify, **live.objects())
        for prefix in never:
            assert_never_read(reads, saved.ranges(prefix), prefix)
        for prefix in always:
            assert_fully_read(reads, saved.ranges(prefix), prefix)
        expected = sum(saved.nbytes(p) for p in always)
        assert report.bytes_read == expected
        assert reads.data_bytes(saved.path) == expected * (2 if verify else 1)
        assert_no_pickle_opened(reads)


def test_plan_reads_no_tensor_bytes(saved: Saved, reads: ReadLog) -> None:
    live = make_run(seed=1, steps=0)
    report = Checkpointer(os.path.dirname(saved.path)).plan(saved.path, "resume", **live.objects())
    assert report.dry_run
    assert report.bytes_read == sum(saved.nbytes(p) for p in ("model.", "optimizer.", "extra."))
    assert reads.data_bytes(saved.path) == 0
    assert not reads.syscalls
    assert_no_pickle_opened(reads)


def test_safetensors_ignored_keys_are_never_read(tmp_path: Any, reads: ReadLog) -> None:
    from safetensors.torch import save_file

    src = make_run(seed=0, steps=1).model
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = str(tmp_path / "weights.safetensors")
    save_file(sd, path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    head = [
        (path, 8 + n + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
        for key, info in header.items()
        if key.startswith("head.")
    ]
    body = [
        (path, 8 + n + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
        for key, info in header.items()
        if key != "__metadata__" and not key.startswith("head.")
    ]
    live = make_run(seed=1, steps=0).model
    head_before = live.head.weight.detach().clone()
    s = LoadStrategy(
        load_optimizer=False, load_scheduler=False, load_data_sources=False,
        load_dataloaders=False, load_metrics=False, load_iteration=False,
        extra_ignore_keys=["model.head.*"],
    )  # fmt: skip
    report = Checkpointer(tmp_path).load(path, s, model=live)
    assert_never_read(reads, head, "safetensors head")
    assert_fully_read(reads, body, "safetensors body")
    assert report.bytes_read == sum(r[2] for r in body)
    assert torch.equal(live.head.weight, head_before)
    assert torch.equal(live.body.weight, src.body.weight)
