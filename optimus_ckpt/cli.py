"""``optimus-ckpt``: inspect, plan, verify and convert checkpoints from the command line.

Also ``python -m optimus_ckpt``. Commands:

- ``inspect PATH``: what a checkpoint (or each checkpoint in a directory) holds; incomplete and
  corrupt ones are flagged (manifest parse and file-size checks, no content read).
- ``plan PATH [OVERRIDES...]``: what a load with a strategy composed from Hydra overrides would do,
  per component and per model key group, with the bytes it would read. It runs
  :meth:`Checkpointer.plan`, so it reports exactly what :meth:`Checkpointer.load` then does.
- ``verify PATH``: every file against the manifest's checksums.
- ``convert SRC DST --to native|torch|safetensors``: between our format, a single ``torch.save``
  file and safetensors; tensors are copied bit for bit.

torch is imported only inside the commands that need it, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["EXIT_FAILED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1  # a check failed: corrupt/incomplete checkpoint, bad checksum, load would fail
EXIT_USAGE = 2  # bad arguments, bad overrides, a --model that cannot be built, DST exists
EXIT_NOT_FOUND = 3  # PATH does not exist, or holds no checkpoint

EXIT_CODES_HELP = """\
exit codes:
  0  success: the checkpoint(s) passed every check, the load would succeed, the conversion is done
  1  a check failed: a corrupt or incomplete checkpoint (inspect), a checksum or size mismatch
     (verify), a load that would fail, e.g. a strict load with mismatched keys (plan)
  2  usage error: bad arguments or overrides, a --model that cannot be built, DST already exists
  3  not found: PATH does not exist or holds no checkpoint
