"""The ``${optimus_ckpt.latest:DIR}`` resolver, the layout contract behind it, and registration:
idempotent, warning-free, and never clobbering a user's own resolver or ConfigStore entry."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from plugin_support import make_checkpoint

from optimus_ckpt import hydra_support, latest_checkpoint, list_checkpoints, register_configs
from optimus_ckpt.hydra_support import LATEST_RESOLVER, SCHEMA_GROUP, SCHEMA_NAME
from optimus_ckpt.layout import is_complete, parse_step, step_dir_name


@pytest.fixture
def ours() -> Iterator[None]:
    """Our resolver registered before the test, and again (ours) after it."""
    register_configs()
    yield
    OmegaConf.clear_resolver(LATEST_RESOLVER)
    register_configs()


def latest_of(directory: Any) -> Any:
    cfg = OmegaConf.create({"dir": directory, "latest": "${optimus_ckpt.latest:${dir}}"})
    return cfg.latest


# --- the resolver ---------------------------------------------------------------------------


def test_missing_or_empty_directory_gives_null(ours: None, tmp_path: Path) -> None:
    assert latest_of(str(tmp_path / "nope")) is None
    assert latest_of(str(tmp_path)) is None
    assert latest_of(None) is None
    assert latest_of("") is None
    (tmp_path / "a_file").write_text("x")
    assert latest_of(str(tmp_path / "a_file")) is None  # not a directory: none, not an error
    cfg = OmegaConf.create({"latest": "${optimus_ckpt.latest:}"})
    assert cfg.latest is None


def test_incomplete_directories_are_ignored(ours: None, tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 3, manifest=False)  # no commit marker yet
    make_checkpoint(tmp_path, 4, staging="r0-1234")  # staging name, even with a manifest
    (tmp_path / "step_0000000005").mkdir()
    (tmp_path / "step_0000000005" / "optimus.json").write_text("{not json")  # torn manifest
    (tmp_path / "step_0000000006").mkdir()
    (tmp_path / "step_0000000006" / "optimus.json").write_text('{"format": "other"}')
    (tmp_path / "notes").mkdir()
    assert latest_of(str(tmp_path)) is None
    committed = make_checkpoint(tmp_path, 2)
    assert latest_of(str(tmp_path)) == str(committed)


def test_returns_the_newest_complete_checkpoint_by_step(ours: None, tmp_path: Path) -> None:
    for step in (100, 9, 20000000000):  # 11 digits sort after 10 by number, not by name
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 30000000000, manifest=False)
    expected = str(tmp_path / step_dir_name(20000000000))
    assert latest_of(str(tmp_path)) == expected
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 100, 20000000000]
    assert latest_checkpoint(tmp_path) == expected


def test_not_stale_when_a_newer_checkpoint_appears(ours: None, tmp_path: Path) -> None:
    cfg = OmegaConf.create({"dir": str(tmp_path), "load_from": "${optimus_ckpt.latest:${dir}}"})
    assert cfg.load_from is None
    first = make_checkpoint(tmp_path, 10)
    assert cfg.load_from == str(first)
    staging = make_checkpoint(tmp_path, 20, manifest=False)
    assert cfg.load_from == str(first)  # the newer one is still being written
    (staging / "optimus.json").write_text('{"format": "optimus_ckpt"}')  # ... and now committed
    assert cfg.load_from == str(tmp_path / step_dir_name(20))


def test_relative_directory_resolves_against_the_cwd(
    ours: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_checkpoint(tmp_path / "ckpts", 7)
    monkeypatch.chdir(tmp_path)
    assert latest_of("ckpts") == str(tmp_path / "ckpts" / step_dir_name(7))


def test_resolver_in_a_composed_config_is_re_evaluated(
    ours: None, tmp_path: Path, hydra_restore_singletons: None
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    ckpts = tmp_path / "ckpts"
    (conf / "config.yaml").write_text(
        "defaults:\n  - load_strategy: resume\n  - _self_\n"
        f"ckpt_dir: {ckpts}\nload_from: ${{optimus_ckpt.latest:${{ckpt_dir}}}}\n"
    )
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config")
    GlobalHydra.instance().clear()
    assert cfg.load_from is None
    make_checkpoint(ckpts, 1)
    assert cfg.load_from == str(ckpts / step_dir_name(1))
    make_checkpoint(ckpts, 2)
    assert cfg.load_from == str(ckpts / step_dir_name(2))
    # Resolvers must hand back primitives, so the whole config still resolves.
    assert OmegaConf.to_container(cfg, resolve=True)["load_from"] == str(ckpts / step_dir_name(2))


def test_layout_helpers(tmp_path: Path) -> None:
    assert step_dir_name(42) == "step_0000000042"
    assert parse_step("step_0000000042") == 42
    for name in ("step_42", "step_0000000042.partial-x", "ckpt_0000000042", "step_000000004a"):
        assert parse_step(name) is None, name
    with pytest.raises(ValueError, match="step must be >= 0"):
        step_dir_name(-1)
    path = make_checkpoint(tmp_path, 42)
    assert is_complete(path) and is_complete(str(path) + os.sep)
    assert not is_complete(make_checkpoint(tmp_path, 43, manifest=False))
    assert not is_complete(make_checkpoint(tmp_path, 44, staging="x"))


# --- registration ---------------------------------------------------------------------------


def test_registration_is_idempotent(ours: None) -> None:
    register_configs()
    register_configs()
    assert OmegaConf.has_resolver(LATEST_RESOLVER)
    assert hydra_support._in_store(SCHEMA_GROUP, SCHEMA_NAME)


def test_registering_emits_no_warnings_in_process(ours: None) -> None:
    OmegaConf.clear_resolver(LATEST_RESOLVER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_configs()
    assert OmegaConf.has_resolver(LATEST_RESOLVER)


def test_importing_and_registering_emit_no_warnings_in_a_fresh_interpreter(tmp_path: Path) -> None:
    code = (
        "import hydra_plugins.optimus_ckpt.optimus_ckpt_plugin\n"
        "from optimus_ckpt import register_configs, PRESETS\n"
        "register_configs(); register_configs(); dict(PRESETS)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_the_new_resolver_api_is_used_where_it_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # omegaconf 2.4: register_resolver(name, fn, *, replace, use_cache); the 2.3 name warns.
    calls: list[tuple[str, bool]] = []

    def register_resolver(name: str, fn: Callable[..., Any], *, use_cache: bool = False) -> None:
        calls.append((name, use_cache))

    def old_api(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("register_new_resolver is deprecated on omegaconf 2.4")

    monkeypatch.setattr(OmegaConf, "register_resolver", register_resolver, raising=False)
    monkeypatch.setattr(OmegaConf, "register_new_resolver", old_api)
    hydra_support._register_resolver("x.y", lambda: None)
    assert calls == [("x.y", False)]


def test_on_omegaconf_2_3_the_string_only_register_resolver_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, bool]] = []

    def register_resolver(name: str, fn: Callable[..., Any]) -> None:  # the 2.3 signature
        raise AssertionError("the deprecated string-only API")

    def register_new_resolver(name: str, fn: Any, *, use_cache: bool = False) -> None:
        calls.append((name, use_cache))

    monkeypatch.setattr(OmegaConf, "register_resolver", register_resolver, raising=False)
    monkeypatch.setattr(OmegaConf, "register_new_resolver", register_new_resolver)
    hydra_support._register_resolver("x.y", lambda: None)
    assert calls == [("x.y", False)]  # uncached: never a stale path


def test_a_users_own_resolver_of_the_same_name_wins(ours: None, tmp_path: Path) -> None:
    OmegaConf.clear_resolver(LATEST_RESOLVER)
    OmegaConf.register_new_resolver(LATEST_RESOLVER, lambda d: f"mine:{d}")
    register_configs()  # must not replace it (and must not raise "already registered")
    make_checkpoint(tmp_path, 1)
    assert latest_of(str(tmp_path)) == f"mine:{tmp_path}"


def test_a_users_own_schema_entry_of_the_same_name_wins(
    ours: None, hydra_restore_singletons: None
) -> None:
    cs = ConfigStore.instance()
    cs.repo["optimus_ckpt"]["schema"].pop(f"{SCHEMA_NAME}.yaml")
    assert not hydra_support._in_store(SCHEMA_GROUP, SCHEMA_NAME)
    users = {"load_model": True, "note": "mine"}
    cs.store(group=SCHEMA_GROUP, name=SCHEMA_NAME, node=users)
    register_configs()
    node = cs.load(f"{SCHEMA_GROUP}/{SCHEMA_NAME}.yaml").node
    assert node.note == "mine" and "_target_" not in node


def test_registers_the_schema_when_it_is_missing(
    ours: None, hydra_restore_singletons: None
) -> None:
    cs = ConfigStore.instance()
    cs.repo["optimus_ckpt"]["schema"].pop(f"{SCHEMA_NAME}.yaml")
    register_configs()
    item = cs.load(f"{SCHEMA_GROUP}/{SCHEMA_NAME}.yaml")
    assert item.provider == "optimus_ckpt"
    assert item.node._target_ == "optimus_ckpt.LoadStrategy"
