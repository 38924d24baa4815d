"""Tiny models built in-process (no downloads): plain functions, imported by tests that need them.

``tiny_bert_folder`` writes a 2-layer, 32-wide BERT and a word-level BERT tokenizer over ``WORDS`` to a
folder, so any code path that takes "a local HF encoder folder" can be exercised in seconds on a CPU.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "love", "happy", "excellent", "fast", "nice", "perfect"]
NEGATIVE = ["bad", "awful", "hate", "sad", "terrible", "slow", "broken", "worst"]
FILLER = ["the", "a", "order", "service", "was", "is", "my", "this", "product", "delivery", "and", "very",
          "it", "today", "again", "with", "support", "app", "price", "box"]
WORDS = POSITIVE + NEGATIVE + FILLER


def tiny_bert_folder(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random tiny BERT (AutoModel-loadable) + tokenizer to ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # transformers 5 builds BERT's WordPiece tokenizer from a {token: id} dict (no vocab.txt needed)
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + [str(d) for d in range(10)])}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=64)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    BertModel(cfg).save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (text, label) pairs whose label is decided by which sentiment words they contain: learnable
    by a tiny model in a few epochs, so "loss falls" is a real check."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        cue = POSITIVE if label == "pos" else NEGATIVE
        words = rng.sample(FILLER, 4) + rng.sample(cue, 2)
        rng.shuffle(words)
        out.append((" ".join(words) + f" {i}", label))  # the number keeps texts unique
    return out


TINY_SPEC = """\
name: tiny
kind: classify
labels: [pos, neg]
teachers:
  - name: rec
    kind: replay
    path: recorded.jsonl
teacher: rec
"""


def tiny_classify_project(root: Path, n: int = 80, val_share: float = 0.2, probs: bool = True, gold: bool = True,
                          seed: int = 0):
    """A classify Project in ``root`` with ``n`` labelled inputs written straight into the store: the teacher
    'rec' answers the true label with probability 0.9 (as if from its logprobs); every 5th row has no probs."""
    import json
    import time

    from distill.project import Project

    project = Project.init(root, "classify", spec_text=TINY_SPEC)
    rng = random.Random(seed)
    now = time.time()
    with project.store.tx() as c:
        for i, (text, label) in enumerate(sentiment_rows(n, seed)):
            split = "validation" if i < int(n * val_share) else "train"
            other = "neg" if label == "pos" else "pos"
            p = round(rng.uniform(0.7, 0.99), 4)
            dist = json.dumps({label: p, other: round(1 - p, 4)}) if probs and i % 5 else None
            c.execute("INSERT INTO examples(id, text, norm, gold, segment, meta, split, created_at) VALUES(?,?,?,?,?,?,?,?)",
                      (f"ex{i:04d}", text, text.lower(), json.dumps(label) if gold else None, None, "{}", split, now))
            c.execute("INSERT INTO labels(example_id, teacher, status, answer, probs, confidence, created_at) "
                      "VALUES(?,?,?,?,?,?,?)", (f"ex{i:04d}", "rec", "ok", json.dumps(label), dist, p, now))
    return project
