"""Example Hydra training app for optimus_ckpt: train, get preempted, resume bit-exactly,
fine-tune with a new head, evaluate. All on CPU in seconds, on data it generates.

    python examples/train.py hydra.run.dir=runs/a                     # train (saves every 50 steps)
    python examples/train.py hydra.run.dir=runs/a                     # rerun: resumes by itself
    python examples/train.py hydra.run.dir=runs/ft load_strategy=finetune task=coarse \\
        checkpoint.load_from=runs/a/checkpoints                       # new 4-class head
    python examples/train.py hydra.run.dir=runs/ev load_strategy=eval \\
        checkpoint.load_from=runs/a/checkpoints                       # evaluate only
    python examples/train.py -m load_strategy=resume,finetune,eval \\
        checkpoint.load_from=runs/a/checkpoints                       # three jobs

What a run leaves in its output dir (``hydra.run.dir``): ``checkpoints/`` (optimus_ckpt
checkpoints), ``loss.csv`` (step, loss, lr, attempt), ``load_report.json`` (when it loaded
something), ``eval.json`` (evaluation metrics) and ``summary.json`` (final step, metrics and a
SHA-256 of the final weights).

The model is an MLP classifier; the data are points in R^dim labelled by a fixed random teacher
network (task ``fine``: 8 classes; task ``coarse``: the same points, the fine classes merged in
pairs, so a different head size). Training uses AdamW, a warmup + cosine schedule, dropout, a
shuffling torchdata ``StatefulDataLoader`` and running metrics; all of it is checkpointed, so a
run stopped at any step and resumed produces the same losses and the same final weights, bit for
bit, as a run that was never stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import optimus_ckpt
from optimus_ckpt import Checkpointer
from optimus_ckpt.layout import list_checkpoints

log = logging.getLogger("train")
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 noise

LOSS_CSV = "loss.csv"
CSV_FIELDS = ["step", "loss", "lr", "attempt"]


# --------------------------------------------------------------------------------------------
# Data: points labelled by a fixed random teacher network, generated from a seed.
# --------------------------------------------------------------------------------------------


def make_split(
    *, seed: int, dim: int, size: int, split: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of one split. Deterministic in (seed, dim, size, split); independent of
    the global RNG. The teacher depends on the seed only, so both tasks share the inputs."""
    teacher = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, 64, generator=teacher) / math.sqrt(dim)
    w2 = torch.randn(64, 8, generator=teacher) / math.sqrt(64)
    gen = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    x = torch.randn(size, dim, generator=gen)
    fine = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    if num_classes == 8:
        y = fine
    elif num_classes == 4:
        y = fine // 2
    else:
        raise ValueError(f"task.num_classes must be 8 (fine) or 4 (coarse), got {num_classes}")
    return x, y


class TeacherDataset(torch.utils.data.Dataset):
    """A generated classification data set: the run's *data source*.

    Its state is its identity (task, seed, size). Restoring it from a checkpoint of other data
    (another task or seed) is an error rather than a silent resume on different data.
    """

    def __init__(self, *, task: str, num_classes: int, seed: int, dim: int, size: int, split: str):
        self.identity = {
            "task": task,
            "num_classes": num_classes,
            "seed": seed,
            "dim": dim,
            "size": size,
            "split": split,
        }
        self.x, self.y = make_split(
            seed=seed, dim=dim, size=size, split=split, num_classes=num_classes
        )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def state_dict(self) -> dict[str, Any]:
        return dict(self.identity)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theirs = {k: state.get(k) for k in self.identity}
        if theirs != self.identity:
            raise ValueError(
                f"The checkpoint's training data {theirs} is not this run's {self.identity}. "
                "To start a new run on this data from the checkpoint's weights, use "
                "load_strategy=finetune."
            )

    def reshard_state_dict(
        self, states: list[dict[str, Any]], *, rank: int, world_size: int
    ) -> dict[str, Any]:
        """optimus_ckpt's hook for a resume with another number of processes: every rank saved
        the same identity, so every new rank takes it (load_state_dict then checks it)."""
        return dict(states[0])


