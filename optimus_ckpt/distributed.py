"""Running under ``torch.distributed`` (torchrun, DDP, FSDP2): what differs from one process.

The checkpoint format does not depend on the number of processes. A tensor is stored as one or
more *chunks* (a box of the global tensor each, see :class:`~optimus_ckpt.manifest.Chunk`); a
single process writes one chunk per tensor, N processes write the chunks they own. So:

* **Saving**: every rank calls :meth:`Checkpointer.save` with its own objects. Plain tensors that
  every rank holds (DDP replicas, scalars) are written once, by one rank
  (``torch.distributed.checkpoint`` deduplicates them); sharded ``DTensor`` state (FSDP2's
  ``fully_shard``, tensor parallelism) is written by the rank that owns each shard, as DCP does.
  Each rank also writes its own small state (``rank_<r>.json``: data position, metrics, RNG).
  After a barrier, rank 0 writes the manifest and renames the staging directory: the commit.
  A rank that dies before the barrier leaves only a staging directory, which nothing reads.
* **Loading** needs no collective for the data: each rank reads the manifest and, for every
  tensor, only the bytes that overlap its own shard (:func:`read_dtensor_into`). Plain tensors
  (DDP) are read whole by every rank. This is what makes N -> M resharding work, including
  M = 1 (a plain model) and N = 1. The ranks do agree on the plan (one small collective) before
  any rank touches its objects, so a load fails on every rank or on none.
* **Per-rank state** (``data_sources``, ``dataloaders``, ``metrics``, RNG) is restored per rank
  when the world size matches. When it differs, an object that defines
  ``reshard_state_dict(states, *, rank, world_size)`` (see :data:`RESHARD_HOOK`) gets the
  states of every saved rank and returns its own; any other object is an error that names the
  option that skips it (``load_strategy.load_dataloaders=false`` etc.). RNG states are left as
  they are, with a warning.
* **Async save** (``Checkpointer(async_save=True)`` or ``save(..., blocking=False)``): the
  state's tensors are copied into reusable snapshot buffers (:class:`Snapshotter`), then a
  background thread writes the checkpoint. Under ``torch.distributed`` the thread uses its own
  gloo process group, so its collectives never interleave with the training loop's.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "RESHARD_HOOK",
    "Snapshotter",
    "agree",
    "background_group",
    "dist_info",
    "is_dtensor",
    "local_box",
    "local_nbytes",
    "new_tensor_like",
    "read_dtensor_into",
    "save_hook",
]

#: Name of the method a per-rank object (dataloader, data source, metrics) defines to accept a
#: checkpoint saved with another world size:
#: ``obj.reshard_state_dict(states: list[state_dict], *, rank: int, world_size: int) -> state_dict``
#: where ``states[r]`` is what rank ``r`` of the saving run returned from ``state_dict()`` and
#: ``rank``/``world_size`` describe the loading process. It must not change ``obj`` (it runs
#: before any object is touched); the returned state dict is then given to ``load_state_dict``.
#: Every rank receives the same ``states``, so the hook can split or merge them consistently.
RESHARD_HOOK = "reshard_state_dict"


# --------------------------------------------------------------------------------------------
# Process-group facts


def dist_info(process_group: Any = None) -> tuple[int, int, bool]:
    """(rank, world size, distributed) of this process in ``process_group`` (default: WORLD)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1, False
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, False
    if process_group is None:
        return dist.get_rank(), dist.get_world_size(), True
    return dist.get_rank(process_group), dist.get_world_size(process_group), True


def group_src(process_group: Any) -> int:
    """Global rank of rank 0 of ``process_group`` (for collectives that take global ranks)."""
    if process_group is None:
        return 0
    import torch.distributed as dist

    return int(dist.get_global_rank(process_group, 0))


def agree(process_group: Any, source: str | None, error: BaseException | None) -> None:
    """Collective: every rank reports its planned source (or its planning error); raise on
    every rank unless all of them planned the same checkpoint. Called between planning and
    touching any object, so a distributed load changes every rank or none."""
    import torch.distributed as dist

    from .errors import LoadMismatchError

    _rank, world, _ = dist_info(process_group)
    mine = (source, None if error is None else f"{type(error).__name__}: {error}")
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=process_group)
    failed = [(r, msg) for r, (_src, msg) in enumerate(gathered) if msg is not None]
    if error is not None:
        return  # the caller re-raises its own error
    if failed:
        r, msg = failed[0]
        raise LoadMismatchError(
            f"rank {r} of {world} cannot load the checkpoint, so no rank loads it (nothing was "
            f"changed on any rank). Rank {r} reported: {msg}"
        )
    sources = sorted({str(s) for s, _ in gathered})
    if len(sources) > 1:
        raise LoadMismatchError(
            "the ranks chose different checkpoints to load, so none was loaded: "
            + ", ".join(sources)
            + ". Fix: pass the same checkpoint path to load() on every rank (a shared "
            "filesystem is required)."
        )


