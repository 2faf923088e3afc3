"""Installed-package tests: build a wheel, install it into a fresh virtual environment, and run a
Hydra app from another directory that never imports optimus_ckpt; the same with an editable
install. Slow (two fresh environments): deselect locally with ``-m "not install"``; CI runs them.

The package is installed from a copy of the working tree, so the tests can change the copy (to
prove the editable install reads the live source) without touching the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from plugin_support import EXPECTED_PRESETS, clean_env, ok, run_app, seen, write_app

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[1]
PIP = ["-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]


@dataclass
class Install:
    mode: str
    python: str
    site: Path  # the environment's site-packages
    package_dir: Path  # where optimus_ckpt must be imported from
    conf_dir: Path  # the preset folder Hydra must search


def sh(*cmd: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def copy_working_tree(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a fresh clone plus local edits hold."""
    try:
        listing = sh(
            "git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO
        )
        names = [n for n in listing.split("\0") if n]
    except (AssertionError, FileNotFoundError):  # not a git checkout: copy, skipping the usual
        names = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file() and not {".git", ".venv", "__pycache__", "dist", "build"} & set(p.parts)
        ]
    for name in names:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def make_venv(where: Path, *install_args: str | Path) -> str:
    sh(sys.executable, "-m", "venv", where)
    python = str(where / "bin" / "python")
    sh(python, *PIP, "-c", REPO / "constraints.txt", *install_args)
    return python


def site_packages(python: str) -> Path:
    return Path(
        sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    copy_working_tree(src)
    dist = base / "dist"
    sh(sys.executable, "-m", "build", "--wheel", "--outdir", dist, src)
    (wheel,) = dist.glob("optimus_ckpt-*.whl")
    return {"base": base, "src": src, "wheel": wheel}


@pytest.fixture(scope="module")
def installs(built: dict[str, Path]) -> dict[str, Install]:
    base, src, wheel = built["base"], built["src"], built["wheel"]
    # A fresh environment; pip installs the wheel and resolves its dependencies from its metadata.
    py_wheel = make_venv(base / "venv-wheel", wheel)
    # The editable environment starts as a hard-linked clone of that one with the package
    # uninstalled: the same dependencies, without installing torch a second time (~30 s).
    editable = base / "venv-editable"
    shutil.copytree(base / "venv-wheel", editable, symlinks=True, copy_function=os.link)
    py_editable = str(editable / "bin" / "python")
    sh(py_editable, "-m", "pip", "uninstall", "-q", "-y", "optimus-ckpt")
    assert "optimus" not in sh(py_editable, "-m", "pip", "list", "--disable-pip-version-check")
    sh(py_editable, *PIP, "-c", REPO / "constraints.txt", "-e", src)
    site = site_packages(py_wheel)
    return {
        "wheel": Install(
            "wheel", py_wheel, site, site / "optimus_ckpt", site / "optimus_ckpt" / "conf"
        ),
        "editable": Install(
            "editable", py_editable, site_packages(py_editable), src / "optimus_ckpt", src / "conf"
        ),
    }


@pytest.fixture(params=["wheel", "editable"])
def installed(request: pytest.FixtureRequest, installs: dict[str, Install]) -> Install:
    return installs[request.param]


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """An app in a directory unrelated to the repository."""
    return write_app(tmp_path / "somewhere" / "else")


def test_wheel_contents(built: dict[str, Path]) -> None:
    with zipfile.ZipFile(built["wheel"]) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta_name).decode()
        entry_points = zf.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    for preset in EXPECTED_PRESETS:
        assert f"optimus_ckpt/conf/load_strategy/{preset}.yaml" in names
    assert "optimus_ckpt/py.typed" in names
    assert "hydra_plugins/optimus_ckpt/optimus_ckpt_plugin.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package: never ship this
    for dep in ("torch", "hydra-core", "omegaconf"):
        assert re.search(rf"^Requires-Dist: {dep}\b", metadata, flags=re.M), dep
    assert (
        "[hydra.plugins]\noptimus_ckpt = hydra_plugins.optimus_ckpt.optimus_ckpt_plugin:OptimusCkptSearchPathPlugin"
        in (entry_points)
    )


def test_load_strategy_finetune_from_another_directory(installed: Install, elsewhere: Path) -> None:
    ok(run_app(elsewhere, "load_strategy=finetune", python=installed.python, build="none"))
    out = seen(elsewhere)
    node = dict(out["node"])
    assert node.pop("_target_") == "optimus_ckpt.LoadStrategy"
    assert node == EXPECTED_PRESETS["finetune"]
    assert out["at_start"] == {"optimus_ckpt": False, "torch": False}
    assert out["torch_in_task"] is False
    # Imported by Hydra's plugin scan, from the installation under test.
    assert Path(out["optimus_ckpt_file"]).parent == installed.package_dir


