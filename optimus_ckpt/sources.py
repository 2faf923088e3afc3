"""What a load reads from: our checkpoints, and foreign single files for model weights.

Every source is a :class:`CheckpointView`: a manifest-like description (components, tensors with
dtype and shape) plus ``read_into(key, dest)``, which copies one tensor's bytes straight into the
destination tensor. Our checkpoints and ``.safetensors`` files are read with ``preadv`` into the
destination's memory (one copy from the page cache); a single-file ``torch.save`` checkpoint is
opened with ``torch.load(weights_only=True, mmap=True)`` and refused if it would need more.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .distributed import copy_into_dtensor, is_dtensor, read_dtensor_into
from .dtypes import dtype_from_name
from .errors import CheckpointCorruptError, CheckpointNotFoundError, UnsafeCheckpointError
from .layout import MANIFEST_NAME, STAGING_INFIX, list_checkpoints, parse_step
from .manifest import Chunk, Manifest, TensorEntry, parse_manifest
from .storage import LocalStorage

__all__ = [
    "CheckpointView",
    "FileView",
    "TorchFileView",
    "candidates",
    "open_checkpoint",
    "tensor_buffer",
]


_VERIFY_THREADS = min(4, os.cpu_count() or 1)
# Batched reads: large loads are split into pieces read by a few threads at once. preadv releases
# the GIL, and first-touch page faults of freshly allocated destinations (a fresh optimizer's
# state) then overlap instead of adding up.
_READ_THREADS = min(4, os.cpu_count() or 1)
_READ_PIECE = 8 << 20
_PARALLEL_FROM = 32 << 20
_VERIFY_BUFFER = 4 << 20  # per verifying thread


def tensor_buffer(t: Any) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no numpy needed)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


@dataclass
class TensorMeta:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class CheckpointView:
    """Base: what the planner needs to know about a source, and how to read a tensor."""

    path: str
    step: int = 0
    world_size: int = 1
    kind: str = "optimus"
    config_yaml: str | None = None
    components: dict[str, dict[str, Any]]
    tensors: dict[str, TensorMeta]

    def global_state(self, component: str) -> Any:
        return None

    def rank_state(self, rank: int) -> dict[str, Any]:
        return {}

    def read_into(self, key: str, dest: Any) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Reads inside may be deferred to the end of the block (then done in parallel): use the
        destinations only after it. Nothing is read if the block raises."""
        yield

    def verify(self, keys: Iterable[str]) -> None:
        """Check content checksums of ``keys`` (no-op where the format has none)."""

    @property
    def bytes_read(self) -> int:
        return 0

    def close(self) -> None:
        pass


