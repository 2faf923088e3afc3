"""README.md stays true: its tables, its YAML examples and the error messages it quotes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from plugin_support import ERRORS, EXPECTED_PRESETS, FLAGS

from optimus_ckpt import PRESETS, LoadStrategy, register_configs

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The text of the ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the markdown table whose first header cell is ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def test_preset_table_matches_the_yaml() -> None:
    text = section("Presets")
    rows = table_rows(text, "preset")
    columns = list(FLAGS)
    header_line = next(line for line in text.splitlines() if line.startswith("| preset |"))
    assert [c.strip() for c in header_line.split("|")[2:-1]] == [
        c.replace("load_", "") for c in columns
    ]
    table = {row[0].strip("`"): row[1:] for row in rows}
    assert sorted(table) == sorted(PRESETS) == sorted(EXPECTED_PRESETS)
    for name, cells in table.items():
        assert cells == ["✓" if getattr(PRESETS[name], c) else "\u2013" for c in columns], name
    for name in PRESETS:  # each preset is explained below the table
        assert f"- `{name}`: " in text, name


def test_field_table_matches_the_dataclass() -> None:
    rows = table_rows(section("Quickstart"), "field")
    fields = dataclasses.fields(LoadStrategy)
    assert [r[0].strip("`") for r in rows] == [f.name for f in fields]
    for row, f in zip(rows, fields):
        assert row[3] == f.metadata["description"], f.name
        default = "null" if f.default is None else str(f.default).lower()
        assert row[2] == default, f.name


def test_two_commands() -> None:
    text = section("Two commands")
    assert fenced(text, "bash") == ["bash examples/demo.sh\n", "bash .ci/test\n"]
    assert len(re.findall(r"^```", text, flags=re.M)) == 4  # exactly two fenced blocks
    assert (REPO / "examples" / "demo.sh").is_file()
    assert (REPO / ".ci" / "test").is_file()
    # CI runs exactly the README's test command.
    assert "bash .ci/test" in (REPO / ".ci" / "run").read_text()


def test_placeholder_sections_exist_for_the_engine_work() -> None:
    for title in ("Checkpoint engine", "Performance", "Distributed", "Command line"):
        section(title)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_error_message_the_tests_assert_is_quoted(name: str) -> None:
    assert ERRORS[name] in section("Errors you can hit"), name


@pytest.fixture
def conf_dir(tmp_path: Path, hydra_restore_singletons: None) -> Path:
    register_configs()
    (tmp_path / "conf").mkdir()
    return tmp_path / "conf"


def compose_in(conf: Path, overrides: list[str]) -> object:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            return compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def strategy_of(cfg: object) -> dict[str, object]:
    return OmegaConf.to_object(cfg.load_strategy).to_dict()  # type: ignore[attr-defined]


def test_quickstart_config_composes(conf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = [b for b in fenced(section("Quickstart"), "yaml") if "defaults:" in b]
    assert "  - load_strategy: resume\n  - _self_\n" in block
    (conf_dir / "config.yaml").write_text(block)
    monkeypatch.chdir(conf_dir.parent)
    cfg = compose_in(conf_dir, [])
    assert strategy_of(cfg) == EXPECTED_PRESETS["resume"]
    assert cfg.load_from is None  # type: ignore[attr-defined]
    cfg = compose_in(conf_dir, ["load_strategy=finetune"])
    assert strategy_of(cfg) == EXPECTED_PRESETS["finetune"]


def test_quickstart_load_line_is_the_documented_one() -> None:
    (code,) = fenced(section("Quickstart"), "python")
    compile(code, "README quickstart", "exec")
    assert (
        "report = ckpt.load(cfg.load_from, cfg.load_strategy, model=model, optimizer=opt)" in code
    )


def test_own_preset_examples_compose(conf_dir: Path) -> None:
    blocks = fenced(section("Your own preset"), "yaml")
    my_ft = next(b for b in blocks if "my_ft.yaml" in b)
    (conf_dir / "load_strategy").mkdir()
    (conf_dir / "load_strategy" / "my_ft.yaml").write_text(my_ft)
    (conf_dir / "config.yaml").write_text("defaults:\n  - load_strategy: resume\n  - _self_\n")
    cfg = compose_in(conf_dir, ["load_strategy=my_ft"])
    assert strategy_of(cfg) == {
        **EXPECTED_PRESETS["finetune"],
        "extra_ignore_keys": ["model.head.*"],
        "load_metrics": True,
    }
    direct = next(b for b in blocks if "strict: true" in b and "defaults:" in b)
    (conf_dir / "config.yaml").write_text(direct)
    assert strategy_of(compose_in(conf_dir, [])) == {**EXPECTED_PRESETS["finetune"], "strict": True}
