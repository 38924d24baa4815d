"""Decontamination: train/validation inputs that near-duplicate a test input are kept out of training.

Why: a near-copy of a test input in the training data lets the student memorise the test answer, and the
test metric then overstates what it does on new inputs. Two checks, cheapest first:

1. ``normalised``: the same text after a stronger normalisation than the importer's (NFKC, casefold,
   *all* punctuation and symbols removed, whitespace collapsed). The importer already merges inputs that
   differ only in case, spacing and punctuation at the ends, so this catches what is left, e.g. commas.
2. ``minhash``: MinHash LSH over word n-gram shingles (Broder 1997; the same idea Lee et al. 2022,
   arXiv 2107.06499, use to deduplicate training sets) finds candidate pairs quickly; every candidate is
   then confirmed with the *exact* Jaccard similarity of the two shingle sets, because MinHash is only an
   estimate. Texts with fewer words than ``ngram`` are shingled into single words so they still compare.

LSH can miss pairs whose similarity is only a little above the threshold, so its banding is tuned to a
lower threshold than the one we confirm with (``lsh_threshold``); pairs reported are never wrong, because
of the exact confirmation.

Results go to the ``contamination`` table, one row per contaminated train/validation example (its best
matching test example). Examples already listed are never re-checked.

Incremental, so an import costs what it adds, not what the store holds: each stored input's *signature* -- a
32-bit key of its strongly normalised text and one 32-bit key per LSH band of its MinHash -- is computed once,
when the input is checked first, and kept in ``decontam_sigs``. A check then touches only the new inputs: new
train/validation inputs are looked up in an index of every test input's keys (``TestIndex``, in memory: 8 bytes
per key), and new test inputs' keys are looked for in the stored signatures of the older train/validation inputs
(a scan of small blobs; no MinHash is recomputed; skipped while there are none, as in a first import, which writes
its test inputs first). Every (train, test) pair is so compared once, when the later of the two is stored: the
pairs the full re-check of every import compared before. Keys are 32 bits, so two
keys can collide by chance; that only adds a candidate, which the exact confirmation turns down.
The signatures depend on the ``decontamination:`` settings; when those change (recorded in ``meta``) every
input's signature is recomputed and every pair checked again. ``rebuild=True`` also clears the table first
(what to run after changing the settings, so rows found under the old ones go).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from distill.project import Project
from distill.task import DecontamSpec

CHUNK = 5000                 # inputs signed and checked per step (and fetched per query)
SHINGLES_PER_STEP = 4096     # MinHash: shingles hashed per numpy step ([shingles, num_perm] uint32: 2 MB)
META_KEY = "decontam_sigs"   # the settings the stored signatures were computed with


class _PunctToSpace(dict):
    """str.translate table built lazily: punctuation (P*) and symbols (S*) become a space. Looking each
    character's category up once, instead of per occurrence, makes this ~5x faster on real text."""

    def __missing__(self, code: int) -> int | None:
        out = 32 if unicodedata.category(chr(code))[0] in "PS" else None
        self[code] = out if out is not None else code
        return self[code]


_PUNCT_TO_SPACE = _PunctToSpace()


def strong_norm(text: str) -> str:
    """NFKC, casefold, every punctuation/symbol character replaced by a space, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCT_TO_SPACE)
    return " ".join(t.split())


def shingles(text: str, n: int) -> set[str]:
    """Word n-grams of the strongly normalised text; single words when the text has fewer than n words."""
    return set(_shingle_list(strong_norm(text), n))


def _shingle_list(norm: str, n: int) -> list[str]:
    words = norm.split()
    if len(words) < n:
        return words
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b|; 0 for two empty sets (nothing to compare is not a match)."""
    if not a and not b:
        return 0.0
    return len(a & b) / len(a | b)


@dataclass(frozen=True)
class Hit:
    example_id: str   # the train/validation example
    test_id: str      # the test example it duplicates
    method: str       # 'normalised' | 'minhash'
    score: float      # 1.0 for normalised; exact Jaccard of the shingles for minhash