def background_group(process_group: Any) -> Any:
    """A new gloo group with the ranks of ``process_group``, for an async save's collectives.

    Collective over the ranks of ``process_group``: every rank must call it, in the same order
    relative to its other collectives (the Checkpointer calls it inside the first async save)."""
    import torch.distributed as dist

    if process_group is None:
        return dist.new_group(backend="gloo")
    ranks = dist.get_process_group_ranks(process_group)
    return dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)


# --------------------------------------------------------------------------------------------
# Test hooks: a test registers a callable to crash or pause a save at a given stage.

_SAVE_HOOKS: dict[str, list[Callable[..., None]]] = {}


def save_hook(stage: str, **info: Any) -> None:
    """Run the callables registered for ``stage`` (``"before_write"``: the staging directory
    exists, nothing written yet; ``"before_commit"``: this rank's files are written, the barrier
    before the manifest is next). Used by tests to kill or pause a rank at that point."""
    for fn in _SAVE_HOOKS.get(stage, ()):
        fn(**info)


def register_save_hook(stage: str, fn: Callable[..., None]) -> Callable[[], None]:
    """Register ``fn`` for ``stage``; returns a function that unregisters it."""
    _SAVE_HOOKS.setdefault(stage, []).append(fn)
    return lambda: _SAVE_HOOKS.get(stage, []).remove(fn)


# --------------------------------------------------------------------------------------------
# DTensor: which box of the global tensor this rank holds, and reading exactly that box.


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing it when unused)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_box(t: Any) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, global offsets, sizes) of a DTensor's shard on this rank."""
    chunks = t.__create_chunk_list__()
    if len(chunks) != 1:
        raise NotImplementedError(
            f"a DTensor with {len(chunks)} local chunks on one rank is not supported"
        )
    local = t.to_local()
    offsets = tuple(int(o) for o in chunks[0].offsets)
    sizes = tuple(int(s) for s in chunks[0].sizes)
    if tuple(local.shape) != sizes:
        raise ValueError(
            f"DTensor local shard has shape {list(local.shape)}, its chunk says {list(sizes)}"
        )
    return local, offsets, sizes


def local_nbytes(nbytes: int, like: Any) -> int:
    """Bytes a rank reads for a stored tensor of ``nbytes`` loaded into ``like`` (its shard)."""
    if not is_dtensor(like) or like.numel() == 0:
        return nbytes
    _local, _offsets, sizes = local_box(like)
    return nbytes * math.prod(sizes) // like.numel()


def read_dtensor_into(view: Any, key: str, dest: Any) -> None:
    """Copy the part of stored tensor ``key`` that ``dest`` (a DTensor) holds on this rank into
    its local shard, reading only the bytes of the chunks that overlap the shard."""
    import torch

    from .dtypes import dtype_from_name

    entry = view.manifest.tensors[key]
    if tuple(dest.shape) != tuple(entry.shape):
        raise ValueError(f"{key}: destination shape {list(dest.shape)} != {list(entry.shape)}")
    local, offsets, sizes = local_box(dest)
    dtype = dtype_from_name(entry.dtype)
    direct = local.dtype == dtype and local.device.type == "cpu" and local.is_contiguous()
    target = local if direct else torch.empty(sizes, dtype=dtype)
    with torch.no_grad():
        for chunk in entry.chunks:
            _read_box(view, chunk, target, offsets, sizes)
        if not direct:
            local.copy_(target)


