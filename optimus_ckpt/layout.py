"""The on-disk layout contract: names, the commit marker and "latest". No torch import here.

A checkpoint directory holds one sub-directory per saved step, ``step_0000000100``. A step
directory is *complete* when it carries the manifest ``optimus.json`` (written last, as the commit
marker) and has its final name (staging directories end in ``.partial-<id>``). The Hydra resolver
``${optimus_ckpt.latest:DIR}`` and :meth:`Checkpointer.latest` both use :func:`latest_checkpoint`.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> latest_checkpoint(d) is None
True
>>> os.makedirs(os.path.join(d, step_dir_name(5)))
>>> latest_checkpoint(d) is None   # no manifest yet: incomplete, ignored
True
"""

from __future__ import annotations

import json
import os
import re

__all__ = [
    "FORMAT_NAME",
    "LATEST_MARKER",
    "MANIFEST_NAME",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "parse_step",
    "step_dir_name",
]

FORMAT_NAME = "optimus_ckpt"
MANIFEST_NAME = "optimus.json"
LATEST_MARKER = "latest"
STAGING_INFIX = ".partial-"
LOCK_NAME = ".optimus.lock"
_STEP_RE = re.compile(r"^step_(\d{10,})$")


def step_dir_name(step: int) -> str:
    """Directory name of a step: zero-padded so that names sort by step."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:010d}"


def parse_step(name: str) -> int | None:
    """The step of a committed step directory's name, or None for anything else."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a committed checkpoint: final name and a readable manifest."""
    path = os.fspath(path)
    if parse_step(os.path.basename(os.path.normpath(path))) is None:
        return False
    try:
        with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as f:
            head = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: a deeply nested JSON bomb
        return False
    return isinstance(head, dict) and head.get("format") == FORMAT_NAME


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """Complete checkpoints under ``directory`` as ``(step, path)``, oldest first."""
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        step = parse_step(name)
        if step is None:
            continue
        path = os.path.join(directory, name)
        if is_complete(path):
            found.append((step, path))
    found.sort()
    return found


def latest_checkpoint(directory: str | os.PathLike[str] | None) -> str | None:
    """Path of the newest complete checkpoint under ``directory``, or None when there is none.

    Scans the directory on every call (never cached), so a newer checkpoint is seen at once.
    """
    if directory is None or os.fspath(directory) == "":
        return None
    found = list_checkpoints(directory)
    return os.path.abspath(found[-1][1]) if found else None
