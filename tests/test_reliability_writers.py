"""Two writers, one directory (a misconfigured sweep): two real processes save into the same
directory. The directory lock serialises their saves and each save stages in its own directory,
so neither corrupts the other's checkpoints; a writer that has to wait logs a warning naming the
holder; two saves of the same step give one checkpoint and a clear error for the other.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_support import ROOT, History, leftovers

from optimus_ckpt.layout import LOCK_NAME, latest_checkpoint
from optimus_ckpt.verify import verify_path

pytestmark = pytest.mark.timeout(300)

WRITER = """
import json, logging, os, sys, time
sys.path.insert(0, "tests")
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
from reliability_support import save_step
from optimus_ckpt import Checkpointer, CheckpointExistsError
directory, go, steps = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
ckpt = Checkpointer(directory)
print("ready", flush=True)
while go != "-" and not os.path.exists(go):
    time.sleep(0.005)
out = {}
for step in steps:
    try:
        save_step(ckpt, step)
        out[step] = "saved"
    except CheckpointExistsError as e:
        out[step] = "exists: " + str(e)
print(json.dumps(out), flush=True)
"""


def _start(directory: str, go: str, steps: list[int], stderr: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, directory, go, ",".join(map(str, steps))],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True,
    )  # fmt: skip


def test_two_processes_saving_into_one_directory(tmp_path: Path) -> None:
    directory = str(tmp_path / "ckpts")
    go = str(tmp_path / "go")
    odd, even = [*range(1, 16, 2), 100], [*range(2, 17, 2), 100]
    procs = [
        _start(directory, go, odd, tmp_path / "a.err"),
        _start(directory, go, even, tmp_path / "b.err"),
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    Path(go).touch()  # both start saving at once
    results = []
    for p, err in zip(procs, ("a.err", "b.err")):
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, (tmp_path / err).read_text()
        results.append({int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()})
    # every save of its own step succeeded; of the shared step 100, exactly one
    for res, mine in zip(results, (odd, even)):
        assert all(res[s] == "saved" for s in mine if s != 100), res
    shared = sorted(r[100] for r in results)
    assert shared[0].startswith("exists: A checkpoint for step 100 already exists"), shared
    assert shared[1] == "saved", shared
    # nothing was corrupted: every checkpoint verifies and holds exactly its step's state
    hist = History(directory, keep_last=10**6)
    steps = hist.check()
    assert steps == [*range(1, 17), 100]
    assert all(r.ok for r in verify_path(directory)), verify_path(directory)
    assert leftovers(directory) == []
    assert latest_checkpoint(directory).endswith("step_0000000100")  # type: ignore[union-attr]


def test_a_writer_that_waits_for_the_lock_says_so(tmp_path: Path) -> None:
    directory = tmp_path / "ckpts"
    directory.mkdir()
    with open(directory / LOCK_NAME, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # this test is "the other run", mid-save
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}")
        lock.flush()
        err = tmp_path / "writer.err"
        proc = _start(str(directory), "-", [1], err)
        deadline = time.monotonic() + 240
        while "waiting for it to finish" not in err.read_text():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "no warning from the waiting writer"
            time.sleep(0.05)
        warning = err.read_text()
        assert f"pid {os.getpid()} on" in warning and f"is saving into {directory}" in warning
        assert "misconfigured sweep" in warning
        # while we hold the lock, the other writer has written nothing
        assert proc.poll() is None and latest_checkpoint(directory) is None
        assert leftovers(str(directory)) == []
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.read_text()
    assert json.loads(out.strip().splitlines()[-1]) == {"1": "saved"}
    History(str(directory)).check()
