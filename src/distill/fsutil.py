"""Atomic file writes: the one helper every stage uses, so a crash leaves the old file or the new one, never half.

Why one helper: six hand-written copies had drifted (some fsynced, some did not, one used ``mkstemp`` whose
0600 mode survived the rename so exported files were unreadable to a group). This one writes to a temporary
name in the *same folder* (a rename is atomic only within one file system), fsyncs, renames, and removes
the temporary file if anything fails, including Ctrl-C.

Also here: ``check_export_target``, the one rule for where ``distill export`` may write (never over the
project itself, its store or the files its store points at; never deleting what distill did not write).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from distill.errors import DistillError


def _tmp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp_path)`` fills a temporary file beside ``path``; then fsync + rename over ``path``.

    OSErrors (disk full, read-only folder) become a DistillError naming the file; the old file is untouched."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DistillError(f"cannot write {path}: {e.strerror or e}",
                           hint="check free space and the folder's permissions; the previous file is unchanged") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """JSON with NaN refused (JSON has none; callers turn NaN into null first) and non-JSON objects as str."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False, default=str) + "\n"
    return write_text_atomic(path, text)


# ------------------------------------------------------------------------------------------------
# Where an export may go. `distill export --out PATH` once replaced a whole project folder (store with its
# paid teacher calls, spec, models) with ONNX files, and `--out PROJECT/distill.db` overwrote the store.

# the project's own files and folders (the store and spec, and the folders the store points into)
PROJECT_FILES = ("distill.yaml", "distill.db", "distill.db-wal", "distill.db-shm", "distill.db-journal",
                 ".distill.lock")
PROJECT_DIRS = ("models", "reports", "rounds", "exports")
# inside these the store points at what exists (models, evaluations, rounds): never replaced, not even --force
POINTED_AT_DIRS = ("models", "reports", "rounds")


def project_protected(project: Any) -> tuple[Path, ...]:
    """Files a project's spec names that an export must never replace: its replay recordings (paid answers)."""
    out = []
    for t in project.spec.teachers:
        if t.kind == "replay" and t.path:
            p = Path(t.path).expanduser()
            out.append(p if p.is_absolute() else Path(project.root) / p)
    return tuple(out)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_target(out: str | Path, *, is_export: Callable[[Path], bool], root: str | Path | None = None,
                        protected: tuple[Path, ...] | list[Path] = (), force: bool = False,
                        default: str | None = None, replaces: str = "a previous export of its own") -> bool:
    """Refuse an export target that would destroy something; returns True when ``--force`` asks to move an
    existing target aside (``move_aside``) before the export takes its place.

    The rule, the same for every export format:

    1. Refused, with or without ``--force``: the project folder ``root`` or a folder containing it; the
       project's own files and folders themselves (distill.yaml, distill.db and its -wal/-shm/-journal,
       .distill.lock, models/, reports/, rounds/, exports/, and ``protected``, e.g. replay recordings); and
       anything that exists inside models/, reports/ or rounds/ and is not a previous export (a model, an
       evaluation, a report: the store points at them; moving them would break the project).
    2. Written without asking: a path that does not exist yet, an empty folder, or a previous export that
       distill wrote (``is_export(path)``: an ONNX folder with export.json + onnx_config.json, a data file
       with its provenance sidecar). Only such a previous export is ever deleted.
    3. Anything else that exists (a non-empty folder, a file) is refused unless ``force``; with ``force`` it
       is moved aside to ``NAME.replaced-TIME`` beside it, never deleted.

    Exporters call it before the work and again just before renaming the export into place (minutes later)."""
    out = Path(out).expanduser()
    real = out.resolve()
    where = f" (the default is {default})" if default else ""
    if root is not None:
        root_r = Path(root).resolve()
        if _inside(root_r, real):
            what = "is the project folder" if real == root_r else f"contains the project folder {root}"
            raise DistillError(
                f"export target {out} {what}: writing the export there would replace the project "
                "(its store of teacher calls, its spec and its models)",
                hint=f"choose a path outside the project's own files{where}; --force does not override this")
        own = {root_r / n: n for n in PROJECT_FILES + PROJECT_DIRS}
        own.update({Path(p).resolve(): Path(p).name for p in protected})
        if real in own:
            name = own[real] + (" (its store of teacher calls, labels and runs)" if own[real] == "distill.db" else "")
            raise DistillError(f"export target {out} is the project's own {name}; writing the export there would "
                               "destroy it", hint=f"choose another path{where}; --force does not override this")
        for d in POINTED_AT_DIRS:
            if (_inside(real, root_r / d) and (out.exists() or out.is_symlink()) and not is_export(out)
                    and not _empty_dir(out)):
                raise DistillError(
                    f"export target {out} exists inside the project's {d}/ folder and is not an export distill "
                    "wrote (the project's store points at what is in there)",
                    hint=f"choose a new path{where}; --force does not override this")
    if not (out.exists() or out.is_symlink()) or _empty_dir(out) or is_export(out):
        return False
    if force:
        return True
    what = "exists and is not empty" if out.is_dir() else "is an existing file"
    raise DistillError(
        f"export target {out} {what}; distill replaces only {replaces} there, so it refuses",
        hint=f"choose a new path{where}, or pass --force to move it aside (to {out.name}.replaced-TIME, "
             "nothing is deleted) and write the export there")


def _empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def move_aside(path: str | Path) -> Path:
    """Rename ``path`` to ``NAME.replaced-YYYYmmdd-HHMMSS`` (a free name) beside it; returns the new path."""
    import time

    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = path.with_name(f"{path.name}.replaced-{stamp}"), 1
    while dest.exists() or dest.is_symlink():
        dest, n = path.with_name(f"{path.name}.replaced-{stamp}-{n}"), n + 1
    try:
        os.rename(path, dest)
    except OSError as e:
        raise DistillError(f"cannot move {path} aside to {dest}: {e.strerror or e}",
                           hint="move it away yourself, or choose another --out; nothing was changed") from None
    return dest
