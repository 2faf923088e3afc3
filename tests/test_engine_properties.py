"""Property-based tests of the checkpoint engine: strategies x which components a checkpoint holds x
which objects a load is given. Loaded state equals the saved state bit for bit, everything else is
exactly as it was, a load that raises changes nothing, and plan() predicts load()."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
from engine_support import (
    ALL_NAMES,
    FLAG_OF,
    LOAD_FLAGS,
    OPTIONAL,
    assert_same,
    component_ignored,
    make_run,
    matches,
    report_dict,
    seed_all,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimus_ckpt import Checkpointer, LoadMismatchError, LoadStrategy, Outcome

pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore:LoadStrategy loads nothing"),
]

SAVED_STEP = 7
PATTERNS = (
    "model.head.*",
    "model.body.bias",
    "model.norm.running_*",
    "model",
    "optimizer",
    "scheduler",
    "data_sources",
    "dataloaders.*",
    "dataloaders.train",
    "metrics",
    "extra.*",
    "extra.ema",
    "rng",
    "model.no_such_layer.*",
    "schedular",
)


@st.composite
def flags_st(draw: Any) -> dict[str, bool]:
    """Every valid combination of the load flags (the two "needs" rules hold)."""
    flags = {f: draw(st.booleans()) for f in LOAD_FLAGS}
    flags["load_optimizer"] = flags["load_optimizer"] and flags["load_model"]
    flags["load_dataloaders"] = flags["load_dataloaders"] and flags["load_data_sources"]
    return flags


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    flags = draw(flags_st())
    given_names = set(draw(st.sets(st.sampled_from(("model", *OPTIONAL)))))
    if "optimizer" in given_names:
        given_names.add("model")  # the API refuses an optimizer without its model
    return {
        "flags": flags,
        "strict": draw(st.booleans()),
        "patterns": draw(st.lists(st.sampled_from(PATTERNS), max_size=3, unique=True)),
        "saved": frozenset(draw(st.sets(st.sampled_from(OPTIONAL)))),
        "given": given_names,
        "live_steps": draw(st.sampled_from((0, 1))),
    }


class SavedCheckpoints:
    """One checkpoint per set of saved components, written on first use (the saving run is
    deterministic, so every checkpoint holds the same values for the components it has)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.cache: dict[frozenset[str], tuple[str, dict[str, Any]]] = {}

    def get(self, saved: frozenset[str]) -> tuple[str, dict[str, Any]]:
        if saved not in self.cache:
            run = make_run(seed=0, steps=3)
            seed_all(99)
            state = snapshot(run)  # RNG included: save() records it as it is now
            name = "ckpt_" + ("_".join(sorted(saved)) or "model_only")
            ckpt = Checkpointer(os.path.join(self.root, name), fsync=False)
            path = ckpt.save(SAVED_STEP, **run.objects({"model", *saved}))
            self.cache[saved] = (path, state)
        return self.cache[saved]


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> SavedCheckpoints:
    return SavedCheckpoints(str(tmp_path_factory.mktemp("saved")))


def expected_outcomes(
    s: LoadStrategy, saved: frozenset[str], given_names: set[str]
) -> dict[str, Outcome]:
    """The issue's rules, written out independently of the engine."""
    patterns = s.extra_ignore_keys or []
    in_ckpt = {"model", "rng", *saved}
    out = {}
    for name in ALL_NAMES:
        given_ = name in given_names or name == "rng"
        if not (given_ or name in in_ckpt):
            continue  # neither given nor saved: not reported
        if not getattr(s, FLAG_OF[name]):
            out[name] = Outcome.SKIPPED_BY_STRATEGY
        elif component_ignored(name, patterns):
            out[name] = Outcome.IGNORED
        elif not given_:
            out[name] = Outcome.NOT_GIVEN
        elif name not in in_ckpt:
            out[name] = Outcome.ABSENT
        else:
            out[name] = Outcome.LOADED
    return out


def expected_unmatched(s: LoadStrategy, outcomes: dict[str, Outcome], keys: list[str]) -> list[str]:
    """Patterns that matched no name the load considered (a likely typo)."""
    considered: list[str] = []
    for name, outcome in outcomes.items():
        if outcome is Outcome.SKIPPED_BY_STRATEGY:
            continue
        parts = name.split(".")
        considered += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if name == "model" and outcome is Outcome.LOADED:
            considered += [f"model.{k}" for k in keys]
    return [p for p in s.extra_ignore_keys or [] if not matches_any(considered, p)]


def matches_any(names: list[str], pattern: str) -> bool:
    return any(matches(n, [pattern]) for n in names)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_selective_load_is_exact_and_touches_nothing_else(
    saved_checkpoints: SavedCheckpoints, case: dict[str, Any]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "loads nothing, so ignores have no effect"
        s = LoadStrategy(
            **case["flags"], strict=case["strict"], extra_ignore_keys=case["patterns"] or None
        )
    path, saved = saved_checkpoints.get(case["saved"])
    live = make_run(seed=1, steps=case["live_steps"])
    objects = live.objects(case["given"])
    seed_all(1234)  # the live RNG state differs from the saved one
    before = snapshot(live)

    outcomes = expected_outcomes(s, case["saved"], case["given"])
    absent = [n for n, o in outcomes.items() if o is Outcome.ABSENT and n != "rng"]
    ckpt = Checkpointer(os.path.dirname(path), fsync=False)

    if absent and s.strict:
        for call in (ckpt.plan, ckpt.load):
            with pytest.raises(LoadMismatchError) as err:
                call(path, s, **objects)
            for name in absent:
                assert f"'{name}'" in str(err.value)
            assert "nothing was changed" in str(err.value)
            assert_same(snapshot(live), before, "a load that raised changed state")
        return

    plan = ckpt.plan(path, s, **objects)
    assert_same(snapshot(live), before, "plan() changed state")
    report = ckpt.load(path, s, **objects)

    # Outcomes, iteration and the report's key lists.
    assert {n: c.outcome for n, c in report.components.items()} == outcomes
    assert report.iteration == (SAVED_STEP if s.load_iteration else 0)
    assert report.step == SAVED_STEP
    assert report.missing_keys == report.unexpected_keys == report.shape_mismatches == []
    for name in absent:
        assert any(f"'{name}'" in w for w in report.warnings), report.warnings
    patterns = s.extra_ignore_keys or []
    keys = list(saved["model"])
    assert report.unmatched_ignore_patterns == expected_unmatched(s, outcomes, keys)

    # Every component: loaded -> the saved state, bit for bit; otherwise exactly as before.
    after = snapshot(live)
    for name in ALL_NAMES:
        loaded = outcomes.get(name) is Outcome.LOADED
        if name == "model" and loaded:
            ignored = [k for k in keys if matches(f"model.{k}", patterns)]
            assert sorted(report.ignored_keys) == sorted(ignored)
            for k in keys:
                want = before["model"][k] if k in ignored else saved["model"][k]
                assert_same(after["model"][k], want, f"model.{k}")
        elif loaded:
            assert_same(after[name], saved[name], f"{name} (loaded)")
        else:
            assert_same(after[name], before[name], f"{name} (not loaded)")

    # The dry run predicted exactly what the load did, bytes included.
    assert report_dict(plan) == report_dict(report)
    assert plan.dry_run and not report.dry_run
    expected_bytes = sum(c.bytes for c in report.components.values())
    assert report.bytes_read == expected_bytes