class FileView(CheckpointView):
    """A checkpoint whose tensors lie as raw bytes in files: ours, or a ``.safetensors`` file."""

    def __init__(
        self, storage: LocalStorage, rel: str, manifest: Manifest, *, kind: str = "optimus"
    ) -> None:
        self.storage, self.rel, self.manifest, self.kind = storage, rel, manifest, kind
        self.path = storage.local_path(rel)
        self.step, self.world_size = manifest.step, manifest.world_size
        self.config_yaml = manifest.config_yaml
        self.components = manifest.components
        self.tensors = {
            k: TensorMeta(e.dtype, e.shape, e.nbytes) for k, e in manifest.tensors.items()
        }
        self._start_bytes = storage.bytes_read
        self._pending: list[tuple[str, int, memoryview, Any]] | None = None

    def _file(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name

    def check_structure(self) -> None:
        """Every listed file exists with its listed size (cheap; always run)."""
        for name, info in self.manifest.files.items():
            try:
                size = self.storage.size(self._file(name))
            except FileNotFoundError:
                raise CheckpointCorruptError(
                    f"{self.storage.local_path(self._file(name))}: structure check failed: file "
                    "listed in the manifest is missing"
                ) from None
            if size != info["size"]:
                raise CheckpointCorruptError(
                    f"{self.storage.local_path(self._file(name))}: size check failed: "
                    f"{size} bytes, the manifest says {info['size']} (truncated or overwritten)"
                )

    def global_state(self, component: str) -> Any:
        return self.manifest.state.get(component)

    def rank_state(self, rank: int) -> dict[str, Any]:
        if rank >= len(self.manifest.rank_files):
            return {}
        cache = self.__dict__.setdefault("_rank_cache", {})
        if rank not in cache:
            cache[rank] = self._read_rank_state(rank)
        return dict(cache[rank])

    def _read_rank_state(self, rank: int) -> dict[str, Any]:
        name = self.manifest.rank_files[rank]
        raw = self.storage.read_bytes(self._file(name))
        expected = self.manifest.files[name].get("crc32")
        if expected is not None and zlib.crc32(raw) != expected:
            raise CheckpointCorruptError(
                f"{self.storage.local_path(self._file(name))}: checksum check failed (crc32)"
            )
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise CheckpointCorruptError(
                f"{self.storage.local_path(self._file(name))}: not valid JSON: {e}"
            ) from None
        return dict(data)

    def read_into(self, key: str, dest: Any) -> None:
        import torch

        if is_dtensor(dest):  # a sharded destination (FSDP2): read only this rank's box
            read_dtensor_into(self, key, dest)
            return
        entry = self.manifest.tensors[key]
        dtype = dtype_from_name(entry.dtype)
        if tuple(dest.shape) != entry.shape:
            raise ValueError(f"{key}: destination shape {list(dest.shape)} != {list(entry.shape)}")
        direct = dest.dtype == dtype and dest.device.type == "cpu" and dest.is_contiguous()
        if not direct:  # read into a staging tensor now, then cast/copy
            target = torch.empty(entry.shape, dtype=dtype)
            pending, self._pending = self._pending, None
            try:
                for chunk in entry.chunks:
                    self._read_chunk(entry, chunk, target)
            finally:
                self._pending = pending
            with torch.no_grad():
                dest.copy_(target)
            return
        for chunk in entry.chunks:
            self._read_chunk(entry, chunk, dest)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self._pending is not None:  # nested: the outer block runs the reads
            yield
            return
        self._pending = []
        try:
            yield
            jobs = self._pending
        finally:
            self._pending = None
        self._run_reads(jobs)

    def _run_reads(self, jobs: list[tuple[str, int, memoryview, Any]]) -> None:
        total = sum(len(buf) for _, _, buf, _ in jobs)
        if total < _PARALLEL_FROM or _READ_THREADS < 2:
            for rel, offset, buf, _keep in jobs:
                self.storage.read_into(rel, offset, buf)
            return
        pieces = [
            (rel, offset + i, buf[i : i + _READ_PIECE])
            for rel, offset, buf, _keep in jobs
            for i in range(0, len(buf), _READ_PIECE)
        ]
        with ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="optimus_ckpt-read") as ex:
            for _ in ex.map(lambda p: self.storage.read_into(*p), pieces):
                pass

    def _read_chunk(self, entry: TensorEntry, chunk: Chunk, target: Any) -> None:
        import torch

        if chunk.nbytes == 0:
            return
        region = target
        for d, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes)):
            if o != 0 or s != entry.shape[d]:
                region = region.narrow(d, o, s)
        if region.is_contiguous():
            buf = tensor_buffer(region)
            if self._pending is not None:
                # Deferred to the end of the batch; keep the tensor alive until then.
                self._pending.append((self._file(chunk.file), chunk.offset, buf, region))
            else:
                self.storage.read_into(self._file(chunk.file), chunk.offset, buf)
        else:
            tmp = torch.empty(chunk.sizes, dtype=target.dtype)
            self.storage.read_into(self._file(chunk.file), chunk.offset, tensor_buffer(tmp))
            region.copy_(tmp)

    def verify(self, keys: Iterable[str]) -> None:
        """Read the chunks of ``keys`` and compare their CRC-32 with the manifest's.

        Chunks are checked by a few threads at once (``preadv`` and ``zlib.crc32`` release the
        GIL), each through its own small buffer; the first bad chunk in manifest order is named.
        """
        jobs = [
            (key, chunk)
            for key in keys
            for chunk in self.manifest.tensors[key].chunks
            if chunk.crc32 is not None and chunk.nbytes
        ]
        local = threading.local()

        def crc_of(job: tuple[str, Chunk]) -> int:
            chunk = job[1]
            view = getattr(local, "view", None)
            if view is None:
                view = local.view = memoryview(bytearray(_VERIFY_BUFFER))
            crc, done = 0, 0
            while done < chunk.nbytes:
                n = min(len(view), chunk.nbytes - done)
                self.storage.read_into(self._file(chunk.file), chunk.offset + done, view[:n])
                crc = zlib.crc32(view[:n], crc)
                done += n
            return crc

        workers = min(len(jobs), _VERIFY_THREADS)
        if workers <= 1:
            crcs = [crc_of(job) for job in jobs]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="optimus_ckpt-verify") as ex:
                crcs = list(ex.map(crc_of, jobs))
        for (key, chunk), crc in zip(jobs, crcs):
            if crc != chunk.crc32:
                raise CheckpointCorruptError(
                    f"{self.storage.local_path(self._file(chunk.file))}: checksum check failed "
                    f"for tensor '{key}' (bytes {chunk.offset}-{chunk.offset + chunk.nbytes}): "
                    f"crc32 {crc:08x}, the manifest says {chunk.crc32:08x}"
                )

    def verify_all(self) -> None:
        """Check every tensor chunk and every small file against the manifest."""
        self.check_structure()
        self.verify(self.manifest.tensors)
        for name, info in self.manifest.files.items():
            if info.get("crc32") is not None:
                raw = self.storage.read_bytes(self._file(name))
                if zlib.crc32(raw) != info["crc32"]:
                    raise CheckpointCorruptError(
                        f"{self.storage.local_path(self._file(name))}: checksum check failed (crc32)"
                    )

    @property
    def bytes_read(self) -> int:
        return self.storage.bytes_read - self._start_bytes

    def close(self) -> None:
        self.storage.close()