def forever(loader: StatefulDataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epochs. The loader's state (epoch position, shuffle generator) is what a
    checkpoint restores, so a resumed run sees the very batches the uninterrupted run saw."""
    while True:
        yield from loader


# --------------------------------------------------------------------------------------------
# Model, schedule, metrics
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """``body`` (shared features) and ``head`` (one logit per class)."""

    def __init__(self, dim: int, hidden: int, depth: int, num_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            layers += [nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine down to ``min_ratio`` at ``total``.

    A plain function, so LambdaLR's state holds no copy of it: the schedule always comes from
    the config, and the checkpoint holds only the scheduler's position."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class RunningMetrics:
    """Running training metrics (what a dashboard would show); checkpointed, so a resumed run
    continues the same averages."""

    def __init__(self, ema_decay: float = 0.9):
        self.ema_decay = ema_decay
        self.steps = 0
        self.samples = 0
        self.correct = 0
        self.loss_sum = 0.0
        self.ema_loss = 0.0

    def update(self, loss: float, correct: int, n: int) -> None:
        self.ema_loss = (
            loss
            if self.steps == 0
            else self.ema_decay * self.ema_loss + (1 - self.ema_decay) * loss
        )
        self.steps += 1
        self.samples += n
        self.correct += correct
        self.loss_sum += loss * n

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.samples)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.samples)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "samples": self.samples,
            "correct": self.correct,
            "loss_sum": self.loss_sum,
            "ema_loss": self.ema_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.samples = int(state["samples"])
        self.correct = int(state["correct"])
        self.loss_sum = float(state["loss_sum"])
        self.ema_loss = float(state["ema_loss"])


@torch.no_grad()
def evaluate(model: nn.Module, data: TeacherDataset, batch_size: int = 256) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(data), batch_size):
        x, y = data.x[i : i + batch_size], data.y[i : i + batch_size]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    return {
        "loss": loss_sum / len(data),
        "accuracy": correct / len(data),
        "num_samples": len(data),
    }


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Run set-up helpers
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 128+signal.
    A second signal stops at once (a save in progress is atomic, so nothing half-written
    remains)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def loss_log(path: str, start_step: int) -> tuple[Any, Any, int]:
    """Open the loss CSV for appending. Rows after ``start_step`` (steps a killed run did
    after its last checkpoint, which this run redoes) are dropped first. Returns the file, the
    writer and this process's attempt number (0 for the first process of the run)."""
    rows: list[dict[str, str]] = []
    if start_step > 0 and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
    attempt = int(rows[-1]["attempt"]) + 1 if rows else 0
    f = open(path, "w", newline="")  # noqa: SIM115 - closed by the caller
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    return f, writer, attempt


def write_json(path: str, data: Any) -> None:
    if RANK != 0:  # under torchrun, rank 0 writes the run's files
        return
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def report_json(report: Any) -> Any:
    data = report.to_json()
    return json.loads(data) if isinstance(data, str) else data


def resolve_mode(cfg: DictConfig) -> str:
    mode = str(cfg.mode)
    if mode == "auto":
        choice = HydraConfig.get().runtime.choices.get("load_strategy")
        return "eval" if choice == "eval" else "train"
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be train, eval or auto, got {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------
# torchrun: `torchrun --nproc_per_node=2 examples/train.py hydra.run.dir=runs/ddp` trains with
# DDP over gloo (CPU). Pass hydra.run.dir: every rank must use the same output dir. Each rank
# shuffles the data with its own seed; every rank saves (optimus_ckpt writes the replicated
# weights once and each rank's data position); rank 0 writes loss.csv and the JSON files (the
# other ranks write loss.rank<r>.csv). Resuming needs the same number of processes, unless the
# per-rank state is skipped: load_strategy.load_dataloaders=false load_strategy.load_metrics=false.
# Nothing here changes a single-process run.
# --------------------------------------------------------------------------------------------

RANK = int(os.environ.get("RANK", "0"))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    if WORLD_SIZE > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")


def agreed_stop(signum: int | None) -> int | None:
    """A stop signal seen by any rank stops every rank at the same step (they save together)."""
    if WORLD_SIZE == 1:
        return signum
    flag = torch.tensor([signum or 0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) or None


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)  # once, now: load_from is the newest checkpoint *before* this run
    out_dir = HydraConfig.get().runtime.output_dir
    mode = resolve_mode(cfg)
    strategy = optimus_ckpt.resolve_strategy(cfg.load_strategy)
    loads_anything = strategy.loads_anything
    load_from = cfg.checkpoint.load_from
    load_from = os.path.abspath(str(load_from)) if load_from not in (None, "") else None
    choice = HydraConfig.get().runtime.choices.get("load_strategy")
    log.info(
        "mode=%s  task=%s (%d classes)  load_strategy=%s  load_from=%s  output dir: %s",
        mode,
        cfg.task.name,
        cfg.task.num_classes,
        choice,
        load_from,
        out_dir,
    )
    seed_everything(cfg.seed, cfg.threads)
    init_distributed()

    def dataset(split: str, size: int) -> TeacherDataset:
        return TeacherDataset(
            task=cfg.task.name,
            num_classes=cfg.task.num_classes,
            seed=cfg.data.seed,
            dim=cfg.data.dim,
            size=size,
            split=split,
        )

    eval_data = dataset("eval", cfg.data.eval_size)
    model = MLP(
        cfg.data.dim, cfg.model.hidden, cfg.model.depth, cfg.task.num_classes, cfg.model.dropout
    )

    if mode == "eval":
        code = run_eval(cfg, model, eval_data, strategy, load_from, out_dir)
        if code:
            sys.exit(code)
        return

    train_data = dataset("train", cfg.data.train_size)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.min_lr_ratio),
    )
    # The shuffling sampler gets its own generator, and the loader another one. Sharing one is a
    # trap: the loader draws a base seed from its generator right after the sampler snapshots
    # it, a draw that the sampler's saved state does not replay, so every epoch after a resume
    # would be shuffled differently. (With no generator, that draw would come from the global
    # RNG and shift dropout instead.)
    loader = StatefulDataLoader(
        train_data,
        batch_size=cfg.data.batch_size,
        sampler=RandomSampler(
            train_data, generator=torch.Generator().manual_seed(cfg.seed + 1 + 1000 * RANK)
        ),
        drop_last=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(cfg.seed + 2),
    )
    metrics = RunningMetrics()
    ckpt_dir = os.path.abspath(cfg.checkpoint.dir)
    ckpt = Checkpointer(ckpt_dir, keep_last=cfg.checkpoint.keep_last)
    components = dict(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data_sources=train_data,
        dataloaders={"train": loader},
        metrics=metrics,
    )

    start = 0
    if load_from is not None and loads_anything:
        # The engine logs the LoadReport (a table: what was loaded, skipped, mismatched).
        report = ckpt.load(load_from, cfg.load_strategy, config=cfg, **components)
        write_json(os.path.join(out_dir, "load_report.json"), report_json(report))
        start = int(report.iteration)
    elif loads_anything:
        log.info("No checkpoint to load (checkpoint.load_from is null): training from scratch.")
    else:
        log.info("load_strategy=%s loads nothing: training from scratch.", choice)

    own = [s for s, _ in list_checkpoints(ckpt_dir)]
    if own and own[-1] > start:
        raise SystemExit(
            f"{ckpt_dir} already holds checkpoints up to step {own[-1]} of another run, and this "
            f"run starts at step {start}: it would mix the two. Use a fresh hydra.run.dir, or "
            "resume that run (load_strategy=resume, no checkpoint.load_from)."
        )

    stop = StopFlag()
    stop.install()
    loss_csv = LOSS_CSV if RANK == 0 else f"loss.rank{RANK}.csv"
    csv_file, writer, attempt = loss_log(os.path.join(out_dir, loss_csv), start)
    last_saved = own[-1] if own else -1

    def save(step: int, why: str) -> None:
        nonlocal last_saved
        if step == last_saved:
            return
        csv_file.flush()  # the curve up to a checkpoint must survive a kill that follows it
        path = ckpt.save(step, config=cfg, **components)
        last_saved = step
        log.info("saved checkpoint (%s): %s", why, path)

    max_steps = int(cfg.trainer.max_steps)
    stop_at = cfg.trainer.stop_at
    batches = forever(loader)
    step = start
    if start > 0:
        log.info("resuming at step %d (attempt %d)", start, attempt)
    model.train()
    net = nn.parallel.DistributedDataParallel(model) if WORLD_SIZE > 1 else model
    try:
        while step < max_steps:
            x, y = next(batches)
            lr = scheduler.get_last_lr()[0]
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = loss.item()
            metrics.update(loss_value, int((logits.argmax(dim=1) == y).sum()), len(y))
            writer.writerow(
                {"step": step, "loss": repr(loss_value), "lr": repr(lr), "attempt": attempt}
            )
            if step % cfg.trainer.log_every == 0 or step == max_steps:
                csv_file.flush()
                log.info(
                    "step %d/%d  loss %.4f  ema %.4f  train acc %.3f  lr %.2e",
                    step,
                    max_steps,
                    loss_value,
                    metrics.ema_loss,
                    metrics.accuracy,
                    lr,
                )
            if step % cfg.checkpoint.save_every == 0 or step == max_steps:
                save(
                    step, f"every {cfg.checkpoint.save_every} steps" if step < max_steps else "end"
                )
            stop.signum = agreed_stop(stop.signum)
            if stop.signum is not None:
                save(step, stop.name)
                log.info("stopped by %s at step %d; rerun to resume", stop.name, step)
                sys.exit(128 + stop.signum)
            if stop_at is not None and step >= stop_at and step < max_steps:
                save(step, "trainer.stop_at")
                log.info("stopped at step %d (trainer.stop_at); rerun to resume", step)
                return
            if cfg.trainer.step_sleep:
                time.sleep(cfg.trainer.step_sleep)
    finally:
        csv_file.close()

    if start >= max_steps:
        log.info("already at step %d of %d: nothing to train", start, max_steps)
    result = evaluate(model, eval_data)
    log.info(
        "eval after step %d: loss %.4f  accuracy %.3f", step, result["loss"], result["accuracy"]
    )
    write_json(os.path.join(out_dir, "eval.json"), {"step": step, **result})
    write_json(
        os.path.join(out_dir, "summary.json"),
        {
            "mode": "train",
            "task": cfg.task.name,
            "load_strategy": choice,
            "loaded_from": load_from if loads_anything else None,
            "start_step": start,
            "final_step": step,
            "train_mean_loss": metrics.mean_loss,
            "train_accuracy": metrics.accuracy,
            "eval": result,
            "weights_sha256": weights_sha256(model),
            "checkpoint": ckpt.latest(),
        },
    )


