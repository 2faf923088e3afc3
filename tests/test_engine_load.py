"""Loading: strict errors and the non-strict report, DDP / torch.compile key prefixes, optimizer
state into a freshly built optimizer, structural mismatches, and loads that fail part-way."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from engine_support import (
    Net,
    Run,
    Wrapped,
    assert_same,
    make_run,
    seed_all,
    snapshot,
)
from torch import nn

from optimus_ckpt import (
    CheckpointCorruptError,
    Checkpointer,
    LoadMismatchError,
    LoadStrategy,
    Outcome,
)

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

STEP = 11


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """A full checkpoint of a run trained 3 steps, and that run's state at save time."""
    run = make_run(seed=0, steps=3)
    seed_all(7)
    state = snapshot(run)
    path = Checkpointer(tmp_path_factory.mktemp("load"), fsync=False).save(STEP, **run.objects())
    return path, state


class WideNet(Net):
    """Net with another head size and four extra layers: many missing keys, two mismatched."""

    def __init__(self) -> None:
        super().__init__(out=5)
        self.adapters = nn.ModuleList(nn.Linear(12, 12) for _ in range(4))


class NoNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 12)
        self.head = nn.Linear(12, 3)


def run_with(model: nn.Module) -> Run:
    return make_run(seed=1, steps=0, model=model)


# ----------------------------------------------------------------------------- strict / non-strict


def test_strict_error_lists_keys_counts_and_fixes(saved: tuple[str, dict[str, Any]]) -> None:
    path, _ = saved
    live = run_with(WideNet())
    before = snapshot(live)
    with pytest.raises(LoadMismatchError) as err:
        Checkpointer(os.path.dirname(path)).load(path, "resume", **live.objects())
    msg = str(err.value)
    assert "8 model key(s) missing from the checkpoint" in msg
    assert "adapters.0.weight" in msg and "(+3 more)" in msg  # the first few, then a count
    assert "2 model key(s) shape mismatch" in msg
    assert "head.weight [3, 12] vs model [5, 12]" in msg
    for fix in ("extra_ignore_keys", "strict=false", "load_strategy=finetune"):
        assert fix in msg
    assert "nothing was changed" in msg
    assert_same(snapshot(live), before, "a strict load that raised")


def test_strict_error_names_unexpected_keys(saved: tuple[str, dict[str, Any]]) -> None:
    path, _ = saved
    model = NoNormNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadMismatchError) as err:
        Checkpointer(os.path.dirname(path)).load(path, "eval", model=model)
    msg = str(err.value)
    assert "5 model key(s) unexpected in the checkpoint" in msg
    assert "norm.running_mean" in msg
    assert_same(model.state_dict(), before, "model after a refused load")
    # The fix the message names works: ignore them.
    s = LoadStrategy(
        load_optimizer=False, load_scheduler=False, load_data_sources=False,
        load_dataloaders=False, load_metrics=False, load_iteration=False,
        extra_ignore_keys=["model.norm.*"],
    )  # fmt: skip
    report = Checkpointer(os.path.dirname(path)).load(path, s, model=model)
    assert sorted(report.ignored_keys) == sorted(k for k in saved[1]["model"] if "norm" in k)
    assert report.unexpected_keys == []


def test_non_strict_new_head_is_reported_and_kept_fresh(saved: tuple[str, dict[str, Any]]) -> None:
    path, state = saved
    model = Net(out=5)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    report = Checkpointer(os.path.dirname(path)).load(path, "finetune", model=model)
    assert report.components["model"].outcome is Outcome.LOADED
    assert "non-strict" in report.components["model"].reason
    assert sorted(report.shape_mismatches) == [
        ("head.bias", [3], [5]),
        ("head.weight", [3, 12], [5, 12]),
    ]
    assert report.missing_keys == report.unexpected_keys == []
    live = model.state_dict()
    for k, v in live.items():
        want = fresh_head[k] if k.startswith("head.") else state["model"][k]
        assert_same(v, want, k)
    assert report.components["model"].tensors == len(live) - 2
    text = str(report)
    assert "shape mismatches (kept fresh): 2" in text
    assert "head.weight: checkpoint [3, 12] vs model [5, 12]" in text
    assert report.iteration == 0 and report.loaded == ["model"]


