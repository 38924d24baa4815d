"""Record the real local teacher's answers for the inputs of the SNIPS slot-filling example, for ReplayTeacher.

    OMP_NUM_THREADS=1 nohup .venv/bin/python examples/snips-slots/record_teacher.py > record.log 2>&1 &
    .venv/bin/python examples/snips-slots/record_teacher.py --limit 3        # a smoke test

Renders each input exactly as the labeller will (``render_messages(spec, text, segment=intent)``: the
importer maps the CSV's ``intent`` column to the segment and leaves no other column in ``meta``), so the
replay keys match; asks the ``qwen-1.5b`` teacher of distill.yaml (greedy generation, ``max_tokens`` from
the spec) and appends one JSON line per input to teacher_qwen2.5-coder-1.5b.jsonl (format:
distill/teachers/replay.py) through ``replay.RecordingAppender``. Resumable: inputs already in the file
are skipped, every line is flushed and fsynced, and a half-written last line (killed mid-write) is cut off
before appending. Inputs are visited split by split (test, train, validation; the splits distill.yaml will
assign on import), each in a seeded random order, so a recording stopped early (--limit) is still a random
sample of its split.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from distill.data.splits import assign_split
from distill.evaluate.lm import pair_counts
from distill.task import ParseError, load_spec, parse_answer, render_messages
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="qwen-1.5b")
    ap.add_argument("--csv", default=str(HERE / "snips_slots.csv"))
    ap.add_argument("--out", default=str(HERE / "teacher_qwen2.5-coder-1.5b.jsonl"))
    ap.add_argument("--limit", type=int, default=None, help="record at most this many inputs in total")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    spec = load_spec(HERE / "distill.yaml")
    tspec = spec.get_teacher(args.teacher)
    rows = list(csv.DictReader(open(args.csv, newline="", encoding="utf-8")))
    random.Random(args.seed).shuffle(rows)
    # the locked test split first (teacher vs gold needs all of it), then train (the student's data), then
    # validation: a recording stopped early is still complete where it matters most
    order = {"test": 0, "train": 1, "validation": 2}
    rows.sort(key=lambda r: order[assign_split(r["id"], spec.splits)])
    if args.limit:
        rows = rows[: args.limit]

    teacher = LocalTeacher(tspec, None)
    t_load = time.perf_counter()
    teacher.load()
    t_load = time.perf_counter() - t_load
    import torch
    import transformers

    spec_sha256 = hashlib.sha256((HERE / "distill.yaml").read_bytes()).hexdigest()
    # used only when the file is new; a resumed file keeps its own header (checked below)
    prov = {
        "teacher": tspec.name,
        "model": teacher.resolved.upstream,
        "package": teacher.resolved.package,
        "sha256": teacher.resolved.sha256,
        "licence": teacher.resolved.licence,
        "method": f"greedy generation, max_new_tokens={tspec.max_tokens}, stop at end of turn, "
                  f"dtype={teacher.model.dtype}",
        "command": "python examples/snips-slots/record_teacher.py" + (f" --limit {args.limit}" if args.limit else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} / {_cpu()} / {os.cpu_count()} cpus / {platform.platform()}",
        "device": str(teacher.model.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "inputs_csv": Path(args.csv).name,
        "inputs_csv_sha256": hashlib.sha256(Path(args.csv).read_bytes()).hexdigest(),
        "spec_sha256": spec_sha256,
    }
    out = Path(args.out)
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
              f"{len(rows)} inputs planned", flush=True)

        t0, n_new, n_valid, n_exact = time.perf_counter(), 0, 0, 0
        tp = n_pred = n_ref = 0
        for i, row in enumerate(rows, start=1):
            msgs = render_messages(spec, row["text"], segment=row["intent"])
            if msgs in rec:
                continue
            req = TeacherRequest(key=messages_sha256(msgs), messages=msgs, kind=spec.kind)
            reply = asyncio.run(teacher.ask(req))
            rec.add(msgs, reply, {"id": row["id"]})
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
    el = time.perf_counter() - t0
    print(f"done: {n_new} new inputs in {el:.0f}s ({el / max(1, n_new):.2f}s/input), {n_recorded} recorded in "
          f"{out.name}", flush=True)


if __name__ == "__main__":
    main()
