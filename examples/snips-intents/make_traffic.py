"""Build new_traffic.csv: "production traffic" for the demo's second round (`distill iterate --traffic`).

    python examples/snips-intents/make_traffic.py     # -> new_traffic.csv (140 rows, 20 per intent)

Fresh SNIPS utterances that are *not* in snips_intents_all.csv (same upstream files, same normalisation),
drawn with a different seed. The recorded teacher answers them too (record_teacher.py --csv new_traffic.csv),
so the iterate round labels them through the replay teacher like any other input. Re-running writes the
same bytes.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from make_csv import INTENTS, length_segment, read_utterances

HERE = Path(__file__).resolve().parent
SOURCE = Path("/work/shared/datasets/snips_nlu_benchmark_2017")
PER_INTENT = 20
SEED = 1


def main() -> None:
    taken = {r["text"].lower() for r in csv.DictReader(open(HERE / "snips_intents_all.csv", encoding="utf-8"))}
    rng = random.Random(SEED)
    rows, seen = [], set(taken)
    for intent in INTENTS:
        pool = []
        for i, text in enumerate(read_utterances(SOURCE / intent / f"train_{intent}_full.json", intent)):
            if text and text.lower() not in seen:
                seen.add(text.lower())
                pool.append((f"{intent}-train-{i:04d}", text))
        for uid, text in sorted(rng.sample(pool, PER_INTENT)):
            rows.append({"id": uid, "text": text, "intent": intent, "length": length_segment(text)})
    with open(HERE / "new_traffic.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "intent", "length"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {HERE / 'new_traffic.csv'}")


if __name__ == "__main__":
    main()
