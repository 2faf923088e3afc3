"""Saving: turn the parts into stored state and write one checkpoint with the commit protocol.

Tensors go through ``torch.distributed.checkpoint`` (so the directory is a DCP checkpoint that
torch's own tools can open, sharded over ranks when distributed); small state goes into JSON. The
commit protocol:

1. take the directory lock (a second writer waits, and is told why);
2. write everything into a staging directory ``step_N.partial-<id>`` (unique per save);
3. rank 0 writes the manifest ``optimus.json`` last, then renames the staging directory to
   ``step_N`` (atomic), then moves the ``latest`` marker and applies ``keep_last``.

A crash at any point leaves either the previous state or a staging directory that nothing reads
and the next save removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import struct
import threading
import time
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .codec import encode
from .distributed import save_hook
from .dtypes import dtype_name
from .errors import CheckpointExistsError, CheckpointWriteError
from .layout import LATEST_MARKER, LOCK_NAME, STAGING_INFIX, list_checkpoints, step_dir_name
from .manifest import Chunk, Manifest, TensorEntry
from .parts import PER_RANK_ROOTS, canonical_key, get_rng_state
from .storage import LocalStorage

log = logging.getLogger("optimus_ckpt")

__all__ = ["SavePayload", "build_payload", "write_checkpoint"]


@dataclass
class SavePayload:
    """What one process contributes to a checkpoint."""

    tensors: dict[str, Any] = field(default_factory=dict)  # storage key -> tensor
    global_state: dict[str, Any] = field(default_factory=dict)  # component -> encoded state
    rank_state: dict[str, Any] = field(default_factory=dict)  # component -> encoded state
    components: dict[str, dict[str, Any]] = field(default_factory=dict)


def _compact(t: Any) -> Any:
    """A detached tensor whose storage holds exactly its elements in row-major order."""
    import torch

    t = t.detach()
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return t  # DTensor and friends: DCP handles them
    if (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ):
        return t
    return t.contiguous().clone()


def param_names(model: Any, optimizer: Any) -> list[str]:
    """FQN of each optimizer parameter, in the optimizer's order (``param.<i>`` when unknown)."""
    by_id = {id(p): canonical_key(n) for n, p in model.named_parameters(remove_duplicate=False)}
    names = []
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        names.append(by_id.get(id(p), f"param.{i}"))
    return names


def build_payload(parts: dict[str, Any], *, with_rng: bool = True) -> SavePayload:
    """Split every part's state into tensors (stored raw) and small state (stored as JSON)."""
    import torch

    pay = SavePayload()

    def sink_for(component: str) -> Any:
        def sink(path: str, tensor: Any) -> str:
            # Paths name the component (for errors): ``extra.ema.shadow.w`` is stored as it is.
            key = path if path.startswith(component + ".") else f"{component}.{path}"
            while key in pay.tensors:
                key += "_"
            pay.tensors[key] = _compact(tensor)
            return key

        return sink

    for name, obj in parts.items():
        root = name.split(".", 1)[0]
        before = set(pay.tensors)
        if name == "model":
            extras = {}
            for key, value in obj.state_dict().items():
                if isinstance(value, torch.Tensor):
                    pay.tensors[f"model.{key}"] = _compact(value)
                else:
                    extras[key] = encode(value, f"model.{key}")
            pay.global_state["model"] = {"extra_state": extras}
        elif name == "optimizer":
            sd = obj.state_dict()
            names = param_names(parts["model"], obj)
            sink = sink_for("optimizer.state")
            state = {}
            for idx, st in sd["state"].items():
                fqn = names[idx]
                state[fqn] = {
                    k: encode(v, f"optimizer.state.{fqn}.{k}", sink) for k, v in st.items()
                }
            groups = []
            for g in sd["param_groups"]:
                hyper = {
                    k: encode(v, f"optimizer.param_groups.{k}")
                    for k, v in g.items()
                    if k != "params"
                }
                hyper["params"] = [names[i] for i in g["params"]]
                groups.append(hyper)
            pay.global_state["optimizer"] = {
                "param_groups": groups,
                "state": state,
                "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
            }
        elif root == "extra":
            pay.global_state[name] = encode(obj.state_dict(), name, sink_for(name))
        elif root in PER_RANK_ROOTS:
            pay.rank_state[name] = encode(obj.state_dict(), name)
        else:  # scheduler
            pay.global_state[name] = encode(obj.state_dict(), name)
        new = [k for k in pay.tensors if k not in before]
        pay.components[name] = {
            "per_rank": root in PER_RANK_ROOTS,
            "tensors": len(new),
            "bytes": sum(_nbytes(pay.tensors[k]) for k in new),
        }
    if with_rng:
        pay.rank_state["rng"] = encode(get_rng_state(), "rng")
        pay.components["rng"] = {"per_rank": True, "tensors": 0, "bytes": 0}
    return pay