def _read_box(view: Any, chunk: Any, target: Any, offsets: Sequence[int], sizes: Sequence[int]):
    """Read the intersection of ``chunk`` with the box (offsets, sizes) into ``target``."""
    import torch

    from .sources import tensor_buffer

    if chunk.nbytes == 0:
        return
    ndim = len(sizes)
    lo = [max(c, o) for c, o in zip(chunk.offsets, offsets)]
    hi = [min(c + cs, o + s) for c, cs, o, s in zip(chunk.offsets, chunk.sizes, offsets, sizes)]
    if any(h <= low for low, h in zip(lo, hi)):
        return
    box = [h - low for low, h in zip(lo, hi)]
    dst = target
    for d in range(ndim):
        if box[d] != sizes[d]:
            dst = dst.narrow(d, lo[d] - offsets[d], box[d])
    item = target.element_size()
    start = [lo[d] - chunk.offsets[d] for d in range(ndim)]
    strides = [math.prod(chunk.sizes[d + 1 :]) for d in range(ndim)]
    # Trailing dimensions the box spans completely are contiguous in the file: one run covers
    # them (and a range of the first dimension it does not span completely).
    k = ndim - 1
    while k > 0 and box[k] == chunk.sizes[k]:
        k -= 1
    k = max(k, 0)
    run = (box[k] * strides[k]) if ndim else 1
    fname = view._file(chunk.file)
    storage = view.storage
    lead = box[:k]
    nruns = math.prod(lead)
    if nruns == 1 and dst.is_contiguous():
        first = sum(s * st for s, st in zip(start, strides))
        storage.read_into(fname, chunk.offset + first * item, tensor_buffer(dst))
        return
    tmp = torch.empty(box, dtype=target.dtype)
    buf = tensor_buffer(tmp)
    idx = [0] * k
    for i in range(nruns):
        first = sum((start[d] + idx[d]) * strides[d] for d in range(k)) + start[k] * strides[k]
        storage.read_into(
            fname, chunk.offset + first * item, buf[i * run * item : (i + 1) * run * item]
        )
        for d in range(k - 1, -1, -1):  # next index over the leading dimensions
            idx[d] += 1
            if idx[d] < lead[d]:
                break
            idx[d] = 0
    dst.copy_(tmp)


def copy_into_dtensor(src: Any, dest: Any) -> None:
    """Copy this rank's box of the full tensor ``src`` into DTensor ``dest`` (foreign files)."""
    import torch

    local, offsets, sizes = local_box(dest)
    region = src
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        region = region.narrow(d, o, s)
    with torch.no_grad():
        local.copy_(region)


def new_tensor_like(view: Any, ref: str, like: Any) -> Any:
    """A new tensor for stored tensor ``ref``, sharded like ``like`` when ``like`` is a DTensor
    of the same global shape (FSDP2 optimizer state); None when no sharding applies."""
    import torch

    if not is_dtensor(like):
        return None
    meta = view.tensors[ref]
    if tuple(meta.shape) != tuple(like.shape) or len(meta.shape) == 0:
        return None
    from torch.distributed.tensor import DTensor

    from .dtypes import dtype_from_name

    _local, _offsets, sizes = local_box(like)
    local = torch.empty(sizes, dtype=dtype_from_name(meta.dtype), device=_local.device)
    out = DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False,
        shape=like.shape, stride=like.stride(),
    )  # fmt: skip
    view.read_into(ref, out)
    return out


# --------------------------------------------------------------------------------------------
# Async save: snapshot the tensors (reusing buffers between saves), write in the background.


class Snapshotter:
    """Copies a save's tensors into buffers that it keeps for the next save of the same state.

    Training may change its parameters and optimizer state as soon as :meth:`take` returns. The
    copies live in host memory (pinned when CUDA is in use), one set per Checkpointer: reusing
    them makes a snapshot a plain memory copy, without allocating or faulting in new pages.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def take(self, tensors: dict[str, Any]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        with torch.no_grad():
            for key, t in tensors.items():
                buf: Any = self._buffers.get(key)
                if not _same_layout(buf, t):
                    buf = _new_buffer(t)
                if is_dtensor(t):
                    buf.to_local().copy_(t.to_local(), non_blocking=True)
                else:
                    buf.copy_(t, non_blocking=True)
                out[key] = buf
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        self._buffers = out
        return out


def _same_layout(buf: Any, t: Any) -> bool:
    if buf is None or type(buf) is not type(t) or buf.dtype != t.dtype or buf.shape != t.shape:
        return False
    if is_dtensor(t):
        return (
            buf.placements == t.placements
            and buf.device_mesh == t.device_mesh
            and buf.to_local().shape == t.to_local().shape
        )
    return True


def _new_buffer(t: Any) -> Any:
    import torch

    if is_dtensor(t):
        from torch.distributed.tensor import DTensor

        local = t.to_local()
        copy = torch.empty_like(local, memory_format=torch.contiguous_format)
        return DTensor.from_local(
            copy, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
    pin = t.device.type == "cuda"
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)


class BackgroundSave:
    """One save running in a thread; :meth:`join` waits and re-raises its error."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.error: BaseException | None = None
        self.result: Any = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as e:
                self.error = e
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, name=name)
        self.thread.start()

    def join(self) -> Any:
        self.thread.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return self.result