def lsh_threshold(threshold: float) -> float:
    """The LSH banding is tuned below the confirm threshold: LSH misses some pairs just above its own
    threshold (measured on 22k random-word rows with 647 planted pairs at Jaccard 0.86-0.97: LSH at 0.8
    missed 19, at 0.65 none), and every candidate is confirmed with the exact Jaccard anyway, so extra
    candidates cost a little time but never a wrong row."""
    return max(0.1, threshold - 0.15)


# -- signatures ----------------------------------------------------------------------------------------------

_MAX_HASH = np.uint32(0xFFFFFFFF)


@dataclass(frozen=True)
class Banding:
    """How signatures are made: shingle size, MinHash permutations, and the LSH bands x rows chosen for the
    (lowered) threshold the way datasketch's MinHashLSH chooses them (``lsh_params``)."""

    ngram: int
    num_perm: int
    bands: int
    rows: int

    @classmethod
    def of(cls, spec: DecontamSpec) -> "Banding":
        b, r = lsh_params(lsh_threshold(spec.threshold), spec.num_perm)
        return cls(spec.ngram, spec.num_perm, b, r)

    def record(self) -> str:
        """What ``meta`` keeps: stored signatures are only comparable with signatures made the same way."""
        return json.dumps({"version": 1, "ngram": self.ngram, "num_perm": self.num_perm, "bands": self.bands,
                           "rows": self.rows}, sort_keys=True)


@functools.lru_cache(maxsize=8)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives, equally weighted, for Jaccard ``threshold``:
    datasketch's ``MinHashLSH`` optimisation (its ``_optimal_param``), computed here so the signatures stored in
    the project do not depend on a private function of a library version."""
    from scipy.integrate import quad

    best, opt = float("inf"), (1, 1)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = quad(lambda s: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)[0]
            fn = quad(lambda s: 1 - (1 - (1 - s ** float(r)) ** float(b)), threshold, 1.0)[0]
            if 0.5 * fp + 0.5 * fn < best:
                best, opt = 0.5 * fp + 0.5 * fn, (b, r)
    return opt


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    # h -> a * h + b mod 2^32 with an odd a: a permutation of the 32-bit hashes (datasketch's "affine32" scheme),
    # with no modulo by a prime, so numpy does it at memory speed
    gen = np.random.RandomState(1)
    a = gen.randint(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    return a, gen.randint(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser, a bijection that spreads every input bit over the output: CRC-32 is linear, and
    the affine permutations need well-mixed input to behave like random ones."""
    h = h ^ (h >> np.uint32(16))
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@functools.lru_cache(maxsize=8)
def _band_mixers(bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.RandomState(2)
    mult = gen.randint(1, 2**63, rows, dtype=np.uint64) | np.uint64(1)      # odd: a product keeps every bit
    salt = gen.randint(0, 2**63, bands, dtype=np.uint64)                     # one per band: bands never collide
    return mult, salt


def minhashes(shingled: Sequence[Sequence[str]], num_perm: int) -> np.ndarray:
    """[len(shingled), num_perm] uint32 MinHash values of each text's shingles (repeats do not change a minimum);
    a text without shingles gets all 2^32 - 1. Shingles are hashed with CRC-32 (stable across processes and runs,
    unlike ``hash()``), the permutations applied to many texts' shingles at once."""
    a, b = _permutations(num_perm)
    out = np.full((len(shingled), num_perm), _MAX_HASH, dtype=np.uint32)
    i = 0
    while i < len(shingled):
        j, count = i, 0
        while j < len(shingled) and (j == i or count + len(shingled[j]) <= SHINGLES_PER_STEP):
            count += len(shingled[j])
            j += 1
        if count:
            hv = _fmix32(np.fromiter((zlib.crc32(s.encode("utf-8")) for k in range(i, j) for s in shingled[k]),
                                     dtype=np.uint32, count=count))
            phv = hv[:, None] * a + b           # wraps mod 2^32
            rows = [k for k in range(i, j) if shingled[k]]
            starts = np.cumsum([0] + [len(shingled[k]) for k in rows[:-1]])
            out[rows] = np.minimum.reduceat(phv, starts, axis=0)
        i = j
    return out


def band_keys(mh: np.ndarray, banding: Banding) -> np.ndarray:
    """[n, bands] uint32: one key per LSH band; two texts share a band's key when (up to a 32-bit collision)
    that band's MinHash values are all equal, which is what makes them an LSH candidate pair."""
    mult, salt = _band_mixers(banding.bands, banding.rows)
    v = mh[:, : banding.bands * banding.rows].reshape(len(mh), banding.bands, banding.rows).astype(np.uint64)
    h = (v * mult).sum(axis=2, dtype=np.uint64) + salt       # wraps mod 2^64, as intended
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)                        # splitmix64's finaliser: spread into the top bits
    h ^= h >> np.uint64(32)
    return (h >> np.uint64(32)).astype(np.uint32)


