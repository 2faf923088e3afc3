"""Property-based tests of LoadStrategy: every valid combination round-trips through every form
a strategy can take; every invalid one is refused with a message naming the fields."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from plugin_support import FLAGS

from optimus_ckpt import LoadStrategy, LoadStrategyConfig, StrategyError, resolve_strategy

# The two rules: (the field that needs, the field it needs).
RULES = (("load_optimizer", "load_model"), ("load_dataloaders", "load_data_sources"))

glob = st.text(alphabet="abcxyz_.*?[]0123456789", min_size=1, max_size=12)
ignore_keys = st.one_of(st.none(), st.lists(glob, max_size=4))
kwargs_st = st.fixed_dictionaries(
    {name: st.booleans() for name in FLAGS}, optional={"extra_ignore_keys": ignore_keys}
)


def broken_rules(kw: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in RULES if kw.get(a, True) and not kw.get(b, True)]


def loads_nothing_but_ignores(kw: dict[str, Any]) -> bool:
    flags = [kw[n] for n in FLAGS if n != "strict"]
    return not any(flags) and bool(kw.get("extra_ignore_keys"))


@settings(max_examples=150, deadline=None)
@given(kwargs_st)
def test_valid_combinations_round_trip_through_every_form(kw: dict[str, Any]) -> None:
    if broken_rules(kw):
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = LoadStrategy(**kw)
    assert bool(caught) == loads_nothing_but_ignores(kw)
    expected = {"extra_ignore_keys": None, **kw}
    assert s.to_dict() == expected

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # OmegaConf.structured(instance) -> to_object: a validated instance again.
        back = OmegaConf.to_object(OmegaConf.structured(s))
        assert isinstance(back, LoadStrategy) and back == s
        # The Hydra schema node with these values, as compose would build it.
        node = OmegaConf.merge(OmegaConf.structured(LoadStrategyConfig), kw)
        assert OmegaConf.to_object(node) == s
        # Every form resolve_strategy accepts gives the same strategy.
        for form in (s, s.to_dict(), OmegaConf.create(s.to_dict()), node):
            out = resolve_strategy(form)
            assert type(out) is LoadStrategy and out == s


@settings(max_examples=150, deadline=None)
@given(kwargs_st)
def test_invalid_combinations_always_raise_naming_both_fields(kw: dict[str, Any]) -> None:
    broken = broken_rules(kw)
    if not broken:
        return
    # The first rule checked that is broken is the one reported.
    needs, needed = broken[0]
    expected = f"{needs}=True needs {needed}=True"
    fix = f"Fix: set load_strategy.{needs}=false, or load_strategy.{needed}=true."
    node = OmegaConf.merge(OmegaConf.structured(LoadStrategyConfig), kw)
    attempts = [
        lambda: LoadStrategy(**kw),
        lambda: resolve_strategy(kw),
        lambda: resolve_strategy(OmegaConf.create(kw)),
        lambda: resolve_strategy(node),
        lambda: OmegaConf.to_object(node),  # compose never ran __post_init__; to_object does
    ]
    for attempt in attempts:
        with pytest.raises(StrategyError) as info:
            attempt()
        assert expected in str(info.value)
        assert fix in str(info.value)


@settings(max_examples=100, deadline=None)
@given(
    kwargs_st,
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=15),
)
def test_any_unknown_key_is_refused_and_named(kw: dict[str, Any], key: str) -> None:
    if key in FLAGS or key == "extra_ignore_keys":
        return
    data = {**kw, key: False}
    for attempt in (lambda: resolve_strategy(data), lambda: LoadStrategy(**data)):
        with pytest.raises(StrategyError) as info:
            attempt()
        assert f"Unknown key '{key}' in load_strategy." in str(info.value)
