"""Helpers for the multi-process tests (not a test module): a launcher and a small training run.

``launch("test_module:scenario", world, workdir)`` runs ``python tests/dist_support.py ...`` in a
subprocess. That process imports torch once and forks ``world`` workers (as torchrun would start
them, but without paying torch's import per rank); each joins a gloo process group through a
file store, runs ``scenario(rank, world, workdir)`` and writes what it returns (or its traceback)
to ``workdir/result.<scenario>.<rank>.json``. The launcher never runs a torch op before forking.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@dataclass
class Launch:
    returncode: int
    output: str
    results: dict[int, Any]  # rank -> what the scenario returned
    errors: dict[int, str]  # rank -> traceback
    exitcodes: dict[int, int | None]


def launch(target: str, world: int, workdir: str, *, timeout: float = 150.0) -> Launch:
    """Run ``target`` ("module:function" in tests/) on ``world`` gloo processes."""
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "dist_support.py"), target, str(world), workdir],
        capture_output=True, text=True, timeout=timeout + 30, env=env,
    )  # fmt: skip
    name = target.split(":")[1]
    results, errors = {}, {}
    for rank in range(world):
        path = os.path.join(workdir, f"result.{name}.{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            if "error" in data:
                errors[rank] = data["error"]
            else:
                results[rank] = data["result"]
    codes: dict[int, int | None] = {}
    codes_path = os.path.join(workdir, f"exitcodes.{name}.json")
    if os.path.exists(codes_path):
        with open(codes_path) as f:
            codes = {int(k): v for k, v in json.load(f).items()}
    return Launch(proc.returncode, proc.stdout + proc.stderr, results, errors, codes)


def check(run: Launch, *, expect_ranks: int) -> dict[int, Any]:
    """Fail with every rank's traceback unless ``expect_ranks`` ranks returned a result."""
    if run.errors or len(run.results) != expect_ranks:
        msg = "\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(run.errors.items()))
        raise AssertionError(
            f"distributed scenario failed (launcher rc={run.returncode}, exit codes "
            f"{run.exitcodes}):\n{msg}\n--- launcher output (tail):\n{run.output[-4000:]}"
        )
    return run.results


# --------------------------------------------------------------------------------------------
# The launcher process


def _worker(target: str, rank: int, world: int, workdir: str, store: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    name = target.split(":")[1]
    out = os.path.join(workdir, f"result.{name}.{rank}.json")
    try:
        import datetime
        import importlib

        module, func = target.split(":")
        fn: Callable[..., Any] = getattr(importlib.import_module(module), func)
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        result = fn(rank, world, workdir)
        data: dict[str, Any] = {"result": result}
    except BaseException:
        data = {"error": traceback.format_exc()}
    with open(out + ".tmp", "w") as f:
        json.dump(data, f, default=str)
    os.replace(out + ".tmp", out)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(1 if "error" in data else 0)


def _main(argv: list[str]) -> int:
    import multiprocessing as mp
    import tempfile

    # Imported once here, before forking: the workers inherit them (no per-rank import cost).
    import torch
    import torch.distributed.checkpoint
    import torch.distributed.fsdp  # noqa: F401

    target, world, workdir = argv[0], int(argv[1]), argv[2]
    name = target.split(":")[1]
    module = target.split(":")[0]
    __import__(module)  # import the scenario's module (and its imports) once, before forking
    store = os.path.join(tempfile.mkdtemp(prefix="optimus-store-"), "store")
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_worker, args=(target, r, world, workdir, store)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = float(os.environ.get("OPTIMUS_DIST_TIMEOUT", "150"))
    import time

    end = time.monotonic() + deadline
    for p in procs:
        p.join(max(0.1, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    with open(os.path.join(workdir, f"exitcodes.{name}.json"), "w") as f:
        json.dump(codes, f)
    return 0 if all(c == 0 for c in codes.values()) else 1


# --------------------------------------------------------------------------------------------
# A small training run, the same in every process and in the pytest process.


def make_model(seed: int = 0) -> Any:
    """Odd sizes on purpose: 2 and 3 processes shard them unevenly; the last bias (2 rows)
    leaves one of 3 ranks an empty shard. The buffer is replicated state (not sharded)."""
    import torch
    from torch import nn

    class Scaled(nn.Sequential):
        def __init__(self) -> None:
            super().__init__(
                nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 2)
            )
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 2))

        def forward(self, x: Any) -> Any:
            return super().forward(x) * self.scale

    torch.manual_seed(seed)
    return Scaled()


