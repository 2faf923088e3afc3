"""Full disks and I/O errors during a save.

A save that fails partway raises :class:`CheckpointWriteError`, which says what failed and that
nothing was committed; every earlier checkpoint is unchanged; nothing that looks complete is left
behind, and the staging directory is removed. The faults are injected at every file-system write
operation of a save in turn (``OSError(ENOSPC)``), at random writes in the middle of the data
files, and, without any patching, by a real kernel error (``RLIMIT_FSIZE`` makes writes fail with
``EFBIG``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from reliability_support import (
    ROOT,
    FaultPoints,
    History,
    build,
    leftovers,
    load_and_check,
    save_step,
)

from optimus_ckpt import Checkpointer, CheckpointWriteError
from optimus_ckpt.layout import latest_checkpoint, step_dir_name
from optimus_ckpt.storage import LocalStorage

pytestmark = pytest.mark.timeout(300)


def _setup(tmp_path: Path) -> tuple[Checkpointer, History]:
    directory = str(tmp_path / "ckpts")
    ckpt = Checkpointer(directory, keep_last=3)
    for step in (1, 2, 3):
        save_step(ckpt, step)
    hist = History(directory)
    hist.check()
    return ckpt, hist


def _attempt(ckpt: Checkpointer, hist: History, step: int, fault: FaultPoints) -> str:
    """Save ``step`` under ``fault``; check the aftermath. Returns "failed" or "committed"."""
    before = latest_checkpoint(hist.directory)
    fault.install()
    try:
        save_step(ckpt, step)
        outcome = "committed"
    except CheckpointWriteError as e:
        outcome = "failed"
        msg = str(e)
        assert f"Saving step {step} into {hist.directory} failed while" in msg or (
            "Cannot save into" in msg
        ), msg
        assert "No space left on device" in msg and e.errno == errno.ENOSPC, msg
        assert "Nothing was" in msg and "intact" in msg, msg
    finally:
        fault.uninstall()
    final = os.path.join(hist.directory, step_dir_name(step))
    if outcome == "failed":
        assert not os.path.exists(final)  # no partial checkpoint that looks complete
        assert latest_checkpoint(hist.directory) == before
    else:
        assert latest_checkpoint(hist.directory) == final
    assert leftovers(hist.directory) == [], (fault.ops, leftovers(hist.directory))
    hist.check()  # every earlier checkpoint unchanged; a committed one loads and verifies
    return outcome


def test_disk_full_at_every_write_operation_of_a_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt, hist = _setup(tmp_path)
    probe = FaultPoints(hist.directory, at=-1, action="enospc").install()
    try:
        save_step(ckpt, 4)
    finally:
        probe.uninstall()
    hist.check()
    n = probe.count
    assert n >= 15, probe.ops
    step, outcomes = 5, []
    caplog.set_level(logging.WARNING, logger="optimus_ckpt")
    for at in range(1, n + 1):
        outcome = _attempt(ckpt, hist, step, FaultPoints(hist.directory, at, "enospc"))
        outcomes.append(outcome)
        step += outcome == "committed"
    # Faults up to the commit (the staging directory's rename) fail the save; the ones after it
    # (moving the 'latest' marker, keep_last's rename) leave a committed checkpoint and a
    # warning. Some faults are harmless: makedirs(exist_ok=True) of a directory that exists
    # (the checkpoint directory; DCP's of the staging directory) and recording the lock
    # holder's pid (best effort).
    commit = next(i for i, op in enumerate(probe.ops) if op.startswith("rename step_0000000004."))

    def harmless(i: int, op: str) -> bool:
        exists = op == "mkdir ckpts" or (op.startswith("mkdir ") and op in probe.ops[:i])
        return exists or op == "write .optimus.lock"

    expected = [
        "committed" if i > commit or harmless(i, op) else "failed" for i, op in enumerate(probe.ops)
    ]
    assert outcomes == expected, list(zip(probe.ops, outcomes))
    assert "was saved and committed, but updating the 'latest' marker" in caplog.text
    save_step(ckpt, step)  # and the disk has room again: the next save just works
    assert leftovers(hist.directory) == []
    hist.check()


def test_disk_full_in_the_middle_of_the_data_files(tmp_path: Path) -> None:
    ckpt, hist = _setup(tmp_path)
    probe = FaultPoints(hist.directory, at=-1, action="enospc", every_write=True).install()
    try:
        save_step(ckpt, 4)
    finally:
        probe.uninstall()
    writes = [i + 1 for i, op in enumerate(probe.ops) if op.startswith("write __0_")]
    assert len(writes) > 100  # torch.save writes a data file in many pieces
    rng = random.Random(3)
    for at in sorted(rng.sample(writes, 12)):
        fault = FaultPoints(hist.directory, at, "enospc", every_write=True)
        assert _attempt(ckpt, hist, 5, fault) == "failed"


def test_the_error_says_what_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, hist = _setup(tmp_path)
    real = LocalStorage.write_atomic

    def full_at_manifest(self: LocalStorage, rel: str, data: bytes) -> None:
        if rel.endswith("optimus.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, rel, data)

    monkeypatch.setattr(LocalStorage, "write_atomic", full_at_manifest)
    with pytest.raises(CheckpointWriteError) as info:
        save_step(ckpt, 4)
    msg = str(info.value)
    assert "failed while writing the manifest optimus.json" in msg
    assert "OSError: [Errno 28] No space left on device" in msg
    assert "Earlier checkpoints are intact (newest: step_0000000003)" in msg
    assert "the unfinished save step_0000000004.partial-" in msg and "was removed" in msg
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert leftovers(hist.directory) == []
    monkeypatch.undo()

    fault = FaultPoints(hist.directory, 1, "enospc")
    fault.hit = lambda op, path: (  # type: ignore[method-assign]
        FaultPoints.hit(fault, op, path) if op == "write" and ".distcp" in str(path) else None
    )
    fault.install()
    try:
        with pytest.raises(CheckpointWriteError, match="while writing tensor data") as info:
            save_step(ckpt, 4)
    finally:
        fault.uninstall()
    assert "No space left on device" in str(info.value)
    assert leftovers(hist.directory) == []
    hist.check()


def test_interrupt_mid_save_cleans_up_and_passes_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, hist = _setup(tmp_path)
    real = LocalStorage.write_atomic

    def interrupted(self: LocalStorage, rel: str, data: bytes) -> None:
        if rel.endswith("optimus.json"):
            raise KeyboardInterrupt
        real(self, rel, data)

    monkeypatch.setattr(LocalStorage, "write_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_step(ckpt, 4)
    monkeypatch.undo()
    assert leftovers(hist.directory) == []
    hist.check()
    save_step(ckpt, 4)
    hist.check()


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = build(1)[0]
    with pytest.raises(CheckpointWriteError, match=r"Cannot save into .*lock file") as info:
        Checkpointer(blocker / "ckpts").save(1, model=model)
    assert "Nothing was written" in str(info.value)


REAL_EFBIG = textwrap.dedent(
    """
    import json, resource, signal, sys
    sys.path.insert(0, "tests")
    from reliability_support import save_step
    from optimus_ckpt import Checkpointer, CheckpointWriteError
    ckpt = Checkpointer(sys.argv[1], keep_last=3)
    save_step(ckpt, 1)
    save_step(ckpt, 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, hard))
    out = {}
    try:
        save_step(ckpt, 3)
    except CheckpointWriteError as e:
        out = {"error": str(e), "errno": e.errno}
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE/SIGXFSZ semantics")
def test_a_real_kernel_write_error_efbig(tmp_path: Path) -> None:
    """No monkeypatching: the kernel refuses writes past RLIMIT_FSIZE, partway through a data
    file (in a subprocess, so the limit touches nothing else)."""
    directory = str(tmp_path / "ckpts")
    proc = subprocess.run(
        [sys.executable, "-c", REAL_EFBIG, directory],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errno"] == errno.EFBIG, out
    assert "failed while writing tensor data" in out["error"], out
    assert "Earlier checkpoints are intact (newest: step_0000000002)" in out["error"]
    assert leftovers(directory) == []
    assert latest_checkpoint(directory) == os.path.join(directory, step_dir_name(2))
    for step in (1, 2):
        load_and_check(os.path.join(directory, step_dir_name(step)), step)
