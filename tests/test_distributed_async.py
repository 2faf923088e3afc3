"""Async save: training goes on while the checkpoint is written, and the checkpoint holds the
state as it was when ``save`` returned.

Proved by ordering, not timing: a save hook holds the background writer before it writes
anything, the training loop then runs steps (with their collectives, under torch.distributed)
while nothing is committed, and only then is the writer released. A second save waits for the
first: the writer is released only when the second save is waiting for it, and the second save
starts writing only after the first has committed.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
import torch
from dist_support import (
    check,
    first_difference,
    full_model_state,
    full_optimizer_state,
    launch,
    make_model,
    make_optimizer,
    train,
    wrap,
)

from optimus_ckpt import Checkpointer, list_checkpoints
from optimus_ckpt.distributed import register_save_hook

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _state(model: Any, opt: Any) -> dict[str, Any]:
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, opt)}


def _async_run(kind: str, rank: int, directory: str, refs: str) -> list[str]:
    """Returns the events in order; saves the reference states (rank 0) under ``refs``."""
    events: list[str] = []
    reached, gate = threading.Event(), threading.Event()

    def before_write(*, rank: int, step: int, staging: str) -> None:
        done = [s for s, _ in list_checkpoints(directory)]
        events.append(f"write {step} starts; committed: {done}")
        if step == 2:
            reached.set()
            assert gate.wait(120), "never released"

    class Recording(Checkpointer):
        def wait(self) -> None:
            if self.pending and not gate.is_set():
                events.append("next save waits")
                gate.set()
            super().wait()

    unregister = register_save_hook("before_write", before_write)
    try:
        model = wrap(make_model(0), kind)
        opt, sched = make_optimizer(model)
        train(model, opt, sched, 2, rank=rank)
        at_save = _state(model, opt)
        ckpt = Recording(directory, async_save=True)
        ckpt.save(2, model=model, optimizer=opt, scheduler=sched)
        events.append("save 2 returned")
        assert reached.wait(120)  # the writer runs, held before writing anything
        train(model, opt, sched, 3, rank=rank, start=2)  # training goes on (DDP/FSDP collectives)
        events.append(f"trained 3 steps; committed: {[s for s, _ in list_checkpoints(directory)]}")
        at_five = _state(model, opt)
        assert first_difference(at_save, at_five) is not None  # training changed the state
        # A blocking save after an async one: it waits for save 2 first.
        ckpt.save(5, model=model, optimizer=opt, scheduler=sched, blocking=True)
        events.append("save 5 returned")
        ckpt.wait()
        events.append(f"done; committed: {[s for s, _ in list_checkpoints(directory)]}")
        if rank == 0:
            torch.save({"2": at_save, "5": at_five}, refs)
    finally:
        unregister()
    return events


EXPECTED = [
    "save 2 returned",
    "trained 3 steps; committed: []",  # training ran while save 2 was in flight
    "next save waits",  # save 5 waited for save 2 ...
    "write 5 starts; committed: [2]",  # ... which had committed before save 5 wrote anything
    "save 5 returned",
    "done; committed: [2, 5]",
]


def _check_events(events: list[str]) -> None:
    # The writer of save 2 starts (in the background) before or after save() returns; either way
    # before the training steps, and the rest happens in exactly this order.
    first = "write 2 starts; committed: []"
    assert first in events and events.index(first) < events.index(EXPECTED[1]), events
    assert [e for e in events if e != first] == EXPECTED, events


def _check_loads(directory: str, refs: str) -> None:
    ref = torch.load(refs, weights_only=True)
    for step in (2, 5):
        model = make_model(1)
        opt, _ = make_optimizer(model)
        path = dict(list_checkpoints(directory))[step]
        report = Checkpointer(directory).load(path, model=model, optimizer=opt)
        assert report.step == step
        diff = first_difference(ref[str(step)], _state(model, opt))
        assert diff is None, (step, diff)


def scenario_async(rank: int, world: int, workdir: str) -> dict[str, list[str]]:
    return {
        kind: _async_run(
            kind, rank, os.path.join(workdir, kind), os.path.join(workdir, kind + ".pt")
        )
        for kind in ("fsdp", "ddp")
    }


def test_async_save_single_process(tmp_path: Any) -> None:
    events = _async_run("plain", 0, str(tmp_path / "ckpt"), str(tmp_path / "refs.pt"))
    _check_events(events)
    _check_loads(str(tmp_path / "ckpt"), str(tmp_path / "refs.pt"))


def test_async_save_two_processes(tmp_path: Any) -> None:
    """FSDP2 (DTensor snapshots) and DDP, 2 processes; the checkpoints load in one process."""
    results = check(
        launch("test_distributed_async:scenario_async", 2, str(tmp_path)), expect_ranks=2
    )
    for rank in (0, 1):
        for kind in ("fsdp", "ddp"):
            _check_events(results[rank][kind])
    for kind in ("fsdp", "ddp"):
        _check_loads(str(tmp_path / kind), str(tmp_path / f"{kind}.pt"))


def test_background_save_error_is_raised_by_the_next_call(tmp_path: Any) -> None:
    """An async save that fails reports its error at wait() (or the next save/load), once."""
    model = make_model(0)
    ckpt = Checkpointer(str(tmp_path), async_save=True)

    def boom(**_: Any) -> None:
        raise OSError(28, "No space left on device")

    unregister = register_save_hook("before_commit", boom)
    try:
        ckpt.save(1, model=model)
        with pytest.raises(OSError, match="No space left"):
            ckpt.wait()
    finally:
        unregister()
    ckpt.wait()  # raised once
    assert list_checkpoints(str(tmp_path)) == []
    ckpt.save(2, model=model)
    assert [s for s, _ in ckpt.checkpoints()] == [2]