def wrap(model: Any, kind: str) -> Any:
    """``plain``, ``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2 ``fully_shard``)."""
    from torch import nn

    if kind == "plain":
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(kind)


def make_optimizer(model: Any) -> tuple[Any, Any]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def train(model: Any, opt: Any, sched: Any, steps: int, *, rank: int, start: int = 0) -> None:
    import torch

    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * rank + s)
        x = torch.randn(8, 6, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _full(t: Any) -> Any:
    from optimus_ckpt.distributed import is_dtensor

    t = t.detach()
    return (t.full_tensor() if is_dtensor(t) else t).clone()


def _canonical(name: str) -> str:
    from optimus_ckpt.parts import canonical_key

    return canonical_key(name)


def full_model_state(model: Any) -> dict[str, Any]:
    """Every tensor of the model, whole (DTensors gathered: collective), by canonical name."""
    return {_canonical(k): _full(v) for k, v in model.state_dict().items()}


def full_optimizer_state(model: Any, opt: Any) -> dict[str, dict[str, Any]]:
    """Optimizer state by parameter name, whole (collective for FSDP2)."""
    names = {id(p): _canonical(n) for n, p in model.named_parameters()}
    out: dict[str, dict[str, Any]] = {}
    for p, st in opt.state.items():
        out[names[id(p)]] = {k: _full(v) if hasattr(v, "shape") else v for k, v in st.items()}
    return out


def local_bytes(model: Any, opt: Any | None) -> int:
    """Bytes of the tensors this rank holds (its shards; whole plain tensors)."""
    from optimus_ckpt.distributed import is_dtensor

    def nbytes(t: Any) -> int:
        t = t.to_local() if is_dtensor(t) else t
        return int(t.numel() * t.element_size())

    total = sum(nbytes(v) for v in model.state_dict().values())
    if opt is not None:
        total += sum(nbytes(v) for st in opt.state.values() for v in st.values())
    return total


def first_difference(a: dict[str, Any], b: dict[str, Any], where: str = "") -> str | None:
    """None when ``a`` and ``b`` (nested dicts of tensors/values) are bit-identical."""
    import torch

    if set(a) != set(b):
        return f"{where}: keys differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            d = first_difference(x, y, f"{where}.{k}")
            if d:
                return d
        elif isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return f"{where}.{k}: tensors differ"
        elif x != y:
            return f"{where}.{k}: {x!r} != {y!r}"
    return None


class ShardedStream:
    """A data source read in lockstep: rank r of W reads global samples start + r + i*W.

    Reshardable: when the world size changes, the hook turns the saved ranks' positions into the
    next unread global sample, from where the new ranks continue (nothing skipped or repeated).
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.start, self.read = rank, world, 0, 0

    def take(self, n: int) -> list[int]:
        out = [self.start + self.rank + (self.read + i) * self.world for i in range(n)]
        self.read += n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "read": self.read, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world"] != self.world:
            raise ValueError("state of another world size")
        self.start, self.read = int(state["start"]), int(state["read"])

    def reshard_state_dict(
        self, states: list[dict[str, Any]], *, rank: int, world_size: int
    ) -> dict[str, Any]:
        ends = {s["start"] + s["read"] * s["world"] for s in states}
        if len(ends) != 1:
            raise ValueError(f"the saved ranks were not in lockstep: {sorted(ends)}")
        return {"start": ends.pop(), "read": 0, "world": world_size}


class SumMetrics:
    """Per-rank sums; resharding merges them (rank 0 carries the totals, the others start at 0)."""

    def __init__(self) -> None:
        self.samples, self.total = 0, 0.0

    def update(self, n: int, value: float) -> None:
        self.samples += n
        self.total += value

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples, self.total = int(state["samples"]), float(state["total"])

    def reshard_state_dict(
        self, states: list[dict[str, Any]], *, rank: int, world_size: int
    ) -> dict[str, Any]:
        if rank != 0:
            return {"samples": 0, "total": 0.0}
        return {"samples": sum(s["samples"] for s in states),
                "total": sum(s["total"] for s in states)}  # fmt: skip


def make_loader(rank: int) -> Any:
    """A torchdata StatefulDataLoader: per-rank state, and no reshard hook."""
    import warnings

    warnings.filterwarnings("ignore", message=".*set_vital.*")
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(list(range(100 * rank, 100 * rank + 40)), batch_size=2)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