class TorchFileView(CheckpointView):
    """A single-file ``torch.save`` checkpoint (a dict of components or a bare state dict)."""

    kind = "torch"

    def __init__(self, path: str) -> None:
        import pickle

        import torch

        self.path = path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it would need unrestricted unpickling, which can run "
                f"code from the file. optimus_ckpt only loads weights_only-safe files. ({e})"
            ) from None
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise CheckpointCorruptError(
                    f"{path}: not a readable torch.save file: {e}"
                ) from None
            obj = _torch_load_plain(path)
        except Exception as e:  # a text file, a truncated pickle...: KeyError, EOFError, ...
            raise CheckpointCorruptError(
                f"{path}: not a checkpoint: not a readable torch.save file, an optimus_ckpt "
                f"checkpoint directory or a .safetensors file ({type(e).__name__}: {e})"
            ) from None
        state = _model_state_from(obj)
        if state is None:
            raise CheckpointCorruptError(
                f"{path}: no model state dict found (expected a dict of tensors, or a dict with "
                "a 'model', 'state_dict' or 'model_state_dict' entry)"
            )
        self._tensors = {f"model.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.tensors = {
            k: TensorMeta(
                str(v.dtype).removeprefix("torch."), tuple(v.shape), v.numel() * v.element_size()
            )
            for k, v in self._tensors.items()
        }
        self.components = {"model": {"per_rank": False, "tensors": len(self.tensors)}}
        if isinstance(obj, dict) and isinstance(obj.get("step"), int):
            self.step = int(obj["step"])
        self._read = 0

    def global_state(self, component: str) -> Any:
        return {"extra_state": {}} if component == "model" else None

    def read_into(self, key: str, dest: Any) -> None:
        import torch

        src = self._tensors[key]
        with torch.no_grad():
            if is_dtensor(dest):
                copy_into_dtensor(src, dest)
            else:
                dest.copy_(src)
        self._read += src.numel() * src.element_size()

    @property
    def bytes_read(self) -> int:
        return self._read


def _torch_load_plain(path: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it would need unrestricted unpickling ({e})"
        ) from None
    except Exception as e:
        raise CheckpointCorruptError(
            f"{path}: not a checkpoint: not a readable torch.save file, an optimus_ckpt "
            f"checkpoint directory or a .safetensors file ({type(e).__name__}: {e})"
        ) from None


def _model_state_from(obj: Any) -> dict[str, Any] | None:
    import torch

    if not isinstance(obj, dict):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("model", "state_dict", "model_state_dict", "module"):
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return None


