"""Checkpointer: save, plan and load. The whole load path is here, in three phases:

1. **plan** (metadata only): decide every component's outcome from the strategy, the ignore rules,
   the given objects and the checkpoint's manifest; match model keys; check optimizer structure.
   Any error is raised here, before a live object is touched. ``plan()`` stops after this phase.
2. **fetch**: read small state and optimizer state into new objects (live objects untouched).
3. **apply**: hand small state and optimizer state to their objects (rolled back if any of them
   raises), then copy the model's tensors straight from the files into the model's own memory.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .codec import decode
from .distributed import RESHARD_HOOK, is_dtensor, local_nbytes, new_tensor_like
from .errors import (
    CheckpointCorruptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    LoadMismatchError,
)
from .layout import latest_checkpoint, list_checkpoints, step_dir_name
from .parts import PER_RANK_ROOTS, canonical_key, collect_parts, set_rng_state
from .report import ComponentReport, LoadReport, Outcome
from .sources import CheckpointView, FileView, candidates, open_checkpoint
from .storage import LocalStorage
from .strategy import _COMPONENT_FLAGS, LoadStrategy, resolve_strategy
from .writer import _dist, build_payload, param_names, write_checkpoint

log = logging.getLogger("optimus_ckpt")

__all__ = ["Checkpointer"]

_ORDER = (
    "model",
    "optimizer",
    "scheduler",
    "data_sources",
    "dataloaders",
    "metrics",
    "extra",
    "rng",
)
_KWARG = {
    "data_sources": "data_sources",
    "dataloaders": "dataloaders",
    "metrics": "metrics",
    "extra": "extra",
}


def _sort_key(name: str) -> tuple[int, str]:
    root = name.split(".", 1)[0]
    return (_ORDER.index(root) if root in _ORDER else len(_ORDER), name)


def _how_to_skip(name: str) -> str:
    root = name.split(".", 1)[0]
    flag = _COMPONENT_FLAGS.get(root)
    if flag and root not in ("rng", "extra"):
        return (
            f"load_strategy.{flag}=false (or a preset that skips it, e.g. load_strategy=finetune)"
        )
    return f"load_strategy.extra_ignore_keys=[{name}]"


class IgnoreRules:
    """fnmatch globs over dotted names; remembers which patterns matched something."""

    def __init__(self, patterns: list[str] | None) -> None:
        self.patterns = list(patterns or [])
        self.used: set[str] = set()

    def match(self, name: str) -> str | None:
        # Every pattern that matches counts as used (not only the first), so an overlapping
        # pattern is never reported as having matched nothing.
        hits = [p for p in self.patterns if fnmatch.fnmatchcase(name, p)]
        self.used.update(hits)
        return hits[0] if hits else None

    def component(self, name: str) -> str | None:
        parts = name.split(".")
        hits = [self.match(".".join(parts[:i])) for i in range(len(parts), 0, -1)]
        return next((h for h in hits if h), None)

    def unmatched(self) -> list[str]:
        return [p for p in self.patterns if p not in self.used]


@dataclass
class _Plan:
    report: LoadReport
    view: CheckpointView
    load: list[str] = field(default_factory=list)  # components to load, in order
    model_pairs: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key, live key)
    optimizer_map: list[tuple[int, str]] = field(
        default_factory=list
    )  # (live index, checkpoint fqn)
    tensor_keys: list[str] = field(default_factory=list)  # every stored tensor the load reads
    # Per-rank components restored through their reshard hook (the world size changed).
    reshard: list[str] = field(default_factory=list)
    # Bytes this rank reads of a tensor, where less than the whole (its shard of a DTensor).
    read_bytes: dict[str, int] = field(default_factory=dict)


class Checkpointer:
    """Saves checkpoints into ``directory`` and loads them back, selectively.

    >>> import tempfile, torch
    >>> from optimus_ckpt import Checkpointer
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep_last=2)
    >>> path = ckpt.save(10, model=model, optimizer=opt)
    >>> fresh = torch.nn.Linear(4, 2)
    >>> report = ckpt.load(strategy="eval", model=fresh)
    >>> report.iteration, report.loaded, torch.equal(fresh.weight, model.weight)
    (0, ['model'], True)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        fsync: bool = True,
        verify: bool = False,
        thread_count: int = 2,
        process_group: Any = None,
        async_save: bool = False,
    ) -> None:
        """``process_group``: the ranks that save and load together (default: the whole job
        when ``torch.distributed`` is initialized). ``async_save``: make :meth:`save` return as
        soon as the state is copied, and write the checkpoint in the background (see
        :meth:`save`); ``save(..., blocking=...)`` overrides it per call."""
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_last = keep_last
        self.fsync = fsync
        self.verify = verify
        self.thread_count = thread_count
        self.process_group = process_group
        self.async_save = async_save
        self._pending: Any = None  # the BackgroundSave of an async save in flight
        self._pending_error: BaseException | None = None
        self._snapshotter: Any = None  # reusable snapshot buffers of async saves
        self._background_group: Any = None  # gloo group for async saves' collectives
        self._agreement: str | None = None  # distributed load: "pending" until ranks agree

    # ------------------------------------------------------------------ listing
    def latest(self) -> str | None:
        """Path of the newest complete checkpoint in this Checkpointer's directory, or None."""
        self.wait()
        return latest_checkpoint(self.directory)

    def checkpoints(self) -> list[tuple[int, str]]:
        """Complete checkpoints as ``(step, path)``, oldest first."""
        self.wait()
        return list_checkpoints(self.directory)

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        *,
        model: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        data_sources: Any = None,
        dataloaders: Mapping[str, Any] | None = None,
        metrics: Any = None,
        extra: Mapping[str, Any] | None = None,
        config: Any = None,
        blocking: bool | None = None,
    ) -> str:
        """Save one checkpoint for ``step`` and return its path. See the module docs for the
        commit protocol: the checkpoint is either complete or invisible.

        ``blocking=False`` (default: ``not async_save``): copy the state's tensors into snapshot
        buffers, return, and write the checkpoint in a background thread while training goes
        on. The returned path exists once the save commits; :meth:`wait` waits for it, and the
        next ``save``, ``load``, ``plan``, ``latest`` and ``checkpoints`` wait first. An error
        of a background save is raised by the call that waits for it. Under
        ``torch.distributed`` every rank must call ``save`` (as for a blocking save) and
        :meth:`wait` before destroying the process group."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.wait()
        parts = collect_parts(
            model=model, optimizer=optimizer, scheduler=scheduler, data_sources=data_sources,
            dataloaders=dataloaders, metrics=metrics, extra=extra,
        )  # fmt: skip
        payload = build_payload(parts)
        storage = LocalStorage(self.directory, fsync=self.fsync)
        if self.async_save if blocking is None else not blocking:
            return self._save_in_background(storage, step, payload, _config_yaml(config))
        path = write_checkpoint(
            storage, step, payload, config_yaml=_config_yaml(config), keep_last=self.keep_last,
            thread_count=self.thread_count, process_group=self.process_group,
        )  # fmt: skip
        log.info("optimus_ckpt: saved step %d to %s", step, path)
        return path

    def _save_in_background(
        self, storage: LocalStorage, step: int, payload: Any, config_yaml: str | None
    ) -> str:
        """Snapshot the payload's tensors, then write the checkpoint in a thread."""
        from .distributed import BackgroundSave, Snapshotter, background_group

        final = storage.local_path(step_dir_name(step))
        _rank, _world, distributed = _dist(self.process_group)
        if not distributed and os.path.exists(final):  # the writer's check, raised now
            raise CheckpointExistsError(
                f"A checkpoint for step {step} already exists at {final}. "
                "Fix: save under a new step, or delete that directory first."
            )
        if self._snapshotter is None:
            self._snapshotter = Snapshotter()
        payload.tensors = self._snapshotter.take(payload.tensors)
        group = self.process_group
        if distributed:  # its own gloo group: never interleaves with the training's collectives
            if self._background_group is None:
                self._background_group = background_group(self.process_group)
            group = self._background_group

        def write() -> str:
            path = write_checkpoint(
                storage, step, payload, config_yaml=config_yaml, keep_last=self.keep_last,
                thread_count=self.thread_count, process_group=group,
            )  # fmt: skip
            log.info("optimus_ckpt: saved step %d to %s (in the background)", step, path)
            return path

        self._pending = BackgroundSave(write, name=f"optimus_ckpt-save-{step}")
        return final

    @property
    def pending(self) -> bool:
        """True while a background save (``blocking=False``) has not been waited for."""
        return self._pending is not None

    def wait(self) -> None:
        """Wait for a pending asynchronous save (if any) and re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()  # re-raises the background save's error
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err

    # ------------------------------------------------------------------ loading
    def plan(self, source: Any = None, strategy: Any = "resume", **objects: Any) -> LoadReport:
        """Dry run of :meth:`load` with the same arguments: reads only metadata, changes nothing,
        and returns the report that ``load`` would produce (or raises the error it would raise)."""
        return self._run_together(source, strategy, objects, execute=False)

    def load(
        self,
        source: Any = None,
        strategy: Any = "resume",
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        data_sources: Any = None,
        dataloaders: Mapping[str, Any] | None = None,
        metrics: Any = None,
        extra: Mapping[str, Any] | None = None,
        config: Any = None,
        verify: bool | None = None,
    ) -> LoadReport:
        """Load what ``strategy`` asks for from ``source`` into the given objects.

        ``source``: a checkpoint directory, a directory of checkpoints (its newest complete one,
        falling back to older ones when one is corrupt), None (this Checkpointer's directory), a
        single-file ``torch.save`` checkpoint or a ``.safetensors`` file (model weights).
        ``strategy``: a LoadStrategy, a DictConfig node such as ``cfg.load_strategy``, or a preset
        name. ``verify``: check content checksums of everything read before touching anything.
        """
        objects = dict(
            model=model, optimizer=optimizer, scheduler=scheduler, data_sources=data_sources,
            dataloaders=dataloaders, metrics=metrics, extra=extra, config=config, verify=verify,
        )  # fmt: skip
        return self._run_together(source, strategy, objects, execute=True)

    def _run_together(
        self, source: Any, strategy: Any, objects: dict[str, Any], execute: bool
    ) -> LoadReport:
        """:meth:`_run`; under torch.distributed, the ranks agree on the plan (or learn of one
        rank's error) before any rank touches its objects: a load fails everywhere or nowhere."""
        if not _dist(self.process_group)[2]:
            return self._run(source, strategy, objects, execute)
        self._agreement = "pending"
        try:
            return self._run(source, strategy, objects, execute)
        except BaseException as e:
            if self._agreement == "pending":  # failed before agreeing: tell the other ranks
                self._agreement = "done"
                from .distributed import agree

                agree(self.process_group, None, e)
            raise
        finally:
            self._agreement = None

    def _agree_on(self, view: CheckpointView) -> None:
        if self._agreement != "pending":
            return
        self._agreement = "done"
        from .distributed import agree

        try:
            agree(self.process_group, f"{os.path.basename(view.path)} (step {view.step})", None)
        except BaseException:
            view.close()
            raise

    def _run(
        self, source: Any, strategy: Any, objects: dict[str, Any], execute: bool
    ) -> LoadReport:
        self.wait()
        start = time.perf_counter()
        s = resolve_strategy(strategy)
        config = objects.pop("config", None)
        verify = objects.pop("verify", None)
        verify = self.verify if verify is None else bool(verify)
        unknown = set(objects) - {
            "model",
            "optimizer",
            "scheduler",
            "data_sources",
            "dataloaders",
            "metrics",
            "extra",
        }
        if unknown:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
        parts = collect_parts(**objects)
        src = self.directory if source is None else os.fspath(source)
        skipped: list[str] = []
        tried = candidates(src)
        for i, path in enumerate(tried):
            try:
                view = open_checkpoint(path)
            except (CheckpointCorruptError, CheckpointNotFoundError) as e:
                if i + 1 == len(tried):
                    if isinstance(e, CheckpointCorruptError):
                        raise self._fallback_error(e, skipped) from None
                    raise
                skipped.append(f"{path}: {e}")
                continue
            try:
                plan = self._plan(view, s, parts, config)
                if verify and isinstance(view, FileView):
                    view.verify(plan.tensor_keys)
                    plan.report.verified = True
                if any(n.split(".", 1)[0] in PER_RANK_ROOTS for n in plan.load):
                    # checksummed small file: read now, so that a bad one falls back too
                    view.rank_state(_dist(self.process_group)[0])
            except CheckpointCorruptError as e:
                view.close()
                if i + 1 == len(tried):
                    raise self._fallback_error(e, skipped) from None
                skipped.append(f"{path}: {e}")
                continue
            except BaseException:
                view.close()
                raise
            break
        self._agree_on(view)
        report = plan.report
        for msg in skipped:
            report.skipped_checkpoints.append(msg.split(": ", 1)[0])
            report.warnings.append(f"skipped a checkpoint that failed its checks: {msg}")
        if not execute:
            view.close()
            report.dry_run = True
            return report
        try:
            tensor_bytes = self._execute(plan, parts)
        finally:
            view.close()
        report.bytes_read = tensor_bytes
        report.seconds = time.perf_counter() - start
        log.info("%s", report)
        for w in report.warnings:
            log.warning("optimus_ckpt: %s", w)
        return report

    @staticmethod
    def _fallback_error(err: CheckpointCorruptError, skipped: list[str]) -> CheckpointCorruptError:
        if not skipped:
            return err
        return CheckpointCorruptError(
            f"{err}\nNo checkpoint passed its checks; also skipped:\n  " + "\n  ".join(skipped)
        )

    # ------------------------------------------------------------------ phase 1: plan
    def _plan(
        self, view: CheckpointView, s: LoadStrategy, parts: dict[str, Any], config: Any
    ) -> _Plan:
        _rank, world, _ = _dist(self.process_group)
        ignore = IgnoreRules(s.extra_ignore_keys)
        report = LoadReport(
            source=view.path, step=view.step, iteration=view.step if s.load_iteration else 0,
            strategy=s.to_dict(),
        )  # fmt: skip
        plan = _Plan(report=report, view=view)
        errors: list[str] = []
        names = sorted(set(parts) | set(view.components) | {"rng"}, key=_sort_key)
        for name in names:
            root = name.split(".", 1)[0]
            in_ckpt = name in view.components
            given = name in parts or name == "rng"
            pattern = ignore.component(name) if s.loads(name) else None
            if not s.loads(name):
                outcome, why = (
                    Outcome.SKIPPED_BY_STRATEGY,
                    f"load_strategy.{_COMPONENT_FLAGS[root]}=false",
                )
            elif pattern:
                outcome, why = Outcome.IGNORED, f"matches ignore pattern '{pattern}'"
            elif not given:
                outcome, why = Outcome.NOT_GIVEN, ""
                if in_ckpt:
                    kw = _KWARG.get(root, root)
                    report.warnings.append(
                        f"the checkpoint has '{name}' and the strategy asks for it, but no object "
                        f"was given: pass {kw}=... to load(), or skip it with {_how_to_skip(name)}"
                    )
            elif not in_ckpt:
                outcome, why = Outcome.ABSENT, ""
                if root != "rng":
                    msg = (
                        f"'{name}' is asked for and given, but {view.path} has no '{name}'. "
                        f"Fix: skip it with {_how_to_skip(name)}"
                    )
                    if s.strict:
                        errors.append(msg)
                    else:
                        report.warnings.append(msg)
            elif (
                root in PER_RANK_ROOTS
                and view.world_size != world
                and callable(getattr(parts.get(name), RESHARD_HOOK, None))
            ):
                outcome = Outcome.LOADED
                why = f"resharded from {view.world_size} to {world} process(es) ({RESHARD_HOOK})"
                plan.reshard.append(name)
            elif root in PER_RANK_ROOTS and view.world_size != world:
                outcome, why = Outcome.SKIPPED_BY_STRATEGY, ""
                msg = (
                    f"'{name}' was saved per process by {view.world_size} process(es); this run "
                    f"has {world}, and its state cannot be split or merged safely."
                )
                if root == "rng":
                    why = "world size changed"
                    report.warnings.append(msg + " RNG states were left as they are.")
                else:
                    errors.append(
                        msg + f" Fix: skip it with {_how_to_skip(name)}, or give "
                        f"{type(parts[name]).__name__} a {RESHARD_HOOK}(states, *, rank, "
                        "world_size) method that splits or merges the saved states (see "
                        "optimus_ckpt.distributed)."
                    )
            else:
                outcome, why = Outcome.LOADED, ""
            comp = ComponentReport(outcome, why)
            report.components[name] = comp
            if outcome is not Outcome.LOADED:
                continue
            if name == "model":
                errors += self._plan_model(plan, s, ignore, parts["model"])
            elif name == "optimizer":
                errors += self._plan_optimizer(plan, parts)
            else:
                keys = (
                    view.component_tensor_keys(name)
                    if hasattr(view, "component_tensor_keys")
                    else [k for k in view.tensors if k.startswith(name + ".")]
                )
                plan.tensor_keys += keys
                comp.tensors = len(keys)
                comp.bytes = sum(view.tensors[k].nbytes for k in keys)
            plan.load.append(name)
        report.unmatched_ignore_patterns = ignore.unmatched()
        for p in report.unmatched_ignore_patterns:
            report.warnings.append(f"ignore pattern '{p}' matched nothing (a typo?)")
        report.bytes_read = sum(
            plan.read_bytes.get(k, view.tensors[k].nbytes) for k in plan.tensor_keys
        )
        report.config_diff = _config_diff(view.config_yaml, config)
        if errors:
            head = errors[:8] + ([f"... and {len(errors) - 8} more"] if len(errors) > 8 else [])
            raise LoadMismatchError(
                f"Cannot load {view.path} with this strategy; nothing was changed:\n  - "
                + "\n  - ".join(head)
            )
        return plan

    def _plan_model(
        self, plan: _Plan, s: LoadStrategy, ignore: IgnoreRules, model: Any
    ) -> list[str]:
        import torch

        view, report = plan.view, plan.report
        live = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        saved = {k[len("model.") :]: m for k, m in view.tensors.items() if k.startswith("model.")}
        live_c = _by_canonical(live)
        saved_c = _by_canonical(saved)
        renames: set[str] = set()
        for c in sorted(set(live_c) | set(saved_c)):
            lk, sk = live_c.get(c), saved_c.get(c)
            if ignore.match(f"model.{c}"):
                report.ignored_keys.append(lk or sk)  # type: ignore[arg-type]
                continue
            if lk is None:
                report.unexpected_keys.append(sk)  # type: ignore[arg-type]
            elif sk is None:
                report.missing_keys.append(lk)
            elif tuple(live[lk].shape) != tuple(saved[sk].shape):
                report.shape_mismatches.append((lk, list(saved[sk].shape), list(live[lk].shape)))
            else:
                plan.model_pairs.append((sk, lk))
                plan.tensor_keys.append(f"model.{sk}")
                if is_dtensor(live[lk]):  # a shard (FSDP2): this rank reads only its part
                    plan.read_bytes[f"model.{sk}"] = local_nbytes(saved[sk].nbytes, live[lk])
                live_dtype = str(live[lk].dtype).removeprefix("torch.")
                if live_dtype != saved[sk].dtype:
                    report.dtype_conversions.append((lk, saved[sk].dtype, live_dtype))
                if sk != lk:
                    renames.add(
                        f"checkpoint '{sk[: len(sk) - len(c)]}' -> model '{lk[: len(lk) - len(c)]}'"
                    )
        report.renamed_prefixes = sorted(renames)
        comp = report.components["model"]
        comp.tensors = len(plan.model_pairs)
        comp.bytes = sum(
            plan.read_bytes.get(f"model.{sk}", saved[sk].nbytes) for sk, _ in plan.model_pairs
        )
        problems = bool(report.missing_keys or report.unexpected_keys or report.shape_mismatches)
        if problems and not s.strict:
            comp.reason = "non-strict: mismatched keys kept their current values"
        if not (s.strict and problems):
            return []
        parts = []
        for label, keys in (("missing from the checkpoint", report.missing_keys),
                            ("unexpected in the checkpoint", report.unexpected_keys),
                            ("shape mismatch", [f"{k} {a} vs model {b}" for k, a, b in report.shape_mismatches])):  # fmt: skip
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} model key(s) {label}: {', '.join(keys[:5])}{more}")
        return [
            "strict model load failed: " + "; ".join(parts) + ". Fix: ignore them with "
            "load_strategy.extra_ignore_keys='[model.<pattern>]', or load non-strictly with "
            "load_strategy.strict=false (mismatched keys keep their current values and are "
            "reported), or use load_strategy=finetune."
        ]

    def _plan_optimizer(self, plan: _Plan, parts: dict[str, Any]) -> list[str]:
        view, comp = plan.view, plan.report.components["optimizer"]
        optimizer, model = parts["optimizer"], parts["model"]
        saved = view.global_state("optimizer")
        if not isinstance(saved, dict) or "param_groups" not in saved:
            raise CheckpointCorruptError(
                f"{view.path}: optimizer state is missing from the manifest"
            )
        fix = (
            "Fix: build the optimizer with the same parameter groups as the run that saved it, or "
            "start it fresh with load_strategy.load_optimizer=false (load_strategy=reset_optimizer)."
        )
        saved_class = saved.get("class")
        live_class = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        if isinstance(saved_class, str) and saved_class != live_class:
            return [
                f"optimizer structure differs: the checkpoint's optimizer state was saved by "
                f"{saved_class}, the optimizer is {live_class} (its state and hyperparameters "
                f"would not fit). Fix: build it as {saved_class.rsplit('.', 1)[-1]}, or start the "
                "optimizer fresh with load_strategy.load_optimizer=false "
                "(load_strategy=reset_optimizer)."
            ]
        names = [canonical_key(n) for n in param_names(model, optimizer)]
        live_groups = optimizer.param_groups
        saved_groups = saved["param_groups"]
        if len(live_groups) != len(saved_groups):
            return [
                f"optimizer structure differs: the checkpoint has {len(saved_groups)} parameter "
                f"group(s), the optimizer has {len(live_groups)}. {fix}"
            ]
        errors = []
        index = 0
        params = [p for g in live_groups for p in g["params"]]
        for gi, (lg, sg) in enumerate(zip(live_groups, saved_groups)):
            live_names = names[index : index + len(lg["params"])]
            index += len(lg["params"])
            saved_names = [canonical_key(n) for n in sg["params"]]
            if sorted(live_names) != sorted(saved_names):
                only_live = sorted(set(live_names) - set(saved_names))[:3]
                only_saved = sorted(set(saved_names) - set(live_names))[:3]
                errors.append(
                    f"optimizer structure differs in parameter group {gi}: {len(saved_names)} "
                    f"parameter(s) in the checkpoint, {len(live_names)} in the optimizer"
                    + (f"; only in the optimizer: {only_live}" if only_live else "")
                    + (f"; only in the checkpoint: {only_saved}" if only_saved else "")
                    + f". {fix}"
                )
        if errors:
            return errors
        state = {canonical_key(k): v for k, v in saved["state"].items()}
        by_name = {n: i for i, n in enumerate(names)}
        for fqn, entries in state.items():
            i = by_name.get(fqn)
            if i is None:
                continue
            for key, enc in entries.items():
                ref = (
                    enc.get("v")
                    if isinstance(enc, dict) and enc.get("__optimus__") == "ref"
                    else None
                )
                if ref is None:
                    continue
                meta = view.tensors.get(ref)
                if meta is None:
                    raise CheckpointCorruptError(
                        f"{view.path}: optimizer tensor {ref} is not stored"
                    )
                shape = tuple(params[i].shape)
                if meta.shape and meta.shape != shape:
                    errors.append(
                        f"optimizer state '{key}' of parameter '{fqn}' has shape {list(meta.shape)} "
                        f"in the checkpoint; the parameter has shape {list(shape)}. {fix}"
                    )
                plan.tensor_keys.append(ref)
                if is_dtensor(params[i]) and meta.shape == shape:  # sharded like its parameter
                    plan.read_bytes[ref] = local_nbytes(meta.nbytes, params[i])
                comp.tensors += 1
                comp.bytes += plan.read_bytes.get(ref, meta.nbytes)
            plan.optimizer_map.append((i, fqn))
        return errors

    # ------------------------------------------------------------------ phases 2 and 3
    def _execute(self, plan: _Plan, parts: dict[str, Any]) -> int:
        import torch

        view = plan.view
        rank, world, _ = _dist(self.process_group)

        def read_new(ref: str) -> Any:
            meta = view.tensors[ref]
            t = torch.empty(meta.shape, dtype=_dtype(meta.dtype))
            view.read_into(ref, t)
            return t

        # Phase 2: fetch into new objects only.
        needs_rank = any(n.split(".", 1)[0] in PER_RANK_ROOTS for n in plan.load)
        rank_state = view.rank_state(rank) if needs_rank else {}
        saved_ranks = [view.rank_state(r) for r in range(view.world_size)] if plan.reshard else []
        before = view.bytes_read
        fetched: dict[str, Any] = {}
        with view.batch():  # tensors are filled at the end of the block (in parallel)
            for name in plan.load:
                if name in ("model", "optimizer") or name in plan.reshard:
                    continue
                per_rank = name.split(".", 1)[0] in PER_RANK_ROOTS
                enc = rank_state.get(name) if per_rank else view.global_state(name)
                if enc is None:
                    raise CheckpointCorruptError(f"{view.path}: the state of '{name}' is missing")
                fetched[name] = decode(enc, read_new)
        for name in plan.reshard:  # the world size changed: the object's hook splits/merges
            states = []
            for r, saved in enumerate(saved_ranks):
                if name not in saved:
                    raise CheckpointCorruptError(
                        f"{view.path}: the state of '{name}' of rank {r} is missing"
                    )
                states.append(decode(saved[name], read_new))
            hook = getattr(parts[name], RESHARD_HOOK)
            fetched[name] = hook(states, rank=rank, world_size=world)
        optimizer_sd = None
        if "optimizer" in plan.load:
            with view.batch():
                optimizer_sd = self._fetch_optimizer(plan, parts["optimizer"], read_new)
        tensor_bytes = view.bytes_read - before

        # Phase 3: apply, rolling back small state if any load_state_dict raises.
        done: list[tuple[Any, Any]] = []
        try:
            for name, state in fetched.items():
                if name == "rng":
                    continue
                obj = parts[name]
                # Registered before the call, so an object whose own load_state_dict changes
                # part of it and then raises is restored too.
                done.append((obj, copy.deepcopy(obj.state_dict())))
                obj.load_state_dict(state)
            if optimizer_sd is not None:
                opt = parts["optimizer"]
                done.append((opt, opt.state_dict()))
                opt.load_state_dict(optimizer_sd)
        except BaseException:
            for obj, snapshot in reversed(done):
                try:  # restore every object even if one refuses its own old state
                    obj.load_state_dict(snapshot)
                except Exception as e:
                    log.error(
                        "optimus_ckpt: could not restore %s after a failed load: %s",
                        type(obj).__name__, e,
                    )  # fmt: skip
            raise
        if "model" in plan.load:
            start = view.bytes_read
            with view.batch():
                self._apply_model(plan, parts["model"])
            tensor_bytes += view.bytes_read - start
        if "rng" in fetched:
            set_rng_state(fetched["rng"])
        return tensor_bytes

    def _fetch_optimizer(self, plan: _Plan, optimizer: Any, read_new: Any) -> dict[str, Any]:
        saved = plan.view.global_state("optimizer")
        state_by_name = {canonical_key(k): v for k, v in saved["state"].items()}
        params = [p for g in optimizer.param_groups for p in g["params"]]

        def reader(i: int) -> Any:
            def read(ref: str) -> Any:  # state sharded like its parameter (FSDP2), or whole
                t = new_tensor_like(plan.view, ref, params[i])
                return read_new(ref) if t is None else t

            return read

        state = {i: decode(state_by_name[fqn], reader(i)) for i, fqn in plan.optimizer_map}
        groups, index = [], 0
        for lg, sg in zip(optimizer.param_groups, saved["param_groups"]):
            hyper = {k: decode(v) for k, v in sg.items() if k != "params"}
            hyper["params"] = list(range(index, index + len(lg["params"])))
            index += len(lg["params"])
            groups.append(hyper)
        return {"state": state, "param_groups": groups}

    def _apply_model(self, plan: _Plan, model: Any) -> None:
        live = model.state_dict()
        for saved_key, live_key in plan.model_pairs:
            plan.view.read_into(f"model.{saved_key}", live[live_key])
        extras = (plan.view.global_state("model") or {}).get("extra_state") or {}
        if extras:
            model.load_state_dict(
                {k: decode(v) for k, v in extras.items() if k in live}, strict=False
            )


def _dtype(name: str) -> Any:
    from .dtypes import dtype_from_name

    return dtype_from_name(name)


def _by_canonical(keys: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k in keys:
        c = canonical_key(k)
        if c in out:  # two keys collapse to one name: fall back to exact names
            return {k: k for k in keys}
        out[c] = k
    return out


def _config_yaml(config: Any) -> str | None:
    if config is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    try:
        node = config if isinstance(config, DictConfig) else OmegaConf.create(config)
        try:
            return OmegaConf.to_yaml(node, resolve=True)
        except Exception:
            return OmegaConf.to_yaml(node, resolve=False)
    except Exception as e:
        raise TypeError(
            f"config must be a DictConfig or a dict, got {type(config).__name__}: {e}"
        ) from None


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _config_diff(saved_yaml: str | None, config: Any) -> list[tuple[str, Any, Any]]:
    if saved_yaml is None or config is None:
        return []
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=False)
    now_yaml = _config_yaml(config) or ""
    now = OmegaConf.to_container(OmegaConf.create(now_yaml), resolve=False)
    a, b = _flatten(saved), _flatten(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


__all__ += ["CheckpointNotFoundError"]
