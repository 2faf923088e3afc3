"""The on-disk format: incomplete checkpoints are invisible, keep_last, no overwrites, foreign
single files (safetensors, torch.save), malicious pickles refused without running, and
torch.distributed.checkpoint reading our checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_support import Net, assert_same, make_run, snapshot
from omegaconf import OmegaConf

from optimus_ckpt import (
    Checkpointer,
    CheckpointExistsError,
    CheckpointNotFoundError,
    LoadMismatchError,
    LoadStrategy,
    Outcome,
    UnsafeCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    register_configs,
)
from optimus_ckpt.writer import param_names

pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
]

MODEL_ONLY = LoadStrategy(
    load_optimizer=False, load_scheduler=False, load_data_sources=False,
    load_dataloaders=False, load_metrics=False, load_iteration=False,
)  # fmt: skip


def _resolved_latest(directory: Path) -> Any:
    register_configs()
    cfg = OmegaConf.create({"dir": str(directory), "load_from": "${optimus_ckpt.latest:${dir}}"})
    return cfg.load_from


# ----------------------------------------------------------------------------- crash safety


def test_incomplete_checkpoints_are_ignored_by_latest_resolver_and_load(tmp_path: Path) -> None:
    run = make_run(seed=0, steps=1)
    ckpt = Checkpointer(tmp_path, fsync=False)
    good = ckpt.save(5, **run.objects())
    # What interrupted saves leave behind, all newer than the good one:
    shutil.copytree(good, tmp_path / "step_0000000009.partial-3f2a9c0d1e2b")  # killed before rename
    no_manifest = tmp_path / "step_0000000010"  # a step directory without its commit marker
    shutil.copytree(good, no_manifest)
    (no_manifest / "optimus.json").unlink()
    torn = tmp_path / "step_0000000011"  # a manifest cut short
    shutil.copytree(good, torn)
    raw = (torn / "optimus.json").read_bytes()
    (torn / "optimus.json").write_bytes(raw[: len(raw) // 2])

    assert ckpt.latest() == good == latest_checkpoint(tmp_path)
    assert ckpt.checkpoints() == [(5, good)] == list_checkpoints(tmp_path)
    assert _resolved_latest(tmp_path) == good
    live = make_run(seed=1, steps=0)
    for source in (None, tmp_path, str(tmp_path)):
        report = ckpt.load(source, "eval", model=live.model)
        assert report.source == good and report.step == 5
    for bad in (tmp_path / "step_0000000009.partial-3f2a9c0d1e2b", no_manifest):
        with pytest.raises(CheckpointNotFoundError):
            ckpt.load(bad, "eval", model=live.model)

    # The next save cleans up the staging leftover, and becomes the latest.
    newer = ckpt.save(12, **run.objects())
    assert not (tmp_path / "step_0000000009.partial-3f2a9c0d1e2b").exists()
    assert ckpt.latest() == newer == _resolved_latest(tmp_path)
    assert [s for s, _ in ckpt.checkpoints()] == [5, 12]


def test_keep_last_deletes_only_older_committed_checkpoints(tmp_path: Path) -> None:
    run = make_run(seed=0, steps=1)
    ckpt = Checkpointer(tmp_path, keep_last=2, fsync=False)
    incomplete = tmp_path / "step_0000000001"
    incomplete.mkdir(parents=True)
    (incomplete / "data.bin").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    paths = [ckpt.save(step, **run.objects()) for step in (2, 3, 4, 5)]
    assert ckpt.checkpoints() == [(4, paths[2]), (5, paths[3])]
    assert not os.path.exists(paths[0]) and not os.path.exists(paths[1])
    assert incomplete.exists() and (incomplete / "data.bin").read_bytes() == b"partial"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "latest").read_text().strip() == "step_0000000005"
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    for _, path in ckpt.checkpoints():  # what is kept still loads
        ckpt.load(path, "eval", model=Net())


def test_saving_an_existing_step_raises_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    run = make_run(seed=0, steps=1)
    ckpt = Checkpointer(tmp_path, fsync=False)
    path = ckpt.save(3, **run.objects())
    manifest = (Path(path) / "optimus.json").read_bytes()
    run.train(1)
    with pytest.raises(CheckpointExistsError, match="step 3 already exists"):
        ckpt.save(3, **run.objects())
    assert (Path(path) / "optimus.json").read_bytes() == manifest
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert ckpt.checkpoints() == [(3, path)]


# ----------------------------------------------------------------------------- foreign files


def _trained_model() -> Net:
    return make_run(seed=0, steps=2).model


def test_safetensors_file_loads_model_weights_bit_exactly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = _trained_model()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = Net()
    report = Checkpointer(tmp_path).load(path, "eval", model=model)
    assert report.loaded == ["model"] and report.step == report.iteration == 0
    assert_same(model.state_dict(), src.state_dict(), "model from safetensors")
    assert report.bytes_read == sum(v.numel() * v.element_size() for v in src.state_dict().values())

    # Half-precision weights load bit-exactly into a half model, and convert (reported) into a
    # float32 one.
    half = {k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    model16 = Net().half()
    Checkpointer(tmp_path).load(tmp_path / "half.safetensors", "eval", model=model16)
    assert_same(model16.state_dict(), half, "half model from safetensors")
    model32 = Net()
    report = Checkpointer(tmp_path).load(tmp_path / "half.safetensors", "eval", model=model32)
    assert ("body.weight", "float16", "float32") in report.dtype_conversions
    assert_same(model32.body.weight.detach(), half["body.weight"].float(), "converted weight")


@pytest.mark.parametrize("layout", ["bare", "model", "state_dict"])
def test_single_file_torch_save_loads_model_weights_bit_exactly(
    tmp_path: Path, layout: str
) -> None:
    run = make_run(seed=0, steps=2)
    sd = run.model.state_dict()
    obj: Any = sd if layout == "bare" else {layout: sd, "step": 7, "epoch": 1}
    if layout == "model":
        obj["optimizer"] = run.optimizer.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    model = Net()
    report = Checkpointer(tmp_path).load(path, MODEL_ONLY, model=model)
    assert report.loaded == ["model"]
    assert_same(model.state_dict(), sd, f"model from torch.save ({layout})")


def test_single_file_without_optimizer_state_names_the_fix(tmp_path: Path) -> None:
    run = make_run(seed=0, steps=1)
    torch.save(run.model.state_dict(), tmp_path / "w.pt")
    live = make_run(seed=1, steps=0)
    before = snapshot(live)
    with pytest.raises(LoadMismatchError) as err:
        Checkpointer(tmp_path).load(tmp_path / "w.pt", "resume", **live.objects())
    assert "'optimizer' is asked for and given" in str(err.value)
    assert "load_strategy=finetune" in str(err.value)
    assert_same(snapshot(live), before, "objects after a refused load")
    report = Checkpointer(tmp_path).load(tmp_path / "w.pt", "finetune", **live.objects())
    assert report.loaded == ["model"]
    assert report.components["optimizer"].outcome is Outcome.SKIPPED_BY_STRATEGY


# ----------------------------------------------------------------------------- unsafe pickles


class Evil:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: unrestricted unpickling of the payload does run its code."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torch.save", "pickle", "pickle-bare"])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    sd = Net().state_dict()
    path = tmp_path / "evil.pt"
    if kind == "torch.save":
        torch.save({"model": sd, "evil": Evil(marker)}, path)
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"model": sd, "evil": Evil(marker)}, f)
    else:
        with open(path, "wb") as f:
            pickle.dump(Evil(marker), f, protocol=2)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(tmp_path)
    for call in (ckpt.plan, ckpt.load):
        with pytest.raises(UnsafeCheckpointError, match="refused"):
            call(path, "eval", model=model)
    assert not marker.exists(), "code from the checkpoint ran"
    assert_same(model.state_dict(), before, "model after a refused file")


def test_dcp_metadata_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = make_run(seed=0, steps=1)
    path = Path(Checkpointer(tmp_path, fsync=False).save(2, **run.objects()))
    # A hostile DCP metadata file, padded to the size the manifest lists (pickle stops at its
    # STOP opcode, so the padding does not disarm it).
    size = (path / ".metadata").stat().st_size
    payload = pickle.dumps(Evil(marker))
    (path / ".metadata").write_bytes(payload + b"\0" * (size - len(payload)))
    live = make_run(seed=1, steps=0)
    ckpt = Checkpointer(tmp_path)
    ckpt.plan(path, "resume", **live.objects())
    report = ckpt.load(path, "resume", **live.objects())
    assert "optimizer" in report.loaded
    assert_same(live.model.state_dict(), run.model.state_dict(), "model")
    # A bare DCP directory (no optimus manifest) is not ours: refused without reading it.
    bare = tmp_path / "dcp_only"
    bare.mkdir()
    shutil.copy(path / ".metadata", bare / ".metadata")
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(bare, "eval", model=live.model)
    assert not marker.exists(), "code from the checkpoint ran"
    # Control: the file was armed all along (unrestricted unpickling runs it).
    pickle.loads((path / ".metadata").read_bytes()).close()
    assert marker.exists()


# ----------------------------------------------------------------------------- DCP compatibility


def test_torch_distributed_checkpoint_reads_our_checkpoint(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    run = make_run(seed=0, steps=3)
    saved = snapshot(run)
    path = Checkpointer(tmp_path, fsync=False).save(3, **run.objects())
    with open(os.path.join(path, "optimus.json")) as f:
        manifest = json.load(f)

    sd: dict[str, torch.Tensor] = {
        f"model.{k}": torch.full_like(v, 7) for k, v in saved["model"].items()
    }
    expected: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in saved["model"].items()}
    names = param_names(run.model, run.optimizer)
    opt_state = manifest["state"]["optimizer"]["state"]
    for index, fqn in enumerate(names):
        for field, enc in opt_state[fqn].items():
            if isinstance(enc, dict) and enc.get("__optimus__") == "ref":
                value = saved["optimizer"]["state"][index][field]
                sd[enc["v"]] = torch.full_like(value, 7)
                expected[enc["v"]] = value
    assert any(k.startswith("optimizer.") for k in sd)
    assert set(k for k in manifest["tensors"] if not k.startswith("extra.")) == set(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    for key, value in expected.items():
        assert_same(sd[key], value, key)
