"""Deterministic train / validation / test splits, with a locked test split.

Why hashing: the split of an example depends only on ``(seed, example id)``, never on file order, on
what else is in the file or on which machine ran the import. Re-running an import, or importing the same
ids from another process, always gives the same split.

Why the test split is locked: an example evaluated once on the test split must never be trained on
later, or every later metric is flattered. So the split is decided once, when an example is first
stored, and never recomputed:

- an example whose id (or normalised text) is already in the store keeps its stored split, whatever the
  current ``splits.seed`` / ``splits.test`` / ``splits.validation`` or split column say;
- changing ``splits.seed`` or the shares later is therefore harmless: it only affects inputs imported
  from then on (existing test examples stay test, existing train examples never become test);
- the first import that stores anything writes ``test_locked`` into the store's ``meta`` table (the seed
  and shares in force then), so ``distill status`` can say since when the test split is fixed.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from distill.errors import DistillError
from distill.task import SplitSpec

SPLITS = ("train", "validation", "test")

# Spellings people use in split columns. Anything else is an error, not a guess.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "dev": "validation", "val": "validation", "valid": "validation",
    "test": "test",
}


def split_uniform(seed: str, example_id: str) -> float:
    """sha256(seed, id) mapped to [0, 1). The first 8 bytes of the digest as an integer / 2**64 is
    uniform for any practical purpose. The NUL separator keeps ("ab", "c") and ("a", "bc") apart."""
    digest = hashlib.sha256(f"{seed}\x00{example_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(example_id: str, seed: str, test: float, validation: float) -> str:
    """test if u < test share, validation if u < test + validation, else train."""
    u = split_uniform(seed, example_id)
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def assign_split(example_id: str, spec: SplitSpec) -> str:
    """The split a *new* example gets from the spec's seed and shares (stored ones never call this)."""
    return hash_split(example_id, spec.seed, spec.test, spec.validation)


def canonical_split(value: Any) -> str | None:
    """'dev' / 'val' / 'valid' -> 'validation' etc.; None when the value is not a split name."""
    if value is None:
        return None
    return SPLIT_ALIASES.get(str(value).strip().lower())


def parse_split_value(value: Any, where: str, column: str) -> str:
    """A split-column value, or DistillError naming where it was found and what is accepted."""
    split = canonical_split(value)
    if split is None:
        raise DistillError(
            f"{where}: column '{column}' has {str(value)!r}, which is not a split",
            hint="use train, validation (or dev/val/valid) or test in that column, "
            "or leave the column out to split by hash",
        )
    return split


def lock_record(spec: SplitSpec, import_id: int) -> str:
    """JSON stored under meta 'test_locked' by the first import that stores examples."""
    return json.dumps({
        "since": time.time(), "import_id": import_id, "seed": spec.seed, "test": spec.test,
        "validation": spec.validation, "column": spec.column,
    })


def settings_drift(locked_json: str | None, spec: SplitSpec) -> str | None:
    """A one-line note when the split settings differ from those in force when the test split was locked.
    Not an error: the change only affects new inputs (see the module docstring)."""
    if not locked_json:
        return None
    locked = json.loads(locked_json)
    changed = [k for k in ("seed", "test", "validation") if locked.get(k) != getattr(spec, k)]
    if not changed:
        return None
    return (
        f"splits.{'/'.join(changed)} changed since the test split was locked; stored examples keep their "
        "split and only new inputs use the new settings"
    )