def _norm_key(norm: str) -> int:
    return zlib.crc32(norm.encode("utf-8"), 0x6E6F726D)


@dataclass
class Signed:
    """One input with what the checks need: its strong normalisation and keys ([] when it has no words: nothing
    to compare); its shingle set is made only when a candidate pair is confirmed."""

    id: str
    norm: str
    keys: np.ndarray          # uint32: [norm key, band keys...] or empty
    ngram: int = 3
    _shingles: set[str] | None = None

    @property
    def shingles(self) -> set[str]:
        if self._shingles is None:
            self._shingles = set(_shingle_list(self.norm, self.ngram))
        return self._shingles

    def blob(self) -> bytes:
        return self.keys.astype("<u4").tobytes()


def sign(items: Sequence[tuple[str, str]], banding: Banding) -> list[Signed]:
    """Signatures of (id, text) pairs."""
    norms = [strong_norm(t) for _, t in items]
    bands = band_keys(minhashes([_shingle_list(n, banding.ngram) for n in norms], banding.num_perm), banding)
    out = []
    for (ex_id, _), norm, bk in zip(items, norms, bands):
        keys = np.concatenate(([_norm_key(norm)], bk)).astype(np.uint32) if norm else np.zeros(0, np.uint32)
        out.append(Signed(ex_id, norm, keys, banding.ngram))
    return out


# -- finding the matches --------------------------------------------------------------------------------------


