"""Atomic file writes: the one helper every stage uses, so a crash leaves the old file or the new one, never half.

Why one helper: six hand-written copies had drifted (some fsynced, some did not, one used ``mkstemp`` whose
0600 mode survived the rename so exported files were unreadable to a group). This one writes to a temporary
name in the *same folder* (a rename is atomic only within one file system), fsyncs, renames, and removes
the temporary file if anything fails, including Ctrl-C.
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
