"""Record the real local teacher's answers for every input of the SNIPS demo, for ReplayTeacher.

    nohup .venv/bin/python examples/snips-intents/record_teacher.py > record.log 2>&1 &

Renders each input exactly as the labeller will (``render_messages(spec, text, segment=length)``), so the
replay keys match, asks the ``qwen-1.5b`` teacher of distill.yaml, and appends one JSON line per input to
teacher_qwen2.5-coder-1.5b.jsonl (format: distill/teachers/replay.py) through
``replay.RecordingAppender``. Resumable: inputs already in the file are skipped, every line is flushed and
fsynced, and a half-written last line (killed mid-write) is cut off before appending. Inputs are visited
in a seeded random order, so a recording stopped early (--limit) is still a random sample of the CSV.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import hashlib
import os
import platform
import random
import sys
import time
from pathlib import Path

from distill.task import load_spec, render_messages
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
    ap.add_argument("--csv", default=str(HERE / "snips_intents_all.csv"))
    ap.add_argument("--out", default=str(HERE / "teacher_qwen2.5-coder-1.5b.jsonl"))
    ap.add_argument("--limit", type=int, default=None, help="record at most this many inputs in total")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    spec = load_spec(HERE / "distill.yaml")
    tspec = spec.get_teacher(args.teacher)
    rows = list(csv.DictReader(open(args.csv, newline="", encoding="utf-8")))
    random.Random(args.seed).shuffle(rows)
    if args.limit:
        rows = rows[: args.limit]

    teacher = LocalTeacher(tspec, None)
    t_load = time.perf_counter()
    teacher.load()
    t_load = time.perf_counter() - t_load
    import torch
    import transformers

    # used only when the file is new; a resumed file keeps its own header (checked below)
    prov = {
        "teacher": tspec.name,
        "model": teacher.resolved.upstream,
        "package": teacher.resolved.package,
        "sha256": teacher.resolved.sha256,
        "licence": teacher.resolved.licence,
        "method": "zero-shot label scoring: summed log-prob of label + end-of-turn, softmax over labels",
        "command": "python examples/snips-intents/record_teacher.py" + (f" --limit {args.limit}" if args.limit else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} / {_cpu()} / {os.cpu_count()} cpus / {platform.platform()}",
        "device": str(teacher.model.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "inputs_csv": Path(args.csv).name,
        "inputs_csv_sha256": hashlib.sha256(Path(args.csv).read_bytes()).hexdigest(),
        "spec_sha256": hashlib.sha256((HERE / "distill.yaml").read_bytes()).hexdigest(),
    }
    out = Path(args.out)
    with RecordingAppender(out, prov) as rec:
        if rec.provenance.get("sha256") != teacher.resolved.sha256:
            sys.exit(f"{out} was recorded with weights {rec.provenance.get('sha256')}, not "
                     f"{teacher.resolved.sha256}; move it away to record afresh")
        print(f"loaded {teacher.resolved.name} in {t_load:.1f}s; {len(rec)} already recorded, "
              f"{len(rows)} inputs planned", flush=True)

        t0, n_new, n_right = time.perf_counter(), 0, 0
        for i, row in enumerate(rows, start=1):
            msgs = render_messages(spec, row["text"], segment=row["length"])
            if msgs in rec:
                continue
            req = TeacherRequest(key=messages_sha256(msgs), messages=msgs, kind=spec.kind, labels=spec.label_names)
            reply = asyncio.run(teacher.ask(req))
            rec.add(msgs, reply, {"id": row["id"]})
            n_new += 1
            n_right += reply.texts[0] == row["intent"]
            if n_new % 25 == 0:
                el = time.perf_counter() - t0
                print(f"{i}/{len(rows)} new={n_new} {el / n_new:.2f}s/input acc(new)={n_right / n_new:.3f} "
                      f"eta={(len(rows) - i) * el / n_new / 60:.1f}min load={os.getloadavg()[0]:.1f}", flush=True)
        n_recorded = len(rec)
    el = time.perf_counter() - t0
    print(f"done: {n_new} new inputs in {el:.0f}s, {n_recorded} recorded in {out.name}", flush=True)


if __name__ == "__main__":
    main()
