"""Command-line tests: a small Hydra app, written into tmp_path and run in a subprocess with
cwd=tmp_path, that never imports optimus_ckpt itself. The plugin alone makes
``load_strategy=<preset>`` work; the app writes what it saw as JSON into its output directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_support import (
    APP_CONFIG,
    APP_PY,
    ERRORS,
    EXPECTED_PRESETS,
    failed,
    make_checkpoint,
    ok,
    run_app,
    seen,
    write_app,
)

from optimus_ckpt.strategy import conf_dir


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return write_app(tmp_path)


def test_default_and_the_app_never_imported_optimus_ckpt_or_torch(app: Path) -> None:
    ok(run_app(app))
    out = seen(app)
    assert out["at_start"] == {"optimus_ckpt": False, "torch": False}
    assert out["choice"] == "resume"
    assert out["strategy"] == EXPECTED_PRESETS["resume"]
    assert out["type"] == "LoadStrategy"
    assert out["load_from"] is None  # no checkpoints yet: null, not an error


def test_plugin_scan_does_not_import_torch(app: Path) -> None:
    ok(run_app(app, "load_strategy=finetune", build="none"))
    out = seen(app)
    # Hydra's scan imported the plugin (and with it optimus_ckpt) ...
    assert out["optimus_ckpt_file"] is not None
    # ... but torch was not imported by the time the task function ran.
    assert out["torch_in_task"] is False


def test_importing_the_plugin_module_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import hydra_plugins.optimus_ckpt.optimus_ckpt_plugin as p\n"
        "import optimus_ckpt\n"
        "optimus_ckpt.PRESETS['finetune']; optimus_ckpt.resolve_strategy('eval')\n"
        "assert p.OptimusCkptSearchPathPlugin\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_hydra_1_4_entry_point_alone_registers_everything(tmp_path: Path) -> None:
    # Hydra 1.4 loads the `hydra.plugins` entry point, which must name a concrete plugin class
    # (it warns and skips anything else); loading it imports our module, which registers.
    code = (
        "import importlib.metadata as md, inspect, sys\n"
        "from hydra.core.config_store import ConfigStore\n"
        "from hydra.plugins.search_path_plugin import SearchPathPlugin\n"
        "from omegaconf import OmegaConf\n"
        "eps = [e for e in md.entry_points(group='hydra.plugins') if e.name == 'optimus_ckpt']\n"
        "assert len(eps) == 1, eps\n"
        "cls = eps[0].load()\n"
        "assert isinstance(cls, type) and issubclass(cls, SearchPathPlugin), cls\n"
        "assert not inspect.isabstract(cls)\n"
        "assert OmegaConf.has_resolver('optimus_ckpt.latest')\n"
        "assert 'load_strategy.yaml' in ConfigStore.instance().repo['optimus_ckpt']['schema']\n"
        "assert 'torch' not in sys.modules\n"
        "print(cls.__module__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hydra_plugins.optimus_ckpt.optimus_ckpt_plugin"


def test_load_strategy_finetune(app: Path) -> None:
    ok(run_app(app, "load_strategy=finetune"))
    out = seen(app)
    assert out["choice"] == "finetune"
    assert out["strategy"] == EXPECTED_PRESETS["finetune"]
    assert out["strategy"]["strict"] is False
    assert out["type"] == "LoadStrategy"


def test_a_field_override_on_top_of_a_preset(app: Path) -> None:
    ok(run_app(app, "load_strategy=finetune", "load_strategy.load_optimizer=true"))
    out = seen(app)
    assert out["strategy"] == {**EXPECTED_PRESETS["finetune"], "load_optimizer": True}


def test_extra_ignore_keys_from_the_command_line(app: Path) -> None:
    ok(run_app(app, "load_strategy=finetune", "load_strategy.extra_ignore_keys=[model.head.*]"))
    out = seen(app)
    assert out["strategy"] == {
        **EXPECTED_PRESETS["finetune"],
        "extra_ignore_keys": ["model.head.*"],
    }


def test_multirun_over_three_presets(app: Path) -> None:
    proc = ok(run_app(app, "-m", "load_strategy=resume,finetune,eval"))
    jobs = sorted(p.name for p in (app / "multirun").iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"], proc.stdout
    by_choice = {}
    for job in jobs:
        out = seen(app, job)
        assert out["strategy"] == EXPECTED_PRESETS[out["choice"]], job
        assert out["node"]["_target_"] == "optimus_ckpt.LoadStrategy"
        by_choice[out["choice"]] = job
    assert by_choice == {"resume": "0", "finetune": "1", "eval": "2"}


def test_the_latest_resolver_in_an_app(app: Path) -> None:
    make_checkpoint(app / "ckpts", 5)
    make_checkpoint(app / "ckpts", 9, manifest=False)
    make_checkpoint(app / "ckpts", 12, staging="abc")
    ok(run_app(app))
    assert seen(app)["load_from"] == str(app / "ckpts" / "step_0000000005")


def test_a_users_own_preset_file(app: Path) -> None:
    (app / "conf" / "load_strategy").mkdir()
    (app / "conf" / "load_strategy" / "my_ft.yaml").write_text(
        "defaults:\n  - finetune\n  - _self_\n\nextra_ignore_keys: [model.head.*]\n"
    )
    ok(run_app(app, "load_strategy=my_ft"))
    out = seen(app)
    assert out["strategy"] == {
        **EXPECTED_PRESETS["finetune"],
        "extra_ignore_keys": ["model.head.*"],
    }


def test_info_searchpath_and_help_show_our_presets(app: Path) -> None:
    proc = ok(run_app(app, "--info", "searchpath"))
    assert re.search(rf"\| optimus_ckpt +\| file://{re.escape(conf_dir())} +\|", proc.stdout)
    proc = ok(run_app(app, "--help"))
    assert "load_strategy: eval, finetune, reset_optimizer, resume, scratch" in proc.stdout


def test_users_own_schema_entry_and_resolver_registered_at_import_win(app: Path) -> None:
    own = (
        "from hydra.core.config_store import ConfigStore\n"
        "from omegaconf import OmegaConf\n"
        "ConfigStore.instance().store(group='optimus_ckpt/schema', name='load_strategy',\n"
        "    node={'load_model': True, 'note': 'mine'})\n"
        "OmegaConf.register_new_resolver('optimus_ckpt.latest', lambda d: 'mine:' + d)\n"
    )
    (app / "own_app.py").write_text(own + APP_PY)
    ok(run_app(app, "load_strategy=resume", build="none", script="own_app.py"))
    out = seen(app)
    assert out["node"] == {"load_model": True, "note": "mine"}
    assert out["load_from"] == "mine:ckpts"


# --- errors, each with the message a user sees ---------------------------------------------


def test_error_misspelled_preset_lists_the_options(app: Path) -> None:
    err = failed(run_app(app, "load_strategy=finetun"))
    assert ERRORS["misspelled_preset"] in err
    assert (
        ERRORS["preset_options"] + "\n\teval\n\tfinetune\n\treset_optimizer\n\tresume\n\tscratch\n"
    ) in err
    assert "optimus_ckpt/schema" not in err.split("Config search path")[0]


def test_error_wrong_type(app: Path) -> None:
    err = failed(run_app(app, "load_strategy.load_model=maybe"))
    assert "Error merging override load_strategy.load_model=maybe" in err
    assert ERRORS["wrong_type"] in err
    assert ERRORS["wrong_type_key"] in err


def test_error_misspelled_field(app: Path) -> None:
    err = failed(run_app(app, "load_strategy.load_modle=false"))
    assert "Could not override 'load_strategy.load_modle'." in err
    assert ERRORS["misspelled_field"] in err


@pytest.mark.parametrize("build", ["instantiate", "resolve", "to_object"])
def test_error_impossible_combination_names_both_fields(app: Path, build: str) -> None:
    err = failed(
        run_app(app, "load_strategy=eval", "load_strategy.load_dataloaders=true", build=build)
    )
    assert ERRORS["dataloaders_without_sources"] in err
    assert not (app / "outputs" / "seen.json").exists()


def test_error_optimizer_without_model(app: Path) -> None:
    err = failed(run_app(app, "load_strategy.load_model=false"))
    assert ERRORS["optimizer_without_model"] in err


@pytest.mark.parametrize("build", ["instantiate", "resolve", "to_object"])
def test_error_unknown_key_added_with_plus(app: Path, build: str) -> None:
    err = failed(run_app(app, "+load_strategy.load_modle=false", build=build))
    assert ERRORS["unknown_key"] in err
    assert not (app / "outputs" / "seen.json").exists()


def test_without_a_defaults_entry_the_app_cannot_select_a_preset(tmp_path: Path) -> None:
    app = write_app(tmp_path, config=APP_CONFIG.replace("  - load_strategy: resume\n", ""))
    err = failed(run_app(app, "load_strategy=finetune", build="none"))
    assert ERRORS["no_defaults_entry"] in err
