"""Build snips_slots.csv from the upstream SNIPS files: a seeded sample balanced over the 7 intents, each
row with its gold answer {"intent": ..., "slots": {slot_name: value}} built from the chunk annotations.

    python examples/snips-slots/make_data.py        # -> examples/snips-slots/snips_slots.csv (399 rows)

Pools ``train_<I>_full.json`` + ``validate_<I>.json`` per intent, joins each utterance's chunks into one
text (whitespace collapsed; a slot value is its chunk's text, stripped and collapsed the same way, so it is
always a substring of the text), drops texts seen before (case-insensitive) and utterances that name the
same slot twice (one JSON key cannot hold two values; see the counts printed and README.md), then draws
PER_INTENT utterances per intent with ``random.Random(SEED)``. Re-running it writes the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

INTENTS = ["AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchCreativeWork",
           "SearchScreeningEvent"]
PER_INTENT = 57       # 7 x 57 = 399 utterances; at a 0.2 test share the hash split puts 78 in test
SEED = 0


def read_utterances(path: Path, intent: str) -> list[list[dict]]:
    raw = path.read_bytes()
    # One upstream file stores an emoji as a CESU-8 surrogate pair; this decode is safe for all files.
    text = raw.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass").decode("utf-16")
    return [u["data"] for u in json.loads(text)[intent]]


def to_answer(chunks: list[dict], intent: str) -> tuple[str, dict | None]:
    """(text, gold answer), or (text, None) when a slot name occurs twice in the utterance."""
    text = " ".join("".join(c["text"] for c in chunks).split())
    slots: dict[str, str] = {}
    for c in chunks:
        if "entity" in c:
            if c["entity"] in slots:
                return text, None
            slots[c["entity"]] = " ".join(c["text"].split())
    return text, {"intent": intent, "slots": slots}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="/work/shared/datasets/snips_nlu_benchmark_2017")
    ap.add_argument("--out", default=str(Path(__file__).with_name("snips_slots.csv")))
    args = ap.parse_args()
    rng = random.Random(SEED)
    rows, seen, repeated = [], set(), 0
    for intent in INTENTS:
        pool = []
        for split, fname in (("train", f"train_{intent}_full.json"), ("validate", f"validate_{intent}.json")):
            for i, chunks in enumerate(read_utterances(Path(args.source) / intent / fname, intent)):
                text, answer = to_answer(chunks, intent)
                if not text or text.lower() in seen:
                    continue
                seen.add(text.lower())
                if answer is None:
                    repeated += 1
                    continue
                pool.append((f"{intent}-{split}-{i:04d}", text, answer))
        for uid, text, answer in sorted(rng.sample(pool, PER_INTENT)):
            rows.append({"id": uid, "text": text, "intent": intent,
                         "gold": json.dumps(answer, ensure_ascii=False, sort_keys=True)})
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "intent", "gold"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    slots = sorted({k for r in rows for k in json.loads(r["gold"])["slots"]})
    print(f"wrote {len(rows)} rows to {args.out}; left out {repeated} unique utterances that repeat a slot name; "
          f"{len(slots)} slot names occur in the sample")


if __name__ == "__main__":
    main()
