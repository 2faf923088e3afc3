"""Every error optimus_ckpt raises, in one place. Each names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "CheckpointCorruptError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "LoadMismatchError",
    "OptimusCkptError",
    "StrategyError",
    "UnsafeCheckpointError",
]


class OptimusCkptError(Exception):
    """Base class of all optimus_ckpt errors."""


class StrategyError(OptimusCkptError, ValueError):
    """A LoadStrategy is invalid: a wrong type, an unknown key or an impossible combination."""


class CheckpointNotFoundError(OptimusCkptError, FileNotFoundError):
    """No (complete) checkpoint where one was asked for."""


class CheckpointExistsError(OptimusCkptError, FileExistsError):
    """A save would replace a committed checkpoint."""


class CheckpointWriteError(OptimusCkptError, OSError):
    """A save failed (disk full, I/O error): says what failed; nothing was committed, the staging
    directory was removed and every earlier checkpoint is intact. ``errno`` is the cause's."""


class CheckpointCorruptError(OptimusCkptError):
    """A checkpoint failed a structure, size or checksum check; names the file and the check."""


class UnsafeCheckpointError(OptimusCkptError):
    """A file would need unrestricted unpickling (it could run code) or its manifest is hostile."""


class LoadMismatchError(OptimusCkptError, ValueError):
    """The checkpoint does not fit the live objects (keys, shapes, optimizer structure)."""
