"""Distributed checkpoint benchmark (issue 5). Run by hand, on CPU with gloo:

    python benchmarks/distributed_bench.py            # starts 2 processes with torchrun
    python benchmarks/distributed_bench.py --small    # a 4x smaller model, for a quick look

Model: 16 x Linear(2048, 2048) = 67M float32 parameters (256 MiB) sharded with FSDP2
(``fully_shard``) over 2 processes, with AdamW state (512 MiB): 768 MiB of state, 384 MiB per rank.
Each figure is the median of ``--repeats`` rounds, all in the same processes, as wall time until
the slowest rank is done (a barrier before and after), warm page cache for loads:

* **save**: ``Checkpointer.save`` vs ``torch.distributed.checkpoint.save`` of
  ``get_state_dict(model, optimizer)`` with the same ``FileSystemWriter`` settings
  (one file per rank, fsync, 2 writer threads);
* **load** (full resume into a fresh model and a fresh optimizer): ``Checkpointer.load`` vs
  ``get_state_dict`` / ``dcp.load`` / ``set_state_dict`` (the DCP path, which initialises the
  optimizer state first);
* **async save**: the time ``save(..., blocking=False)`` blocks the training loop, as a fraction
  of a blocking save (goal: at most 20%), the first one (snapshot buffers allocated) and the
  steady state (buffers reused), plus the time until the background save has committed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", action="store_true", help="4x smaller model")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    return p.parse_args(argv)


def build(width: int, layers: int) -> Any:
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def step(model: Any, opt: Any, width: int) -> None:
    import torch

    x = torch.randn(4, width)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from optimus_ckpt import Checkpointer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    width, layers = (1024, 16) if args.small else (2048, 16)
    root = args.dir
    model = build(width, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step(model, opt, width)
    state_mib = 3 * sum(p.numel() * 4 for p in model.parameters()) / 2**20

    def fresh() -> tuple[Any, Any]:
        m = build(width, layers)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    res: dict[str, list[float]] = {k: [] for k in (
        "ours_save", "dcp_save", "ours_load", "dcp_load", "sync_save", "async_block_first",
        "async_block", "async_total",
    )}  # fmt: skip

    def save_and_load(ours: str, plain: str) -> None:
        ckpt = Checkpointer(ours)
        res["ours_save"].append(timed(lambda: ckpt.save(1, model=model, optimizer=opt)))

        def dcp_save() -> None:
            msd, osd = get_state_dict(model, opt)
            writer = FileSystemWriter(plain, single_file_per_rank=True, sync_files=True,
                                      thread_count=2)  # fmt: skip
            dcp.save({"model": msd, "optim": osd}, storage_writer=writer)

        res["dcp_save"].append(timed(dcp_save))
        m2, o2 = fresh()
        res["ours_load"].append(timed(lambda: ckpt.load(model=m2, optimizer=o2)))
        m3, o3 = fresh()

        def dcp_load() -> None:
            msd, osd = get_state_dict(m3, o3)
            dcp.load({"model": msd, "optim": osd}, storage_reader=FileSystemReader(plain))
            set_state_dict(m3, o3, model_state_dict=msd, optim_state_dict=osd)

        res["dcp_load"].append(timed(dcp_load))
        for a, b in zip(m2.state_dict().values(), m3.state_dict().values()):
            assert torch.equal(a.to_local(), b.to_local())  # both loads restored the same state

    for r in range(args.repeats):
        ours, plain = os.path.join(root, f"ours{r}"), os.path.join(root, f"dcp{r}")
        save_and_load(ours, plain)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ours, ignore_errors=True)
            shutil.rmtree(plain, ignore_errors=True)

    # Async: a training loop that saves every few steps; blocked time vs a blocking save.
    ckpt_sync = Checkpointer(os.path.join(root, "sync"))
    ckpt_async = Checkpointer(os.path.join(root, "async"), async_save=True)
    for r in range(args.repeats + 1):
        if rank == 0:  # delete the previous round's checkpoints outside the timed regions
            for c in (ckpt_sync, ckpt_async):
                for _s, path in c.checkpoints():
                    shutil.rmtree(path)
        step(model, opt, width)
        t = timed(lambda: ckpt_sync.save(r, model=model, optimizer=opt))  # noqa: B023
        res["sync_save"].append(t)
        step(model, opt, width)
        dist.barrier()
        t0 = time.perf_counter()
        ckpt_async.save(r, model=model, optimizer=opt)
        blocked = time.perf_counter() - t0
        step(model, opt, width)  # training goes on while the save is written
        ckpt_async.wait()
        dist.barrier()
        total = time.perf_counter() - t0
        res["async_block_first" if r == 0 else "async_block"].append(blocked)
        if r:
            res["async_total"].append(total)
    res["sync_save"] = res["sync_save"][1:]

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if rank == 0:
        # Per figure: the slowest rank's time in each round, then the median over rounds.
        med = {k: statistics.median(max(g[k][i] for g in gathered) for i in range(len(res[k])))
               for k in res}  # fmt: skip
        world = dist.get_world_size()
        print(f"\n{world} processes, FSDP2 model {width}x{width}x{layers}: "
              f"{state_mib:.0f} MiB of model + AdamW state ({state_mib / world:.0f} MiB per rank), "
              f"median of {args.repeats}\n")  # fmt: skip
        rows = [
            ("sharded save", med["ours_save"], med["dcp_save"]),
            ("sharded load (full resume)", med["ours_load"], med["dcp_load"]),
        ]
        print(f"{'':28} {'optimus_ckpt':>13} {'DCP direct':>11} {'ratio':>7}")
        for name, a, b in rows:
            print(f"{name:28} {a:12.3f}s {b:10.3f}s {b / a:6.2f}x")
        print(f"  throughput: save {state_mib / med['ours_save']:.0f} MiB/s "
              f"(DCP {state_mib / med['dcp_save']:.0f}), load {state_mib / med['ours_load']:.0f} "
              f"MiB/s (DCP {state_mib / med['dcp_load']:.0f})")  # fmt: skip
        sync = med["sync_save"]
        print(f"\nasync save: training blocked {med['async_block']:.3f}s per save = "
              f"{100 * med['async_block'] / sync:.1f}% of a blocking save ({sync:.3f}s); "
              f"goal <= 20%")  # fmt: skip
        print(f"  first async save (allocates its snapshot buffers): {med['async_block_first']:.3f}s"
              f" = {100 * med['async_block_first'] / sync:.1f}%")  # fmt: skip
        print(f"  save() to committed, with a training step meanwhile: {med['async_total']:.3f}s")
    ckpt_async.wait()
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    args = _args(argv)
    if "RANK" in os.environ:  # a torchrun worker
        worker(args)
        return 0
    root = args.dir or tempfile.mkdtemp(prefix="optimus-dist-bench-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "--master_port=29561", os.path.abspath(__file__), *argv, "--dir", root]  # fmt: skip
    try:
        return subprocess.call(cmd, env=env)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