"""


class CliError(Exception):
    """An error to print (without a traceback) and the exit code that goes with it."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- output helpers


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """An aligned text table; columns in ``right`` are right-aligned."""
    all_rows = [list(header)] + [list(r) for r in rows]
    ncol = len(header)
    widths = [max(len(r[i]) for r in all_rows) for i in range(ncol)]
    right_set = set(right)
    lines = []
    for r in all_rows:
        cells = [
            r[i].rjust(widths[i]) if i in right_set else r[i].ljust(widths[i]) for i in range(ncol)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _when(unix: float | None) -> str:
    if not unix:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


class Progress:
    """A one-line progress bar on stderr (``\\r`` redraws), shown only when enabled."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.done = label, max(0, total), 0
        self.enabled = enabled and self.total > 0
        self._last_draw = 0.0
        self._width = 0

    def add(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw >= 0.1 or self.done >= self.total:
            self._last_draw = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac)
            line = (
                f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% "
                f"{_size(self.done)} / {_size(self.total)}"
            )
            self._width = max(self._width, len(line))
            sys.stderr.write(line)
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _progress_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return sys.stderr.isatty()


# ----------------------------------------------------------------------------- paths

_STEP_PREFIX = re.compile(r"^step_(\d+)")


def _name_step(name: str) -> int | None:
    m = _STEP_PREFIX.match(name)
    return int(m.group(1)) if m else None


def _looks_like_checkpoint(path: str) -> bool:
    from .layout import MANIFEST_NAME, STAGING_INFIX

    name = os.path.basename(os.path.normpath(path))
    return (
        os.path.exists(os.path.join(path, MANIFEST_NAME))
        or STAGING_INFIX in name
        or _name_step(name) is not None
    )


def _classify(path: str) -> str:
    """'missing', 'file', 'checkpoint' (one checkpoint directory) or 'directory' (of them)."""
    if not os.path.exists(path):
        return "missing"
    if not os.path.isdir(path):
        return "file"
    return "checkpoint" if _looks_like_checkpoint(path) else "directory"


def _checkpoint_entries(directory: str) -> list[str]:
    """Every checkpoint-like entry (committed, staging, or a step directory) of a directory."""
    out = []
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if os.path.isdir(full) and _looks_like_checkpoint(full):
            out.append(full)
    return out


def _require(path: str) -> str:
    kind = _classify(path)
    if kind == "missing":
        raise CliError(f"{path} does not exist", EXIT_NOT_FOUND)
    return kind


# ----------------------------------------------------------------------------- inspect


def _dtypes_of(tensors: dict[str, Any], prefix: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key, meta in tensors.items():
        if key.startswith(prefix):
            counts[meta.dtype] = counts.get(meta.dtype, 0) + 1
    return dict(sorted(counts.items()))


def _components_of(view_components: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in view_components.items():
        keys = [k for k in tensors if k.startswith(name + ".")]
        out[name] = {
            "per_rank": bool(info.get("per_rank", False)),
            "tensors": len(keys),
            "bytes": sum(tensors[k].nbytes for k in keys),
            "dtypes": _dtypes_of(tensors, name + "."),
        }
    return out


def _config_keys(config_yaml: str | None) -> list[str]:
    if not config_yaml:
        return []
    try:
        from omegaconf import OmegaConf

        node = OmegaConf.create(config_yaml)
        return [str(k) for k in node] if hasattr(node, "keys") else []
    except Exception:
        return []


def _record_base(path: str, kind: str) -> dict[str, Any]:
    return {
        "path": os.path.abspath(path),
        "name": os.path.basename(os.path.normpath(path)),
        "kind": kind,
        "status": "complete",
        "problem": None,
        "staging": False,
        "step": None,
        "world_size": None,
        "created_unix": None,
        "format_version": None,
        "library_version": None,
        "torch_version": None,
        "components": {},
        "tensors": 0,
        "tensor_bytes": 0,
        "files": 0,
        "disk_bytes": 0,
        "config_yaml": None,
        "config_keys": [],
        "keys": None,
    }


def _inspect_native(path: str, with_keys: bool = False) -> dict[str, Any]:
    """Describe one of our checkpoint directories; flag it incomplete or corrupt (no exceptions)."""
    from .errors import CheckpointCorruptError, UnsafeCheckpointError
    from .layout import MANIFEST_NAME, STAGING_INFIX
    from .manifest import parse_manifest
    from .sources import FileView
    from .storage import LocalStorage

    rec = _record_base(path, "optimus")
    name = rec["name"]
    rec["step"] = _name_step(name)
    rec["staging"] = STAGING_INFIX in name
    if rec["staging"]:
        rec["status"] = "incomplete"
        rec["problem"] = (
            "being deleted (keep_last)"
            if f"{STAGING_INFIX}deleted-" in name
            else "unfinished save (staging directory); the next save removes it"
        )
    manifest_file = os.path.join(rec["path"], MANIFEST_NAME)
    try:
        with open(manifest_file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if rec["status"] == "complete":
            rec["status"] = "incomplete"
            rec["problem"] = (
                f"no {MANIFEST_NAME}, yet named like a committed checkpoint: an interrupted copy, "
                "a deleted manifest, or another tool's directory (loads skip it)"
            )
        return rec
    except OSError as e:
        rec["status"], rec["problem"] = "corrupt", f"{manifest_file}: cannot be read: {e}"
        return rec
    try:
        manifest = parse_manifest(raw, manifest_file)
    except (CheckpointCorruptError, UnsafeCheckpointError) as e:
        if rec["status"] == "complete":
            rec["status"], rec["problem"] = "corrupt", str(e)
        return rec
    rec.update(
        step=manifest.step,
        world_size=manifest.world_size,
        created_unix=manifest.created_unix or None,
        format_version=manifest.format_version,
        library_version=manifest.library_version,
        torch_version=manifest.torch_version,
        files=len(manifest.files),
        disk_bytes=sum(int(i["size"]) for i in manifest.files.values()),
        config_yaml=manifest.config_yaml,
        config_keys=_config_keys(manifest.config_yaml),
    )
    view = FileView(
        LocalStorage(os.path.dirname(rec["path"])), os.path.basename(rec["path"]), manifest
    )
    _fill_tensors(rec, view, with_keys)
    if rec["status"] == "complete":
        try:
            view.check_structure()
        except CheckpointCorruptError as e:
            rec["status"], rec["problem"] = "corrupt", str(e)
    view.close()
    return rec


def _fill_tensors(rec: dict[str, Any], view: Any, with_keys: bool) -> None:
    rec["components"] = _components_of(view.components, view.tensors)
    rec["tensors"] = len(view.tensors)
    rec["tensor_bytes"] = sum(m.nbytes for m in view.tensors.values())
    if with_keys:
        rec["keys"] = [
            {"key": k, "dtype": m.dtype, "shape": list(m.shape), "bytes": m.nbytes}
            for k, m in view.tensors.items()
        ]


def _inspect_file(path: str, with_keys: bool = False) -> dict[str, Any]:
    from .errors import CheckpointCorruptError, UnsafeCheckpointError
    from .sources import open_checkpoint

    rec = _record_base(path, "safetensors" if path.endswith(".safetensors") else "torch")
    try:
        view = open_checkpoint(path)
    except CheckpointCorruptError as e:
        rec["status"], rec["problem"] = "corrupt", str(e)
        return rec
    except UnsafeCheckpointError as e:
        rec["status"], rec["problem"] = "unsafe", str(e)
        return rec
    rec.update(kind=view.kind, step=view.step, world_size=view.world_size, files=1)
    rec["disk_bytes"] = os.path.getsize(path)
    _fill_tensors(rec, view, with_keys)
    view.close()
    return rec


def _inspect_any(path: str, with_keys: bool = False) -> dict[str, Any]:
    return (
        _inspect_native(path, with_keys) if os.path.isdir(path) else _inspect_file(path, with_keys)
    )


def _status_text(rec: dict[str, Any]) -> str:
    return rec["status"].upper() if rec["status"] != "complete" else "complete"


def _print_record(rec: dict[str, Any], full_config: bool) -> None:
    fields = [("Checkpoint", rec["path"])]
    status = _status_text(rec)
    if rec["status"] == "complete":
        status += (
            " (manifest and file sizes checked; `optimus-ckpt verify` checks contents)"
            if rec["kind"] == "optimus"
            else f" ({rec['kind']} file, readable)"
        )
    fields.append(("Status", status))
    if rec["problem"]:
        fields.append(("Problem", rec["problem"]))
    if rec["kind"] == "optimus":
        fmt = f"optimus_ckpt format v{rec['format_version']}" if rec["format_version"] else "-"
        if rec["library_version"]:
            fmt += f", saved by optimus_ckpt {rec['library_version']}"
        if rec["torch_version"]:
            fmt += f" with torch {rec['torch_version']}"
    else:
        fmt = "single torch.save file" if rec["kind"] == "torch" else "safetensors file"
        fmt += " (model weights)"
    fields.append(("Format", fmt))
    if rec["step"] is None and not rec["files"]:  # nothing could be read
        width = max(len(k) for k, _ in fields)
        for k, v in fields:
            print(f"{k.ljust(width)}  {v}")
        return
    fields.append(("Step", "-" if rec["step"] is None else str(rec["step"])))
    fields.append(("World size", "-" if rec["world_size"] is None else str(rec["world_size"])))
    if rec["created_unix"]:
        fields.append(("Created", _when(rec["created_unix"])))
    fields.append(
        (
            "Size",
            f"{rec['tensors']} tensor(s), {_size(rec['tensor_bytes'])}; "
            f"{rec['files']} file(s), {_size(rec['disk_bytes'])} on disk",
        )
    )
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k.ljust(width)}  {v}")
    if rec["components"]:
        print()
        rows = []
        for name, c in rec["components"].items():
            dtypes = ", ".join(f"{d} x{n}" for d, n in c["dtypes"].items())
            rows.append(
                [
                    name,
                    "per-rank" if c["per_rank"] else "shared",
                    str(c["tensors"]),
                    _size(c["bytes"]) if c["tensors"] else "-",
                    dtypes or ("(small state)" if not c["tensors"] else ""),
                ]
            )
        print(_table(["COMPONENT", "STATE", "TENSORS", "SIZE", "DTYPES"], rows, right=(2, 3)))
    if rec["keys"] is not None:
        print()
        rows = [[k["key"], k["dtype"], str(k["shape"]), _size(k["bytes"])] for k in rec["keys"]]
        print(_table(["KEY", "DTYPE", "SHAPE", "SIZE"], rows, right=(3,)))
    if (rec["kind"] == "optimus" and rec["status"] != "incomplete") or rec["config_yaml"]:
        print()
        cfg = rec["config_yaml"]
        if not cfg:
            print("Config: none saved")
        else:
            lines = cfg.rstrip("\n").splitlines()
            keys = ", ".join(rec["config_keys"])
            print(f"Config: {len(lines)} line(s) of YAML; top-level keys: {keys or '-'}")
            shown = lines if full_config else lines[:20]
            for line in shown:
                print(f"  {line}")
            if len(shown) < len(lines):
                print(f"  ... ({len(lines) - len(shown)} more line(s); --config shows all)")


def _components_summary(rec: dict[str, Any]) -> str:
    if rec["problem"]:  # file names relative to the checkpoint: the row names it already
        return rec["problem"].splitlines()[0].replace(rec["path"] + os.sep, "")
    return ", ".join(rec["components"])


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.path
    kind = _require(path)
    if kind in ("checkpoint", "file"):
        rec = _inspect_any(path, args.keys)
        if args.json:
            _emit_json(rec)
        else:
            _print_record(rec, args.config)
        return EXIT_OK if rec["status"] == "complete" else EXIT_FAILED
    from .layout import latest_checkpoint

    entries = _checkpoint_entries(path)
    if not entries:
        raise CliError(f"no checkpoints in {path}", EXIT_NOT_FOUND)
    recs = [_inspect_native(p, args.keys) for p in entries]
    order = {"complete": 0, "corrupt": 1, "unsafe": 1, "incomplete": 2}
    recs.sort(key=lambda r: (-(r["step"] if r["step"] is not None else -1), order[r["status"]]))
    latest = latest_checkpoint(path)
    for r in recs:
        r["latest"] = latest is not None and r["path"] == os.path.abspath(latest)
    # Unfinished saves (staging directories) are expected after a crash and removed by the next
    # save; anything else that is not complete fails the check.
    bad = [r for r in recs if r["status"] != "complete" and not r.get("staging")]
    if args.json:
        _emit_json({"directory": os.path.abspath(path), "latest": latest, "checkpoints": recs})
    else:
        print(f"{os.path.abspath(path)}: {len(recs)} checkpoint(s), newest first")
        rows = []
        for r in recs:
            complete = r["status"] == "complete"
            rows.append(
                [
                    "-" if r["step"] is None else str(r["step"]),
                    _status_text(r) + (" (latest)" if r["latest"] else ""),
                    str(r["world_size"]) if r["world_size"] else "-",
                    str(r["tensors"]) if r["tensors"] else "-",
                    _size(r["tensor_bytes"]) if r["tensor_bytes"] else "-",
                    _when(r["created_unix"]),
                    r["name"],
                    _components_summary(r) if complete or r["problem"] else "",
                ]
            )
        header = ["STEP", "STATUS", "WORLD", "TENSORS", "SIZE", "CREATED", "NAME", "CONTENTS"]
        print(_table(header, rows, right=(0, 2, 3, 4)))
        if bad:
            print(
                f"\n{len(bad)} checkpoint(s) corrupt or incomplete; `optimus-ckpt inspect PATH` "
                "and `optimus-ckpt verify PATH` for details."
            )
    return EXIT_FAILED if bad else EXIT_OK


# ----------------------------------------------------------------------------- verify


def _verify_native(path: str, progress_flag: bool | None) -> dict[str, Any]:
    """Check every file of one of our checkpoints; collect every failure (never raises)."""
    from .errors import CheckpointCorruptError, UnsafeCheckpointError
    from .layout import MANIFEST_NAME
    from .manifest import parse_manifest
    from .sources import FileView
    from .storage import LocalStorage

    path = os.path.abspath(path)
    rec: dict[str, Any] = {
        "path": path,
        "ok": False,
        "step": _name_step(os.path.basename(path)),
        "files_checked": 0,
        "tensors_checked": 0,
        "bytes_checked": 0,
        "unchecked_chunks": 0,
        "failures": [],
    }

    def fail(file: str, check: str, message: str, tensors: list[str] | None = None) -> None:
        rec["failures"].append(
            {"file": file, "check": check, "message": message, "tensors": tensors or []}
        )

    manifest_file = os.path.join(path, MANIFEST_NAME)
    try:
        with open(manifest_file, "rb") as f:
            raw = f.read()
        manifest = parse_manifest(raw, manifest_file)
    except FileNotFoundError:
        fail(
            MANIFEST_NAME,
            "manifest",
            f"{manifest_file}: manifest check failed: missing (an interrupted copy, a deleted "
            "manifest, or not an optimus_ckpt checkpoint)",
        )
        return rec
    except (CheckpointCorruptError, UnsafeCheckpointError, OSError) as e:
        fail(MANIFEST_NAME, "manifest", str(e))
        return rec
    rec["step"] = manifest.step
    storage = LocalStorage(os.path.dirname(path))
    view = FileView(storage, os.path.basename(path), manifest)
    bad_files: set[str] = set()
    for name, info in manifest.files.items():
        full = os.path.join(path, name)
        try:
            size = os.path.getsize(full)
        except OSError:
            fail(name, "exists", f"{full}: listed in the manifest but missing")
            bad_files.add(name)
            continue
        if size != info["size"]:
            fail(
                name,
                "size",
                f"{full}: size check failed: {size} bytes, the manifest says {info['size']} "
                "(truncated or overwritten)",
            )
            bad_files.add(name)
    keys = [
        k for k, e in manifest.tensors.items() if not any(c.file in bad_files for c in e.chunks)
    ]
    small = [
        n for n, i in manifest.files.items() if i.get("crc32") is not None and n not in bad_files
    ]
    tensor_bytes = sum(
        c.nbytes for k in keys for c in manifest.tensors[k].chunks if c.crc32 is not None
    )
    total = tensor_bytes + sum(int(manifest.files[n]["size"]) for n in small)
    rec["unchecked_chunks"] = sum(
        1 for e in manifest.tensors.values() for c in e.chunks if c.crc32 is None
    )
    bar = Progress(f"verify {os.path.basename(path)}", total, _progress_enabled(progress_flag))
    by_file: dict[str, dict[str, Any]] = {}

    def check(batch: list[str]) -> None:
        try:
            view.verify(batch)
            return
        except CheckpointCorruptError:
            pass
        for key in batch:  # attribute the failure(s) to tensors and files
            try:
                view.verify([key])
            except CheckpointCorruptError as e:
                msg = str(e)
                chunks = manifest.tensors[key].chunks
                file = next(
                    (c.file for c in chunks if msg.startswith(os.path.join(path, c.file))),
                    chunks[0].file,
                )
                entry = by_file.setdefault(file, {"message": msg, "tensors": []})
                entry["tensors"].append(key)

    batch: list[str] = []
    batch_bytes = 0
    try:
        for key in keys:
            n = sum(c.nbytes for c in manifest.tensors[key].chunks if c.crc32 is not None)
            batch.append(key)
            batch_bytes += n
            if batch_bytes >= (64 << 20):
                check(batch)
                bar.add(batch_bytes)
                batch, batch_bytes = [], 0
        if batch:
            check(batch)
            bar.add(batch_bytes)
        rec["tensors_checked"] = len(keys)
        rec["bytes_checked"] = tensor_bytes
        for name in small:
            raw_file = storage.read_bytes(f"{os.path.basename(path)}/{name}")
            crc = zlib.crc32(raw_file)
            if crc != manifest.files[name]["crc32"]:
                fail(
                    name,
                    "checksum",
                    f"{os.path.join(path, name)}: checksum check failed (crc32 {crc:08x}, the "
                    f"manifest says {manifest.files[name]['crc32']:08x})",
                )
            rec["bytes_checked"] += len(raw_file)
            bar.add(len(raw_file))
    finally:
        bar.close()
        view.close()
    for file, entry in by_file.items():
        tensors = entry["tensors"]
        message = entry["message"]
        if len(tensors) > 1:
            message += f" (and {len(tensors) - 1} more tensor(s) in this file)"
        fail(file, "checksum", message, tensors)
    checked = set(manifest.files) - bad_files
    rec["files_checked"] = len(
        {c.file for k in keys for c in manifest.tensors[k].chunks} & checked | set(small)
    )
    rec["ok"] = not rec["failures"]
    return rec


def _verify_file(path: str) -> dict[str, Any]:
    rec = _inspect_file(path)
    ok = rec["status"] == "complete"
    return {
        "path": rec["path"],
        "ok": ok,
        "step": rec["step"],
        "files_checked": 1,
        "tensors_checked": rec["tensors"] if ok else 0,
        "bytes_checked": 0,
        "unchecked_chunks": rec["tensors"],
        "failures": []
        if ok
        else [
            {"file": rec["name"], "check": "structure", "message": rec["problem"], "tensors": []}
        ],
        "note": f"a {rec['kind']} file has no checksums: only its structure was checked",
    }


def cmd_verify(args: argparse.Namespace) -> int:
    path = args.path
    kind = _require(path)
    skipped: list[dict[str, Any]] = []
    if kind == "file":
        results = [_verify_file(path)]
    elif kind == "checkpoint":
        if _is_staging(path):
            results = []
            skipped.append(
                {"path": os.path.abspath(path), "reason": _inspect_native(path)["problem"]}
            )
        else:
            results = [_verify_native(path, args.progress)]
    else:
        entries = _checkpoint_entries(path)
        if not entries:
            raise CliError(f"no checkpoints in {path}", EXIT_NOT_FOUND)
        results = []
        for p in sorted(entries, key=_newest_first):
            if _is_staging(p):  # an unfinished save: not a checkpoint (yet)
                skipped.append(
                    {"path": os.path.abspath(p), "reason": _inspect_native(p)["problem"]}
                )
                continue
            results.append(_verify_native(p, args.progress))
    failed = [r for r in results if not r["ok"]]
    incomplete_target = kind == "checkpoint" and not results
    if args.json:
        _emit_json({"ok": not failed and not incomplete_target, "checkpoints": results,
                    "skipped": skipped})  # fmt: skip
    else:
        for r in results:
            head = "OK    " if r["ok"] else "FAILED"
            detail = (
                f"{r['files_checked']} file(s), {r['tensors_checked']} tensor(s), "
                f"{_size(r['bytes_checked'])} checked"
            )
            if r.get("note"):
                detail = r["note"]
            elif r["unchecked_chunks"]:
                detail += f"; {r['unchecked_chunks']} chunk(s) have no checksum"
            print(f"{head}  {r['path']}  ({detail})")
            for f in r["failures"]:  # each message names its file and its check
                print(f"        {f['message'].replace(r['path'] + os.sep, '')}")
        for s in skipped:
            print(f"SKIP    {s['path']}  ({s['reason']})")
        if failed:
            names = sorted(
                {
                    f["file"] if len(results) == 1 else f"{os.path.basename(r['path'])}/{f['file']}"
                    for r in failed
                    for f in r["failures"]
                }
            )
            print(
                f"\n{len(failed)} of {len(results)} checkpoint(s) failed verification; bad "
                f"file(s): {', '.join(names)}"
            )
    if incomplete_target:
        print(f"optimus-ckpt: {path} is not a complete checkpoint", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if failed else EXIT_OK


def _newest_first(path: str) -> tuple[int, str]:
    step = _name_step(os.path.basename(path))
    return (-(step if step is not None else -1), path)


def _is_staging(path: str) -> bool:
    from .layout import STAGING_INFIX

    return STAGING_INFIX in os.path.basename(os.path.normpath(path))


# ----------------------------------------------------------------------------- plan

_PRIMARY_CONFIG = "optimus_ckpt_cli"


def compose_strategy(overrides: Sequence[str]) -> Any:
    """A validated LoadStrategy composed by Hydra from ``overrides`` over the shipped presets.

    The primary config is ``defaults: [load_strategy: resume, _self_]``; Hydra's own messages
    report bad overrides (unknown preset, unknown key, wrong type).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .errors import StrategyError
    from .hydra_support import register_configs
    from .strategy import conf_dir, resolve_strategy

    register_configs()
    ConfigStore.instance().store(
        name=_PRIMARY_CONFIG,
        node={"defaults": [{"load_strategy": "resume"}, "_self_"]},
        provider="optimus_ckpt",
    )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base=None, config_dir=conf_dir(), job_name="optimus"):
            cfg = compose(_PRIMARY_CONFIG, overrides=list(overrides))
        return resolve_strategy(cfg.load_strategy)
    except (HydraException, OmegaConfBaseException, StrategyError) as e:
        message = str(e)
        cause = e.__cause__
        while cause is not None:
            message += f"\n{cause}"
            cause = cause.__cause__
        raise CliError(f"invalid overrides: {message}", EXIT_USAGE) from None
    finally:
        GlobalHydra.instance().clear()


