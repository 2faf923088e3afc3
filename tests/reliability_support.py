"""Shared helpers for the reliability tests and benchmarks/kill_stress.py (not a test module).

* A deterministic training state per step (:func:`build`): model, AdamW state, a dataloader's
  position, all a function of the step, so that any checkpoint's content can be checked.
* A *zygote* process (``python tests/reliability_support.py zygote``) that imports torch once and
  forks a worker per trial, which keeps the SIGKILL trials cheap (no 2 s start per trial):

  - ``run DIR KEEP_LAST``: fork a worker that saves step after step into DIR until killed;
    replies ``pid PID`` once the worker is saving (the caller sends it SIGKILL);
  - ``crash DIR KEEP_LAST K``: fork a worker that makes one save and SIGKILLs itself just
    before the K-th file-system operation of that save; replies ``pid PID``;
  - ``reap PID``: wait for the worker; replies ``status killed|exit CODE``;
  - ``quit``.

* :class:`FaultPoints`: counts the file-system operations under a directory (open for writing,
  each write, fsync, mkdir, rename/replace, unlink/rmdir) and acts at the K-th one (SIGKILL the
  process, or raise ``OSError(ENOSPC)`` in the caller).
* :class:`History`: what each committed checkpoint looked like (manifest bytes and a hash of every
  file), to prove that no checkpoint committed before a kill is lost or changed.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import random
import select
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEEP_LAST = 3


# ------------------------------------------------------------------ deterministic training state
class Loader:
    """A dataloader stand-in with the state_dict protocol."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"epoch": 0, "position": 0, "seed": 1234}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