@dataclass
class TestIndex:
    """The keys of test inputs, in memory: two sorted uint64 arrays (norm keys, band keys), each entry the key in
    the high 32 bits and the position of its test id in ``ids`` in the low 32 (8 bytes a key, sorted in place).
    Kept for a whole import; ``refresh`` adds test inputs signed since (by this import or another process), and
    the arrays are sorted again only when they are next searched."""

    ids: list[str] = field(default_factory=list)
    seen: int = 0                          # decontam_sigs.n up to which tests were read
    _norm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    _band: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    _new: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)   # not yet merged: (norm, band)

    def add(self, ids: list[str], keys: np.ndarray) -> None:
        """``keys``: [len(ids), 1 + bands] uint32 signatures."""
        if not ids:
            return
        owner = np.arange(len(self.ids), len(self.ids) + len(ids), dtype=np.uint64)
        k = keys.astype(np.uint64) << np.uint64(32)
        self._new.append((k[:, 0] | owner, (k[:, 1:] | owner[:, None]).ravel()))
        self.ids.extend(ids)

    def refresh(self, conn: sqlite3.Connection, width: int) -> None:
        # every signature stored since is read once (train ones too, so the next refresh starts after them)
        while True:
            rows = conn.execute(
                "SELECT s.n, s.example_id, s.sig, e.split FROM decontam_sigs s JOIN examples e ON e.id = s.example_id "
                "WHERE s.n > ? ORDER BY s.n LIMIT ?", (self.seen, CHUNK)).fetchall()
            if not rows:
                return
            self.seen = rows[-1][0]
            tests = [r for r in rows if r[3] == "test" and r[2]]
            if tests:
                self.add([r[1] for r in tests],
                         np.frombuffer(b"".join(r[2] for r in tests), dtype="<u4").reshape(-1, width))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._new:
            self._norm = np.concatenate([self._norm, *(n for n, _ in self._new)])
            self._band = np.concatenate([self._band, *(b for _, b in self._new)])
            self._new = []
            self._norm.sort()
            self._band.sort()
        return self._norm, self._band

    def candidates(self, signed: Sequence[Signed]) -> list[tuple[set[int], set[int]]]:
        """Per input: (tests with its norm key, tests sharing one of its band keys), as positions in ``ids``."""
        out: list[tuple[set[int], set[int]]] = [(set(), set()) for _ in signed]
        rows = [i for i, s in enumerate(signed) if len(s.keys)]
        if not rows or not self.ids:
            return out
        q = np.stack([signed[i].keys for i in rows]).astype(np.uint64) << np.uint64(32)
        low = np.uint64(0xFFFFFFFF)
        for col, packed in enumerate(self._arrays()):
            flat = q[:, 0] if col == 0 else q[:, 1:].ravel()
            order = np.argsort(flat)           # searching sorted keys walks the big array in order: cache-friendly
            keys = flat[order]
            lo, hi = np.searchsorted(packed, keys, "left"), np.searchsorted(packed, keys | low, "right")
            per_row = 1 if col == 0 else q.shape[1] - 1
            for f in np.nonzero(hi > lo)[0]:
                out[rows[order[f] // per_row]][col].update((packed[lo[f]:hi[f]] & low).tolist())
        return out


def _best(s: Signed, tests: Iterable[Signed], threshold: float, normalised: bool) -> Hit | None:
    """The best test match of ``s`` among ``tests`` (candidates): the same strong normalisation wins (smallest
    test id); else the highest exact Jaccard at or above ``threshold``, ties to the smallest test id, so reruns
    write the same row."""
    best: tuple[float, str] | None = None
    for t in tests:
        if normalised:
            if t.norm == s.norm and (best is None or t.id < best[1]):
                best = (1.0, t.id)
            continue
        score = jaccard(s.shingles, t.shingles)
        if score >= threshold and (best is None or (-score, t.id) < (-best[0], best[1])):
            best = (score, t.id)
    if best is None:
        return None
    return Hit(s.id, best[1], "normalised" if normalised else "minhash", 1.0 if normalised else round(best[0], 6))


def _match(signed: Sequence[Signed], index: TestIndex, tests: dict[str, Signed], threshold: float) -> list[Hit]:
    """Hits of ``signed`` (train/validation inputs) against the tests of ``index``; ``tests`` maps test ids to
    their signatures (every candidate's must be there)."""
    hits = []
    for s, (by_norm, by_band) in zip(signed, index.candidates(signed)):
        hit = (_best(s, (tests[index.ids[i]] for i in sorted(by_norm)), threshold, True)
               or _best(s, (tests[index.ids[i]] for i in sorted(by_band)), threshold, False))
        if hit is not None:
            hits.append(hit)
    return hits


def find_contamination(tests: Iterable[tuple[str, str]], candidates: Iterable[tuple[str, str]],
                       spec: DecontamSpec) -> list[Hit]:
    """Pure: which ``candidates`` (id, text) near-duplicate one of ``tests`` (id, text), in candidate id order."""
    banding = Banding.of(spec)
    signed_tests = sign(sorted(tests), banding)
    index = TestIndex()
    with_keys = [t for t in signed_tests if len(t.keys)]
    if with_keys:
        index.add([t.id for t in with_keys], np.stack([t.keys for t in with_keys]))
    return _match(sign(sorted(candidates), banding), index, {t.id: t for t in signed_tests}, spec.threshold)


# -- in the store -----------------------------------------------------------------------------------------------


class Checker:
    """Decontamination over one transaction or one import's chunks (``decontaminate_in`` makes one per call when
    not given). It keeps the test index between chunks, and on first use brings the stored signatures up to date
    (settings changed since they were made, or inputs stored without them: those are signed and checked)."""

    def __init__(self, spec: DecontamSpec):
        self.spec, self.banding = spec, Banding.of(spec)
        self.width = 1 + self.banding.bands
        self.index = TestIndex()
        self.prepared = False
        self.older_trains = True       # set by prepare: train/validation inputs stored before this checker's
        self.signed_trains = False     # this checker signed train/validation inputs (they are older for later tests)

    def prepare(self, conn: sqlite3.Connection, new: Sequence[tuple[str, str, str]] = ()) -> int:
        """Once per checker: signatures made with other settings are dropped, inputs without one (but ``new``,
        the caller's new inputs, which it checks itself) are signed and checked."""
        if self.prepared:
            return 0
        self.prepared = True
        skip = {i for i, _, _ in new}
        # are there train/validation inputs a new test input must be compared with? In a first import there are
        # none until its test inputs (written first) are all in, and the scan for them can be skipped
        trains = conn.execute("SELECT COUNT(*) FROM examples WHERE split IN ('train', 'validation')").fetchone()[0]
        self.older_trains = trains > sum(1 for _, _, split in new if split != "test")
        record = self.banding.record()
        stored = conn.execute("SELECT value FROM meta WHERE key=?", (META_KEY,)).fetchone()
        if stored is None or stored[0] != record:
            conn.execute("DELETE FROM decontam_sigs")       # made another way: not comparable, sign again
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (META_KEY, record))
        n = conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        if n - len(skip) == conn.execute("SELECT COUNT(*) FROM decontam_sigs").fetchone()[0]:
            return 0      # every stored input but the caller's new ones is signed (the usual case)
        # tests first, so the train/validation inputs signed after them are checked against all of them
        hits = 0
        for which in ("=", "!="):
            last = ""
            while True:
                # `|| ''` keeps SQLite on the primary key (by the split index it would sort every page again)
                rows = conn.execute(
                    f"SELECT e.id, e.text, e.split FROM examples e WHERE e.split || '' {which} 'test' AND e.id > ? "
                    "AND NOT EXISTS (SELECT 1 FROM decontam_sigs s WHERE s.example_id = e.id) ORDER BY e.id LIMIT ?",
                    (last, CHUNK)).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                hits += self.check(conn, [(r[0], r[1], r[2]) for r in rows if r[0] not in skip])
        return hits

    def check(self, conn: sqlite3.Connection, new: Sequence[tuple[str, str, str]]) -> int:
        """Sign ``new`` (id, text, split) inputs, store their signatures and check them both ways; returns the
        contamination rows written."""
        if not new:
            return 0
        signed = sign([(i, t) for i, t, _ in new], self.banding)
        _delete(conn, "decontam_sigs", [i for i, _, _ in new])     # an input deleted and stored again: sign it anew
        conn.executemany("INSERT INTO decontam_sigs(example_id, sig) VALUES(?, ?)", [(s.id, s.blob()) for s in signed])
        listed = _listed(conn, [i for i, _, _ in new])
        trains = [s for s, (_, _, split) in zip(signed, new) if split != "test" and s.id not in listed]
        new_tests = [s for s, (_, _, split) in zip(signed, new) if split == "test" and len(s.keys)]
        hits: list[Hit] = []
        if trains:
            self.index.refresh(conn, self.width)
            hits += self._against_tests(conn, trains)
        if new_tests and (self.older_trains or self.signed_trains):
            hits += self._against_older(conn, new_tests, {i for i, _, _ in new})
        self.signed_trains = self.signed_trains or any(split != "test" for _, _, split in new)
        conn.executemany("INSERT OR REPLACE INTO contamination(example_id, test_id, method, score) VALUES(?,?,?,?)",
                         [(h.example_id, h.test_id, h.method, h.score) for h in hits])
        return len(hits)

    def _against_tests(self, conn: sqlite3.Connection, trains: list[Signed]) -> list[Hit]:
        """New train/validation inputs against every test input."""
        wanted = sorted({self.index.ids[i] for cands in self.index.candidates(trains) for part in cands for i in part})
        tests = {s.id: s for s in sign(_texts(conn, wanted), self.banding)}
        return _match(trains, self.index, tests, self.spec.threshold)

    def _against_older(self, conn: sqlite3.Connection, new_tests: list[Signed], skip: set[str]) -> list[Hit]:
        """New test inputs against the stored train/validation inputs not yet listed (those in ``skip`` are this
        step's own, checked by ``_against_tests``): a scan of their stored keys."""
        index = TestIndex()
        index.add([t.id for t in new_tests], np.stack([t.keys for t in new_tests]))
        by_id = {t.id: t for t in new_tests}
        hits, last = [], ""
        while True:
            rows = conn.execute(
                "SELECT s.example_id, s.sig FROM decontam_sigs s JOIN examples e ON e.id = s.example_id "
                "WHERE s.example_id > ? AND e.split != 'test' AND length(s.sig) > 0 AND NOT EXISTS "
                "(SELECT 1 FROM contamination c WHERE c.example_id = s.example_id) ORDER BY s.example_id LIMIT ?",
                (last, CHUNK * 10)).fetchall()
            if not rows:
                return hits
            last = rows[-1][0]
            keys = np.frombuffer(b"".join(r[1] for r in rows), dtype="<u4").reshape(len(rows), self.width)
            stub = [Signed(r[0], "", k) for r, k in zip(rows, keys) if r[0] not in skip]
            found = [s.id for s, (a, b) in zip(stub, index.candidates(stub)) if a or b]
            if found:
                hits += _match(sign(_texts(conn, found), self.banding), index, by_id, self.spec.threshold)


def _texts(conn: sqlite3.Connection, ids: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        out += [(r[0], r[1]) for r in conn.execute(
            f"SELECT id, text FROM examples WHERE id IN ({','.join('?' * len(part))})", tuple(part))]
    return sorted(out)


def _delete(conn: sqlite3.Connection, table: str, ids: Sequence[str]) -> None:
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        conn.execute(f"DELETE FROM {table} WHERE example_id IN ({','.join('?' * len(part))})", tuple(part))


def _listed(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        out.update(r[0] for r in conn.execute(
            f"SELECT example_id FROM contamination WHERE example_id IN ({','.join('?' * len(part))})", tuple(part)))
    return out


def decontaminate_in(conn: sqlite3.Connection, spec: DecontamSpec, *, rebuild: bool = False,
                     new: Sequence[tuple[str, str, str]] | None = None, checker: Checker | None = None) -> int:
    """Run inside an open transaction (the importer calls it in the same one as its inserts, so an import
    and its contamination rows commit together). ``new``: the (id, text, split) inputs just stored, checked
    both ways; inputs stored without a signature are signed and checked too. ``checker``: the importer's, kept
    between its chunks. Returns the number of new contamination rows."""
    checker = checker or Checker(spec)
    if rebuild:
        conn.execute("DELETE FROM contamination")
        conn.execute("DELETE FROM decontam_sigs")
        checker.index, checker.prepared = TestIndex(), False
    new = new or []
    return checker.prepare(conn, new) + checker.check(conn, new)


def decontaminate(project: Project, *, rebuild: bool = False) -> int:
    """Check the project's train/validation examples against its test examples; returns new rows."""
    with project.store.tx() as conn:
        return decontaminate_in(conn, project.spec.decontamination, rebuild=rebuild)


def list_contamination(project: Project) -> list[dict]:
    """For ``distill status --contamination``: each excluded example next to the test input it copies."""
    rows = project.store.q(
        """SELECT c.example_id, e.split, e.text AS train_text, c.test_id, t.text AS test_text, c.method, c.score
           FROM contamination c JOIN examples e ON e.id = c.example_id JOIN examples t ON t.id = c.test_id
           ORDER BY c.score DESC, c.example_id""")
    return [dict(r) for r in rows]
