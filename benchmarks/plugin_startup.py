"""Start-up cost that optimus_ckpt's Hydra plugin adds to a small Hydra app.

Hydra imports every installed plugin at the start of every app, so whatever our plugin costs, every
Hydra app in the environment pays. This builds two virtual environments that differ only in
optimus_ckpt (the "with" one is a hard-linked clone of the "without" one plus the wheel), runs the
same small app in each, interleaved, and prints the median wall time of each, the difference and
the ratio. Goal: under 30 ms.

    python benchmarks/plugin_startup.py [--runs 15] [--workdir DIR]

The wheel is installed with --no-deps: the plugin must not need torch (it never imports it), so
torch is left out of both environments; were the plugin to import torch, the "with" runs would fail.
Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]

APP = """\
import hydra


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    assert cfg.lr == 0.1


if __name__ == "__main__":
    main()
"""
CONFIG = "lr: 0.1\nepochs: 3\n"


def sh(*cmd: object, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def build_envs(work: Path) -> tuple[str, str]:
    dist = work / "dist"
    print("building the wheel ...", flush=True)
    sh(sys.executable, "-m", "build", "--wheel", "--outdir", dist, REPO)
    (wheel,) = dist.glob("optimus_ckpt-*.whl")
    without, with_ = work / "venv-without", work / "venv-with"
    print("creating the environments ...", flush=True)
    sh(sys.executable, "-m", "venv", without)
    sh(
        without / "bin" / "python",
        *PIP,
        "-c",
        REPO / "constraints.txt",
        "hydra-core",
        "omegaconf",
    )
    shutil.copytree(without, with_, symlinks=True, copy_function=os.link)
    sh(with_ / "bin" / "python", *PIP, "--no-deps", wheel)
    return str(without / "bin" / "python"), str(with_ / "bin" / "python")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(python: str, app_dir: Path) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one run of the app, in seconds."""
    cpu0, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(
        [python, "app.py", f"hydra.run.dir={app_dir / 'outputs'}"],
        cwd=app_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if proc.returncode != 0:
        sys.exit(f"the app failed under {python}:\n{proc.stderr}")
    return elapsed, cpu


def plugin_import_ms(python: str, cwd: Path) -> float:
    """Cumulative import time of the plugin module, from ``python -X importtime``, with hydra
    and omegaconf already imported (as they are when Hydra scans its plugins)."""
    code = (
        "import hydra.core.config_store, hydra.plugins.search_path_plugin, omegaconf;"
        "import hydra_plugins.optimus_ckpt.optimus_ckpt_plugin"
    )
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", code], cwd=cwd, capture_output=True, text=True
    )
    for line in proc.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "hydra_plugins.optimus_ckpt.optimus_ckpt_plugin":
            return int(parts[1]) / 1000
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per environment (>= 5)")
    parser.add_argument("--workdir", type=Path, help="keep the environments here (reused)")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="optimus-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if (work / "venv-with" / "bin" / "python").exists():
            without = str(work / "venv-without" / "bin" / "python")
            with_ = str(work / "venv-with" / "bin" / "python")
        else:
            without, with_ = build_envs(work)
        app = work / "app"
        (app / "conf").mkdir(parents=True, exist_ok=True)
        (app / "app.py").write_text(APP)
        (app / "conf" / "config.yaml").write_text(CONFIG)

        # Proof that the plugin is active in one and absent from the other.
        info_with = sh(with_, "app.py", "--info", "searchpath", cwd=app)
        info_without = sh(without, "app.py", "--info", "searchpath", cwd=app)
        assert "optimus_ckpt" in info_with and "optimus_ckpt" not in info_without

        for _ in range(3):  # warm-up: byte-compile, fill the page cache
            run_once(without, app)
            run_once(with_, app)
        wall: dict[str, list[float]] = {"without": [], "with": []}
        cpu: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            for name, python in (("without", without), ("with", with_)):
                w, c = run_once(python, app)
                wall[name].append(w * 1000)
                cpu[name].append(c * 1000)

        print(f"python {sys.version.split()[0]}, {args.runs} runs each, medians:")
        print("                          wall ms    cpu ms (user+sys)")
        for name in ("without", "with"):
            print(
                f"  {name + ' optimus_ckpt:':22s} {statistics.median(wall[name]):8.1f}  "
                f"{statistics.median(cpu[name]):8.1f}"
            )
        diff = statistics.median(wall["with"]) - statistics.median(wall["without"])
        cpu_diff = statistics.median(cpu["with"]) - statistics.median(cpu["without"])
        ratio = statistics.median(wall["with"]) / statistics.median(wall["without"])
        cpu_ratio = statistics.median(cpu["with"]) / statistics.median(cpu["without"])
        print(f"  {'difference:':22s} {diff:+8.1f}  {cpu_diff:+8.1f}")
        print(f"  {'ratio:':22s} {ratio:8.3f}  {cpu_ratio:8.3f}")
        print(f"  plugin import alone (-X importtime): {plugin_import_ms(with_, app):.1f} ms")
        print(f"  goal: under 30 ms -> {'met' if diff < 30 else 'NOT met'}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