def build(step: int | None = None) -> tuple[Any, Any, Loader]:
    """A small model (~0.1M parameters), its AdamW and a loader; with ``step``: that step's state."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = Loader()
    if step is not None:
        set_state(step, model, opt, loader)
    return model, opt, loader


def set_state(step: int, model: Any, opt: Any, loader: Loader) -> None:
    import torch

    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    for p in model.parameters():
        opt.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.randn(p.shape, generator=g),
            "exp_avg_sq": torch.rand(p.shape, generator=g),
        }
    loader.load_state_dict({"epoch": step // 7, "position": 3 * step, "seed": 1234})


def save_step(ckpt: Any, step: int) -> str:
    model, opt, loader = build(step)
    return str(ckpt.save(step, model=model, optimizer=opt, dataloaders={"train": loader}))


def check_loaded(step: int, model: Any, opt: Any, loader: Loader) -> None:
    """Assert that the objects hold exactly the state of ``step``."""
    import torch

    em, eo, el = build(step)
    for (k, a), b in zip(model.state_dict().items(), em.state_dict().values()):
        assert torch.equal(a, b), f"step {step}: model tensor {k} differs"
    got, want = opt.state_dict(), eo.state_dict()
    assert got["state"].keys() == want["state"].keys()
    for i, st in want["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][i][k], v), f"step {step}: optimizer {i}.{k} differs"
    assert loader.state == el.state, f"step {step}: loader state {loader.state} != {el.state}"


def load_and_check(path: str, step: int) -> Any:
    """Resume from ``path`` with verify=True into fresh objects and check every value."""
    from optimus_ckpt import Checkpointer

    model, opt, loader = build()
    report = Checkpointer(os.path.dirname(path)).load(
        path, model=model, optimizer=opt, dataloaders={"train": loader}, verify=True
    )
    assert report.verified and report.iteration == step, report
    check_loaded(step, model, opt, loader)
    return report


# ------------------------------------------------------------------ history of committed checkpoints
def fingerprint(path: str) -> dict[str, str]:
    """sha256 of every file of a checkpoint directory (the manifest included)."""
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


@dataclass
class History:
    """Every committed checkpoint seen so far: step -> fingerprint."""

    directory: str
    keep_last: int = KEEP_LAST
    seen: dict[int, dict[str, str]] = field(default_factory=dict)
    new_checked: int = 0

    def check(self) -> list[int]:
        """Check the directory against everything seen before; check and record new checkpoints.

        Returns the steps of the checkpoints present now.
        """
        from optimus_ckpt.layout import list_checkpoints

        present = dict(list_checkpoints(self.directory))
        # keep_last deletes a checkpoint only after committing keep_last newer ones
        for step in self.seen:
            newer = sum(1 for s in present if s > step)
            assert step in present or newer >= self.keep_last, (
                f"committed checkpoint of step {step} was lost (present: {sorted(present)})"
            )
        for step, path in present.items():
            if step in self.seen:
                assert fingerprint(path) == self.seen[step], f"step {step} changed on disk"
            else:
                load_and_check(path, step)
                self.seen[step] = fingerprint(path)
                self.new_checked += 1
        return sorted(present)


def leftovers(directory: str) -> list[str]:
    from optimus_ckpt.layout import STAGING_INFIX

    return sorted(
        n for n in os.listdir(directory) if STAGING_INFIX in n or n.startswith("latest.tmp-")
    )


# ------------------------------------------------------------------ fault points
class FaultPoints:
    """Count file-system operations under ``directory``; act at the ``at``-th one.

    ``action``: "kill" (SIGKILL this process: a crash at that exact point) or "enospc" (raise
    ``OSError(ENOSPC)``, as a full disk would). Deletions are counted only for "kill" (a full disk
    does not make them fail). ``install()`` patches the os/io functions; ``uninstall()`` restores.
    """

    WRITE_OPS = ("open", "write", "fsync", "mkdir", "rename", "replace")

    def __init__(
        self, directory: str, at: int, action: str = "kill", every_write: bool = False
    ) -> None:
        self.directory = os.path.realpath(directory)
        self.at, self.action, self.count = at, action, 0
        self.every_write = every_write  # else only a file's first write is a fault point
        self.ops: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._fds: set[int] = set()

    def _mine(self, path: Any) -> bool:
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        return p == self.directory or p.startswith(self.directory + os.sep)

    def hit(self, op: str, path: Any) -> None:
        if self.action != "kill" and op not in self.WRITE_OPS:
            return
        self.count += 1
        self.ops.append(f"{op} {os.path.basename(os.fspath(path))}")
        if self.count == self.at:
            if self.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    def _patch(self, owner: Any, name: str, wrapper: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper)

    def install(self) -> FaultPoints:
        fp = self
        real_open, real_fsync = io.open, os.fsync

        class Writer:
            def __init__(self, f: Any, path: Any) -> None:
                self._f, self._path, self._writes = f, path, 0

            def write(self, data: Any) -> int:
                self._writes += 1
                if fp.every_write or self._writes == 1:
                    fp.hit("write", self._path)
                return int(self._f.write(data))

            def close(self) -> None:
                if not self._f.closed:
                    fp._fds.discard(self._f.fileno())
                self._f.close()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._f, name)

            def __enter__(self) -> Writer:
                return self

            def __exit__(self, *exc: Any) -> None:
                self.close()

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            writing = isinstance(file, str | os.PathLike) and any(c in mode for c in "wax+")
            if writing and fp._mine(file):
                fp.hit("open", file)
                f = real_open(file, mode, *args, **kwargs)
                fp._fds.add(f.fileno())
                return Writer(f, file)
            return real_open(file, mode, *args, **kwargs)

        def fake_fsync(fd: Any) -> None:
            n = fd if isinstance(fd, int) else fd.fileno()
            if n in fp._fds:
                fp.hit("fsync", "file")
            real_fsync(fd)

        def path_op(name: str, real: Any) -> Any:
            def op(path: Any, *args: Any, **kwargs: Any) -> Any:
                full = path
                if kwargs.get("dir_fd") is not None:  # shutil.rmtree works relative to a dir fd
                    full = os.path.join(os.readlink(f"/proc/self/fd/{kwargs['dir_fd']}"), path)
                if fp._mine(full):
                    fp.hit(name, full)
                return real(path, *args, **kwargs)

            return op

        self._patch(io, "open", fake_open)
        self._patch(builtins, "open", fake_open)
        self._patch(os, "fsync", fake_fsync)
        for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
            self._patch(os, name, path_op(name, getattr(os, name)))
        return self

    def uninstall(self) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()


# ------------------------------------------------------------------ the zygote and its workers
def _worker_loop(directory: str, keep_last: int, ready_fd: int) -> None:
    from optimus_ckpt import Checkpointer
    from optimus_ckpt.layout import list_checkpoints

    ckpt = Checkpointer(directory, keep_last=keep_last)
    done = list_checkpoints(directory)
    step = done[-1][0] + 1 if done else 1
    os.write(ready_fd, b"go")
    os.close(ready_fd)
    while True:
        save_step(ckpt, step)
        step += 1


def _worker_crash(directory: str, keep_last: int, at: int, ready_fd: int) -> None:
    from optimus_ckpt import Checkpointer
    from optimus_ckpt.layout import list_checkpoints

    ckpt = Checkpointer(directory, keep_last=keep_last)
    done = list_checkpoints(directory)
    step = done[-1][0] + 1 if done else 1
    model, opt, loader = build(step)
    os.write(ready_fd, b"go")
    os.close(ready_fd)
    fp = FaultPoints(directory, at, "kill").install()
    ckpt.save(step, model=model, optimizer=opt, dataloaders={"train": loader})
    fp.uninstall()


def _fork(target: Any, *args: Any) -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(r)
        code = 0
        try:
            target(*args, w)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 120)
    got = os.read(r, 2) if ready else b""
    os.close(r)
    if got != b"go":
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        raise RuntimeError(f"worker did not start (status {status})")
    return pid


def zygote() -> None:
    import torch

    torch.set_num_threads(1)  # no OpenMP pool in the parent: forking stays safe
    import tempfile

    from optimus_ckpt import Checkpointer

    with tempfile.TemporaryDirectory() as warm:  # pay every first-use cost once, before forking
        save_step(Checkpointer(warm), 1)
        load_and_check(os.path.join(warm, "step_0000000001"), 1)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "run":
            pid = _fork(_worker_loop, args[0], int(args[1]))
            print(f"pid {pid}", flush=True)
        elif cmd == "crash":
            pid = _fork(_worker_crash, args[0], int(args[1]), int(args[2]))
            print(f"pid {pid}", flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            if os.WIFSIGNALED(status):
                print(f"status killed {os.WTERMSIG(status)}", flush=True)
            else:
                print(f"status exit {os.WEXITSTATUS(status)}", flush=True)
        elif cmd == "quit":
            return


class Zygote:
    """The test side of the zygote protocol."""

    def __init__(self, stderr_path: str) -> None:
        self._err = open(stderr_path, "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "zygote"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
            cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert self._line() == "ready", self.stderr()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"zygote died: {self.stderr()}")
        return line

    def ask(self, *words: Any) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        return self._line()

    def run(self, directory: str, keep_last: int = KEEP_LAST) -> int:
        return int(self.ask("run", directory, keep_last).split()[1])

    def crash(self, directory: str, at: int, keep_last: int = KEEP_LAST) -> int:
        return int(self.ask("crash", directory, keep_last, at).split()[1])

    def reap(self, pid: int) -> str:
        return self.ask("reap", pid).split(" ", 1)[1]

    def stderr(self) -> str:
        self._err.flush()
        self._err.seek(0)
        return self._err.read()

    def close(self) -> None:
        try:
            self.ask("quit")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._err.close()


@dataclass
class KillStats:
    trials: int = 0
    survived: int = 0
    interrupted_saves: int = 0  # trials that left an unfinished save behind
    checkpoints_checked: int = 0
    errors: list[str] = field(default_factory=list)


def kill_trial(z: Zygote, hist: History, rng: random.Random, max_delay: float) -> bool:
    """One trial: start a saving worker, SIGKILL it after a random delay, check everything.

    Returns whether the kill left an unfinished save behind. Raises AssertionError on a failure.
    """
    import time

    from optimus_ckpt import Checkpointer
    from optimus_ckpt.layout import latest_checkpoint

    pid = z.run(hist.directory, hist.keep_last)
    time.sleep(rng.uniform(0, max_delay))
    os.kill(pid, signal.SIGKILL)
    status = z.reap(pid)
    assert status == "killed 9", f"worker ended by itself ({status}): {z.stderr()[-3000:]}"
    interrupted = bool(leftovers(hist.directory))
    steps = hist.check()
    newest = latest_checkpoint(hist.directory)
    if steps:
        # latest() ignores leftovers; a load from the directory takes the newest, no fallback
        assert newest is not None and newest.endswith(f"step_{steps[-1]:010d}"), newest
        model, opt, loader = build()
        report = Checkpointer(hist.directory).load(
            model=model, optimizer=opt, dataloaders={"train": loader}, verify=True
        )
        assert report.source == newest and not report.skipped_checkpoints, report
        check_loaded(steps[-1], model, opt, loader)
    else:
        assert newest is None
    # the next save removes the leftovers of the interrupted one (and commits normally)
    ckpt = Checkpointer(hist.directory, keep_last=hist.keep_last)
    save_step(ckpt, (steps[-1] if steps else 0) + 1)
    assert leftovers(hist.directory) == [], leftovers(hist.directory)
    hist.check()
    return interrupted


def crash_points(z: Zygote, hist: History, limit: int = 500) -> int:
    """Crash a save at each of its file-system operations in turn (K = 1, 2, ...) until a save
    completes. Checks the directory after every crash. Returns the number of crash points."""
    from optimus_ckpt import Checkpointer

    for at in range(1, limit):
        pid = z.crash(hist.directory, at, hist.keep_last)
        status = z.reap(pid)
        steps = hist.check()
        if status == "exit 0":  # no K-th operation: the save completed
            ckpt = Checkpointer(hist.directory, keep_last=hist.keep_last)
            save_step(ckpt, steps[-1] + 1)
            assert leftovers(hist.directory) == []
            hist.check()
            return at - 1
        assert status == "killed 9", f"crash point {at}: {status}: {z.stderr()[-3000:]}"
    raise AssertionError(f"a save has more than {limit} file-system operations?")


def count_ops(directory: str) -> list[str]:
    """The file-system operations of one save, in order (in this process; no fault)."""
    from optimus_ckpt import Checkpointer
    from optimus_ckpt.layout import list_checkpoints

    ckpt = Checkpointer(directory, keep_last=KEEP_LAST)
    done = list_checkpoints(directory)
    model, opt, loader = build(done[-1][0] + 1 if done else 1)
    fp = FaultPoints(directory, at=-1, action="kill").install()
    try:
        ckpt.save(
            done[-1][0] + 1 if done else 1, model=model, optimizer=opt,
            dataloaders={"train": loader},
        )  # fmt: skip
    finally:
        fp.uninstall()
    return fp.ops


def remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        zygote()
