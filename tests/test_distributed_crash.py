"""A rank killed during a distributed save leaves the previous checkpoint as the newest complete
one: the manifest (the commit marker) is written by rank 0 only after every rank has finished.

The victim is SIGKILLed by a save hook at the worst moment: its own shards are on disk, the
barrier before the commit is next. Killing rank 1 (rank 0 then fails at the barrier and removes
the staging directory) and killing rank 0 (the committer itself; the staging directory stays,
ignored, until the next save removes it).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import torch
from dist_support import (
    first_difference,
    full_model_state,
    launch,
    make_model,
    make_optimizer,
    train,
    wrap,
)

from optimus_ckpt import Checkpointer, latest_checkpoint, list_checkpoints
from optimus_ckpt.distributed import register_save_hook
from optimus_ckpt.layout import LATEST_MARKER, step_dir_name

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _crash(victim: int, rank: int, world: int, workdir: str) -> dict[str, Any]:
    model = wrap(make_model(0), "fsdp")
    opt, sched = make_optimizer(model)
    train(model, opt, sched, 2, rank=rank)
    ckpt = Checkpointer(os.path.join(workdir, "ckpt"))
    ckpt.save(2, model=model, optimizer=opt, scheduler=sched)
    ref = full_model_state(model)
    if rank == 0:
        torch.save(ref, os.path.join(workdir, "ref_step2.pt"))
    train(model, opt, sched, 2, rank=rank, start=2)

    def die(*, rank: int, step: int, staging: str) -> None:
        if rank == victim and step == 4:
            with open(os.path.join(workdir, f"victim_files.{rank}"), "w") as f:
                f.write("\n".join(sorted(os.listdir(staging))))  # what it wrote before dying
            os.kill(os.getpid(), signal.SIGKILL)

    register_save_hook("before_commit", die)
    try:
        ckpt.save(4, model=model, optimizer=opt, scheduler=sched)
    except Exception as e:
        return {"save_error": f"{type(e).__name__}: {e}"}
    return {"save_error": None}


def scenario_kill_rank1(rank: int, world: int, workdir: str) -> dict[str, Any]:
    return _crash(1, rank, world, workdir)


def scenario_kill_rank0(rank: int, world: int, workdir: str) -> dict[str, Any]:
    return _crash(0, rank, world, workdir)


@pytest.mark.parametrize("victim", [1, 0])
def test_rank_killed_during_save_leaves_previous_checkpoint(tmp_path: Any, victim: int) -> None:
    workdir = str(tmp_path)
    run = launch(f"test_distributed_crash:scenario_kill_rank{victim}", 2, workdir)
    survivor = 1 - victim
    assert run.exitcodes.get(victim) == -signal.SIGKILL, (run.exitcodes, run.output[-3000:])
    assert survivor in run.results, (run.errors, run.output[-3000:])
    # The survivor's save failed (its peer vanished before the commit); it did not hang.
    assert run.results[survivor]["save_error"], run.results
    # The victim had written its shards and its per-rank state before it was killed.
    with open(os.path.join(workdir, f"victim_files.{victim}")) as f:
        written = f.read().split()
    assert f"rank_{victim:05d}.json" in written
    assert any(n.startswith(f"__{victim}_") for n in written), written

    root = os.path.join(workdir, "ckpt")
    assert [s for s, _ in list_checkpoints(root)] == [2]
    assert latest_checkpoint(root) == os.path.join(root, step_dir_name(2))
    with open(os.path.join(root, LATEST_MARKER)) as f:
        assert f.read().strip() == step_dir_name(2)
    assert not os.path.exists(os.path.join(root, step_dir_name(4)))
    # What may remain is a staging directory without a manifest (a dead rank 0 cannot remove
    # it; a surviving rank 0 may), which nothing reads.
    leftovers = [n for n in os.listdir(root) if ".partial-" in n]
    if victim == 0:
        assert leftovers, os.listdir(root)
    for name in leftovers:
        assert "optimus.json" not in os.listdir(os.path.join(root, name))

    # The newest complete checkpoint loads (in one process) bit-exactly, and the next save
    # removes the leftover staging directory.
    ckpt = Checkpointer(root)
    model = make_model(1)
    report = ckpt.load(strategy="eval", model=model)
    assert report.step == 2
    ref = torch.load(os.path.join(workdir, "ref_step2.pt"), weights_only=True)
    assert first_difference(ref, full_model_state(model)) is None
    ckpt.save(5, model=model)
    assert [s for s, _ in list_checkpoints(root)] == [2, 5]
    assert not [n for n in os.listdir(root) if ".partial-" in n]
