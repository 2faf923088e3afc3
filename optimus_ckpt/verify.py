"""Checking checkpoints on disk without loading them (the command line's ``verify``).

Two levels, the same a load uses:

* **structure** (every load runs these): the manifest parses, is not hostile (no path traversal,
  absurd sizes or unknown format version) and matches its own CRC-32; every file it lists exists
  with its listed size;
* **content** (a load runs these with ``verify=True``): every tensor chunk's CRC-32 and every small
  file's CRC-32, as recorded at save.

:func:`verify_path` never raises for a bad checkpoint: it returns one :class:`VerifyResult` per
checkpoint, with ``ok``, the failed ``check`` and the error text (which names the file).

>>> import tempfile, torch
>>> from optimus_ckpt import Checkpointer
>>> d = tempfile.mkdtemp()
>>> _ = Checkpointer(d).save(1, model=torch.nn.Linear(2, 2))
>>> [(r.ok, r.step, r.check) for r in verify_path(d)]
[(True, 1, '')]
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from .errors import CheckpointNotFoundError, OptimusCkptError, UnsafeCheckpointError
from .layout import MANIFEST_NAME, STAGING_INFIX, parse_step

__all__ = ["VerifyResult", "verify_checkpoint", "verify_path"]


@dataclass
class VerifyResult:
    """The outcome of checking one checkpoint."""

    path: str
    ok: bool
    step: int | None = None
    kind: str = ""  # "optimus", "safetensors", "torch"
    content: bool = True  # whether content checksums were checked (else structure only)
    check: str = ""  # the check that failed: structure, size, checksum, manifest, refused, missing
    error: str = ""
    files: int = 0
    tensors: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        what = "content and structure" if self.content else "structure"
        if self.ok:
            return (
                f"OK      {self.path} (step {self.step}): {what} checks passed: {self.files} "
                f"file(s), {self.tensors} tensor(s), {self.bytes_checked} bytes checked "
                f"in {self.seconds:.3f} s"
            )
        return f"FAILED  {self.path}: {self.check} check failed: {self.error}"


def _failed_check(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, UnsafeCheckpointError):
        return "refused"
    if isinstance(err, CheckpointNotFoundError):
        return "missing"
    for check in ("checksum", "size", "structure", "manifest"):
        if f"{check} check failed" in text:
            return check
    return "structure"


def verify_checkpoint(path: str | os.PathLike[str], *, content: bool = True) -> VerifyResult:
    """Check one checkpoint: a step directory, a ``.safetensors`` or a ``torch.save`` file.

    ``content=False`` runs only the structure checks every load runs. Never raises for a bad
    checkpoint: the result says which check failed and why.
    """
    from .sources import FileView, open_checkpoint

    path = os.path.abspath(os.fspath(path))
    result = VerifyResult(path=path, ok=False, content=content)
    start = time.perf_counter()
    view = None
    try:
        view = open_checkpoint(path)  # parses the manifest and runs the structure checks
        result.step, result.kind = view.step, view.kind
        if isinstance(view, FileView):
            result.files = len(view.manifest.files)
            result.tensors = len(view.manifest.tensors)
            if content:
                before = view.storage.bytes_read
                view.verify_all()
                result.bytes_checked = view.storage.bytes_read - before
        else:
            result.tensors = len(view.tensors)
        result.ok = True
    except (OptimusCkptError, OSError) as e:
        result.check, result.error = _failed_check(e), str(e)
    finally:
        if view is not None:
            view.close()
    result.seconds = time.perf_counter() - start
    return result


def verify_path(path: str | os.PathLike[str], *, content: bool = True) -> list[VerifyResult]:
    """Check ``path``: one checkpoint, or every checkpoint of a directory of checkpoints.

    For a directory of checkpoints, every step directory with its final name is checked, newest
    first, including ones without a readable manifest (they fail). Staging directories of
    unfinished saves (``step_N.partial-<id>``) are not checkpoints and are not listed.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        return [
            VerifyResult(path=path, ok=False, content=content, check="missing",
                         error=f"{path} does not exist")
        ]  # fmt: skip
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return [verify_checkpoint(path, content=content)]
    steps = sorted(
        ((step, os.path.join(path, n)) for n in os.listdir(path)
         if (step := parse_step(n)) is not None and os.path.isdir(os.path.join(path, n))),
        reverse=True,
    )  # fmt: skip
    if not steps:
        if parse_step(os.path.basename(path)) is not None or STAGING_INFIX in path:
            return [verify_checkpoint(path, content=content)]
        return [
            VerifyResult(path=path, ok=False, content=content, check="missing",
                         error=f"no checkpoint in {path}")
        ]  # fmt: skip
    return [verify_checkpoint(p, content=content) for _, p in steps]