def _nbytes(t: Any) -> int:
    return int(t.numel()) * int(t.element_size())


# --------------------------------------------------------------------------------------------
# Locating raw tensor bytes inside the torch.save blobs that DCP writes.


class _Slice(io.RawIOBase):
    """A read-only window [start, start+length) of an open file, for zipfile."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def locate_blob_data(f: Any, start: int, length: int) -> tuple[int, int, int | None]:
    """For a torch.save blob at [start, start+length): (file offset of raw data, size, crc32)."""
    with zipfile.ZipFile(_Slice(f, start, length)) as zf:
        info = next((i for i in zf.infolist() if i.filename.endswith("/data/0")), None)
        if info is None:  # an empty tensor (a rank's empty shard) has no data record
            return start, 0, None
        f.seek(start + info.header_offset)
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            raise ValueError("bad local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        data = start + info.header_offset + 30 + name_len + extra_len
        return data, info.file_size, (info.CRC or None)


def _tensor_entries(staging_abs: str, metadata: Any) -> dict[str, TensorEntry]:
    """Build our tensor entries from DCP's metadata (in memory, never from the pickle on disk)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    entries: dict[str, TensorEntry] = {}
    handles: dict[str, Any] = {}
    try:
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                continue
            dtype = dtype_name(md.properties.dtype)
            chunks = []
            for ch in md.chunks:
                info = metadata.storage_data[MetadataIndex(fqn, ch.offsets)]
                fh = handles.get(info.relative_path)
                if fh is None:
                    path = os.path.join(staging_abs, info.relative_path)
                    fh = handles[info.relative_path] = open(path, "rb")  # noqa: SIM115
                data_off, size, crc = locate_blob_data(fh, info.offset, info.length)
                chunks.append(
                    Chunk(
                        tuple(ch.offsets), tuple(ch.sizes), info.relative_path, data_off, size, crc
                    )
                )
            entries[fqn] = TensorEntry(fqn, dtype, tuple(md.size), tuple(chunks))
    finally:
        for fh in handles.values():
            fh.close()
    return entries


# --------------------------------------------------------------------------------------------
# The commit protocol.


