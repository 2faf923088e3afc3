"""Every bad input a user can give, and the exact error each gives: one test per row of the
README's table (``python tests/test_reliability_bad_inputs.py`` prints the table as markdown).

Rows cover the strategy (preset name, field type, unknown key, impossible combination, on the
Hydra command line and in Python), the source (missing path, empty directory, an unfinished save,
a file that is not a checkpoint), the live objects (a checkpoint of another model, an optimizer of
another structure or class, a component the checkpoint lacks) and saving. Each expected message
is exact, with ``{ckpts}`` (the checkpoint directory), ``{step5}`` (its checkpoint) and ``{tmp}``
standing for paths.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reliability_support import Loader, build, save_step

PRIMARY = """\
defaults:
  - load_strategy: resume
  - _self_

load_from: null
"""


class Env:
    """A checkpoint directory with step 5 saved (model, AdamW, a loader) and a Hydra composer."""

    def __init__(self, tmp: Path) -> None:
        from optimus_ckpt import Checkpointer

        self.tmp = tmp
        self.ckpts = str(tmp / "ckpts")
        self.ckpt = Checkpointer(self.ckpts)
        save_step(self.ckpt, 5)
        self.step5 = os.path.join(self.ckpts, "step_0000000005")
        self.conf = tmp / "conf"
        self.conf.mkdir()
        (self.conf / "config.yaml").write_text(PRIMARY)

    def compose(self, *overrides: str) -> Any:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from optimus_ckpt import register_configs

        register_configs()
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(self.conf), version_base=None):
                return compose(config_name="config", overrides=list(overrides))
        finally:
            GlobalHydra.instance().clear()

    def resume(self, strategy: Any = "resume", source: Any = None, **objects: Any) -> Any:
        model, opt, loader = build()
        objs = {"model": model, "optimizer": opt, "dataloaders": {"train": loader}, **objects}
        objs = {k: v for k, v in objs.items() if v is not None}
        return self.ckpt.load(source, strategy, **objs)

    def fmt(self, text: str) -> str:
        return text.format(ckpts=self.ckpts, step5=self.step5, tmp=str(self.tmp))


@dataclass
class Row:
    id: str
    what: str  # the kind of mistake (the README's first column)
    where: str  # "command line" (Hydra overrides) or "Python"
    given: str  # what the user wrote
    error: str  # exception class name, or "warning" (the load goes on; the report says it)
    message: str  # the exact message ({ckpts}, {step5}, {tmp}: paths)
    run: Callable[[Env], Any]
    # where the message's environment-dependent tail starts (Hydra's config search path,
    # torch's own unpickling error): compared up to there, and shown as "..." in the table
    tail: str | None = None


def _other_head(env: Env) -> Any:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    return env.ckpt.load(strategy="eval", model=model)


def _other_model(env: Env) -> Any:
    import torch

    return env.ckpt.load(strategy="eval", model=torch.nn.Linear(3, 3))


def _two_groups(env: Env) -> Any:
    import torch

    model = build()[0]
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}]
    )
    return env.resume(optimizer=opt, model=model)


def _fewer_params(env: Env) -> Any:
    import torch

    model = build()[0]
    return env.resume(optimizer=torch.optim.AdamW(model[0].parameters()), model=model)


def _other_class(env: Env) -> Any:
    import torch

    model = build()[0]
    return env.resume(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), model=model)


def _absent_scheduler(env: Env) -> Any:
    import torch

    model, opt, _ = build()
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    return env.resume(model=model, optimizer=opt, scheduler=sched)


def _hydra_then_load(env: Env, *overrides: str) -> Any:
    cfg = env.compose(*overrides)
    return env.resume(strategy=cfg.load_strategy)


def _unfinished_only(env: Env) -> Any:
    staging = env.tmp / "fresh" / "step_0000000007.partial-3f2a9c0e11d4"
    staging.mkdir(parents=True)
    return env.resume(source=str(env.tmp / "fresh"))


def _not_checkpoints(env: Env) -> Any:
    (env.tmp / "logs").mkdir()
    (env.tmp / "logs" / "train.log").write_text("loss 0.1\n")
    return env.resume(source=str(env.tmp / "logs"))


def _text_file(env: Env) -> Any:
    (env.tmp / "notes.txt").write_text("hello")
    return env.resume("eval", source=str(env.tmp / "notes.txt"), optimizer=None, dataloaders=None)


def _unsaveable(env: Env) -> Any:
    class Bad:
        def state_dict(self) -> dict[str, Any]:
            return {"hook": print}

        def load_state_dict(self, state: Any) -> None:
            pass

    return env.ckpt.save(6, model=build()[0], extra={"bad": Bad()})


def _warning_unmatched(env: Env) -> Any:
    from optimus_ckpt import LoadStrategy

    return env.resume(LoadStrategy(extra_ignore_keys=["model.hed.*"]))


def _warning_not_given(env: Env) -> Any:
    return env.ckpt.load(strategy="resume", model=build()[0])


def _load_strategy(**kw: Any) -> Any:
    from optimus_ckpt import LoadStrategy

    return LoadStrategy(**kw)


FIX_SCRATCH = (
    ". Fix: point load_from at a checkpoint or a directory that holds one, or use "
    "load_strategy=scratch to start without one."
)
CANNOT = "Cannot load {step5} with this strategy; nothing was changed:\n  - "
STRICT_FIX = (
    ". Fix: ignore them with load_strategy.extra_ignore_keys='[model.<pattern>]', or load "
    "non-strictly with load_strategy.strict=false (mismatched keys keep their current values "
    "and are reported), or use load_strategy=finetune."
)
OPT_FIX = (
    " Fix: build the optimizer with the same parameter groups as the run that saved it, or start "
    "it fresh with load_strategy.load_optimizer=false (load_strategy=reset_optimizer)."
)
VALID_KEYS = (
    "Valid keys: load_model, load_optimizer, load_scheduler, load_data_sources, "
    "load_dataloaders, load_metrics, load_iteration, extra_ignore_keys, strict."
)

ROWS = [
    # ---------------------------------------------------------------- the strategy
    Row("preset-cli", "preset name", "command line", "load_strategy=finetun",
        "MissingConfigException",
        "In 'config': Could not find 'load_strategy/finetun'\n\nAvailable options in "
        "'load_strategy':\n\teval\n\tfinetune\n\treset_optimizer\n\tresume\n\tscratch",
        lambda env: env.compose("load_strategy=finetun"), tail="\nConfig search path:"),
    Row("preset-py", "preset name", "Python", 'ckpt.load(strategy="finetun", ...)',
        "StrategyError",
        "Unknown load strategy preset 'finetun'. Did you mean 'finetune'? Available presets: "
        "eval, finetune, reset_optimizer, resume, scratch.",
        lambda env: env.resume("finetun")),
    Row("type-cli", "field type", "command line", "load_strategy.load_model=maybe",
        "ConfigCompositionException",
        "Error merging override load_strategy.load_model=maybe\n"
        "Value 'maybe' is not a valid bool (type str)",
        lambda env: env.compose("load_strategy.load_model=maybe")),
    Row("type-py", "field type", "Python", 'LoadStrategy(strict="yes")', "StrategyError",
        "LoadStrategy.strict must be true or false, got 'yes' (str). Fix: "
        "load_strategy.strict=true or =false.",
        lambda env: _load_strategy(strict="yes")),
    Row("ignore-type-py", "field type", "Python", 'LoadStrategy(extra_ignore_keys="head.*")',
        "StrategyError",
        "LoadStrategy.extra_ignore_keys must be a list of glob patterns or null, got 'head.*'. "
        "Fix: load_strategy.extra_ignore_keys='[model.head.*]'.",
        lambda env: _load_strategy(extra_ignore_keys="head.*")),
    Row("strategy-type-py", "field type", "Python", "ckpt.load(strategy=3, ...)",
        "StrategyError",
        "Cannot use int as a load strategy: pass a LoadStrategy, a preset name (eval, finetune, "
        "reset_optimizer, resume, scratch) or a config node such as cfg.load_strategy.",
        lambda env: env.resume(3)),
    Row("key-cli", "unknown key", "command line", "load_strategy.load_modle=false",
        "ConfigCompositionException",
        "Could not override 'load_strategy.load_modle'.\nTo append to your config use "
        "+load_strategy.load_modle=false\nKey 'load_modle' not in 'LoadStrategyConfig'",
        lambda env: env.compose("load_strategy.load_modle=false")),
    Row("key-plus-cli", "unknown key", "command line",
        "+load_strategy.load_modle=false (composes; the load refuses it)", "StrategyError",
        "Unknown key 'load_modle' in load_strategy. Did you mean 'load_model'? " + VALID_KEYS,
        lambda env: _hydra_then_load(env, "+load_strategy.load_modle=false")),
    Row("key-py", "unknown key", "Python", 'ckpt.load(strategy={"load_modle": False}, ...)',
        "StrategyError",
        "Unknown key 'load_modle' in load_strategy. Did you mean 'load_model'? " + VALID_KEYS,
        lambda env: env.resume({"load_modle": False})),
    Row("combo-cli", "impossible combination", "command line",
        "load_strategy=eval load_strategy.load_dataloaders=true (composes; the load refuses it)",
        "StrategyError",
        "load_dataloaders=True needs load_data_sources=True: a dataloader's state contains its "
        "data source's. Fix: set load_strategy.load_dataloaders=false, or "
        "load_strategy.load_data_sources=true.",
        lambda env: _hydra_then_load(env, "load_strategy=eval",
                                     "load_strategy.load_dataloaders=true")),
    Row("combo-py", "impossible combination", "Python", "LoadStrategy(load_model=False)",
        "StrategyError",
        "load_optimizer=True needs load_model=True: optimizer state is keyed to the model's "
        "parameters. Fix: set load_strategy.load_optimizer=false, or "
        "load_strategy.load_model=true.",
        lambda env: _load_strategy(load_model=False)),
    # ---------------------------------------------------------------- the source
    Row("missing-path", "missing path", "Python / load_from", 'ckpt.load("{tmp}/nope", ...)',
        "CheckpointNotFoundError", "checkpoint source {tmp}/nope does not exist",
        lambda env: env.resume(source=str(env.tmp / "nope"))),
    Row("missing-own-dir", "missing path", "Python", "Checkpointer(<new dir>).load(...)",
        "CheckpointNotFoundError", "checkpoint source {tmp}/new does not exist",
        lambda env: type(env.ckpt)(env.tmp / "new").load(model=build()[0])),
    Row("empty-dir", "empty directory", "Python / load_from", 'ckpt.load("{tmp}/empty", ...)',
        "CheckpointNotFoundError", "no complete checkpoint in {tmp}/empty (empty)" + FIX_SCRATCH,
        lambda env: (env.tmp / "empty").mkdir() or env.resume(source=str(env.tmp / "empty"))),
    Row("unfinished-only", "empty directory", "Python / load_from",
        "a directory holding only an interrupted save", "CheckpointNotFoundError",
        "no complete checkpoint in {tmp}/fresh (incomplete: "
        "step_0000000007.partial-3f2a9c0e11d4)" + FIX_SCRATCH,
        _unfinished_only),
    Row("not-checkpoints", "missing path", "Python / load_from",
        "a directory of other files (logs)", "CheckpointNotFoundError",
        "no complete checkpoint in {tmp}/logs (it holds no step_* directories)" + FIX_SCRATCH,
        _not_checkpoints),
    Row("text-file", "missing path", "Python / load_from", "a file that is not a checkpoint",
        "CheckpointCorruptError",
        "{tmp}/notes.txt: not a checkpoint: not a readable torch.save file, an optimus_ckpt "
        "checkpoint directory or a .safetensors file",
        _text_file, tail=" ("),
    # ---------------------------------------------------------------- the live objects
    Row("other-head", "checkpoint of another model", "Python",
        "a model whose head has 10 outputs, the checkpoint's 128 (strict)", "LoadMismatchError",
        CANNOT + "strict model load failed: 2 model key(s) shape mismatch: 2.bias [128] vs "
        "model [10], 2.weight [128, 512] vs model [10, 512]" + STRICT_FIX,
        _other_head),
    Row("other-model", "checkpoint of another model", "Python",
        "a different architecture (strict)", "LoadMismatchError",
        CANNOT + "strict model load failed: 2 model key(s) missing from the checkpoint: bias, "
        "weight; 4 model key(s) unexpected in the checkpoint: 0.bias, 0.weight, 2.bias, "
        "2.weight" + STRICT_FIX,
        _other_model),
    Row("opt-groups", "optimizer of another structure", "Python",
        "the optimizer built with 2 parameter groups, the checkpoint's 1", "LoadMismatchError",
        CANNOT + "optimizer structure differs: the checkpoint has 1 parameter group(s), the "
        "optimizer has 2." + OPT_FIX,
        _two_groups),
    Row("opt-params", "optimizer of another structure", "Python",
        "the optimizer over half of the parameters", "LoadMismatchError",
        CANNOT + "optimizer structure differs in parameter group 0: 4 parameter(s) in the "
        "checkpoint, 2 in the optimizer; only in the checkpoint: ['2.bias', '2.weight']."
        + OPT_FIX,
        _fewer_params),
    Row("opt-class", "optimizer of another structure", "Python",
        "SGD given, the checkpoint's state is AdamW's", "LoadMismatchError",
        CANNOT + "optimizer structure differs: the checkpoint's optimizer state was saved by "
        "torch.optim.adamw.AdamW, the optimizer is torch.optim.sgd.SGD (its state and "
        "hyperparameters would not fit). Fix: build it as AdamW, or start the optimizer fresh "
        "with load_strategy.load_optimizer=false (load_strategy=reset_optimizer).",
        _other_class),
    Row("absent-component", "impossible combination", "Python",
        "scheduler=... given to resume, the checkpoint has none", "LoadMismatchError",
        CANNOT + "'scheduler' is asked for and given, but {step5} has no 'scheduler'. Fix: skip "
        "it with load_strategy.load_scheduler=false (or a preset that skips it, e.g. "
        "load_strategy=finetune)",
        _absent_scheduler),
    Row("unmatched-ignore", "field type", "Python",
        'extra_ignore_keys=["model.hed.*"] (a typo)', "warning",
        "ignore pattern 'model.hed.*' matched nothing (a typo?)",
        _warning_unmatched),
    Row("not-given", "impossible combination", "Python",
        "resume with only model=... given", "warning",
        "the checkpoint has 'optimizer' and the strategy asks for it, but no object was given: "
        "pass optimizer=... to load(), or skip it with load_strategy.load_optimizer=false (or a "
        "preset that skips it, e.g. load_strategy=finetune)",
        _warning_not_given),
    Row("dataloaders-type", "field type", "Python", "dataloaders=loader (not a mapping)",
        "TypeError",
        "dataloaders must be a mapping of name -> object (e.g. dataloaders={{'train': obj}}), "
        "got Loader",
        lambda env: env.resume(dataloaders=Loader())),
    Row("no-state-dict", "field type", "Python", "metrics=object()", "TypeError",
        "metrics must have state_dict() and load_state_dict() methods, got object. Fix: pass "
        "the object itself (e.g. the DataLoader), or wrap it.",
        lambda env: env.resume(metrics=object())),
    # ---------------------------------------------------------------- saving
    Row("step-exists", "impossible combination", "Python", "ckpt.save(5, ...) twice",
        "CheckpointExistsError",
        "A checkpoint for step 5 already exists at {step5}. Fix: save under a new step, or "
        "delete that directory first.",
        lambda env: save_step(env.ckpt, 5)),
    Row("negative-step", "field type", "Python", "ckpt.save(-1, ...)", "ValueError",
        "step must be a non-negative int, got -1",
        lambda env: env.ckpt.save(-1, model=build()[0])),
    Row("unsaveable", "field type", "Python", "a state_dict() holding a function",
        "TypeError",
        "Cannot store state at 'extra.bad.hook' of type builtins.builtin_function_or_method "
        "safely: optimus_ckpt stores small state as JSON and never pickles. Fix: make "
        "state_dict() return plain data (numbers, strings, lists, dicts, tuples, bytes, tensors, "
        "numpy arrays).",
        _unsaveable),
    Row("keep-last", "field type", "Python", "Checkpointer(dir, keep_last=0)", "ValueError",
        "keep_last must be >= 1 or None, got 0",
        lambda env: type(env.ckpt)(env.ckpts, keep_last=0)),
    Row("optimizer-no-model", "impossible combination", "Python",
        "ckpt.save(1, model=None, optimizer=opt)", "ValueError",
        "optimizer given without model: optimizer state is keyed to the model's parameters",
        lambda env: env.ckpt.save(1, model=None, optimizer=build()[1])),
]  # fmt: skip


def outcome(row: Row, env: Env) -> tuple[str, str]:
    """(error class name or "warning" or "ok", the message) of running ``row``."""
    try:
        result = row.run(env)
    except Exception as e:
        text = str(e)
        if type(e).__name__ == "ConfigCompositionException" and e.__cause__ is not None:
            text += "\n" + str(e.__cause__).splitlines()[0]  # Hydra prints the cause too
        return type(e).__name__, text
    warnings = getattr(result, "warnings", None)
    if warnings:
        return "warning", warnings[0]
    return "ok", ""


@pytest.fixture
def env(tmp_path: Path, hydra_restore_singletons: None) -> Iterator[Env]:
    yield Env(tmp_path)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_gives_its_exact_error(row: Row, env: Env) -> None:
    error, message = outcome(row, env)
    assert error == row.error, (error, message)
    if row.tail is not None:
        assert row.tail in message, message
        message = message[: message.index(row.tail)]
    assert message == env.fmt(row.message), message


def test_the_live_objects_are_untouched_by_a_refused_load(env: Env) -> None:
    import torch

    model, _, loader = build(42)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="optimizer structure differs"):
        env.ckpt.load(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      dataloaders={"train": loader})  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert loader.state == build(42)[2].state


CODE = ("load_strategy", "+load_strategy", "ckpt.", "LoadStrategy(", "Checkpointer(",
        "extra_ignore_keys", "dataloaders=", "metrics=", "scheduler=")  # fmt: skip


def markdown_table() -> str:
    """The README table: one row per test above (paths shown under /runs/exp)."""
    lines = [
        "| Mistake | Where | Given | Error | Message |",
        "|---|---|---|---|---|",
    ]
    for r in ROWS:
        msg = re.sub(r"\s*\n\s*(- )?", " ", r.message).replace("|", "\\|")
        msg = msg.replace("{step5}", "/runs/exp/ckpts/step_0000000005")
        msg = msg.replace("{ckpts}", "/runs/exp/ckpts").replace("{tmp}", "/runs/exp")
        msg = msg.replace("{{", "{").replace("}}", "}") + (" ..." if r.tail else "")
        given = r.given.replace("{tmp}", "/runs/exp").replace("|", "\\|")
        if given.startswith(CODE):
            code, sep, rest = given.partition(" (")
            given = f"`{code}`" + (f" ({rest}" if sep else "")
        error = "warning in the report" if r.error == "warning" else f"`{r.error}`"
        lines.append(f"| {r.what} | {r.where} | {given} | {error} | {msg} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:  # print what each row gives now
        for row in ROWS:
            with tempfile.TemporaryDirectory() as d:
                e = Env(Path(d))
                print(f"== {row.id}: {outcome(row, e)}")
    else:
        print(markdown_table())
