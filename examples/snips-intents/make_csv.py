"""Build the demo's CSVs from the upstream SNIPS files (a seeded, stratified sample).

    python examples/snips-intents/make_csv.py            # -> snips_intents_all.csv (1204 rows)
    python examples/snips-intents/make_csv.py --only-recorded teacher_qwen2.5-coder-1.5b.jsonl \
        --out examples/snips-intents/snips_intents.csv     # -> the rows the recording covers

Pools ``train_<I>_full.json`` + ``validate_<I>.json`` per intent, drops repeated texts (after lowercasing
and collapsing spaces), and draws PER_INTENT utterances per intent with ``random.Random(SEED)``. The
``length`` column is *derived* by us from the word count, to give the project a segment to gate on.
Re-running it writes the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

INTENTS = ["AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchCreativeWork",
           "SearchScreeningEvent"]
PER_INTENT = 172      # 7 x 172 = 1204 utterances: enough for train/validation/test and a ~45 min recording
SEED = 0


def length_segment(text: str) -> str:
    n = len(text.split())
    return "short" if n <= 5 else "medium" if n <= 10 else "long"


def read_utterances(path: Path, intent: str) -> list[str]:
    raw = path.read_bytes()
    # One upstream file stores an emoji as a CESU-8 surrogate pair; this decode is safe for all files.
    text = raw.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass").decode("utf-16")
    return [" ".join("".join(c["text"] for c in u["data"]).split()) for u in json.loads(text)[intent]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="/work/shared/datasets/snips_nlu_benchmark_2017")
    ap.add_argument("--out", default=str(Path(__file__).with_name("snips_intents_all.csv")))
    ap.add_argument("--only-recorded", type=Path, help="keep only the ids recorded in this teacher JSONL")
    args = ap.parse_args()
    rng = random.Random(SEED)
    rows = []
    seen: set[str] = set()
    for intent in INTENTS:
        pool = []
        for split, fname in (("train", f"train_{intent}_full.json"), ("validate", f"validate_{intent}.json")):
            for i, text in enumerate(read_utterances(Path(args.source) / intent / fname, intent)):
                norm = text.lower()
                if text and norm not in seen:
                    seen.add(norm)
                    pool.append((f"{intent}-{split}-{i:04d}", text))
        for uid, text in sorted(rng.sample(pool, PER_INTENT)):
            rows.append({"id": uid, "text": text, "intent": intent, "length": length_segment(text)})
    if args.only_recorded:
        path = args.only_recorded if args.only_recorded.exists() else Path(__file__).parent / args.only_recorded
        recorded = {json.loads(ln).get("id") for ln in open(path, encoding="utf-8") if ln.strip()}
        rows = [r for r in rows if r["id"] in recorded]
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "intent", "length"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
