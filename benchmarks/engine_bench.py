"""Checkpoint engine benchmark (issue 3). Run by hand: ``python benchmarks/engine_bench.py``.

Every figure is the median of N fresh processes (warm page cache), stated as a ratio against
baselines measured in the same run:

* copy limit: read the bytes from the page-cached file into preallocated, already-touched tensors;
* plain: ``torch.load`` of a single-file checkpoint, then ``load_state_dict``;
* DCP: ``get_state_dict`` / ``dcp.load`` / ``set_state_dict``.

Model: 16 x Linear(2048, 2048) = 67M float32 parameters (256 MiB) with AdamW state (512 MiB).
Pass ``--small`` for a quick run on a 4x smaller model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def build(width: int, layers: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def stepped_optimizer(model):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peak_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return peak_kib()


# ------------------------------------------------------------------------------ child measurements
def child(kind: str, work: str, width: int, layers: int) -> dict:
    import torch

    torch.set_num_threads(2)
    if kind == "import":
        t0 = time.perf_counter()
        from optimus_ckpt import Checkpointer, resolve_strategy

        assert Checkpointer is not None
        resolve_strategy("eval")  # first use reads the preset YAML
        return {"seconds": time.perf_counter() - t0}
    model = build(width, layers)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    full = kind.endswith("resume") or kind == "copy_all"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if full else None
    if full and kind in ("copy_all",):
        opt = stepped_optimizer(model)  # preallocated + touched destination for the copy limit
    # Imports happen before timing: their cost is measured separately ("import").
    import torch.distributed.checkpoint
    import torch.distributed.checkpoint.state_dict

    from optimus_ckpt.checkpointer import Checkpointer
    from optimus_ckpt.strategy import resolve_strategy

    resolve_strategy("eval")  # one-time costs (imports, preset YAML) are in the "import" figure

    base_rss = rss_kib()
    reset_peak()
    t0 = time.perf_counter()
    if kind in ("copy_model", "copy_all"):
        dests = list(model.state_dict().values())
        if kind == "copy_all":
            for st in opt.state.values():
                dests += [v for k, v in st.items() if k != "step"]
        with open(os.path.join(work, "raw.bin"), "rb", buffering=0) as f:
            for t in dests:
                f.readinto(memoryview(t.numpy()).cast("B"))
    elif kind == "plain_model":
        sd = torch.load(os.path.join(work, "model.pt"), weights_only=True)
        model.load_state_dict(sd)
    elif kind == "plain_resume":
        sd = torch.load(os.path.join(work, "full.pt"), weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
    elif kind == "dcp_resume":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(work, "dcp"), no_dist=True)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    elif kind in ("ours_model", "ours_resume", "ours_model_verify"):
        from optimus_ckpt import Checkpointer

        ck = Checkpointer(os.path.join(work, "ours"))
        if kind == "ours_resume":
            ck.load(None, "resume", model=model, optimizer=opt)
        else:
            ck.load(None, "eval", model=model, verify=kind.endswith("verify"))
    elif kind == "save_plain":
        opt = stepped_optimizer(model)
        reset_peak()
        t0 = time.perf_counter()
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict()},
            os.path.join(work, "save.pt"),
        )
    elif kind in ("save_ours", "save_ours_fsync"):
        from optimus_ckpt import Checkpointer

        opt = stepped_optimizer(model)
        target = os.path.join(work, "save_ours")
        shutil.rmtree(target, ignore_errors=True)
        reset_peak()
        t0 = time.perf_counter()
        Checkpointer(target, fsync=kind.endswith("fsync")).save(1, model=model, optimizer=opt)
    else:
        raise SystemExit(f"unknown kind {kind}")
    if full and not kind.startswith("save"):
        # Count until every tensor of the state has been written once, as the first step will.
        for st in opt.state.values():
            for k, v in st.items():
                if k != "step":
                    v.add_(0.0)
    seconds = time.perf_counter() - t0
    if full:
        state_bytes += sum(
            v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
        )
    # Private memory above the state: the peak growth during the load, less the state that did
    # not exist before it (a fresh optimizer's state has to be allocated by any method).
    new_state = 0
    if full and kind != "copy_all" and not kind.startswith("save"):
        new_state = state_bytes - sum(
            t.numel() * t.element_size() for t in model.state_dict().values()
        )
    extra = max(0, (hwm_kib() - base_rss) * 1024 - new_state)
    return {"seconds": seconds, "extra_bytes": extra, "state_bytes": state_bytes}


# ------------------------------------------------------------------------------ driver
def prepare(work: str, width: int, layers: int) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    sys.path.insert(0, os.path.dirname(HERE))
    from optimus_ckpt import Checkpointer

    model = build(width, layers)
    opt = stepped_optimizer(model)
    torch.save(model.state_dict(), os.path.join(work, "model.pt"))
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict()}, os.path.join(work, "full.pt")
    )
    with open(os.path.join(work, "raw.bin"), "wb") as f:
        for t in model.state_dict().values():
            f.write(t.numpy().tobytes())
        for st in opt.state.values():
            for k, v in st.items():
                if k != "step":
                    f.write(v.numpy().tobytes())
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(work, "dcp"), no_dist=True)
    Checkpointer(os.path.join(work, "ours")).save(1, model=model, optimizer=opt)


def run(kind: str, work: str, width: int, layers: int, reps: int) -> dict:
    results = []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--work", work, "--width", str(width), "--layers", str(layers)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--work")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.work, a.width, a.layers)))
        return
    if a.small:
        a.width, a.layers = 1024, 16
    work = tempfile.mkdtemp(prefix="optimus-bench-")
    try:
        prepare(work, a.width, a.layers)
        kinds = ["copy_model", "copy_all", "plain_model", "ours_model", "ours_model_verify",
                 "plain_resume", "dcp_resume", "ours_resume", "save_plain", "save_ours", "save_ours_fsync", "import"]  # fmt: skip
        r = {k: run(k, work, a.width, a.layers, a.reps) for k in kinds}
        mib = r["copy_model"]["state_bytes"] / 2**20
        print(f"model {mib:.0f} MiB float32; full state {r['copy_all']['state_bytes'] / 2**20:.0f} MiB; "
              f"median of {a.reps} fresh processes each\n")  # fmt: skip
        for k in kinds:
            print(
                f"  {k:18s} {r[k]['seconds']:.3f} s   peak private memory +{r[k].get('extra_bytes', 0) / 2**20:.0f} MiB"
            )
        m, f = r["ours_model"], r["ours_resume"]
        print("\nModel-only load (eval):")
        print(
            f"  vs copy limit:      {m['seconds'] / r['copy_model']['seconds']:.2f}x the time (goal <= 1.3x)"
        )
        print(
            f"  vs torch.load+lsd:  {r['plain_model']['seconds'] / m['seconds']:.1f}x faster (goal >= 8x)"
        )
        print(
            f"  memory above model: {100 * m['extra_bytes'] / m['state_bytes']:.1f}% (goal <= 5%)"
        )
        print(
            f"  verify=True costs   {r['ours_model_verify']['seconds'] / m['seconds']:.2f}x an unverified load"
        )
        print("Full resume:")
        print(
            f"  vs copy limit:      {f['seconds'] / r['copy_all']['seconds']:.2f}x the time (goal <= 3x)"
        )
        print(
            f"  vs plain resume:    {r['plain_resume']['seconds'] / f['seconds']:.1f}x faster (goal >= 3x)"
        )
        print(
            f"  vs DCP path:        {r['dcp_resume']['seconds'] / f['seconds']:.1f}x faster (goal >= 5x)"
        )
        print(
            f"  memory above state: {100 * f['extra_bytes'] / f['state_bytes']:.1f}% (goal <= 10%)"
        )
        print("Save:")
        print(
            f"  throughput vs torch.save: {r['save_plain']['seconds'] / r['save_ours']['seconds']:.2f}x (goal >= 0.8x)"
        )
        print(
            f"  with fsync (the default):  {r['save_plain']['seconds'] / r['save_ours_fsync']['seconds']:.2f}x"
            " (torch.save does not fsync)"
        )
        print(
            f"import optimus_ckpt + first preset lookup, after torch: "
            f"+{r['import']['seconds'] * 1000:.0f} ms (goal <= 100 ms)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