def _load_factory(spec: str) -> Any:
    """Build the model from ``MODULE:FACTORY`` (MODULE importable, or a path to a .py file)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CliError(
            f"--model {spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:build or "
            "path/to/models.py:build"
        )
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            file = os.path.abspath(module_name)
            if not os.path.isfile(file):
                raise CliError(f"--model {spec!r}: {file} does not exist", EXIT_NOT_FOUND)
            sys.path.insert(0, os.path.dirname(file))
            mod_spec = importlib.util.spec_from_file_location("_optimus_cli_model", file)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules["_optimus_cli_model"] = module
            mod_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
        factory: Any = module
        for part in attr.split("."):
            factory = getattr(factory, part)
        if not callable(factory):
            raise CliError(f"--model {spec!r}: {attr} is not callable")
        model = factory()
    except CliError:
        raise
    except Exception as e:
        raise CliError(f"--model {spec!r} failed: {type(e).__name__}: {e}") from None
    if not callable(getattr(model, "state_dict", None)):
        raise CliError(
            f"--model {spec!r} returned {type(model).__name__}, which has no state_dict(); "
            "the factory must return the model (a torch.nn.Module)"
        )
    return model


class _StandIn:
    """A component's object for planning: nothing to save, and loading changes nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        pass


class _StandInModel(_StandIn):
    """The checkpoint's own model keys, as tensors on the meta device (no memory)."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self._tensors = tensors
        self._params: dict[str, Any] = dict(tensors)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._tensors)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterable[tuple[str, Any]]:
        return list(self._params.items())


class _StandInOptimizer(_StandIn):
    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.param_groups = param_groups


def _stand_in_optimizer(saved_class: Any, groups: list[dict[str, Any]]) -> _StandInOptimizer:
    """A stand-in of the class that saved the state (``module.Qualname``), as the user's
    optimizer would be when built as in the run that saved it."""
    cls: type[_StandInOptimizer] = _StandInOptimizer
    if isinstance(saved_class, str) and "." in saved_class:
        module, _, qualname = saved_class.rpartition(".")
        attrs = {"__module__": module, "__qualname__": qualname}
        cls = type(qualname.rsplit(".", 1)[-1], (_StandInOptimizer,), attrs)
    return cls(groups)


def _stand_ins(view: Any, model: Any) -> dict[str, Any]:
    """An object for every component of the checkpoint, as load() would be given them."""
    import torch

    from .dtypes import dtype_from_name
    from .parts import canonical_key

    def meta(dtype: str, shape: Sequence[int]) -> Any:
        return torch.empty(tuple(shape), dtype=dtype_from_name(dtype), device="meta")

    objects: dict[str, Any] = {}
    if model is None and "model" in view.components:
        tensors = {
            k[len("model.") :]: meta(m.dtype, m.shape)
            for k, m in view.tensors.items()
            if k.startswith("model.")
        }
        model = _StandInModel(tensors)
    if model is not None:
        objects["model"] = model
    saved_opt = view.global_state("optimizer") if "optimizer" in view.components else None
    if model is not None and isinstance(saved_opt, dict) and "param_groups" in saved_opt:
        params = {canonical_key(n): p for n, p in model.named_parameters()}
        used: set[str] = set()
        groups: list[dict[str, Any]] = []
        for g in saved_opt["param_groups"]:
            group = []
            for name in g.get("params", []):
                c = canonical_key(str(name))
                p = params.get(c)
                if p is None and isinstance(model, _StandInModel):
                    shape: Sequence[int] = ()
                    for enc in (saved_opt.get("state") or {}).get(name, {}).values():
                        if isinstance(enc, dict) and enc.get("__optimus__") == "ref":
                            m = view.tensors.get(enc.get("v"))
                            if m is not None and m.shape:
                                shape = m.shape
                                break
                    p = model._params[c] = meta("float32", shape)
                if p is not None:
                    group.append(p)
                    used.add(c)
            groups.append({"params": group})
        # Parameters of the model that no saved group holds go where a fresh optimizer over
        # model.parameters() would put them: into the (last) group.
        rest = [p for c, p in params.items() if c not in used]
        if rest:
            if groups:
                groups[-1]["params"].extend(rest)
            else:
                groups.append({"params": rest})
        objects["optimizer"] = _stand_in_optimizer(saved_opt.get("class"), groups)
    for name in view.components:
        root, _, sub = name.partition(".")
        if root in ("model", "optimizer", "rng"):
            continue
        if sub:
            objects.setdefault(root, {})[sub] = _StandIn()
        else:
            objects[root] = _StandIn()
    return objects


def _choose_source(path: str) -> tuple[str, list[str]]:
    """The checkpoint a load of ``path`` reads, and the warnings about newer ones it skipped.

    The engine chooses (a directory's newest complete checkpoint, falling back past corrupt
    ones): a dry run that loads nothing reads only manifests.
    """
    if not os.path.isdir(path):
        return os.path.abspath(path), []
    from .checkpointer import Checkpointer
    from .strategy import PRESETS

    probe = Checkpointer(path).plan(path, PRESETS["scratch"])
    return os.path.abspath(probe.source), list(probe.warnings)


def _group_of(key: str, depth: int) -> str:
    return ".".join(key.split(".")[:depth])


def _key_groups(report: Any, view_tensors: dict[str, Any], depth: int) -> list[dict[str, Any]]:
    """Per model key group (key prefix): how many keys load, are ignored, mismatched, ..."""
    from .parts import canonical_key

    comp = report.components.get("model")
    if comp is None or comp.outcome.value != "loaded":
        return []
    ignored = {canonical_key(k) for k in report.ignored_keys}
    unexpected = {canonical_key(k) for k in report.unexpected_keys}
    mismatched = {canonical_key(k) for k, _a, _b in report.shape_mismatches}
    groups: dict[str, dict[str, Any]] = {}

    def group(c: str) -> dict[str, Any]:
        name = "model." + _group_of(c, depth)
        return groups.setdefault(
            name,
            {"group": name, "keys": 0, "load": 0, "ignored": 0, "shape_mismatch": 0,
             "unexpected": 0, "missing": 0, "bytes": 0},
        )  # fmt: skip

    for key, meta in view_tensors.items():
        if not key.startswith("model."):
            continue
        c = canonical_key(key[len("model.") :])
        g = group(c)
        g["keys"] += 1
        if c in ignored:
            g["ignored"] += 1
        elif c in unexpected:
            g["unexpected"] += 1
        elif c in mismatched:
            g["shape_mismatch"] += 1
        else:
            g["load"] += 1
            g["bytes"] += meta.nbytes
    saved = {canonical_key(k[len("model.") :]) for k in view_tensors if k.startswith("model.")}
    for k in report.missing_keys:
        group(canonical_key(k))["missing"] += 1
    for k in report.ignored_keys:  # ignored keys that only the live model has
        c = canonical_key(k)
        if c not in saved:
            group(c)["ignored"] += 1
    return list(groups.values())  # in the checkpoint's (the model's) order


def _group_action(g: dict[str, Any]) -> str:
    parts = [
        f"{label} {g[k]}"
        for k, label in (
            ("load", "load"),
            ("ignored", "ignored"),
            ("shape_mismatch", "shape mismatch (kept)"),
            ("unexpected", "unexpected (not loaded)"),
            ("missing", "missing (kept)"),
        )
        if g[k]
    ]
    return ", ".join(parts)


def _strategy_text(s: dict[str, Any]) -> str:
    flags = [
        "model", "optimizer", "scheduler", "data_sources", "dataloaders", "metrics", "iteration",
    ]  # fmt: skip
    loads = [f for f in flags if s.get(f"load_{f}")]
    text = "loads " + (", ".join(loads) if loads else "nothing")
    text += "; strict" if s.get("strict") else "; non-strict"
    if s.get("extra_ignore_keys"):
        text += "; ignores " + ", ".join(s["extra_ignore_keys"])
    return text


def cmd_plan(args: argparse.Namespace) -> int:
    _require(args.path)
    strategy = compose_strategy(args.overrides)
    model = _load_factory(args.model) if args.model else None

    from .checkpointer import Checkpointer
    from .errors import LoadMismatchError
    from .sources import open_checkpoint

    source, _ = _choose_source(args.path)
    ckpt = Checkpointer(args.path if os.path.isdir(args.path) else os.path.dirname(source))
    for _attempt in range(16):
        view = open_checkpoint(source)
        try:  # the objects a load would be given, shaped like this checkpoint's state
            objects = _stand_ins(view, model)
            tensors = dict(view.tensors)
        finally:
            view.close()
        error = None
        failing: list[str] = []
        try:
            report = ckpt.plan(args.path, strategy, **objects)
        except LoadMismatchError as e:
            error = str(e)
            report, failing = _diagnostic_plan(ckpt, args.path, strategy, objects)
        if report is None or not os.path.isdir(args.path) or report.source == source:
            break
        source = report.source  # the engine fell back further (a check of the plan phase)
    groups = _key_groups(report, tensors, args.group_depth) if report is not None else []
    model_source = args.model or "stand-in (the checkpoint's own components)"
    if args.json:
        data: dict[str, Any] = report.to_dict() if report is not None else {
            "source": source, "strategy": strategy.to_dict(),
        }  # fmt: skip
        for name in failing:
            data["components"][name]["outcome"] = WOULD_FAIL
        data.update(
            would_fail=error is not None,
            error=error,
            overrides=list(args.overrides),
            model=model_source,
            groups=groups,
        )
        _emit_json(data)
    else:
        _print_plan(report, strategy.to_dict(), source, args, model_source, groups, error, failing)
    return EXIT_FAILED if error else EXIT_OK


WOULD_FAIL = "would fail"


def _diagnostic_plan(
    ckpt: Any, source: str, strategy: Any, objects: dict[str, Any]
) -> tuple[Any, list[str]]:
    """After a plan failed: a relaxed plan's report, to show which keys are the problem, and the
    components that make the load fail.

    First non-strict; if the optimizer's structure still fails, also without the optimizer.
    ``(None, [])`` when even that fails (the error message then says it all).
    """
    from .errors import LoadMismatchError
    from .strategy import LoadStrategy

    base = strategy.to_dict()
    tries = [{"strict": False}, {"strict": False, "load_optimizer": False}]
    for change in tries:
        if all(base.get(k) == v for k, v in change.items()):
            continue
        try:
            report = ckpt.plan(source, LoadStrategy(**{**base, **change}), **objects)
        except LoadMismatchError:
            continue
        report.strategy = base
        failing = []
        model = report.components.get("model")
        keys_wrong = report.missing_keys or report.unexpected_keys or report.shape_mismatches
        if model is not None and base["strict"] and keys_wrong:
            model.reason = "strict: keys do not match (see below)"
            failing.append("model")
        if "load_optimizer" in change and "optimizer" in report.components:
            report.components["optimizer"].reason = "optimizer state does not fit (see below)"
            failing.append("optimizer")
        return report, failing
    return None, []


def _print_plan(report: Any, strategy: dict[str, Any], source: str, args: argparse.Namespace,
                model_source: str, groups: list[dict[str, Any]], error: str | None,
                failing: list[str]) -> None:  # fmt: skip
    overrides = " ".join(args.overrides) or "(none: load_strategy=resume)"
    print(f"Plan for   {source}")
    print(f"Overrides  {overrides}")
    print(f"Strategy   {_strategy_text(strategy)}")
    print(f"Model      {model_source}")
    if report is None:
        print(f"\nA load with this strategy would FAIL:\n{error}")
        return
    print(f"Iteration  continue from {report.iteration} (checkpoint step {report.step})")
    print()
    rows = []
    for name, c in report.components.items():
        rows.append(
            [
                name,
                WOULD_FAIL.upper() if name in failing else c.outcome.value,
                str(c.tensors) if c.tensors else "-",
                _size(c.bytes) if c.bytes else "-",
                c.reason,
            ]
        )
        if name == "model":
            for g in groups:
                rows.append(
                    [
                        "  " + g["group"],
                        _group_action(g),
                        str(g["load"]) if g["load"] else "-",
                        _size(g["bytes"]) if g["bytes"] else "-",
                        "",
                    ]
                )
    print(_table(["COMPONENT / KEY GROUP", "ACTION", "TENSORS", "READ", "NOTE"], rows, (2, 3)))
    print(f"\nTotal read: {_size(report.bytes_read)} of tensors (plus small state)")
    for label, keys in (
        ("Missing keys (keep their current values)", report.missing_keys),
        ("Unexpected keys (not loaded)", report.unexpected_keys),
        ("Ignored keys", report.ignored_keys),
    ):
        if keys:
            print(f"{label}: {len(keys)}")
            for k in keys[: args.max_keys]:
                print(f"  {k}")
            if len(keys) > args.max_keys:
                print(f"  ... and {len(keys) - args.max_keys} more (--max-keys)")
    if report.shape_mismatches:
        print(f"Shape mismatches (keep their current values): {len(report.shape_mismatches)}")
        for key, saved, live in report.shape_mismatches[: args.max_keys]:
            print(f"  {key}: checkpoint {saved} vs model {live}")
        if len(report.shape_mismatches) > args.max_keys:
            print(f"  ... and {len(report.shape_mismatches) - args.max_keys} more (--max-keys)")
    for key, saved_dtype, live_dtype in report.dtype_conversions[: args.max_keys]:
        print(f"dtype converted: {key}: {saved_dtype} -> {live_dtype}")
    for p in report.renamed_prefixes:
        print(f"Renamed keys: {p}")
    if report.unmatched_ignore_patterns:
        print(
            "Ignore patterns that matched nothing (a typo?): "
            + ", ".join(report.unmatched_ignore_patterns)
        )
    for w in report.warnings:
        if "matched nothing" not in w:
            print(f"WARNING: {w}")
    print()
    if error:
        print(f"A load with this strategy would FAIL:\n{error}")
    else:
        print("A load with this strategy would succeed.")


# ----------------------------------------------------------------------------- convert


class _StateHolder:
    """The smallest 'model' Checkpointer.save accepts: a fixed state dict."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: Any) -> None:
        self._state = dict(state)