def run_eval(
    cfg: DictConfig,
    model: nn.Module,
    eval_data: TeacherDataset,
    strategy: Any,
    load_from: str | None,
    out_dir: str,
) -> int:
    """Evaluate a checkpoint's weights. Trains nothing and writes nothing but the job's own
    ``eval.json``/``load_report.json``."""
    if not strategy.load_model:
        log.error("mode=eval needs a load_strategy that loads the model (e.g. load_strategy=eval).")
        return 2
    if load_from is None:
        log.error(
            "Nothing to evaluate: %s has no checkpoint. Pass checkpoint.load_from=<checkpoint or "
            "directory of checkpoints>.",
            cfg.checkpoint.dir,
        )
        return 2
    # Eval only reads: a Checkpointer creates nothing until it saves, and this one never does.
    report = Checkpointer(cfg.checkpoint.dir).load(
        load_from, cfg.load_strategy, model=model, config=cfg
    )
    write_json(os.path.join(out_dir, "load_report.json"), report_json(report))
    result = evaluate(model, eval_data)
    log.info(
        "eval of %s on task %s: loss %.4f  accuracy %.3f (%d samples)",
        load_from,
        cfg.task.name,
        result["loss"],
        result["accuracy"],
        result["num_samples"],
    )
    write_json(
        os.path.join(out_dir, "eval.json"),
        {"checkpoint": load_from, "task": cfg.task.name, **result},
    )
    write_json(
        os.path.join(out_dir, "summary.json"),
        {
            "mode": "eval",
            "task": cfg.task.name,
            "load_strategy": HydraConfig.get().runtime.choices.get("load_strategy"),
            "loaded_from": load_from,
            "eval": result,
            "weights_sha256": weights_sha256(model),
        },
    )
    return 0


if __name__ == "__main__":
    main()
