"""The example app under ``torchrun --nproc_per_node=2`` (DDP, gloo, CPU): a run stopped and
resumed with 2 processes ends bit-identical to an uninterrupted one; resuming it with 1 process
fails naming the options that skip the per-process state, and with them it loads and trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimus_ckpt.manifest import parse_manifest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
STEPS = ["trainer.max_steps=40", "checkpoint.save_every=20", "data.train_size=1024"]

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _run(cwd: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                     "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [*launcher, str(TRAIN), *STEPS, *overrides], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240,
    )  # fmt: skip


def _summary(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "summary.json").read_text())


def test_example_app_under_torchrun(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    out = _run(tmp_path, 2, f"hydra.run.dir={a}", "trainer.stop_at=20")
    assert out.returncode == 0, out.stdout[-4000:]
    ckpt = a / "checkpoints" / "step_0000000020"
    manifest = parse_manifest((ckpt / "optimus.json").read_bytes(), str(ckpt))
    assert manifest.world_size == 2 and len(manifest.rank_files) == 2
    assert (a / "loss.csv").exists() and (a / "loss.rank1.csv").exists()

    out = _run(tmp_path, 2, f"hydra.run.dir={a}")  # resumes by itself
    assert out.returncode == 0, out.stdout[-4000:]
    out = _run(tmp_path, 2, f"hydra.run.dir={b}")  # never stopped
    assert out.returncode == 0, out.stdout[-4000:]
    assert _summary(a)["weights_sha256"] == _summary(b)["weights_sha256"]
    assert _summary(a)["start_step"] == 20 and _summary(a)["final_step"] == 40
    assert (a / "loss.csv").read_text().splitlines()[:21] == \
        (b / "loss.csv").read_text().splitlines()[:21]  # fmt: skip

    # One process: the 2 data positions cannot be split or merged into one.
    one = tmp_path / "one"
    src = f"checkpoint.load_from={ckpt}"
    out = _run(tmp_path, 1, f"hydra.run.dir={one}", src)
    assert out.returncode != 0
    assert "load_strategy.load_dataloaders=false" in out.stdout, out.stdout[-3000:]
    assert "load_strategy.load_metrics=false" in out.stdout
    assert not (one / "checkpoints").exists()  # nothing was trained or saved
    out = _run(tmp_path, 1, f"hydra.run.dir={one}", src, "load_strategy.load_dataloaders=false",
               "load_strategy.load_metrics=false")  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
    report = json.loads((one / "load_report.json").read_text())
    assert report["components"]["data_sources"]["outcome"] == "loaded"
    assert "resharded from 2 to 1" in report["components"]["data_sources"]["reason"]
    assert report["components"]["model"]["outcome"] == "loaded"
    assert _summary(one)["start_step"] == 20 and _summary(one)["final_step"] == 40
