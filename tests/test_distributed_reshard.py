"""Sharded saves under torch.distributed (gloo, CPU) and resharding on load.

Two processes save a DDP run and an FSDP2 run (model, AdamW, scheduler, per-rank data position,
metrics and dataloader). The checkpoints then load, under every preset, into one plain process
(here, in pytest's own process) and into three processes (FSDP2 and DDP), and a single-process
checkpoint loads into three processes: every loaded tensor is bit-exact after gathering, every
component not loaded is untouched, and each FSDP2 rank reads exactly the bytes of its own shards.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import pytest
import torch
from dist_support import (
    ShardedStream,
    SumMetrics,
    check,
    first_difference,
    full_model_state,
    full_optimizer_state,
    launch,
    local_bytes,
    make_loader,
    make_model,
    make_optimizer,
    train,
    wrap,
)

from optimus_ckpt import PRESETS, Checkpointer, LoadMismatchError, LoadStrategy, Outcome
from optimus_ckpt.manifest import parse_manifest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

STEPS = 3
SOURCES = ("ddp", "fsdp", "single")  # how the checkpoint was saved (single: one plain process)


def _run_objects(rank: int, world: int) -> tuple[ShardedStream, SumMetrics, Any]:
    stream, metrics, loader = ShardedStream(rank, world), SumMetrics(), make_loader(rank)
    it = iter(loader)
    for s in range(STEPS):
        stream.take(2)
        metrics.update(2, float(10 * rank + s))
        next(it)
    return stream, metrics, loader


def _reference(model: Any, opt: Any) -> dict[str, Any]:
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, opt)}


def scenario_save(rank: int, world: int, workdir: str) -> dict[str, Any]:
    """Each kind: train, save with 2 processes, then reload with 2 (per-rank state restored)."""
    out: dict[str, Any] = {}
    for kind in ("ddp", "fsdp"):
        model = wrap(make_model(0), kind)
        opt, sched = make_optimizer(model)
        train(model, opt, sched, STEPS, rank=rank)
        stream, metrics, loader = _run_objects(rank, world)
        ref = _reference(model, opt)
        ckpt = Checkpointer(os.path.join(workdir, kind))
        objects = dict(optimizer=opt, scheduler=sched, data_sources=stream,
                       dataloaders={"train": loader}, metrics=metrics)  # fmt: skip
        path = ckpt.save(STEPS, model=model, **objects)
        if rank == 0:
            torch.save(ref, os.path.join(workdir, f"ref_{kind}.pt"))
        # Same world size: everything, per-rank state included, comes back for this rank.
        model2 = wrap(make_model(1), kind)
        opt2, sched2 = make_optimizer(model2)
        stream2, metrics2, loader2 = ShardedStream(rank, world), SumMetrics(), make_loader(rank)
        report = ckpt.load(
            model=model2, optimizer=opt2, scheduler=sched2, data_sources=stream2,
            dataloaders={"train": loader2}, metrics=metrics2,
        )  # fmt: skip
        diff = first_difference(ref, _reference(model2, opt2))
        assert diff is None, diff
        assert report.loaded == [
            "model", "optimizer", "scheduler", "data_sources", "dataloaders.train", "metrics",
            "rng",
        ], report.loaded  # fmt: skip
        assert stream2.state_dict() == stream.state_dict()
        assert metrics2.state_dict() == metrics.state_dict()
        nxt = 100 * rank + 2 * STEPS
        assert next(iter(loader2)).tolist() == [nxt, nxt + 1]  # this rank's next batch
        assert sched2.last_epoch == STEPS
        out[kind] = {"path": path, "bytes_read": report.bytes_read}
    return out


def _save_single(workdir: str) -> None:
    """The 1 -> N direction: a plain single-process run of the same model."""
    model = make_model(0)
    opt, sched = make_optimizer(model)
    train(model, opt, sched, STEPS, rank=0)
    stream, metrics, loader = _run_objects(0, 1)
    Checkpointer(os.path.join(workdir, "single")).save(
        STEPS, model=model, optimizer=opt, scheduler=sched, data_sources=stream,
        dataloaders={"train": loader}, metrics=metrics,
    )  # fmt: skip
    torch.save(_reference(model, opt), os.path.join(workdir, "ref_single.pt"))
    # Foreign single files (model weights only): a torch.save state dict and a .safetensors.
    torch.save(model.state_dict(), os.path.join(workdir, "weights.pt"))
    from safetensors.torch import save_file

    save_file(model.state_dict(), os.path.join(workdir, "weights.safetensors"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> str:
    workdir = str(tmp_path_factory.mktemp("dist"))
    _save_single(workdir)
    check(launch("test_distributed_reshard:scenario_save", 2, workdir), expect_ranks=2)
    return workdir


def _manifest(workdir: str, source: str) -> Any:
    (path,) = [os.path.join(workdir, source, n) for n in os.listdir(os.path.join(workdir, source))
               if n.startswith("step_")]  # fmt: skip
    with open(os.path.join(path, "optimus.json"), "rb") as f:
        return parse_manifest(f.read(), path)


# --------------------------------------------------------------------------------------------
# Loading: the checks shared by the 1-process (pytest) and 3-process loads.


def _load_and_check(
    workdir: str,
    source: str,
    target: str,
    preset: str,
    rank: int,
    world: int,
    read: dict[str, int] | None = None,
) -> list[str]:
    """Load ``source`` into a fresh ``target`` run with ``preset``; return what went wrong (and
    record the bytes read in ``read``)."""
    ref = torch.load(os.path.join(workdir, f"ref_{source}.pt"), weights_only=True)
    saved_world = 1 if source == "single" else 2
    s = PRESETS[preset]
    model = wrap(make_model(1), target)
    opt, sched = make_optimizer(model)
    stream, metrics = ShardedStream(rank, world), SumMetrics()
    before = _reference(model, opt)
    objects = dict(model=model, optimizer=opt, scheduler=sched, data_sources=stream,
                   metrics=metrics)  # fmt: skip
    ckpt = Checkpointer(os.path.join(workdir, source))
    plan = ckpt.plan(strategy=preset, **objects)
    report = ckpt.load(strategy=preset, **objects)
    if read is not None:
        read[f"{source}->{target} [{preset}]"] = report.bytes_read
    problems = []
    after = _reference(model, opt)
    expect_model = ref["model"] if s.load_model else before["model"]
    expect_opt = ref["optimizer"] if s.load_optimizer else before["optimizer"]
    for what, want, got in (("model", expect_model, after["model"]),
                            ("optimizer", expect_opt, after["optimizer"])):  # fmt: skip
        diff = first_difference(want, got, what)
        if diff:
            problems.append(diff)
    if sched.last_epoch != (STEPS if s.load_scheduler else 0):
        problems.append(f"scheduler last_epoch {sched.last_epoch}")
    # Another world size: the data position is resharded (the new ranks continue at the next
    # unread global sample); the same world size: each rank gets its own position back.
    resharded = world != saved_world
    want_stream = {"start": 0, "read": 0, "world": world}
    if s.load_data_sources:
        want_stream = ({"start": 2 * STEPS * saved_world, "read": 0, "world": world}
                       if resharded else {"start": 0, "read": 2 * STEPS, "world": world})  # fmt: skip
    if stream.state_dict() != want_stream:
        problems.append(f"stream {stream.state_dict()} != {want_stream}")
    reason = report.components["data_sources"].reason
    if s.load_data_sources and resharded != ("resharded" in reason):
        problems.append(f"data_sources reason: {reason!r}")
    totals = 2 * STEPS * (saved_world if resharded else 1)
    want_samples = totals if (s.load_metrics and (rank == 0 or not resharded)) else 0
    if metrics.samples != want_samples:
        problems.append(f"metrics samples {metrics.samples} != {want_samples}")
    if report.iteration != (STEPS if s.load_iteration else 0):
        problems.append(f"iteration {report.iteration}")
    rng_warned = any("RNG states were left" in w for w in report.warnings)
    if rng_warned != (s.load_iteration and world != saved_world):
        problems.append(f"RNG warning: {report.warnings}")
    # Byte accounting: this rank read exactly its shards (whole tensors where not sharded).
    expect_bytes = local_bytes(model, opt if s.load_optimizer else None) if s.load_model else 0
    if report.bytes_read != expect_bytes:
        problems.append(f"bytes_read {report.bytes_read} != this rank's state {expect_bytes}")
    if plan.bytes_read != report.bytes_read:
        problems.append(f"plan bytes {plan.bytes_read} != load bytes {report.bytes_read}")
    return [f"{source}->{target} [{preset}] rank {rank}: {p}" for p in problems]


def _dataloader_world_change(workdir: str, source: str, target: str, rank: int) -> list[str]:
    """A per-rank dataloader without a reshard hook: a clear error, nothing changed; skipping it
    with load_dataloaders=false works."""
    problems = []
    model = wrap(make_model(1), target)
    opt, _ = make_optimizer(model)
    before = full_model_state(model)
    loader = make_loader(rank)
    loader_state = loader.state_dict()
    ckpt = Checkpointer(os.path.join(workdir, source))
    try:
        ckpt.load(model=model, optimizer=opt, dataloaders={"train": loader})
        problems.append("no error for a dataloader saved by another world size")
    except LoadMismatchError as e:
        msg = str(e)
        for needle in ("dataloaders.train", "load_strategy.load_dataloaders=false",
                       "reshard_state_dict", "nothing was changed"):  # fmt: skip
            if needle not in msg:
                problems.append(f"error does not say {needle!r}: {msg}")
    if first_difference(before, full_model_state(model)):
        problems.append("the failed load changed the model")
    s = LoadStrategy(load_dataloaders=False)
    report = ckpt.load(strategy=s, model=model, optimizer=opt, dataloaders={"train": loader})
    if report.components["dataloaders.train"].outcome is not Outcome.SKIPPED_BY_STRATEGY:
        problems.append(f"dataloader outcome {report.components['dataloaders.train']}")
    if loader.state_dict() != loader_state:
        problems.append("the skipped dataloader changed")
    return [f"{source}->{target} dataloader rank {rank}: {p}" for p in problems]


def scenario_load3(rank: int, world: int, workdir: str) -> dict[str, Any]:
    problems: list[str] = []
    read: dict[str, int] = {}
    for source in SOURCES:
        for target in ("fsdp", "ddp"):
            for preset in sorted(PRESETS):
                problems += _load_and_check(workdir, source, target, preset, rank, world, read)
        problems += _dataloader_world_change(workdir, source, "fsdp", rank)
    ref = torch.load(os.path.join(workdir, "ref_single.pt"), weights_only=True)["model"]
    for name in ("weights.pt", "weights.safetensors"):  # foreign files into FSDP2 shards
        model = wrap(make_model(1), "fsdp")
        report = Checkpointer(workdir).load(os.path.join(workdir, name), "eval", model=model)
        diff = first_difference(ref, full_model_state(model))
        if diff or report.loaded != ["model"]:
            problems.append(f"{name} -> fsdp rank {rank}: {diff} {report.loaded}")
    return {"problems": problems, "bytes_read": read}


# --------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("source", ["ddp", "fsdp"])
def test_two_processes_write_each_shard_once(saved: str, source: str) -> None:
    """Each rank wrote only its own shards: DDP replicas once (split between the ranks), FSDP2
    shards by their owners; the manifest (written once by rank 0) has the single-process keys."""
    m = _manifest(saved, source)
    single = _manifest(saved, "single")
    assert m.world_size == 2 and m.rank_files == ["rank_00000.json", "rank_00001.json"]
    prefix = "model.module." if source == "ddp" else "model."
    assert {k.replace(prefix, "model.") for k in m.tensors} == set(single.tensors)
    writers: set[str] = set()
    for key, entry in m.tensors.items():
        ranks = [c.file.split("_")[2] for c in entry.chunks]  # "__<rank>_<n>.distcp"
        writers.update(ranks)
        boxes = sorted((c.offsets, c.sizes) for c in entry.chunks)
        if source == "fsdp" and entry.shape and entry.shape[0] >= 2 and key != "model.scale":
            assert sorted(ranks) == ["0", "1"], (key, boxes)  # one shard per rank
            assert boxes[0][0][0] == 0 and boxes[1][0][0] == boxes[0][1][0], boxes  # disjoint
            assert boxes[0][1][0] + boxes[1][1][0] == entry.shape[0]  # and covering
        else:
            assert len(entry.chunks) == 1, (key, boxes)  # a replicated tensor: written once
    assert writers == {"0", "1"}  # both ranks wrote data


def test_load_into_one_process_every_preset(saved: str) -> None:
    """2 -> 1 (and 1 -> 1): a plain model in this process, every preset."""
    problems = []
    for source in SOURCES:
        for preset in sorted(PRESETS):
            problems += _load_and_check(saved, source, "plain", preset, 0, 1)
    assert not problems, "\n".join(problems)


def test_load_into_three_processes_every_preset(saved: str) -> None:
    """2 -> 3 and 1 -> 3, into FSDP2 and DDP, every preset; per-rank bytes are the shards'."""
    results = check(launch("test_distributed_reshard:scenario_load3", 3, saved), expect_ranks=3)
    problems = [p for r in sorted(results) for p in results[r]["problems"]]
    assert not problems, "\n".join(problems)
    # Each case above already checked that every rank read exactly the bytes of its own state.
    # Summed over the ranks: the whole checkpoint once, plus one more copy per extra rank of the
    # replicated tensors (the buffer and the optimizer's step counters) and nothing else.
    for source in SOURCES:
        m = _manifest(saved, source)
        total = sum(e.nbytes for e in m.tensors.values())
        replicated = sum(e.nbytes for k, e in m.tensors.items()
                         if k.endswith((".scale", ".step")))  # fmt: skip
        per_rank = [results[r]["bytes_read"][f"{source}->fsdp [resume]"] for r in range(3)]
        assert sum(per_rank) == total + 2 * replicated, (source, per_rank, total)
        assert max(per_rank) < total / 2, per_rank
        ddp = [results[r]["bytes_read"][f"{source}->ddp [resume]"] for r in range(3)]
        assert ddp == [total] * 3  # DDP replicas: every rank needs everything