@contextlib.contextmanager
def directory_lock(root: str) -> Iterator[None]:
    """Exclusive lock on the checkpoint directory for the whole save (a second writer waits)."""
    path = os.path.join(root, LOCK_NAME)
    try:
        os.makedirs(root, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115
    except OSError as e:
        err = CheckpointWriteError(
            f"Cannot save into {root}: creating the directory or its lock file {LOCK_NAME} "
            f"failed: {type(e).__name__}: {e}. Nothing was written; earlier checkpoints are "
            "intact. Fix: check that the directory is writable and its disk is not full."
        )
        err.errno = e.errno
        raise err from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            log.warning(
                "optimus_ckpt: %s is saving into %s; waiting for it to finish. Two runs saving "
                "into one directory usually means a misconfigured sweep: give each job its own "
                "checkpoint directory.",
                holder,
                root,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock (some NFS/FUSE mounts)
            log.warning(
                "optimus_ckpt: cannot lock %s (%s); saving without the lock. Each save still "
                "writes into its own staging directory, but two runs saving into this "
                "directory at once would not wait for each other.",
                path,
                e,
            )
        try:  # who holds the lock, for the other writer's warning (best effort: disk may be full)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {os.uname().nodename}")
            f.flush()
        except OSError:
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def _dist(process_group: Any = None) -> tuple[int, int, bool]:
    """(rank, world size, distributed) in ``process_group`` (default: the whole job)."""
    from .distributed import dist_info

    return dist_info(process_group)


def _broadcast(value: Any, pg: Any = None) -> Any:
    import torch.distributed as dist

    box = [value]
    from .distributed import group_src

    dist.broadcast_object_list(box, src=group_src(pg), group=pg)
    return box[0]


def remove_leftovers(storage: LocalStorage) -> list[str]:
    """Delete staging directories of interrupted saves (call only while holding the lock)."""
    removed = []
    for name in storage.listdir(""):
        if STAGING_INFIX in name:
            storage.remove_tree(name)
            removed.append(name)
        elif name.startswith(f"{LATEST_MARKER}.tmp-"):  # write_atomic's temp file, killed mid-way
            try:
                os.unlink(storage.local_path(name))
                removed.append(name)
            except OSError:
                pass
    return removed


def write_checkpoint(
    storage: LocalStorage,
    step: int,
    payload: SavePayload,
    *,
    config_yaml: str | None = None,
    keep_last: int | None = None,
    thread_count: int = 2,
    process_group: Any = None,
) -> str:
    """Write one checkpoint with the commit protocol; returns its absolute path."""
    rank, world, distributed = _dist(process_group)
    final = step_dir_name(step)
    lock = directory_lock(storage.root) if rank == 0 else contextlib.nullcontext()
    with lock:
        staging = ""
        error = None
        error_kind = "exists"
        mkdir_error: CheckpointWriteError | None = None
        if rank == 0:
            if storage.exists(final):
                error = (
                    f"A checkpoint for step {step} already exists at {storage.local_path(final)}. "
                    "Fix: save under a new step, or delete that directory first."
                )
            else:
                for name in remove_leftovers(storage):
                    log.info("optimus_ckpt: removed leftover of an interrupted save: %s", name)
                staging = f"{final}{STAGING_INFIX}{uuid.uuid4().hex[:12]}"
                try:
                    storage.makedirs(staging)
                except OSError as e:
                    storage.remove_tree(staging)
                    staging, error_kind = "", "write"
                    mkdir_error = _write_error(
                        storage, step, "", "creating the staging directory", e
                    )
                    error = str(mkdir_error)
        if distributed:
            staging, error, error_kind = _broadcast((staging, error, error_kind), process_group)
        if mkdir_error is not None:
            raise mkdir_error
        if error:
            raise (CheckpointWriteError if error_kind == "write" else CheckpointExistsError)(error)
        path = storage.local_path(final)
        doing = "writing the per-process state file"
        before = set(threading.enumerate())
        try:
            save_hook("before_write", rank=rank, step=step, staging=storage.local_path(staging))
            rank_file = f"rank_{rank:05d}.json"
            storage.write_atomic(f"{staging}/{rank_file}", json.dumps(payload.rank_state).encode())
            metadata = None
            if payload.tensors or distributed:
                doing = "writing tensor data (torch.distributed.checkpoint)"
                metadata = _dcp_save(
                    storage, staging, payload.tensors, thread_count, distributed, process_group
                )
            save_hook("before_commit", rank=rank, step=step, staging=storage.local_path(staging))
            if distributed:
                import torch.distributed as dist

                doing = "waiting for the other processes to write their data"
                dist.barrier(group=process_group)
            if rank == 0:
                doing = "reading back the written data to build the manifest"
                manifest = _build_manifest(
                    storage, staging, step, world, payload, metadata, config_yaml
                )
                doing = "writing the manifest optimus.json"
                storage.write_atomic(f"{staging}/optimus.json", manifest.to_json().encode())
                doing = "committing (renaming the staging directory)"
                storage.rename_dir(staging, final)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if rank == 0 and staging:
                _join_dcp_writer_threads(before)
                storage.remove_tree(staging)
            if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit):
                raise  # cleaned up, passed on as they are
            raise _write_error(storage, step, staging, doing, e) from e
        if rank == 0:
            _after_commit(storage, final, keep_last)
        if distributed:
            import torch.distributed as dist

            dist.barrier(group=process_group)
    return path


def _dcp_save(storage: LocalStorage, staging: str, tensors: dict[str, Any], thread_count: int,
              distributed: bool, process_group: Any) -> Any:  # fmt: skip
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    class _Writer(FileSystemWriter):
        metadata: Any = None

        def write_data(self, plan: Any, planner: Any) -> Any:
            # DCP's extra writer threads die silently on an error (it reaches only
            # threading.excepthook), and the save would go on without their files: catch it.
            errors: list[BaseException] = []
            prev = threading.excepthook

            def hook(args: Any) -> None:
                if args.thread is not None and "_write_files" in args.thread.name:
                    errors.append(args.exc_value)
                else:
                    prev(args)

            threading.excepthook = hook
            try:
                fut = super().write_data(plan, planner)
            finally:
                if threading.excepthook is hook:
                    threading.excepthook = prev
            written = len(fut.value())
            if errors or written < len(plan.items):
                if errors:
                    raise errors[0]
                raise OSError(
                    f"torch.distributed.checkpoint wrote {written} of {len(plan.items)} items "
                    "(a writer thread failed)"
                )
            return fut

        def finish(self, metadata: Any, results: Any) -> None:
            super().finish(metadata, results)
            self.metadata = metadata

    writer = _Writer(
        storage.local_path(staging),
        single_file_per_rank=True,
        sync_files=storage.fsync,
        thread_count=max(1, thread_count),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*assuming the intent is to save in a single process.*"
        )
        dcp.save(
            tensors, storage_writer=writer, process_group=process_group, no_dist=not distributed
        )
    return writer.metadata


def _build_manifest(storage: LocalStorage, staging: str, step: int, world: int, payload: SavePayload,
                    metadata: Any, config_yaml: str | None) -> Manifest:  # fmt: skip
    import torch

    tensors = _tensor_entries(storage.local_path(staging), metadata) if metadata is not None else {}
    files: dict[str, dict[str, Any]] = {}
    for name in storage.listdir(staging):
        size = storage.size(f"{staging}/{name}")
        crc = None
        if not name.endswith(".distcp"):  # small files: whole-file CRC (data files: per chunk)
            with open(storage.local_path(f"{staging}/{name}"), "rb") as f:
                crc = zlib.crc32(f.read())
        files[name] = {"size": size, "crc32": crc}
    components = {}
    for name, info in payload.components.items():
        keys = [k for k in tensors if k.startswith(name + ".")]
        components[name] = {
            "per_rank": info["per_rank"],
            "tensors": len(keys) if keys else info["tensors"],
            "bytes": sum(tensors[k].nbytes for k in keys) if keys else info["bytes"],
        }
    return Manifest(
        step=step,
        world_size=world,
        components=components,
        tensors=tensors,
        state=payload.global_state,
        files=files,
        rank_files=[f"rank_{r:05d}.json" for r in range(world)],
        config_yaml=config_yaml,
        library_version=__version__,
        torch_version=str(torch.__version__),
        created_unix=time.time(),
    )


def _join_dcp_writer_threads(before: set[Any], timeout: float = 120.0) -> None:
    """After a failed save, wait for DCP's writer threads started by it: when one of them fails,
    DCP raises without joining the others, which would go on writing into the staging directory
    while it is being removed."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t not in before and t is not threading.current_thread() and "_write_files" in t.name:
            t.join(max(0.0, deadline - time.monotonic()))


def _root_cause(err: BaseException) -> BaseException:
    """The OSError behind ``err`` when there is one (DCP wraps failures in CheckpointException)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        for v in (getattr(e, "failures", None) or {}).values():  # CheckpointException
            todo += [x for x in (v if isinstance(v, list | tuple) else [v])
                     if isinstance(x, BaseException)]  # fmt: skip
    return err


def _write_error(storage: LocalStorage, step: int, staging: str, doing: str,
                 err: BaseException) -> CheckpointWriteError:  # fmt: skip
    """A clear error for a failed save: what failed, and that nothing earlier was touched."""
    cause = _root_cause(err)
    what = f"{type(cause).__name__}: {cause}"
    if cause is not err and isinstance(cause, OSError):
        what += f" (reported as {type(err).__name__})"
    elif "unexpected pos" in str(err):  # torch.save's zip writer: a write came up short
        what += " (a write came up short: the disk is probably full)"
    try:
        st = os.statvfs(storage.root)
        free = f"; {st.f_bavail * st.f_frsize / 2**20:.1f} MiB free on that filesystem now"
    except OSError:
        free = ""
    done = list_checkpoints(storage.root)
    kept = (
        f"Earlier checkpoints are intact (newest: {os.path.basename(done[-1][1])})"
        if done
        else "There is no earlier checkpoint in that directory"
    )
    cleaned = (
        f"the unfinished save {staging} was removed"
        if staging and not storage.exists(staging)
        else (f"the unfinished save {staging} is ignored and removed by the next save"
              if staging else "nothing was left behind")
    )  # fmt: skip
    out = CheckpointWriteError(
        f"Saving step {step} into {storage.root} failed while {doing}: {what}{free}. "
        f"Nothing was committed: {cleaned}. {kept}. Fix: free disk space or fix the I/O problem, "
        "then save again."
    )
    errno_ = getattr(cause, "errno", None)
    if errno_ is not None:
        out.errno = errno_
    return out


def _after_commit(storage: LocalStorage, final: str, keep_last: int | None) -> None:
    """Move the ``latest`` marker and apply ``keep_last``. The checkpoint is already committed,
    so a failure here is a warning, not a failed save."""
    try:
        storage.write_atomic(LATEST_MARKER, (final + "\n").encode())
        if keep_last is not None:
            _apply_keep_last(storage, keep_last)
    except OSError as e:
        log.warning(
            "optimus_ckpt: %s was saved and committed, but updating the 'latest' marker or "
            "deleting old checkpoints (keep_last) failed: %s. Listings and latest() are not "
            "affected (they scan the directory); the next save retries.",
            storage.local_path(final),
            e,
        )


def _apply_keep_last(storage: LocalStorage, keep_last: int) -> None:
    """Delete committed checkpoints older than the newest ``keep_last`` (atomically each)."""
    done = list_checkpoints(storage.root)
    for _step, path in done[: max(0, len(done) - max(1, keep_last))]:
        name = os.path.basename(path)
        doomed = f"{name}{STAGING_INFIX}deleted-{uuid.uuid4().hex[:6]}"
        os.rename(path, storage.local_path(doomed))  # disappears from listings atomically
        storage.remove_tree(doomed)
