"""Reliability figures for the closing note (issue 6), run by hand:
``python benchmarks/verify_cost.py`` (``--quick`` for a smaller run).

1. **Cost of checking** on a model-only load (eval) of 16 x Linear(2048, 2048) = 67M float32
   parameters (256 MiB), warm page cache, each figure the median of fresh processes:

   * ``unchecked``: the load with the structure checks switched off (no stat of the listed files,
     no manifest checksum), the baseline;
   * ``structure``: the default load (every listed file present with its size, the manifest's
     own CRC-32): always on; goal under 5% above the baseline;
   * ``verify``: ``verify=True``, the CRC-32 of every chunk the load reads, before anything is
     touched (one extra pass over the bytes).

   The structure checks are also timed on their own, in process (many repetitions).
2. **Corruptions tried and detected**: byte flips at random places in every file of a checkpoint,
   truncations, deleted files, garbage and truncated manifests. Each is loaded with verify=True:
   *detected* (a named check refused it), *harmless* (the byte is one no load reads, e.g. DCP's
   zip headers or its ``.metadata``; the loaded state is bit-identical) or *silently wrong*
   (must be 0). Also counted: how many the always-on structure checks catch without verify.
3. **Kill trials run and survived** (benchmarks/kill_stress.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


# ------------------------------------------------------------------------------ 1. cost
def build_big(width: int, layers: int) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def unchecked() -> None:
    """Switch the structure checks off (for the baseline only)."""
    from optimus_ckpt import manifest, sources

    sources.FileView.check_structure = lambda self: None  # type: ignore[method-assign]
    manifest._checksum_ok = lambda raw, data: None


def child(kind: str, path: str, width: int, layers: int) -> None:
    import torch

    from optimus_ckpt import Checkpointer

    torch.set_num_threads(1)
    model = build_big(width, layers)
    for p in model.parameters():  # touched: the load writes into resident memory
        p.data.zero_()
    if kind == "unchecked":
        unchecked()
    ckpt = Checkpointer(os.path.dirname(path))
    start = time.perf_counter()
    ckpt.load(path, "eval", model=model, verify=(kind == "verify"))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds}))


def measure_cost(work: str, width: int, layers: int, reps: int) -> dict[str, Any]:
    import torch

    from optimus_ckpt import Checkpointer
    from optimus_ckpt.sources import native_view

    model = build_big(width, layers)
    path = Checkpointer(os.path.join(work, "big")).save(1, model=model)
    del model
    times: dict[str, list[float]] = {"unchecked": [], "structure": [], "verify": []}
    for _ in range(reps):
        for kind in times:  # interleaved, so drift hits all three alike
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, path, str(width), str(layers)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            times[kind].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}

    # the same three, in one process, interleaved many times (less noise than fresh processes)
    from optimus_ckpt import manifest as manifest_mod
    from optimus_ckpt import sources

    model = build_big(width, layers)
    ckpt = Checkpointer(os.path.dirname(path))
    inproc: dict[str, list[float]] = {"unchecked": [], "structure": [], "verify": []}
    checks = (sources.FileView.check_structure, manifest_mod._checksum_ok)
    for _ in range(reps * 3):
        for kind in inproc:
            if kind == "unchecked":
                unchecked()
            start = time.perf_counter()
            ckpt.load(path, "eval", model=model, verify=(kind == "verify"))
            inproc[kind].append(time.perf_counter() - start)
            sources.FileView.check_structure, manifest_mod._checksum_ok = checks  # type: ignore[method-assign]
    med_in = {k: statistics.median(v) for k, v in inproc.items()}
    del model

    # the structure checks on their own: parse + crc of the manifest, stat of every file
    view = native_view(path)
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        view.check_structure()
    stat_s = (time.perf_counter() - start) / n
    raw = open(os.path.join(path, "optimus.json"), "rb").read()  # noqa: SIM115
    from optimus_ckpt.manifest import _checksum_ok

    data = json.loads(raw)
    start = time.perf_counter()
    for _ in range(n):
        _checksum_ok(raw, data)
    crc_s = (time.perf_counter() - start) / n
    nbytes = sum(p.numel() * 4 for p in build_big(width, layers).parameters())
    del torch
    return {
        "model_bytes": nbytes,
        "median_seconds": med,
        "runs": times,
        "structure_overhead": med["structure"] / med["unchecked"] - 1,
        "verify_ratio": med["verify"] / med["structure"],
        "in_process_median_seconds": med_in,
        "in_process_structure_overhead": med_in["structure"] / med_in["unchecked"] - 1,
        "in_process_verify_ratio": med_in["verify"] / med_in["structure"],
        "checks_in_process_seconds": stat_s + crc_s,
        "checks_fraction_of_load": (stat_s + crc_s) / med["structure"],
    }


# ------------------------------------------------------------------------------ 2. corruption
def corruption_sweep(work: str, flips: int, seed: int) -> dict[str, Any]:
    from reliability_support import build, check_loaded, save_step

    from optimus_ckpt import (
        CheckpointCorruptError,
        Checkpointer,
        CheckpointNotFoundError,
        UnsafeCheckpointError,
    )

    refused = (CheckpointCorruptError, CheckpointNotFoundError, UnsafeCheckpointError)
    from optimus_ckpt.layout import step_dir_name

    rng = random.Random(seed)
    base = os.path.join(work, "small")
    save_step(Checkpointer(base), 3)
    src = os.path.join(base, step_dir_name(3))
    files = sorted(os.listdir(src))

    def flip(path: str, at: int) -> None:
        with open(path, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))

    cases: list[tuple[str, Any]] = []
    for i in range(flips):
        name = files[i % len(files)]
        cases.append((f"flip {name}", lambda p, n=name: flip(os.path.join(p, n),
                      rng.randrange(os.path.getsize(os.path.join(p, n))))))  # fmt: skip
    for name in files:
        for _ in range(5):
            cases.append((f"truncate {name}", lambda p, n=name: os.truncate(
                os.path.join(p, n), rng.randrange(os.path.getsize(os.path.join(p, n))))))  # fmt: skip
        cases.append((f"delete {name}", lambda p, n=name: os.remove(os.path.join(p, n))))

    def garbage(p: str) -> None:
        with open(os.path.join(p, "optimus.json"), "wb") as f:
            f.write(os.urandom(4096))

    cases.append(("garbage manifest", garbage))

    counts: dict[str, dict[str, int]] = {}
    structure_caught = 0
    wrong: list[str] = []
    for i, (label, corrupt) in enumerate(cases):
        kind = label.split()[0] + " " + (label.split()[1] if len(label.split()) > 1 else "")
        c = counts.setdefault(kind, {"tried": 0, "detected": 0, "harmless": 0, "wrong": 0})
        c["tried"] += 1
        copy = os.path.join(work, f"c{i}", step_dir_name(3))
        shutil.copytree(src, copy)
        corrupt(copy)
        ckpt = Checkpointer(os.path.dirname(copy))
        try:  # without verify: what the always-on checks catch
            m, o, lo = build()
            ckpt.load(copy, model=m, optimizer=o, dataloaders={"train": lo}, verify=False)
        except refused:
            structure_caught += 1
        except Exception as e:  # any other error type is a finding too
            wrong.append(f"{label}: unclear error without verify: {type(e).__name__}: {e}")
        try:
            m, o, lo = build()
            ckpt.load(copy, model=m, optimizer=o, dataloaders={"train": lo}, verify=True)
        except refused:
            c["detected"] += 1
        except Exception as e:
            c["wrong"] += 1
            wrong.append(f"{label}: unclear error: {type(e).__name__}: {e}")
        else:
            try:
                check_loaded(3, m, o, lo)
                c["harmless"] += 1
            except AssertionError as e:
                c["wrong"] += 1
                wrong.append(f"{label}: SILENTLY WRONG: {e}")
        shutil.rmtree(os.path.dirname(copy))
    total = {k: sum(c[k] for c in counts.values()) for k in ("tried", "detected", "harmless",
                                                             "wrong")}  # fmt: skip
    return {"by_kind": counts, "total": total, "caught_without_verify": structure_caught,
            "problems": wrong}  # fmt: skip


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description="reliability figures (issue 6)")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "PATH", "WIDTH", "LAYERS"))
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer runs")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--flips", type=int, default=300)
    ap.add_argument("--kill-trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the figures as JSON here")
    args = ap.parse_args()
    if args.child:
        kind, path, width, layers = args.child
        child(kind, path, int(width), int(layers))
        return
    width, layers = (1024, 16) if args.quick else (2048, 16)
    reps = 3 if args.quick else args.reps
    work = tempfile.mkdtemp(prefix="optimus_verify_cost_")
    try:
        cost = measure_cost(work, width, layers, reps)
        med = cost["median_seconds"]
        print(f"model-only load of {cost['model_bytes'] / 2**20:.0f} MiB, median of {reps} "
              "fresh processes:")  # fmt: skip
        print(f"  structure checks off : {med['unchecked']:.4f} s (baseline)")
        print(f"  structure checks on  : {med['structure']:.4f} s "
              f"({cost['structure_overhead'] * 100:+.1f}%; the checks alone take "
              f"{cost['checks_in_process_seconds'] * 1e3:.2f} ms = "
              f"{cost['checks_fraction_of_load'] * 100:.2f}% of the load)")  # fmt: skip
        print(
            f"  verify=True          : {med['verify']:.4f} s "
            f"({cost['verify_ratio']:.2f}x the default load)"
        )
        mi = cost["in_process_median_seconds"]
        print(f"  in one process, interleaved, median of {3 * reps}: off {mi['unchecked']:.4f} s, "
              f"on {mi['structure']:.4f} s ({cost['in_process_structure_overhead'] * 100:+.1f}%), "
              f"verify {mi['verify']:.4f} s ({cost['in_process_verify_ratio']:.2f}x)")  # fmt: skip
        sweep = corruption_sweep(work, args.flips, args.seed)
        t = sweep["total"]
        print(
            f"corruptions: {t['tried']} tried, {t['detected']} detected, {t['harmless']} "
            f"harmless (bytes no load reads; state bit-identical), {t['wrong']} silently "
            f"wrong; {sweep['caught_without_verify']} caught by the always-on checks alone"
        )
        for kind, c in sorted(sweep["by_kind"].items()):
            print(
                f"  {kind:28s} {c['tried']:4d} tried {c['detected']:4d} detected "
                f"{c['harmless']:4d} harmless {c['wrong']:3d} wrong"
            )
        for p in sweep["problems"][:10]:
            print("  PROBLEM", p)
        from kill_stress import run_kills

        kills = run_kills(args.kill_trials, 0.3, args.seed)
        print(f"kill trials: {kills.trials} run, {kills.survived} survived "
              f"({kills.interrupted_saves} killed mid-save); "
              f"{kills.checkpoints_checked} checkpoints verified")  # fmt: skip
        for e in kills.errors[:5]:
            print("  FAILED", e)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"cost": cost, "corruption": sweep,
                           "kills": kills.__dict__}, f, indent=1, default=str)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
