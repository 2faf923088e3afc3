"""Plot an uninterrupted run's loss curve against a run that was interrupted and resumed.

    python examples/plot.py runs/demo/straight/loss.csv runs/demo/resumed/loss.csv \\
        --out runs/demo/resume_vs_straight.png --require-identical

Reads the ``loss.csv`` files that examples/train.py writes (step, loss, lr, attempt). The top
panel overlays the two curves and marks where the resumed run restarted; the bottom panel shows
the per-step difference (all zero when resuming is exact). Prints a one-line verdict; with
``--require-identical`` exits 1 unless both runs logged the same steps with bit-identical losses.
"""

from __future__ import annotations

import argparse
import csv
import sys


def read_curve(path: str) -> list[tuple[int, float, int]]:
    """(step, loss, attempt) rows of a loss.csv."""
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"]), int(r["attempt"])) for r in csv.DictReader(f)]


def compare(
    reference: list[tuple[int, float, int]], resumed: list[tuple[int, float, int]]
) -> tuple[bool, str]:
    ref = {s: loss for s, loss, _ in reference}
    res = {s: loss for s, loss, _ in resumed}
    if not ref or not res:
        return False, "a curve is empty"
    if sorted(ref) != sorted(res):
        return False, f"different steps: {len(ref)} in the reference, {len(res)} resumed"
    diffs = [s for s in sorted(ref) if ref[s] != res[s]]
    if diffs:
        worst = max(abs(ref[s] - res[s]) for s in diffs)
        return False, (
            f"{len(diffs)} of {len(ref)} steps differ, first at step {diffs[0]}, "
            f"max |difference| {worst:.3g}"
        )
    return True, f"identical: all {len(ref)} steps have bit-identical losses"


def plot(
    reference: list[tuple[int, float, int]],
    resumed: list[tuple[int, float, int]],
    out: str,
    labels: tuple[str, str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot(
        [s for s, _, _ in reference],
        [v for _, v, _ in reference],
        lw=3,
        alpha=0.4,
        color="tab:blue",
        label=labels[0],
    )
    attempts = sorted({a for _, _, a in resumed})
    colors = ["tab:orange", "tab:red", "tab:purple", "tab:green", "tab:brown"]
    for i, attempt in enumerate(attempts):
        rows = [(s, v) for s, v, a in resumed if a == attempt]
        name = labels[1] if len(attempts) == 1 else f"{labels[1]} (process {attempt + 1})"
        top.plot(
            [s for s, _ in rows],
            [v for _, v in rows],
            ls="--",
            lw=1.2,
            color=colors[i % len(colors)],
            label=name,
        )
        if i > 0:
            top.axvline(rows[0][0] - 0.5, color="gray", ls=":", lw=1)
            top.annotate(
                f"resumed after step {rows[0][0] - 1}",
                (rows[0][0], top.get_ylim()[1]),
                va="top",
                fontsize=8,
                color="gray",
            )
    top.set_ylabel("training loss")
    top.set_title("Uninterrupted vs. interrupted-and-resumed training")
    top.legend()
    ref = {s: v for s, v, _ in reference}
    steps = [s for s, _, _ in resumed if s in ref]
    bottom.plot(steps, [v - ref[s] for s, v, _ in resumed if s in ref], color="black", lw=1)
    bottom.set_ylabel("resumed - straight")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="loss.csv of the uninterrupted run")
    parser.add_argument("resumed", help="loss.csv of the interrupted and resumed run")
    parser.add_argument("--out", default="resume_vs_straight.png", help="PNG to write")
    parser.add_argument("--labels", nargs=2, default=["uninterrupted", "interrupted + resumed"])
    parser.add_argument(
        "--require-identical",
        action="store_true",
        help="exit 1 unless every step's loss is bit-identical",
    )
    args = parser.parse_args(argv)
    reference, resumed = read_curve(args.reference), read_curve(args.resumed)
    same, verdict = compare(reference, resumed)
    plot(reference, resumed, args.out, tuple(args.labels))
    print(f"loss curves {verdict}")
    print(f"plot: {args.out}")
    return 0 if same or not args.require_identical else 1


if __name__ == "__main__":
    sys.exit(main())