def test_non_strict_missing_and_unexpected_keys_keep_their_values(
    saved: tuple[str, dict[str, Any]],
) -> None:
    path, state = saved
    model = WideNet()
    adapters = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("adapters.")}
    s = LoadStrategy(strict=False, load_optimizer=False)
    report = Checkpointer(os.path.dirname(path)).load(path, s, model=model)
    assert sorted(report.missing_keys) == sorted(adapters)
    live = model.state_dict()
    for k, v in adapters.items():
        assert_same(live[k], v, k)
    assert_same(live["body.weight"], state["model"]["body.weight"], "body.weight")


# ----------------------------------------------------------------------------- prefixes


def _wrap(attr: str | None) -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    return net if attr is None else Wrapped(net, attr)


@pytest.mark.parametrize(
    ("save_as", "load_as"),
    [
        ("module", None),
        (None, "module"),
        ("_orig_mod", None),
        (None, "_orig_mod"),
        ("module", "_orig_mod"),
        (None, None),
    ],
)
def test_wrapper_prefixes_load_both_ways(
    tmp_path: Any, save_as: str | None, load_as: str | None
) -> None:
    src = make_run(seed=0, steps=2, model=_wrap(save_as))
    saved = snapshot(src)
    path = Checkpointer(tmp_path, fsync=False).save(1, **src.objects())
    live = make_run(seed=1, steps=0, model=_wrap(load_as))
    report = Checkpointer(tmp_path).load(path, "resume", **live.objects())
    assert report.missing_keys == report.unexpected_keys == []
    after = snapshot(live)
    saved_model = {k.split(".", 1)[1] if save_as else k: v for k, v in saved["model"].items()}
    live_model = {k.split(".", 1)[1] if load_as else k: v for k, v in after["model"].items()}
    assert_same(live_model, saved_model, "model")
    assert_same(after["optimizer"], saved["optimizer"], "optimizer")
    if save_as == load_as:
        assert report.renamed_prefixes == []
    else:
        assert len(report.renamed_prefixes) == 1
        rename = report.renamed_prefixes[0]
        assert f"'{save_as}.'" in rename if save_as else "checkpoint ''" in rename
        assert f"'{load_as}.'" in rename if load_as else "model ''" in rename
        assert "renamed keys" in str(report)


# ----------------------------------------------------------------------------- optimizer


def test_optimizer_loads_into_a_fresh_optimizer_and_continues_identically(
    saved: tuple[str, dict[str, Any]],
) -> None:
    path, state = saved
    original = make_run(seed=0, steps=3)  # the saving run, rebuilt: identical state
    assert_same(snapshot(original)["optimizer"], state["optimizer"], "rebuilt run")

    torch.manual_seed(123)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    assert not opt.state  # freshly built: no state at all

    def no_dummy_step(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the load took an optimizer step")

    opt.step = no_dummy_step  # type: ignore[method-assign]
    report = Checkpointer(os.path.dirname(path)).load(
        path, LoadStrategy(load_scheduler=False), model=model, optimizer=opt
    )
    del opt.step
    assert report.components["optimizer"].outcome is Outcome.LOADED
    assert_same(opt.state_dict(), state["optimizer"], "optimizer after load")

    # One more identical step on both: identical parameters and state, bit for bit.
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(42))
    for m, o in ((original.model, original.optimizer), (model, opt)):
        m.train()
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    assert_same(model.state_dict(), original.model.state_dict(), "model after the next step")
    assert_same(opt.state_dict(), original.optimizer.state_dict(), "optimizer after the next step")


def _two_groups(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.01,
    )


