"""Write clinc150_subset.csv: the seeded CLINC150 subset the router benchmark and this example use, and
clinc150_more_traffic.csv: the rest of ``data_full``'s training queries, the retention bench's extra traffic.

    python examples/clinc150/make_subset.py [--source /work/shared/datasets/clinc150/data_small.json.gz]
                                            [--full /work/shared/datasets/clinc150/data_full.json.gz]

Source: ``data_small.json`` of https://github.com/clinc/oos-eval (CC BY 3.0, Larson et al. 2019,
arXiv 1909.02027; see LICENSE and README.md). Kept, per split (column ``split``):
- train:       30 of the 50 ``train`` queries per intent (4500), seeded, so MiniLM trains in minutes on 2 CPUs;
- validation:  10 of the 20 ``val`` queries per intent (1500) + all 100 ``oos_val`` queries;
- test:        all 4500 ``test`` queries + all 1000 ``oos_test`` queries (the paper's full test set).
``oos_train`` is left out on purpose: the student learns in-scope intents only, and out-of-scope inputs
must be caught by the router. Columns: text, intent ("oos" for out-of-scope), domain ("oos" too), split.

clinc150_more_traffic.csv (columns text, intent, domain): every ``train`` query of ``data_full.json`` (100 per
intent; ``data_small``'s 50 are among them) whose text is not already in clinc150_subset.csv — ~70 per intent,
10,499 rows (one query, "what's your designation", is also a subset validation/test text and is left out).
Only bench/intent_teacher.py reads it: these inputs are more *unlabelled traffic* for the teacher to label
(20 per intent is too little for a 150-way student), never gold for anyone. Kept apart so every reader of
clinc150_subset.csv (router, serving and example scripts) sees the same rows as before.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
TRAIN_PER_INTENT = 30
VAL_PER_INTENT = 10


def per_intent(rows: list[list[str]], k: int, rng: random.Random) -> list[list[str]]:
    by: dict[str, list[list[str]]] = {}
    for text, intent in rows:
        by.setdefault(intent, []).append([text, intent])
    out = []
    for intent in sorted(by):
        out += rng.sample(by[intent], k)
    return out


def load(path: str) -> dict:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="/work/shared/datasets/clinc150/data_small.json.gz")
    ap.add_argument("--domains", default="/work/shared/datasets/clinc150/domains.json")
    ap.add_argument("--full", default="/work/shared/datasets/clinc150/data_full.json.gz")
    ap.add_argument("--out", default=str(HERE / "clinc150_subset.csv"))
    ap.add_argument("--more-out", default=str(HERE / "clinc150_more_traffic.csv"))
    args = ap.parse_args()
    data = load(args.source)
    domain_of = {i: d for d, intents in json.loads(Path(args.domains).read_text()).items() for i in intents}
    rng = random.Random(SEED)
    parts = [("train", per_intent(data["train"], TRAIN_PER_INTENT, rng)),
             ("validation", per_intent(data["val"], VAL_PER_INTENT, rng) + data["oos_val"]),
             ("test", data["test"] + data["oos_test"])]
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "intent", "domain", "split"])
        for split, rows in parts:
            for text, intent in rows:
                w.writerow([text, intent, domain_of.get(intent, "oos"), split])
    (HERE / "domains.json").write_text(Path(args.domains).read_text())
    print(f"wrote {args.out}: " + ", ".join(f"{s} {len(r)}" for s, r in parts))
    taken = {text for _, rows in parts for text, _ in rows}
    more = [(text, intent) for text, intent in load(args.full)["train"] if text not in taken]
    with open(args.more_out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "intent", "domain"])
        w.writerows([text, intent, domain_of[intent]] for text, intent in sorted(more, key=lambda r: (r[1], r[0])))
    print(f"wrote {args.more_out}: {len(more)} more training queries (unlabelled traffic for the teacher)")


if __name__ == "__main__":
    main()
