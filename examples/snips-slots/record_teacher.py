"""Record the real local teacher's answers for the inputs of the SNIPS slot-filling example, for ReplayTeacher.

    OMP_NUM_THREADS=1 nohup .venv/bin/python examples/snips-slots/record_teacher.py > record.log 2>&1 &
    .venv/bin/python examples/snips-slots/record_teacher.py --limit 3        # a smoke test
    # few-shot: 8 retrieved gold demonstrations per input, top-20 token logprobs (for sparse_topk KD):
    .venv/bin/python examples/snips-slots/record_teacher.py --k 8 --top-logprobs 20 --splits test,train

The inputs go through a scratch distill project (``--work``, default ``$DISTILL_CACHE/record-snips-slots-k<K>``):
the CSV is imported there with this folder's distill.yaml (``prompt.examples.k`` set to ``--k``), so ids,
splits, decontamination and the few-shot demonstrations of every input are exactly what ``distill label``
computes in a user's project (``distill.fewshot.teacher_prompts``: gold pool of train/validation rows, never
test, never the input itself), and the replay keys match. Asks the ``qwen-1.5b`` teacher of distill.yaml
(greedy generation, ``max_tokens`` from the spec) and appends one JSON line per input to the recording
(format: distill/teachers/replay.py) through ``replay.RecordingAppender``. Resumable: inputs already in the
file are skipped, every line is flushed and fsynced, and a half-written last line (killed mid-write) is cut
off before appending. Inputs are visited split by split (``--splits``, in that order), each in a seeded random
order, so a recording stopped early (--limit) is still a random sample of its split.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import yaml

from distill.data.importer import import_file
from distill.fewshot import teacher_prompts
from distill.metrics import pair_counts
from distill.models import cache_dir
from distill.project import Project
from distill.task import ParseError, parse_answer
from distill.teachers.base import TeacherRequest
from distill.teachers.local import LocalTeacher
from distill.teachers.replay import RecordingAppender, messages_sha256

HERE = Path(__file__).resolve().parent


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def scratch_project(work: Path, csv_path: Path, k: int, select: str) -> Project:
    """This example's spec with ``prompt.examples`` set, the CSV imported (idempotent on re-runs)."""
    spec = yaml.safe_load((HERE / "distill.yaml").read_text(encoding="utf-8"))
    spec["prompt"]["examples"] = {"k": k, "select": select, "pool": "gold"}
    text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    work.mkdir(parents=True, exist_ok=True)
    if (work / "distill.yaml").exists() and (work / "distill.yaml").read_text(encoding="utf-8") != text:
        sys.exit(f"{work} holds another spec; pass another --work or remove it")
    (work / "distill.yaml").write_text(text, encoding="utf-8")
    project = Project.open(work)
    import_file(project, csv_path, id="id", label="gold")
    return project


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="qwen-1.5b")
    ap.add_argument("--csv", default=str(HERE / "snips_slots.csv"))
    ap.add_argument("--k", type=int, default=0, help="few-shot demonstrations per input (prompt.examples.k)")
    ap.add_argument("--select", default="similar", choices=["similar", "fixed"])
    ap.add_argument("--top-logprobs", type=int, default=0, help="record this many top log-probs per answer token")
    ap.add_argument("--splits", default="test,train,validation")
    ap.add_argument("--out", default=None, help="default: teacher_qwen2.5-coder-1.5b[_<k>shot].jsonl here")
    ap.add_argument("--work", default=None, help="the scratch project folder")
    ap.add_argument("--limit", type=int, default=None, help="record at most this many inputs in total")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    csv_path = Path(args.csv)
    work = Path(args.work) if args.work else cache_dir() / f"record-snips-slots-k{args.k}-{args.select}"
    project = scratch_project(work, csv_path, args.k, args.select)
    spec = project.spec
    tspec = spec.get_teacher(args.teacher)
    if args.top_logprobs:
        tspec = tspec.model_copy(update={"logprobs": True, "top_logprobs": args.top_logprobs})
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    rows = []
    for split in splits:
        part = project.store.q("SELECT id, text, segment, meta, gold FROM examples WHERE split=? ORDER BY id", (split,))
        part = list(part)
        random.Random(args.seed).shuffle(part)
        rows += part
    if args.limit:
        rows = rows[: args.limit]
    prompts = teacher_prompts(project, rows)

    teacher = LocalTeacher(tspec, None)
    t_load = time.perf_counter()
    teacher.load()
    t_load = time.perf_counter() - t_load
    import torch
    import transformers

    spec_sha256 = hashlib.sha256((HERE / "distill.yaml").read_bytes()).hexdigest()
    shot = f"_{args.k}shot" if args.k else ""
    out = Path(args.out) if args.out else HERE / f"teacher_qwen2.5-coder-1.5b{shot}.jsonl"
    cmd = (f"python examples/snips-slots/record_teacher.py --k {args.k} --select {args.select} "
           f"--top-logprobs {args.top_logprobs} --splits {','.join(splits)}"
           + (f" --limit {args.limit}" if args.limit else ""))
    # used only when the file is new; a resumed file keeps its own header (checked below)
    prov = {
        "teacher": tspec.name,
        "model": teacher.resolved.upstream,
        "package": teacher.resolved.package,
        "sha256": teacher.resolved.sha256,
        "licence": teacher.resolved.licence,
        "method": f"greedy generation, max_new_tokens={tspec.max_tokens}, stop at end of turn, "
                  f"dtype={teacher.model.dtype}, top_logprobs={tspec.top_logprobs if tspec.logprobs else 0}",
        "few_shot": {"k": args.k, "select": args.select, "pool": "gold answers of the train/validation "
                     "inputs (never test, never the input itself; distill.fewshot)",
                     "embedder": spec.prompt.examples.embedder},
        "command": cmd,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} / {_cpu()} / {os.cpu_count()} cpus / {platform.platform()}",
        "device": str(teacher.model.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "inputs_csv": csv_path.name,
        "inputs_csv_sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
        "spec_sha256": spec_sha256,
    }
    with RecordingAppender(out, prov) as rec:
        if rec.provenance.get("sha256") != teacher.resolved.sha256:
            sys.exit(f"{out} was recorded with weights {rec.provenance.get('sha256')}, not "
                     f"{teacher.resolved.sha256}; move it away to record afresh")
        if rec.provenance.get("spec_sha256") != spec_sha256:
            # Not fatal: only the rendered prompt matters for replay, and lines whose prompt changed simply
            # stop matching. But the provenance line would then describe another spec, so say it.
            print(f"warning: distill.yaml changed since {out.name} was started; prompts that changed will "
                  "be recorded again as new lines", flush=True)
        print(f"loaded {teacher.resolved.name} in {t_load:.1f}s; {len(rec)} already recorded, "
              f"{len(rows)} inputs planned ({args.k}-shot, {args.select})", flush=True)

        t0, n_new, n_valid, n_exact = time.perf_counter(), 0, 0, 0
        tp = n_pred = n_ref = 0
        for i, (row, prompt) in enumerate(zip(rows, prompts), start=1):
            msgs = prompt.messages
            if msgs in rec:
                continue
            req = TeacherRequest(key=messages_sha256(msgs), messages=msgs, kind=spec.kind)
            reply = asyncio.run(teacher.ask(req))
            rec.add(msgs, reply, {"id": row["id"], "demos": prompt.demo_ids})
            n_new += 1
            # running quality vs the SNIPS gold, the same way distill eval scores it
            gold = json.loads(row["gold"])
            try:
                ans = parse_answer(spec, reply.texts[0])
            except ParseError:
                ans = None
            n_valid += ans is not None
            n_exact += ans == gold
            a, b, c = pair_counts(ans, gold)
            tp, n_pred, n_ref = tp + a, n_pred + b, n_ref + c
            if n_new % 10 == 0 or i == len(rows):
                el = time.perf_counter() - t0
                print(f"{i}/{len(rows)} new={n_new} {el / n_new:.2f}s/input valid={n_valid / n_new:.3f} "
                      f"exact={n_exact / n_new:.3f} field_f1={2 * tp / max(1, n_pred + n_ref):.3f} "
                      f"eta={(len(rows) - i) * el / n_new / 60:.1f}min load={os.getloadavg()[0]:.1f}", flush=True)
        n_recorded = len(rec)
    project.close()
    el = time.perf_counter() - t0
    print(f"done: {n_new} new inputs in {el:.0f}s ({el / max(1, n_new):.2f}s/input), {n_recorded} recorded in "
          f"{out.name}", flush=True)


if __name__ == "__main__":
    main()
