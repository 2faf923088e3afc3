"""The example Hydra training app (examples/train.py), driven through its command line.

Each test runs ``python examples/train.py ... hydra.run.dir=...`` in a subprocess, as a user
would, and checks what the runs leave on disk: loss curves, load reports, checkpoints, weights.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from optimus_ckpt import Checkpointer, LoadStrategy
from optimus_ckpt.layout import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
PLOT = ROOT / "examples" / "plot.py"
MAX_STEPS = 200  # examples/conf/train.yaml: trainer.max_steps
SAVE_EVERY = 50  # checkpoint.save_every

pytestmark = pytest.mark.timeout(300)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")


def train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """Run the app to completion; stdout and stderr together in ``.stdout``."""
    return subprocess.run(
        [sys.executable, str(TRAIN), *overrides],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def interrupt(cwd: Path, run_dir: Path, sig: int, when: str) -> tuple[int, str]:
    """Start a (slowed-down) run, send ``sig`` as soon as it prints a line containing ``when``,
    and return its exit status and output."""
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), f"hydra.run.dir={run_dir}", "trainer.step_sleep=0.02"],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if when in line:
                proc.send_signal(sig)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + rest


def plot(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PLOT), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def read_losses(run_dir: Path) -> list[tuple[int, str, str]]:
    """(step, loss, lr) rows of a run's loss.csv, as written (repr of the floats: equal strings
    mean bit-identical values)."""
    with open(run_dir / "loss.csv", newline="") as f:
        return [(int(r["step"]), r["loss"], r["lr"]) for r in csv.DictReader(f)]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def tree_digest(root: Path) -> str:
    """Digest of every path under ``root`` (names, kinds, sizes, modes, mtimes, contents)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d + "/" for d in dirnames]:
            path = os.path.join(dirpath, name.rstrip("/"))
            st = os.lstat(path)
            h.update(f"{os.path.relpath(path, root)}|{st.st_mode}|{st.st_mtime_ns}|".encode())
            if not name.endswith("/"):
                h.update(f"{st.st_size}|".encode())
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _example_module() -> Any:
    spec = importlib.util.spec_from_file_location("optimus_example_train", TRAIN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_final_state(checkpoint: str, num_classes: int = 8) -> dict[str, torch.Tensor]:
    """Model weights and AdamW state of a checkpoint, loaded through the engine into fresh
    objects built like the app builds them."""
    app = _example_module()
    torch.manual_seed(12345)  # a different init, so that equality proves the load
    model = app.MLP(32, 128, 2, num_classes, 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.01)
    strategy = LoadStrategy(
        load_scheduler=False,
        load_data_sources=False,
        load_dataloaders=False,
        load_metrics=False,
        load_iteration=False,
    )
    report = Checkpointer(os.path.dirname(checkpoint)).load(
        checkpoint, strategy, model=model, optimizer=optimizer
    )
    assert report.components["model"].outcome == "loaded"
    assert report.components["optimizer"].outcome == "loaded"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, s in optimizer.state.items():
        for k, v in s.items():
            state[f"optimizer.{names[id(p)]}.{k}"] = v
    return state


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-identical: {different}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: MAX_STEPS steps, never interrupted."""
    cwd = tmp_path_factory.mktemp("straight")
    run_dir = cwd / "run"
    out = ok(train(cwd, f"hydra.run.dir={run_dir}"))
    assert "training from scratch" in out
    steps = [s for s, _ in list_checkpoints(run_dir / "checkpoints")]
    assert steps == list(range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY))
    assert [r[0] for r in read_losses(run_dir)] == list(range(1, MAX_STEPS + 1))
    return run_dir


# --------------------------------------------------------------------------------------------
# Resume is exact, after a real kill of the process
# --------------------------------------------------------------------------------------------


def test_resume_after_sigkill_is_bit_exact(straight: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Killed right after its first checkpoint: the steps it did after it are lost.
    rc, out = interrupt(tmp_path, run_dir, signal.SIGKILL, when="saved checkpoint")
    assert rc == -signal.SIGKILL, out[-3000:]
    assert not (run_dir / "summary.json").exists()  # it really died mid-run
    saved = [s for s, _ in list_checkpoints(run_dir / "checkpoints")]
    listing = sorted(os.listdir(run_dir / "checkpoints"))
    assert saved, f"no complete checkpoint after the kill: {listing}\n{out[-3000:]}"
    assert SAVE_EVERY <= saved[-1] < MAX_STEPS, listing

    # Rerun in the same directory with no extra arguments: it resumes by itself.
    out = ok(train(tmp_path, f"hydra.run.dir={run_dir}"))
    report = read_json(run_dir / "load_report.json")
    assert report["iteration"] == saved[-1]
    assert f"resuming at step {saved[-1]}" in out
    assert "continue from iteration" in out  # the LoadReport was printed
    for name in ("model", "optimizer", "scheduler", "dataloaders.train", "metrics", "rng"):
        assert report["components"][name]["outcome"] == "loaded", name

    # Steps done after the last checkpoint by the killed process were redone: the curve has
    # each step once, and every loss and learning rate is bit-identical to the reference.
    assert read_losses(run_dir) == read_losses(straight)
    summary, reference = read_json(run_dir / "summary.json"), read_json(straight / "summary.json")
    assert summary["start_step"] == saved[-1] and summary["final_step"] == MAX_STEPS
    assert summary["weights_sha256"] == reference["weights_sha256"]
    assert summary["eval"] == reference["eval"]
    assert_bit_identical(
        load_final_state(str(run_dir / "checkpoints")),
        load_final_state(str(straight / "checkpoints")),
    )


def test_resume_after_sigterm_saves_and_is_bit_exact_and_plotted(
    straight: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # Preempted between two periodic checkpoints (50 and 100): it saves where it stops.
    rc, out = interrupt(tmp_path, run_dir, signal.SIGTERM, when=f"step 75/{MAX_STEPS}")
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    stopped = [s for s, _ in list_checkpoints(run_dir / "checkpoints")][-1]
    assert f"stopped by SIGTERM at step {stopped}" in out
    assert 75 <= stopped < MAX_STEPS
    if stopped % SAVE_EVERY:
        assert f"saved checkpoint (SIGTERM): {run_dir / 'checkpoints'}" in out
    assert [r[0] for r in read_losses(run_dir)] == list(range(1, stopped + 1))

    ok(train(tmp_path, f"hydra.run.dir={run_dir}"))
    assert read_json(run_dir / "load_report.json")["iteration"] == stopped
    assert read_losses(run_dir) == read_losses(straight)
    assert (
        read_json(run_dir / "summary.json")["weights_sha256"]
        == read_json(straight / "summary.json")["weights_sha256"]
    )

    # examples/plot.py draws both curves and checks them step by step.
    png = tmp_path / "cmp.png"
    proc = plot(straight / "loss.csv", run_dir / "loss.csv", "--out", png, "--require-identical")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"identical: all {MAX_STEPS} steps" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A curve that differs in one step is caught.
    rows = (run_dir / "loss.csv").read_text().splitlines()
    step, loss, lr, attempt = rows[150].split(",")
    rows[150] = ",".join([step, repr(float(loss) + 1e-6), lr, attempt])
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    proc = plot(straight / "loss.csv", tmp_path / "bad.csv", "--out", png, "--require-identical")
    assert proc.returncode == 1
    assert f"1 of {MAX_STEPS} steps differ, first at step 150" in proc.stdout


# --------------------------------------------------------------------------------------------
# Fine-tune with a new head, evaluate, sweep
# --------------------------------------------------------------------------------------------


def test_finetune_new_head_reports_mismatch_and_starts_fresh(
    straight: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "ft"
    out = ok(
        train(
            tmp_path,
            f"hydra.run.dir={run_dir}",
            "load_strategy=finetune",
            "task=coarse",
            f"checkpoint.load_from={straight / 'checkpoints'}",
        )
    )
    # The printed report shows the 8-class head kept fresh as a 4-class head.
    assert "shape mismatches (kept fresh): 2" in out
    assert "head.weight: checkpoint [8, 128] vs model [4, 128]" in out
    report = read_json(run_dir / "load_report.json")
    assert report["source"] == str(straight / "checkpoints" / "step_0000000200")
    assert report["iteration"] == 0
    assert sorted(m[0] for m in report["shape_mismatches"]) == ["head.bias", "head.weight"]
    assert report["components"]["model"]["outcome"] == "loaded"
    for name in ("optimizer", "scheduler", "dataloaders.train", "metrics", "rng"):
        assert report["components"][name]["outcome"] == "skipped by strategy", name

    # Training started at step 0 with a fresh schedule...
    losses = read_losses(run_dir)
    assert [r[0] for r in losses] == list(range(1, MAX_STEPS + 1))
    assert losses[0][2] == read_losses(straight)[0][2]  # the first warmup learning rate
    summary = read_json(run_dir / "summary.json")
    assert (summary["task"], summary["start_step"], summary["final_step"]) == ("coarse", 0, 200)
    # ... and a fresh optimizer: its first checkpoint holds AdamW state of 50 steps, not 250.
    first = next(p for s, p in list_checkpoints(run_dir / "checkpoints") if s == SAVE_EVERY)
    state = load_final_state(first, num_classes=4)
    assert float(state["optimizer.head.weight.step"]) == SAVE_EVERY
    assert float(state["optimizer.body.0.weight.step"]) == SAVE_EVERY


def test_eval_loads_weights_and_changes_nothing_on_disk(straight: Path, tmp_path: Path) -> None:
    before = tree_digest(straight / "checkpoints")
    run_dir = tmp_path / "ev"
    out = ok(
        train(
            tmp_path,
            f"hydra.run.dir={run_dir}",
            "load_strategy=eval",
            f"checkpoint.load_from={straight / 'checkpoints'}",
        )
    )
    assert tree_digest(straight / "checkpoints") == before
    assert "eval of" in out and "accuracy" in out
    report = read_json(run_dir / "load_report.json")
    assert report["iteration"] == 0
    assert report["components"]["model"]["outcome"] == "loaded"
    assert report["shape_mismatches"] == [] and report["missing_keys"] == []
    # Nothing trained, nothing saved: no checkpoints, no loss curve.
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "loss.csv").exists()
    # The metrics are those of the reference's final weights, on the same eval split.
    result = read_json(run_dir / "eval.json")
    reference = read_json(straight / "eval.json")
    assert (result["loss"], result["accuracy"]) == (reference["loss"], reference["accuracy"])
    summary = read_json(run_dir / "summary.json")
    assert summary["weights_sha256"] == read_json(straight / "summary.json")["weights_sha256"]


def test_eval_without_a_checkpoint_fails_clearly(tmp_path: Path) -> None:
    proc = train(tmp_path, f"hydra.run.dir={tmp_path / 'ev'}", "load_strategy=eval")
    assert proc.returncode == 2
    assert "Nothing to evaluate" in proc.stdout
    assert "checkpoint.load_from=" in proc.stdout


def test_sweep_over_resume_finetune_eval(straight: Path, tmp_path: Path) -> None:
    before = tree_digest(straight / "checkpoints")
    source = straight / "checkpoints" / "step_0000000100"
    sweep = tmp_path / "sweep"
    out = ok(
        train(
            tmp_path,
            "-m",
            "load_strategy=resume,finetune,eval",
            f"checkpoint.load_from={source}",
            f"hydra.sweep.dir={sweep}",
        )
    )
    assert "Launching 3 jobs" in out
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    jobs = {}
    for job in ("0", "1", "2"):
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        preset = next(
            p for p in ("resume", "finetune", "eval") if f"load_strategy={p}" in overrides
        )
        jobs[preset] = sweep / job
    assert out.count("continue from iteration") == 3  # three printed LoadReports

    # resume: continues the reference run from step 100 in its own directory, bit-exactly.
    resume = read_json(jobs["resume"] / "summary.json")
    assert read_json(jobs["resume"] / "load_report.json")["iteration"] == 100
    assert (resume["start_step"], resume["final_step"]) == (100, MAX_STEPS)
    assert resume["weights_sha256"] == read_json(straight / "summary.json")["weights_sha256"]
    assert read_losses(jobs["resume"]) == read_losses(straight)[100:]
    assert [s for s, _ in list_checkpoints(jobs["resume"] / "checkpoints")] == [150, 200]

    # finetune: the step-100 weights, then MAX_STEPS steps from step 0 with a fresh optimizer.
    finetune = read_json(jobs["finetune"] / "summary.json")
    report = read_json(jobs["finetune"] / "load_report.json")
    assert report["iteration"] == 0
    assert report["components"]["optimizer"]["outcome"] == "skipped by strategy"
    assert (finetune["start_step"], finetune["final_step"]) == (0, MAX_STEPS)
    assert finetune["weights_sha256"] != resume["weights_sha256"]
    assert [r[0] for r in read_losses(jobs["finetune"])] == list(range(1, MAX_STEPS + 1))

    # eval: loads the step-100 weights, reports metrics, trains and saves nothing.
    evaluation = read_json(jobs["eval"] / "summary.json")
    assert evaluation["mode"] == "eval"
    assert read_json(jobs["eval"] / "load_report.json")["source"] == str(source)
    assert (jobs["eval"] / "eval.json").exists()
    assert not (jobs["eval"] / "checkpoints").exists()
    assert not (jobs["eval"] / "loss.csv").exists()

    assert tree_digest(straight / "checkpoints") == before