def test_world_size_change_with_dataloader_state(saved: str) -> None:
    """The documented behaviour in one process: the torchdata loader has no reshard hook, so
    the load fails naming load_strategy.load_dataloaders=false; the data source's hook merges."""
    problems = []
    for source in ("ddp", "fsdp"):
        problems += _dataloader_world_change(saved, source, "plain", 0)
    assert not problems, "\n".join(problems)
    # A resharded object's report says so; the RNG is left alone with a warning.
    stream = ShardedStream(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = Checkpointer(os.path.join(saved, "ddp")).plan(
            model=make_model(1), data_sources=stream
        )
    assert report.components["data_sources"].outcome is Outcome.LOADED
    assert "resharded from 2 to 1" in report.components["data_sources"].reason
    assert report.components["rng"].outcome is Outcome.SKIPPED_BY_STRATEGY
    assert json.loads(report.to_json())["components"]["rng"]["reason"] == "world size changed"


@pytest.mark.parametrize(
    "offsets,sizes",
    [
        ((0, 0), (7, 10)),
        ((3, 0), (2, 10)),
        ((0, 4), (7, 3)),
        ((2, 1), (3, 8)),
        ((6, 9), (1, 1)),
        ((0, 0), (0, 10)),
    ],
)
def test_reading_a_box_reads_exactly_its_bytes(tmp_path: Any, offsets: Any, sizes: Any) -> None:
    """The shard reader on any box (row shards, column shards, inner boxes, empty): the right
    values, and exactly the box's bytes read from the file."""
    from optimus_ckpt.distributed import _read_box
    from optimus_ckpt.sources import native_view

    full = torch.arange(70, dtype=torch.float32).reshape(7, 10)
    model = torch.nn.Linear(10, 7)
    with torch.no_grad():
        model.weight.copy_(full)
    path = Checkpointer(str(tmp_path)).save(1, model=model)
    view = native_view(path)
    try:
        (chunk,) = view.manifest.tensors["model.weight"].chunks
        target = torch.full(sizes, -1.0)
        before = view.bytes_read
        _read_box(view, chunk, target, offsets, sizes)
        want = full[offsets[0] : offsets[0] + sizes[0], offsets[1] : offsets[1] + sizes[1]]
        assert torch.equal(target, want)
        assert view.bytes_read - before == want.numel() * 4
    finally:
        view.close()
