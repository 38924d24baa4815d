"""Few-shot teacher prompts: k solved examples (input -> answer) shown to the teacher before each input.

    prompt:
      examples:
        k: 8               # 0 = zero-shot (the default)
        select: similar    # the k pool rows nearest the input (MiniLM cosine); fixed: the same k for all inputs
        pool: gold         # non-test inputs with a gold answer or a correction; or a .jsonl/.csv file
        pool_size: 64      # optional: a small hand-labelled set, chosen by a seeded hash of the ids
        shortlist: false   # classify: the teacher chooses among the retrieved examples' labels only

Why: a teacher that has never seen a solved example of a task's conventions (SNIPS's 39 slot names, which
words count as a ``playlist_owner``; BANKING77's 77 near-synonymous intents) is wrong in systematic ways
that no filter repairs. Demonstrations near the input teach them best: Liu et al. 2022 ("What Makes Good
In-Context Examples for GPT-3?", arXiv 2101.06804) retrieve the k nearest training examples by sentence
embedding and beat random examples. For classification with many labels, the retrieved examples' labels
also make a shortlist: scoring 8 candidate labels instead of 77 costs a tenth and removes labels the input
is nowhere near.

Rules that keep the numbers honest and the bill paid once:
- **never the test split**: the gold pool is train/validation rows only, minus the rows decontamination
  found near-duplicating a test input; a file pool goes through the same check (``data.decontam``) and its
  near-duplicates of test inputs are dropped and counted (``FewShot.dropped``);
- **never the input itself**: an input that is also in the pool (same id, or the same text after
  ``strong_norm``) is not shown its own answer, or its teacher label would be the gold label copied and the
  student's data would look better than the teacher is;
- **a choice is kept once made**: the demonstrations chosen for a stored input are written to the store
  (``fewshot_choices``) and reused, so a re-run, a machine whose float rounding orders two near-equal
  similarities the other way, or a pool that grew since, renders the same prompt and hits the same cache
  key. An input is re-chosen only when one of its demonstrations left the pool or changed its answer, or
  when the settings above change (all of them are part of the key the choice is stored under);
- the demonstrations are part of the rendered messages, so they are part of the teacher identity of every
  call and of its cache key (``task.cache_key``): changing them relabels, explicitly, as any prompt change.

The examples are the teacher's only: students train and answer on their own prompt (``render_messages``
without ``demos``) and learn the conventions from the labelled data instead.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from distill.data.decontam import find_contamination, strong_norm
from distill.dataset import correction_join
from distill.errors import DistillError
from distill.task import ExamplesSpec, ParseError, ProjectSpec, answer_text, parse_answer, render_messages


@dataclass(frozen=True)
class Demo:
    """One pool row: an input and its reference answer (gold, a correction, or a file's answer)."""

    id: str
    text: str
    answer: Any
    segment: str | None = None
    meta: dict = field(default_factory=dict)
    source: str = "gold"          # gold | correction | file


@dataclass
class TeacherPrompt:
    messages: list[dict[str, str]]
    labels: list[str] | None       # classify: the candidate labels (a shortlist, or all of them)
    demo_ids: list[str]


def _h(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _demo_hash(d: Demo) -> str:
    return _h(d.text, json.dumps(d.answer, sort_keys=True, ensure_ascii=False))[:12]


def settings_key(ex: ExamplesSpec) -> str:
    """The key a choice is stored under: every setting that changes which demonstrations an input gets."""
    return _h(json.dumps(ex.model_dump(mode="json"), sort_keys=True))[:16]


class Embedder:
    """L2-normalised mean-pooled sentence embeddings (how all-MiniLM-L6-v2 was trained), batch by batch."""

    def __init__(self, name: str):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from distill.students.classifier import resolve_base

        folder = resolve_base(name)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self._torch = torch

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                b = self.tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=128,
                             return_tensors="pt")
                h = self.model(**b).last_hidden_state.float()
                m = b["attention_mask"].unsqueeze(-1).float()
                e = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
                out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def _answer_ok(spec: ProjectSpec, answer: Any) -> Any:
    """The answer in canonical form, or ParseError: a pool answer must be one the task accepts."""
    return parse_answer(spec, answer_text(spec.kind, answer))


def gold_pool(project) -> list[Demo]:
    """Train/validation rows with a correction (preferred) or a gold answer, minus near-duplicates of test."""
    rows = project.store.q(
        f"""SELECT e.id, e.text, e.gold, e.segment, e.meta, c.answer AS corrected FROM examples e
           {correction_join(project, feedback=False)}
           WHERE e.split IN ('train', 'validation') AND e.id NOT IN (SELECT example_id FROM contamination)
             AND (e.gold IS NOT NULL OR c.answer IS NOT NULL)
           ORDER BY e.id""")
    out = []
    for r in rows:
        raw = r["corrected"] if r["corrected"] is not None else r["gold"]
        try:
            answer = _answer_ok(project.spec, json.loads(raw))
        except (ParseError, ValueError):
            continue          # a gold value the task's schema refuses is no demonstration
        out.append(Demo(r["id"], r["text"], answer, r["segment"], json.loads(r["meta"] or "{}"),
                        "correction" if r["corrected"] is not None else "gold"))
    return out


def file_pool(project, path: Path) -> tuple[list[Demo], dict[str, int]]:
    """A .jsonl/.csv of ``text`` + ``answer`` (+ optional ``segment``). Rows whose answer the task refuses,
    and rows near-duplicating a test input, are dropped and counted."""
    if not path.is_file():
        raise DistillError(f"prompt.examples.pool: {path} does not exist",
                           hint="use `pool: gold`, or a .jsonl/.csv file with text and answer columns")
    if path.suffix == ".jsonl":
        raw = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except ValueError as e:
                    raise DistillError(f"{path}:{n}: not JSON ({e})") from None
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
        for r in raw:
            if project.spec.kind == "extract" and isinstance(r.get("answer"), str):
                try:
                    r["answer"] = json.loads(r["answer"])
                except ValueError:
                    pass      # counted as a refused answer below
    else:
        raise DistillError(f"prompt.examples.pool: {path.name} is neither .jsonl nor .csv")
    dropped = {"answer_refused": 0, "near_duplicate_of_test": 0, "no_text": 0}
    demos = []
    for r in raw:
        text = str(r.get("text") or "").strip()
        if not text:
            dropped["no_text"] += 1
            continue
        try:
            answer = _answer_ok(project.spec, r.get("answer"))
        except ParseError:
            dropped["answer_refused"] += 1
            continue
        demos.append(Demo("pool:" + _h(text)[:12], text, answer, r.get("segment"), {}, "file"))
    tests = [(r["id"], r["text"]) for r in project.store.q("SELECT id, text FROM examples WHERE split='test'")]
    hits = {h.example_id for h in find_contamination(tests, [(d.id, d.text) for d in demos],
                                                      project.spec.decontamination)}
    dropped["near_duplicate_of_test"] = len(hits)
    return [d for d in demos if d.id not in hits], dropped


class FewShot:
    """Chooses, keeps and renders the demonstrations of one project's teacher prompts."""

    def __init__(self, spec: ProjectSpec, pool: list[Demo], store=None, dropped: dict[str, int] | None = None,
                 embedder: Embedder | None = None):
        self.spec, self.ex, self.store = spec, spec.prompt.examples, store
        self.dropped = dropped or {}
        if not pool:
            raise DistillError(
                f"prompt.examples.k is {self.ex.k} but the example pool ({self.ex.pool}) is empty",
                hint="import inputs with gold answers (--label), add corrections, or point `pool:` at a file")
        if self.ex.pool_size is not None and len(pool) > self.ex.pool_size:
            pool = sorted(pool, key=lambda d: _h(self.ex.seed, "pool", d.id))[: self.ex.pool_size]
        self.pool = sorted(pool, key=lambda d: d.id)
        self.by_id = {d.id: d for d in self.pool}
        self.key = settings_key(self.ex)
        self._embedder = embedder
        self._pool_emb: np.ndarray | None = None
        # fixed: one seeded order; each input takes the first k that are not itself
        self._fixed_order = sorted(self.pool, key=lambda d: _h(self.ex.seed, "fixed", d.id))
        self._norms = [strong_norm(d.text) for d in self.pool]

    @classmethod
    def for_project(cls, project) -> "FewShot | None":
        """None when the project's teacher prompt has no examples (k = 0)."""
        ex = project.spec.prompt.examples
        if ex.k == 0:
            return None
        if ex.pool == "gold":
            return cls(project.spec, gold_pool(project), project.store)
        path = Path(ex.pool)
        path = path if path.is_absolute() else Path(project.root) / path
        demos, dropped = file_pool(project, path)
        return cls(project.spec, demos, project.store, dropped)

    def fingerprint(self) -> str:
        """The settings and the pool (ids and answers): while both are unchanged every kept choice stays valid,
        so a stored input's demonstrations, and its prompt, are unchanged (``labeling.prompt_fingerprint``)."""
        return _h(self.key, *(f"{d.id}:{_demo_hash(d)}" for d in self.pool))[:16]

    # -- choosing ------------------------------------------------------------------------------------
    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embedder is None:
            self._embedder = Embedder(self.ex.embedder)
        return self._embedder(texts)

    def _excluded(self, ex_id: str | None, text: str) -> np.ndarray:
        norm = strong_norm(text)
        return np.array([d.id == ex_id or n == norm for d, n in zip(self.pool, self._norms)])

    def select(self, items: Sequence[tuple[str | None, str]]) -> list[list[Demo]]:
        """Fresh choices for (id or None, text) pairs, nearest first (not stored: see ``choose``)."""
        k = self.ex.k
        if self.ex.select == "fixed":
            out = []
            for ex_id, text in items:
                mine = self._excluded(ex_id, text)      # itself: same id or same normalised text
                keep = {d.id for d, x in zip(self.pool, mine) if not x}
                out.append([d for d in self._fixed_order if d.id in keep][:k])
            return out
        if self._pool_emb is None:
            self._pool_emb = self._embed([d.text for d in self.pool])
        out = []
        for start in range(0, len(items), 1024):     # [chunk, pool] similarities at a time: bounded memory
            chunk = items[start:start + 1024]
            sims = self._embed([t for _, t in chunk]) @ self._pool_emb.T    # cosine: both are L2-normalised
            for row, (ex_id, text) in zip(sims, chunk):
                row = np.where(self._excluded(ex_id, text), -np.inf, row)
                # ties (and float noise below 1e-6) go to the pool order, which is by id: stable across runs
                order = np.lexsort((np.arange(len(row)), -np.round(row, 6)))
                out.append([self.pool[i] for i in order[:k] if np.isfinite(row[i])])
        return out

    def choose(self, items: Sequence[tuple[str, str]]) -> list[list[Demo]]:
        """Demonstrations for stored inputs (id, text): the kept choice where it is still valid, else a fresh
        one, which is kept (written in one transaction before it is used for any call)."""
        kept: dict[str, list[str]] = {}
        ids = [ex_id for ex_id, _ in items]
        for i in range(0, len(ids) if self.store is not None else 0, 500):   # these inputs' choices only: the
            part = ids[i:i + 500]                                             # labeller plans a page at a time
            for r in self.store.q(f"SELECT example_id, demo_ids FROM fewshot_choices WHERE settings=? AND "
                                  f"example_id IN ({','.join('?' * len(part))})", (self.key, *part)):
                kept[r["example_id"]] = json.loads(r["demo_ids"])
        out: list[list[Demo] | None] = []
        todo = []
        for i, (ex_id, text) in enumerate(items):
            ref = kept.get(ex_id)
            # still valid while every demonstration is in the pool with the answer it had
            if ref is not None and all(x in self.by_id and _demo_hash(self.by_id[x]) == h for x, h in ref):
                out.append([self.by_id[x] for x, _ in ref])
            else:
                out.append(None)
                todo.append(i)
        if todo:
            fresh = self.select([items[i] for i in todo])
            for i, demos in zip(todo, fresh):
                out[i] = demos
            if self.store is not None and not getattr(self.store, "readonly", False):
                now = time.time()
                with self.store.tx() as c:
                    c.executemany("INSERT OR REPLACE INTO fewshot_choices(example_id, settings, demo_ids, created_at) "
                                  "VALUES(?,?,?,?)",
                                  [(items[i][0], self.key, json.dumps([[d.id, _demo_hash(d)] for d in out[i]]), now)
                                   for i in todo])
        return out  # type: ignore[return-value]

    # -- rendering -----------------------------------------------------------------------------------
    def shortlist(self, demos: Iterable[Demo]) -> list[str] | None:
        if not (self.ex.shortlist and self.spec.kind == "classify"):
            return None
        have = {d.answer for d in demos}
        return [n for n in self.spec.label_names if n in have]

    def prompt(self, text: str, segment: str | None, meta: dict | None, demos: list[Demo],
               rationale: bool = False) -> TeacherPrompt:
        labels = self.shortlist(demos)
        msgs = render_messages(self.spec, text, segment, meta, rationale=rationale, demos=demos, labels=labels)
        return TeacherPrompt(msgs, labels if labels is not None else (self.spec.label_names or None),
                             [d.id for d in demos])


def teacher_prompts(project, rows: Sequence[Any], rationale: bool = False,
                    fewshot: FewShot | None | bool = True) -> list[TeacherPrompt]:
    """The teacher's prompt for each stored input (rows with id, text, segment, meta: sqlite rows with a JSON
    ``meta`` column, or ``dataset.Row``s), exactly as the labeller sends it. ``fewshot``: True builds it
    from the project (None when k = 0); pass a ``FewShot`` to reuse one."""
    spec = project.spec
    fs = FewShot.for_project(project) if fewshot is True else (fewshot or None)

    def field_(r, name):
        return r[name] if not hasattr(r, name) else getattr(r, name)

    def meta_(r):
        m = field_(r, "meta")
        return json.loads(m or "{}") if isinstance(m, (str, type(None))) else m

    if fs is None:
        return [TeacherPrompt(render_messages(spec, field_(r, "text"), field_(r, "segment"), meta_(r),
                                              rationale=rationale), spec.label_names or None, [])
                for r in rows]
    chosen = fs.choose([(field_(r, "id"), field_(r, "text")) for r in rows])
    return [fs.prompt(field_(r, "text"), field_(r, "segment"), meta_(r), demos, rationale)
            for r, demos in zip(rows, chosen)]
