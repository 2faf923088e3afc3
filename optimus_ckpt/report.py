"""LoadReport: what a load (or a dry-run plan) did, component by component and key by key."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

__all__ = ["ComponentReport", "LoadReport", "Outcome"]


class Outcome(str, Enum):
    """What happened to one component."""

    LOADED = "loaded"
    SKIPPED_BY_STRATEGY = "skipped by strategy"
    IGNORED = "skipped by ignore rule"
    ABSENT = "absent from checkpoint"
    NOT_GIVEN = "no object given"

    def __str__(self) -> str:
        return self.value


@dataclass
class ComponentReport:
    """One component's outcome, why, and how much it reads."""

    outcome: Outcome
    reason: str = ""
    tensors: int = 0
    bytes: int = 0


@dataclass
class LoadReport:
    """The result of :meth:`Checkpointer.load` or :meth:`Checkpointer.plan`.

    ``iteration`` is the step to continue from: the checkpoint's step when the strategy loads the
    iteration, else 0. ``bytes_read`` counts the tensor bytes read (planned, for ``plan``).
    """

    source: str
    step: int
    iteration: int
    strategy: dict[str, Any]
    components: dict[str, ComponentReport] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    unmatched_ignore_patterns: list[str] = field(default_factory=list)
    renamed_prefixes: list[str] = field(default_factory=list)
    dtype_conversions: list[tuple[str, str, str]] = field(default_factory=list)
    config_diff: list[tuple[str, Any, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped_checkpoints: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    verified: bool = False

    @property
    def loaded(self) -> list[str]:
        """Names of the components that were (or would be) loaded."""
        return [n for n, c in self.components.items() if c.outcome is Outcome.LOADED]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["components"] = {
            n: {**asdict(c), "outcome": c.outcome.value} for n, c in self.components.items()
        }
        d["loaded"] = self.loaded
        return d

    def to_json(self, **kwargs: Any) -> str:
        """The report as JSON text (``json.dumps`` keyword arguments pass through)."""
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def __str__(self) -> str:
        title = "Load plan" if self.dry_run else "Load report"
        lines = [
            f"{title}: {self.source}",
            f"  checkpoint step {self.step}; continue from iteration {self.iteration}",
        ]
        rows = [("component", "outcome", "tensors", "size", "note")]
        for name, c in self.components.items():
            rows.append(
                (
                    name,
                    c.outcome.value,
                    str(c.tensors) if c.tensors else "",
                    _size(c.bytes),
                    c.reason,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append(
                "  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + ("  " + r[4]).rstrip()
            )
        lines.append(
            f"  read {_size(self.bytes_read)}"
            + ("" if self.dry_run else f" in {self.seconds:.3f} s")
            + (" (checksums verified)" if self.verified else "")
        )
        for label, keys in (
            ("missing keys (kept their current values)", self.missing_keys),
            ("unexpected keys (not loaded)", self.unexpected_keys),
            ("ignored keys", self.ignored_keys),
        ):
            if keys:
                lines.append(f"  {label}: {len(keys)}: {_first(keys)}")
        if self.shape_mismatches:
            lines.append(f"  shape mismatches (kept fresh): {len(self.shape_mismatches)}")
            for key, saved, live in self.shape_mismatches[:8]:
                lines.append(f"    {key}: checkpoint {saved} vs model {live}")
        for key, saved_dtype, live_dtype in self.dtype_conversions[:8]:
            lines.append(f"  dtype converted: {key}: {saved_dtype} -> {live_dtype}")
        for p in self.renamed_prefixes:
            lines.append(f"  renamed keys: {p}")
        if self.unmatched_ignore_patterns:
            lines.append(
                "  ignore patterns that matched nothing (typo?): "
                + ", ".join(self.unmatched_ignore_patterns)
            )
        if self.config_diff:
            lines.append(f"  config differences (checkpoint -> now): {len(self.config_diff)}")
            for key, old, new in self.config_diff[:12]:
                lines.append(f"    {key}: {old!r} -> {new!r}")
        for w in self.warnings:
            lines.append(f"  WARNING: {w}")
        return "\n".join(lines)


def _first(keys: list[str], n: int = 5) -> str:
    head = ", ".join(keys[:n])
    return head + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _size(n: int) -> str:
    if not n:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
