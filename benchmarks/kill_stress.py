"""Kill -9 stress test (issue 6), run by hand: ``python benchmarks/kill_stress.py --trials 500``.

The same trials as tests/test_reliability_kill.py, many more of them: a worker saving step after
step (model, AdamW state, a dataloader's position) is SIGKILLed after a random delay; after every
kill the directory is checked (no committed checkpoint lost or changed, every checkpoint loads
with verify=True and holds exactly its step's state, latest() is the newest complete one, the
next save removes the leftovers). ``--crash-points`` also crashes one save at each of its
file-system operations in turn. Prints trials run and survived.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from reliability_support import (  # noqa: E402
    History,
    KillStats,
    Zygote,
    crash_points,
    kill_trial,
    save_step,
)


def run_kills(trials: int, max_delay: float, seed: int, keep: bool = False) -> KillStats:
    """Run ``trials`` kill trials; returns the counts (a failed trial is recorded, not raised)."""
    stats = KillStats()
    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="optimus_kill_")
    z = Zygote(os.path.join(work, "zygote.err"))
    try:
        hist = History(os.path.join(work, "ckpts"))
        os.makedirs(hist.directory)
        for trial in range(trials):
            stats.trials += 1
            try:
                stats.interrupted_saves += kill_trial(z, hist, rng, max_delay)
                stats.survived += 1
            except AssertionError as e:
                stats.errors.append(f"trial {trial}: {e}")
                hist = History(os.path.join(work, f"ckpts_after_{trial}"))  # start clean
                os.makedirs(hist.directory)
            if (trial + 1) % 50 == 0:
                print(f"  ... {trial + 1} trials, {stats.survived} survived", flush=True)
        stats.checkpoints_checked = hist.new_checked
    finally:
        z.close()
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return stats


def run_crash_points() -> tuple[int, int]:
    """Crash one save at each of its file-system operations; returns (points, survived)."""
    from optimus_ckpt import Checkpointer

    work = tempfile.mkdtemp(prefix="optimus_crash_")
    z = Zygote(os.path.join(work, "zygote.err"))
    try:
        directory = os.path.join(work, "ckpts")
        ckpt = Checkpointer(directory, keep_last=3)
        for step in (1, 2, 3):
            save_step(ckpt, step)
        hist = History(directory)
        hist.check()
        points = crash_points(z, hist)
        return points, points  # crash_points raises on the first failure
    finally:
        z.close()


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--max-delay", type=float, default=0.3, help="seconds before the kill")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--crash-points", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    stats = run_kills(args.trials, args.max_delay, args.seed, args.keep)
    print(
        f"kill trials: {stats.trials} run, {stats.survived} survived "
        f"({stats.interrupted_saves} killed mid-save, leaving an unfinished save behind); "
        f"{stats.checkpoints_checked} committed checkpoints verified value by value; "
        f"seed {args.seed}; {time.perf_counter() - start:.0f} s"
    )
    for e in stats.errors[:10]:
        print("  FAILED", e)
    if args.crash_points:
        points, ok = run_crash_points()
        print(f"crash points: {points} file-system operations of a save, {ok} survived")
    sys.exit(1 if stats.errors else 0)


if __name__ == "__main__":
    main()