def test_optimizer_with_two_param_groups_round_trips(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = _two_groups(model)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    path = Checkpointer(tmp_path).save(2, model=model, optimizer=opt)
    model2 = Net()
    opt2 = _two_groups(model2)
    Checkpointer(tmp_path).load(path, model=model2, optimizer=opt2)
    assert_same(opt2.state_dict(), opt.state_dict(), "two-group optimizer")


@pytest.mark.parametrize("kind", ["groups", "params", "shape"])
def test_optimizer_structure_mismatch_is_a_clear_error(
    saved: tuple[str, dict[str, Any]], kind: str
) -> None:
    path, _ = saved
    strategy: Any = "resume"
    if kind == "groups":
        live = run_with(Net())
        live.optimizer = _two_groups(live.model)
        live.scheduler = torch.optim.lr_scheduler.LambdaLR(live.optimizer, lambda s: 1.0)
        expect = ["the checkpoint has 1 parameter group(s), the optimizer has 2"]
    elif kind == "params":
        live = run_with(Net())
        live.optimizer = torch.optim.AdamW(live.model.body.parameters(), lr=0.05)
        live.scheduler = torch.optim.lr_scheduler.LambdaLR(live.optimizer, lambda s: 1.0)
        expect = ["parameter group 0", "6 parameter(s) in the checkpoint, 2 in the optimizer"]
        expect.append("only in the checkpoint: ['head.bias', 'head.weight', 'norm.bias']")
    else:  # a new head, ignored for the model: the optimizer state for it cannot fit
        live = run_with(Net(out=5))
        strategy = LoadStrategy(extra_ignore_keys=["model.head.*"])
        expect = ["'exp_avg' of parameter 'head.weight' has shape [3, 12]", "shape [5, 12]"]
    before = snapshot(live)
    with pytest.raises(LoadMismatchError) as err:
        Checkpointer(os.path.dirname(path)).load(path, strategy, **live.objects())
    msg = str(err.value)
    assert "optimizer" in msg and "nothing was changed" in msg
    for part in expect:
        assert part in msg
    assert "load_strategy.load_optimizer=false" in msg  # the way out
    assert_same(snapshot(live), before, f"objects after a refused load ({kind})")


# ----------------------------------------------------------------------------- nothing half-done


class Bomb:
    """An extra whose load_state_dict changes part of the object, then raises."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.armed = False

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "armed": self.armed}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.value = sd["value"]
        if sd["armed"]:
            raise RuntimeError("boom: this state cannot be loaded")
        self.armed = sd["armed"]


def test_a_user_object_raising_in_the_apply_phase_leaves_everything_untouched(
    tmp_path: Any,
) -> None:
    src = make_run(seed=0, steps=2)
    bomb = Bomb(1)
    bomb.armed = True
    objects = src.objects()
    objects["extra"] = {"ema": src.ema, "z_bomb": bomb}
    path = Checkpointer(tmp_path, fsync=False).save(4, **objects)

    live = make_run(seed=1, steps=1)
    live_bomb = Bomb(0)
    objects = live.objects()
    objects["extra"] = {"ema": live.ema, "z_bomb": live_bomb}
    seed_all(3)
    before = snapshot(live)
    report = Checkpointer(tmp_path).plan(path, "resume", **objects)  # the checks all pass
    assert "extra.z_bomb" in report.loaded
    with pytest.raises(RuntimeError, match="boom"):
        Checkpointer(tmp_path).load(path, "resume", **objects)
    assert_same(snapshot(live), before, "objects after a load whose apply phase raised")
    assert live_bomb.state_dict() == {"value": 0, "armed": False}


def test_an_absent_component_found_late_in_the_checks_changes_nothing(tmp_path: Any) -> None:
    src = make_run(seed=0, steps=2)
    # The checkpoint lacks "metrics" and "extra.ema"; model and optimizer were planned first.
    path = Checkpointer(tmp_path / "b", fsync=False).save(
        4, model=src.model, optimizer=src.optimizer, scheduler=src.scheduler
    )
    live = make_run(seed=1, steps=1)
    before = snapshot(live)
    with pytest.raises(LoadMismatchError) as err:
        Checkpointer(tmp_path).load(path, "resume", **live.objects())
    msg = str(err.value)
    for name in ("data_sources", "dataloaders.train", "metrics", "extra.ema"):
        assert f"'{name}' is asked for and given" in msg
    assert "load_strategy.load_metrics=false" in msg
    assert "load_strategy.extra_ignore_keys=[extra.ema]" in msg
    assert_same(snapshot(live), before, "objects after a refused load")
    # Non-strict, the same load goes through and reports what it skipped.
    report = Checkpointer(tmp_path).load(path, LoadStrategy(strict=False), **live.objects())
    assert report.components["metrics"].outcome is Outcome.ABSENT
    assert report.components["model"].outcome is Outcome.LOADED
    assert any("'extra.ema'" in w for w in report.warnings)


def test_a_truncated_data_file_is_refused_before_anything_changes(tmp_path: Any) -> None:
    src = make_run(seed=0, steps=2)
    path = Checkpointer(tmp_path, fsync=False).save(4, **src.objects())
    data = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[0]
    with open(os.path.join(path, data), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, data)) - 7)
    live = make_run(seed=1, steps=1)
    before = snapshot(live)
    with pytest.raises(CheckpointCorruptError, match=data):
        Checkpointer(tmp_path).load(path, "resume", **live.objects())
    assert_same(snapshot(live), before, "objects after a refused load")
