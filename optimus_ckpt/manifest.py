"""The JSON manifest: the commit marker and the only metadata a load reads.

It lists every tensor (dtype, shape, and where each chunk's raw bytes lie, with a CRC-32), every
file with its size, the components, the small state and the run's config. Parsing treats the file
as hostile: names, sizes, shapes and versions are checked before anything is allocated or read.
torch.distributed.checkpoint's own ``.metadata`` (a pickle) is written for torch's tools and is
never read by optimus_ckpt.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from .dtypes import DTYPES
from .errors import CheckpointCorruptError, UnsafeCheckpointError
from .layout import FORMAT_NAME, MANIFEST_NAME

__all__ = ["FORMAT_VERSION", "Chunk", "Manifest", "TensorEntry", "parse_manifest"]

FORMAT_VERSION = 1
MAX_BYTES = 1 << 50  # 1 PiB: anything larger is an absurd (hostile) size
MAX_NDIM = 64
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: its box in the global tensor and its raw bytes in a file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    crc32: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "offsets": list(self.offsets),
            "sizes": list(self.sizes),
            "file": self.file,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "crc32": self.crc32,
        }


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES()[self.dtype].itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunks": [c.to_json() for c in self.chunks],
        }


@dataclass
class Manifest:
    step: int
    world_size: int = 1
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank_files: list[str] = field(default_factory=list)
    config_yaml: str | None = None
    library_version: str = ""
    torch_version: str = ""
    created_unix: float = 0.0
    format_version: int = FORMAT_VERSION
    # Whether the manifest's own CRC-32 matched when it was parsed (None: it carries none).
    checksum_ok: bool | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> str:
        data = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "library_version": self.library_version,
            "torch_version": self.torch_version,
            "components": self.components,
            "files": self.files,
            "rank_files": self.rank_files,
            "tensors": {k: e.to_json() for k, e in self.tensors.items()},
            "state": self.state,
            "config_yaml": self.config_yaml,
        }
        return add_checksum(json.dumps(data, indent=1, allow_nan=True))

    def component_tensors(self, component: str) -> list[str]:
        prefix = component + "."
        return [k for k in self.tensors if k.startswith(prefix)]


# The manifest's own CRC-32 is its last key, over the text without it, so that a flipped byte in
# the manifest (a digit of an offset, a learning rate) is caught even where JSON still parses.
_CRC_KEY = "manifest_crc32"
_CRC_TAIL = re.compile(rb',\n "manifest_crc32": (\d+)\n\}\s*\Z')


def add_checksum(text: str) -> str:
    """Append the ``manifest_crc32`` key to the JSON object ``text`` (written by ``to_json``)."""
    body = text.rstrip()
    if not body.endswith("\n}"):
        raise ValueError("add_checksum expects json.dumps(..., indent=1) output")
    crc = zlib.crc32(body.encode("utf-8"))
    return f'{body[:-2]},\n "{_CRC_KEY}": {crc}\n}}'


def _checksum_ok(raw: bytes, data: dict[str, Any]) -> bool | None:
    if _CRC_KEY not in data:
        return None  # hand-written or foreign: nothing to check (structure checks still run)
    m = _CRC_TAIL.search(raw)
    if m is None or int(m.group(1)) != data[_CRC_KEY]:
        return False
    return zlib.crc32(raw[: m.start()] + b"\n}") == data[_CRC_KEY]


def _int(value: Any, what: str, where: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UnsafeCheckpointError(
            f"{where}: refusing manifest: {what} is {value!r}, expected an integer in [{lo}, {hi}]"
        )
    return value


def safe_file_name(name: Any, where: str) -> str:
    """A manifest's file name must be a plain name inside the checkpoint (no ``..``, no ``/``)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise UnsafeCheckpointError(
            f"{where}: refusing manifest: file name {name!r} is not a plain file name inside the "
            "checkpoint (path traversal or absolute path)"
        )
    return name


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and check a manifest. ``where`` (the manifest's path) goes into every error."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointCorruptError(
            f"{where}: manifest check failed: not valid JSON (truncated or garbage): {e}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointCorruptError(
            f"{where}: manifest check failed: not an optimus_ckpt manifest (no format marker)"
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsafeCheckpointError(
            f"{where}: unknown checkpoint format version {version!r}; this optimus_ckpt reads "
            f"version {FORMAT_VERSION}. Fix: upgrade optimus_ckpt to read newer checkpoints."
        )
    try:
        manifest = _parse_body(data, where)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointCorruptError(
            f"{where}: manifest check failed: malformed field ({type(e).__name__}: {e})"
        ) from None
    manifest.checksum_ok = _checksum_ok(raw, data)
    if manifest.checksum_ok is False:
        raise CheckpointCorruptError(
            f"{where}: checksum check failed: the manifest's own crc32 does not match its "
            "content (flipped or overwritten bytes)"
        )
    return manifest


def _parse_body(data: dict[str, Any], where: str) -> Manifest:
    files: dict[str, dict[str, Any]] = {}
    for name, info in dict(data["files"]).items():
        safe_file_name(name, where)
        crc = info.get("crc32")
        files[name] = {
            "size": _int(info["size"], f"size of {name}", where),
            "crc32": None if crc is None else _int(crc, f"crc32 of {name}", where, 0, 2**32 - 1),
        }
    rank_files = [safe_file_name(n, where) for n in list(data.get("rank_files", []))]
    for n in rank_files:
        if n not in files:
            raise CheckpointCorruptError(f"{where}: manifest check failed: {n} not in files")
    tensors: dict[str, TensorEntry] = {}
    for key, e in dict(data["tensors"]).items():
        if not isinstance(key, str):
            raise UnsafeCheckpointError(f"{where}: refusing manifest: tensor key {key!r}")
        tensors[key] = _parse_entry(key, e, files, where)
    components = {str(k): dict(v) for k, v in dict(data["components"]).items()}
    config = data.get("config_yaml")
    return Manifest(
        step=_int(data["step"], "step", where),
        world_size=_int(data.get("world_size", 1), "world_size", where, 1, 1 << 24),
        components=components,
        tensors=tensors,
        state=dict(data.get("state") or {}),
        files=files,
        rank_files=rank_files,
        config_yaml=config if isinstance(config, str) else None,
        library_version=str(data.get("library_version", "")),
        torch_version=str(data.get("torch_version", "")),
        created_unix=float(data.get("created_unix", 0.0)),
    )


def _parse_entry(key: str, e: dict[str, Any], files: dict[str, Any], where: str) -> TensorEntry:
    dtype = e["dtype"]
    if dtype not in DTYPES():
        raise UnsafeCheckpointError(f"{where}: refusing manifest: tensor {key!r} dtype {dtype!r}")
    item = DTYPES()[dtype].itemsize
    shape_raw = list(e["shape"])
    if len(shape_raw) > MAX_NDIM:
        raise UnsafeCheckpointError(
            f"{where}: refusing manifest: tensor {key!r} has {len(shape_raw)} dims"
        )
    shape = tuple(_int(s, f"shape of {key!r}", where) for s in shape_raw)
    total = math.prod(shape) * item
    if total > MAX_BYTES:
        raise UnsafeCheckpointError(
            f"{where}: refusing manifest: tensor {key!r} of shape {list(shape)} is absurdly large"
        )
    chunks = []
    covered = 0
    for c in list(e["chunks"]):
        offsets = tuple(_int(o, f"chunk offset of {key!r}", where) for o in c["offsets"])
        sizes = tuple(_int(s, f"chunk size of {key!r}", where) for s in c["sizes"])
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise UnsafeCheckpointError(f"{where}: refusing manifest: chunk rank of {key!r}")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise UnsafeCheckpointError(
                f"{where}: refusing manifest: a chunk of {key!r} lies outside its shape"
            )
        fname = safe_file_name(c["file"], where)
        if fname not in files:
            raise CheckpointCorruptError(
                f"{where}: manifest check failed: tensor {key!r} names unlisted file {fname}"
            )
        nbytes = _int(c["nbytes"], f"nbytes of {key!r}", where)
        offset = _int(c["offset"], f"offset of {key!r}", where)
        if nbytes != math.prod(sizes) * item:
            raise UnsafeCheckpointError(
                f"{where}: refusing manifest: chunk of {key!r} claims {nbytes} bytes for sizes "
                f"{list(sizes)}"
            )
        if offset + nbytes > files[fname]["size"]:
            raise UnsafeCheckpointError(
                f"{where}: refusing manifest: chunk of {key!r} lies past the end of {fname}"
            )
        crc = c.get("crc32")
        chunks.append(
            Chunk(offsets, sizes, fname, offset, nbytes,
                  None if crc is None else _int(crc, "crc32", where, 0, 2**32 - 1))
        )  # fmt: skip
        covered += nbytes
    if covered < total:
        raise CheckpointCorruptError(
            f"{where}: manifest check failed: chunks of {key!r} cover {covered} of {total} bytes"
        )
    return TensorEntry(key, dtype, shape, tuple(chunks))


def manifest_path(checkpoint_rel: str) -> str:
    return f"{checkpoint_rel}/{MANIFEST_NAME}" if checkpoint_rel else MANIFEST_NAME
