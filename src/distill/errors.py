"""One exception type for everything a user can fix.

The CLI prints ``DistillError`` as a short message plus a hint and exits with code 2; anything else is a
bug and keeps its traceback. Messages say *what* and *where* (file, line, field); hints say what to do.
"""

from __future__ import annotations

import os


class DistillError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # shown by the CLI and in test failures
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class BudgetExceeded(DistillError):
    """Raised before a paid call that would take the ledger past ``--budget``."""


def write_failed(what: str, path: object, exc: BaseException) -> DistillError:
    """The DistillError for a write that failed part-way: ``what`` (e.g. "the training checkpoint") at ``path``
    could not be written. A full disk or ``ulimit -f`` does not always surface as an OSError (torch.save
    raises RuntimeError "unexpected pos", safetensors a SafetensorError), so the message keeps the original
    error and adds what is likely: the free space there and the process's file-size limit."""
    import errno
    import shutil

    facts = []
    try:
        folder = path if os.path.isdir(str(path)) else os.path.dirname(str(path)) or "."
        facts.append(f"{shutil.disk_usage(folder).free / 1e6:,.0f} MB free there")
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            facts.append(f"file-size limit (ulimit -f) {soft:,} bytes")
    except (ImportError, OSError, ValueError):
        pass
    code = errno.errorcode.get(getattr(exc, "errno", None) or -1)      # EFBIG, ENOSPC, EDQUOT, ...
    text = " ".join(str(exc).split())[:300]
    detail = type(exc).__name__ + (f" {code}" if code else "") + (f": {text}" if text else "")
    return DistillError(
        f"cannot write {what} {path}: {detail}" + (f" ({'; '.join(facts)})" if facts else ""),
        hint="free disk space or raise the file-size limit (ulimit -f), then re-run the same command: the "
             "half-written files are never loaded, and training resumes from the last complete checkpoint",
    )