def test_instantiate_and_multirun_in_the_installed_package(
    installed: Install, elsewhere: Path
) -> None:
    ok(run_app(elsewhere, "-m", "load_strategy=eval,scratch", python=installed.python))
    for job, preset in (("0", "eval"), ("1", "scratch")):
        out = seen(elsewhere, job)
        assert (out["choice"], out["type"]) == (preset, "LoadStrategy")
        assert out["strategy"] == EXPECTED_PRESETS[preset]


def test_info_searchpath_shows_our_path(installed: Install, elsewhere: Path) -> None:
    proc = ok(run_app(elsewhere, "--info", "searchpath", python=installed.python))
    row = re.search(r"\| optimus_ckpt +\| (\S+) +\|", proc.stdout)
    assert row, proc.stdout
    assert row.group(1) == f"file://{installed.conf_dir}"
    assert Path(installed.conf_dir, "load_strategy", "finetune.yaml").is_file()


def test_python_api_of_the_installed_package(installed: Install, tmp_path: Path) -> None:
    code = (
        "import optimus_ckpt, sys\n"
        "print(sorted(optimus_ckpt.PRESETS))\n"
        "print(optimus_ckpt.resolve_strategy('finetune').strict)\n"
        "print('torch' in sys.modules)\n"
    )
    out = sh(installed.python, "-c", code, cwd=tmp_path).splitlines()
    assert out == [str(sorted(EXPECTED_PRESETS)), "False", "False"]


def test_editable_install_reads_the_live_source(
    installs: dict[str, Install], built: dict[str, Path], elsewhere: Path
) -> None:
    live = built["src"] / "conf" / "load_strategy" / "live.yaml"
    live.write_text(
        "defaults:\n  - /optimus_ckpt/schema/load_strategy@_here_\n  - _self_\n\n"
        "load_optimizer: false\nload_scheduler: false\n"
    )
    try:
        ok(run_app(elsewhere, "load_strategy=live", python=installs["editable"].python))
        assert seen(elsewhere)["strategy"] == EXPECTED_PRESETS["reset_optimizer"]
        presets = sh(
            installs["editable"].python,
            "-c",
            "import optimus_ckpt; print(sorted(optimus_ckpt.PRESETS))",
            cwd=elsewhere,  # not the repository, whose optimus_ckpt `python -c` would import
        )
        assert "'live'" in presets
        # The wheel is a snapshot: it does not see the new file.
        wheel_presets = sh(
            installs["wheel"].python,
            "-c",
            "import optimus_ckpt; print(sorted(optimus_ckpt.PRESETS))",
            cwd=elsewhere,  # not the repository, whose optimus_ckpt `python -c` would import
        )
        assert "'live'" not in wheel_presets
    finally:
        live.unlink()


def test_hydra_1_4_finds_the_plugin(built: dict[str, Path], tmp_path: Path) -> None:
    """Hydra 1.4 (entry points as well as the namespace scan) with omegaconf 2.4: the presets,
    the schema and the resolver work, with no deprecation warning of ours at start-up."""
    venv = tmp_path / "venv-hydra14"
    sh(sys.executable, "-m", "venv", venv)
    python = str(venv / "bin" / "python")
    sh(python, *PIP, "--pre", "hydra-core==1.4.0rc3")  # pulls the matching omegaconf 2.4
    sh(python, *PIP, "--no-deps", built["wheel"])  # no torch needed to compose configs
    versions = sh(
        python, "-c", "import hydra, omegaconf; print(hydra.__version__, omegaconf.__version__)"
    )
    assert versions.startswith("1.4."), versions
    app = write_app(tmp_path / "app")
    proc = ok(run_app(app, "load_strategy=finetune", python=python, build="none"))
    node = dict(seen(app)["node"])
    assert node.pop("_target_") == "optimus_ckpt.LoadStrategy"
    assert node == EXPECTED_PRESETS["finetune"]
    assert "optimus_ckpt" not in proc.stderr  # no warning of ours
    ok(run_app(app, "-m", "load_strategy=eval,scratch", python=python))
    for job, preset in (("0", "eval"), ("1", "scratch")):
        assert seen(app, job)["strategy"] == EXPECTED_PRESETS[preset]