_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
    "U64": "uint64",
}  # fmt: skip


def safetensors_view(path: str) -> FileView:
    """A ``.safetensors`` file as a FileView (header parsed here; no dependency needed)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointCorruptError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CheckpointCorruptError(f"{path}: safetensors header size {n} is impossible")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointCorruptError(f"{path}: safetensors header is not JSON: {e}") from None
    name = os.path.basename(path)
    base = 8 + n
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointCorruptError(
                f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')}"
            )
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        nbytes = math.prod(shape) * dtype_from_name(dtype).itemsize
        if end - begin != nbytes or base + end > size or begin < 0:
            raise CheckpointCorruptError(f"{path}: tensor {key!r} has inconsistent data offsets")
        chunk = Chunk(tuple(0 for _ in shape), shape, name, base + begin, nbytes, None)
        tensors[f"model.{key}"] = TensorEntry(f"model.{key}", dtype, shape, (chunk,))
    manifest = Manifest(
        step=0,
        components={"model": {"per_rank": False, "tensors": len(tensors)}},
        tensors=tensors,
        state={"model": {"extra_state": {}}},
        files={name: {"size": size, "crc32": None}},
    )
    view = FileView(
        LocalStorage(os.path.dirname(os.path.abspath(path))), "", manifest, kind="safetensors"
    )
    view.path = os.path.abspath(path)  # the file, not its directory (reports, error messages)
    return view


def native_view(checkpoint_dir: str) -> FileView:
    """Open one of our checkpoints: parse the manifest and run the structure checks."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    manifest_file = os.path.join(checkpoint_dir, MANIFEST_NAME)
    if STAGING_INFIX in os.path.basename(checkpoint_dir):
        raise CheckpointNotFoundError(
            f"{checkpoint_dir} is an unfinished save (staging directory), not a checkpoint"
        )
    try:
        with open(manifest_file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{checkpoint_dir} has no {MANIFEST_NAME}: it is not a complete optimus_ckpt "
            "checkpoint (an interrupted save, or another tool's directory)"
        ) from None
    manifest = parse_manifest(raw, manifest_file)
    view = FileView(
        LocalStorage(os.path.dirname(checkpoint_dir)), os.path.basename(checkpoint_dir), manifest
    )
    view.check_structure()
    return view


def open_checkpoint(path: str) -> CheckpointView:
    """Open a single source: a checkpoint directory, a ``.safetensors`` or a ``torch.save`` file."""
    if os.path.isdir(path):
        return native_view(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint source {path} does not exist")
    if path.endswith(".safetensors"):
        return safetensors_view(path)
    return TorchFileView(path)


def candidates(source: str) -> list[str]:
    """Checkpoints to try for ``source``, best first: a directory of checkpoints gives its complete
    ones newest first (the fallback order); anything else gives itself."""
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, MANIFEST_NAME)):
        found = [p for _, p in reversed(list_checkpoints(source))]
        if found:
            # Step directories newer than the newest complete checkpoint carry their final name,
            # which only a commit gives, yet no readable manifest: corrupted. Tried first, so
            # that the load falls back past them with a warning naming them.
            newest = parse_step(os.path.basename(found[0])) or 0
            broken = sorted(
                (step, os.path.join(source, n))
                for n in os.listdir(source)
                if (step := parse_step(n)) is not None
                and step > newest
                and os.path.isdir(os.path.join(source, n))
            )
            return [p for _, p in reversed(broken)] + found
        if (
            parse_step(os.path.basename(os.path.normpath(source))) is not None
            or STAGING_INFIX in source
        ):
            return [source]
        names = os.listdir(source)
        partial = [n for n in names if STAGING_INFIX in n or parse_step(n) is not None]
        raise CheckpointNotFoundError(
            f"no complete checkpoint in {source}"
            + (
                f" (incomplete: {', '.join(sorted(partial)[:5])})"
                if partial
                else (" (empty)" if not names else " (it holds no step_* directories)")
            )
            + ". Fix: point load_from at a checkpoint or a directory that holds one, or use "
            "load_strategy=scratch to start without one."
        )
    return [source]