_WEIGHTS_ONLY_SCALARS = (str, int, float, bool, type(None), complex)


def _weights_only_safe(obj: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` can read ``obj`` back."""
    import torch

    if isinstance(obj, _WEIGHTS_ONLY_SCALARS):
        return True
    if isinstance(obj, torch.Tensor | torch.dtype | torch.Size):
        return True
    if type(obj) in (list, tuple):
        return all(_weights_only_safe(v) for v in obj)
    if type(obj) is dict:
        return all(_weights_only_safe(k) and _weights_only_safe(v) for k, v in obj.items())
    return False


def _read_model(view: Any, bar: Progress) -> dict[str, Any]:
    import torch

    from .dtypes import dtype_from_name

    out = {}
    for key, meta in view.tensors.items():
        if not key.startswith("model."):
            continue
        t = torch.empty(meta.shape, dtype=dtype_from_name(meta.dtype))
        view.read_into(key, t)
        out[key[len("model.") :]] = t
        bar.add(meta.nbytes)
    return out


def _training_state(view: Any, bar: Progress, notes: list[str]) -> dict[str, Any]:
    """Optimizer (as a torch state dict), scheduler and extra state of a native checkpoint."""
    import torch

    from .codec import decode
    from .dtypes import dtype_from_name

    def read_new(ref: str) -> Any:
        meta = view.tensors[ref]
        t = torch.empty(meta.shape, dtype=dtype_from_name(meta.dtype))
        view.read_into(ref, t)
        bar.add(meta.nbytes)
        return t

    out: dict[str, Any] = {}
    saved = view.global_state("optimizer")
    if isinstance(saved, dict) and "param_groups" in saved:
        names = [n for g in saved["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(names)}
        state = {
            index[fqn]: decode(entries, read_new)
            for fqn, entries in saved["state"].items()
            if fqn in index
        }
        groups = []
        for g in saved["param_groups"]:
            hyper = {k: decode(v) for k, v in g.items() if k != "params"}
            hyper["params"] = [index[n] for n in g["params"]]
            groups.append(hyper)
        out["optimizer"] = {"state": state, "param_groups": groups}
        out["optimizer_param_names"] = names
    for name, info in view.components.items():
        root = name.split(".", 1)[0]
        if root in ("model", "optimizer"):
            continue
        if info.get("per_rank"):
            notes.append(f"left out per-process state '{name}' (not meaningful in one file)")
            continue
        value = decode(view.global_state(name), read_new)
        if name.startswith("extra."):
            out.setdefault("extra", {})[name[len("extra.") :]] = value
        else:
            out[name] = value
    for key in list(out):
        if not _weights_only_safe(out[key]):
            notes.append(f"left out '{key}': holds types torch.load(weights_only=True) refuses")
            del out[key]
    return out


_ST_CODES: dict[str, str] | None = None


def _st_code(dtype: str) -> str:
    global _ST_CODES
    if _ST_CODES is None:
        from .sources import _ST_DTYPES

        _ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
    code = _ST_CODES.get(dtype)
    if code is None:
        raise CliError(f"safetensors cannot store tensors of dtype {dtype}", EXIT_FAILED)
    return code


def _write_safetensors(view: Any, dst: str, metadata: dict[str, str], bar: Progress) -> int:
    """Write the model tensors as a .safetensors file (the format is simple: no dependency)."""
    import torch

    from .dtypes import dtype_from_name
    from .sources import tensor_buffer

    keys = sorted(k for k in view.tensors if k.startswith("model."))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in keys:
        meta = view.tensors[key]
        header[key[len("model.") :]] = {
            "dtype": _st_code(meta.dtype),
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for key in keys:
                meta = view.tensors[key]
                t = torch.empty(meta.shape, dtype=dtype_from_name(meta.dtype))
                view.read_into(key, t)
                if meta.nbytes:
                    f.write(tensor_buffer(t))
                bar.add(meta.nbytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(keys)


def _safetensors_metadata(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(min(n, 100 << 20))).get("__metadata__")
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def cmd_convert(args: argparse.Namespace) -> int:
    _require(args.src)
    dst = args.dst
    if args.to in ("torch", "safetensors") and os.path.exists(dst) and not args.force:
        raise CliError(f"{dst} already exists; pass --force to replace it")
    if args.to in ("torch", "safetensors") and os.path.isdir(dst):
        raise CliError(f"{dst} is a directory; --to {args.to} writes a single file")
    if args.to == "native" and os.path.isfile(dst):
        raise CliError(f"{dst} is a file; --to native writes a checkpoint directory")

    from .sources import open_checkpoint

    src_path, warnings = _choose_source(args.src)
    for msg in warnings:
        print(f"optimus-ckpt: warning: {msg}", file=sys.stderr)
    view = open_checkpoint(src_path)
    kind = view.kind  # optimus | torch | safetensors
    if (kind == "optimus" and args.to == "native") or kind == args.to:
        view.close()
        raise CliError(f"{args.src} is already in {args.to} format (nothing to convert)")
    step = args.step if args.step is not None else view.step
    if args.step is None and kind == "safetensors":  # a step we wrote into the metadata
        saved_step = str(_safetensors_metadata(src_path).get("step", ""))
        step = int(saved_step) if saved_step.isdigit() else step
    model_keys = [k for k in view.tensors if k.startswith("model.")]
    if not model_keys:
        view.close()
        raise CliError(f"{src_path} holds no model tensors to convert", EXIT_FAILED)
    total = sum(view.tensors[k].nbytes for k in model_keys)
    with_state = kind == "optimus" and args.to == "torch" and not args.model_only
    if with_state:
        total = sum(m.nbytes for m in view.tensors.values())
    bar = Progress(f"convert -> {args.to}", total, _progress_enabled(args.progress))
    notes: list[str] = []
    try:
        if args.to == "safetensors":
            meta = {"format": "pt", "step": str(step), "converted_by": "optimus_ckpt"}
            count = _write_safetensors(view, dst, meta, bar)
            bar.close()
            out_path = os.path.abspath(dst)
        elif args.to == "torch":
            import torch

            model = _read_model(view, bar)
            obj: dict[str, Any]
            if args.model_only:
                obj = model
            else:
                obj = {"model": model, "step": step}
                if with_state:
                    obj.update(_training_state(view, bar, notes))
                if view.config_yaml:
                    obj["config_yaml"] = view.config_yaml
            bar.close()
            count = len(model)
            tmp = f"{dst}.tmp-{os.getpid()}"
            try:
                torch.save(obj, tmp)
                os.replace(tmp, dst)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            out_path = os.path.abspath(dst)
        else:
            from .checkpointer import Checkpointer

            model = _read_model(view, bar)
            bar.close()
            count = len(model)
            out_path = Checkpointer(dst).save(step, model=_StateHolder(model))
    finally:
        bar.close()
        view.close()
    print(
        f"wrote {out_path} ({args.to}): {count} model tensor(s), "
        f"{_size(sum(view.tensors[k].nbytes for k in model_keys))}, step {step}"
    )
    for n in notes:
        print(f"note: {n}")
    return EXIT_OK


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="optimus-ckpt",
        description="Inspect, plan, verify and convert optimus_ckpt checkpoints.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"optimus-ckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect",
        help="what a checkpoint (or a directory of them) holds; flags incomplete/corrupt ones",
        description="Show step, completeness, world size, components (tensor counts, bytes, "
        "dtypes) and the saved config of a checkpoint, a single torch.save/.safetensors file, "
        "or every checkpoint in a directory (one line each, newest first). Checks the manifest "
        "and file sizes (cheap); `verify` checks contents.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--keys", action="store_true", help="also list every tensor key")
    p.add_argument("--config", action="store_true", help="print the whole saved config")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "plan",
        help="what a load with a strategy would do, per component and key group (dry run)",
        description="Compose a load strategy from Hydra overrides over the shipped presets "
        "(default load_strategy=resume) and show what a load of PATH would do: per component "
        "and per model key group, the outcome and the bytes it would read, plus ignore patterns "
        "that match nothing. Reads only metadata. Without --model it plans as if an object were "
        "given for every component of the checkpoint; with --model it also shows missing, "
        "unexpected and shape-mismatched keys, and exits 1 when the load would fail.",
        epilog="examples:\n"
        "  optimus-ckpt plan runs/ckpt load_strategy=finetune\n"
        "  optimus-ckpt plan runs/ckpt load_strategy=eval --model mypkg.models:build\n"
        "  optimus-ckpt plan runs/ckpt 'load_strategy.extra_ignore_keys=[model.head.*]' "
        "load_strategy.strict=false --model models.py:build\n\n" + EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    p.add_argument("path", metavar="PATH", help="a checkpoint, a directory of them (its newest "
                   "complete one), a torch.save file or a .safetensors file")  # fmt: skip
    p.add_argument("overrides", metavar="OVERRIDES", nargs="*",
                   help="Hydra overrides, e.g. load_strategy=finetune")  # fmt: skip
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="a callable that builds the model (MODULE importable, or a .py path)")  # fmt: skip
    p.add_argument("--group-depth", type=int, default=1, metavar="N",
                   help="group model keys by their first N name parts (default 1)")  # fmt: skip
    p.add_argument("--max-keys", type=int, default=20, metavar="N",
                   help="list at most N keys of each kind (default 20)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "verify",
        help="check every file against the manifest's checksums",
        description="Check every file of a checkpoint against the manifest: sizes, and the CRC-32 "
        "of every tensor chunk and every small file. On a directory, verify each complete "
        "checkpoint (incomplete ones are listed as skipped). Names every file that fails.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "convert",
        help="convert between our format, a torch.save file and safetensors",
        description="Convert SRC to DST, copying tensors bit for bit.\n"
        "  --to torch:       a torch.save file {'model': ..., 'optimizer': ..., 'scheduler': ...,\n"
        "                    'extra': ..., 'step': N} (optimizer as a torch state dict; per-process\n"
        "                    state is left out); --model-only writes the bare model state dict.\n"
        "  --to safetensors: the model weights.\n"
        "  --to native:      a checkpoint with the model component, saved under DST (a checkpoint\n"
        "                    directory; the step is SRC's, or --step).",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", required=True, choices=("native", "torch", "safetensors"))
    p.add_argument("--step", type=int, default=None, help="step of the written checkpoint")
    p.add_argument("--model-only", action="store_true",
                   help="--to torch: write only the model's state dict")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing DST file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optimus-ckpt`` and ``python -m optimus_ckpt``; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (``plan PATH --model m:f load_strategy=eval``): argparse
    # leaves such trailing positionals over; anything else left over is an error.
    if extra and args.command == "plan" and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("optimus-ckpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return EXIT_OK
    except Exception as e:
        code, message = _error_code(e)
        if code is None:
            raise
        if as_json:
            _emit_json({"error": message, "exit_code": code})
        print(f"optimus-ckpt: error: {message}", file=sys.stderr)
        return code


def _error_code(e: Exception) -> tuple[int | None, str]:
    from .errors import (
        CheckpointCorruptError,
        CheckpointExistsError,
        CheckpointNotFoundError,
        LoadMismatchError,
        OptimusCkptError,
        StrategyError,
        UnsafeCheckpointError,
    )

    if isinstance(e, CliError):
        return e.code, str(e)
    if isinstance(e, CheckpointNotFoundError):
        return EXIT_NOT_FOUND, str(e)
    if isinstance(e, CheckpointCorruptError | UnsafeCheckpointError | LoadMismatchError):
        return EXIT_FAILED, str(e)
    if isinstance(e, StrategyError | CheckpointExistsError):
        return EXIT_USAGE, str(e)
    if isinstance(e, OptimusCkptError | OSError):  # e.g. a failed write (disk full)
        return EXIT_FAILED, str(e)
    return None, str(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
