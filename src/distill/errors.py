"""One exception type for everything a user can fix.

The CLI prints ``DistillError`` as a short message plus a hint and exits with code 2; anything else is a
bug and keeps its traceback. Messages say *what* and *where* (file, line, field); hints say what to do.
"""

from __future__ import annotations


class DistillError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # shown by the CLI and in test failures
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class BudgetExceeded(DistillError):
    """Raised before a paid call that would take the ledger past ``--budget``."""
