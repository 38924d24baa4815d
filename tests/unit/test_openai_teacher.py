"""OpenAITeacher, backoff, Retry-After and the rate limiter - no sockets: httpx.MockTransport and a fake clock."""

import asyncio
import time
import email.utils
import json
import math
import random

import httpx
import pytest

from distill.errors import DistillError
from distill.labeling import answer_token_span, first_token_distribution, label_fields
from distill.teachers.ledger import cost_of
from distill.ratelimit import Limiter, TokenBucket
from distill.task import ProjectSpec, TeacherSpec
from distill.teachers.base import TeacherAuthError, TeacherReply, TeacherRequest, TeacherUnavailable
from distill.teachers.ensemble import MemberAnswer, combine
from distill.teachers.openai_compat import OpenAITeacher, backoff_delay, parse_retry_after

KEY = "sk-test-SECRET-123"


def spec(**kw) -> TeacherSpec:
    base = dict(name="api", kind="openai", base_url="http://fake/v1", model="m", api_key_env="T_KEY", max_retries=3)
    base.update(kw)
    return TeacherSpec(**base)


def ok_body(texts=("positive",), logprobs=None, usage=(10, 2)) -> dict:
    return {"choices": [{"index": i, "message": {"role": "assistant", "content": t},
                         "logprobs": logprobs if i == 0 else None} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}


class Script:
    """Answers requests from a list of (status, body, headers); records what was sent."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        status, body, headers = (step + ({},))[:3] if len(step) == 2 else step
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers)


def run_ask(script: Script, sleeps: list | None = None, **kw):
    sleeps = sleeps if sleeps is not None else []

    async def fake_sleep(s):
        sleeps.append(s)

    async def go():
        t = OpenAITeacher(spec(**kw), transport=httpx.MockTransport(script), sleep=fake_sleep, rng=random.Random(0))
        try:
            return await t.ask(TeacherRequest(key="k1", messages=[{"role": "user", "content": "hi"}], kind="classify"))
        finally:
            await t.aclose()

    return asyncio.run(go())


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("T_KEY", KEY)


# -- Retry-After and backoff -------------------------------------------------------------------------------


def test_retry_after_seconds_and_fractions():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_retry_after_http_date():
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0, abs=1.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_backoff_is_full_jitter_within_exponential_cap():
    rng = random.Random(1)
    for attempt, cap in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 30.0)]:
        xs = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(300)]
        assert min(xs) >= 0 and max(xs) <= cap
        assert max(xs) > 0.8 * cap and min(xs) < 0.2 * cap    # spread over the whole range (that is the jitter)


# -- the teacher ---------------------------------------------------------------------------------------------


def test_request_shape_headers_and_reply():
    lp = {"content": [{"token": "pos", "logprob": -0.1, "top_logprobs": [{"token": "pos", "logprob": -0.1},
                                                                          {"token": "neg", "logprob": -2.4}]}]}
    script = Script((200, ok_body(("positive", "negative"), logprobs=lp, usage=(12, 4))))
    reply = run_ask(script, n=2, logprobs=True, top_logprobs=2, temperature=0.7, max_tokens=5)
    req = script.requests[0]
    body = json.loads(req.content)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7,
                    "max_tokens": 5, "n": 2, "logprobs": True, "top_logprobs": 2}
    assert req.headers["Idempotency-Key"] == "k1"
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert str(req.url) == "http://fake/v1/chat/completions"
    assert reply.texts == ["positive", "negative"]
    assert reply.logprobs == [{"token": "pos", "logprob": -0.1, "top_logprobs": [
        {"token": "pos", "logprob": -0.1}, {"token": "neg", "logprob": -2.4}]}]
    assert (reply.tokens_in, reply.tokens_out, reply.retries) == (12, 4, 0)
    assert KEY not in json.dumps(reply.raw)


def test_429_honours_retry_after_then_succeeds():
    sleeps = []
    script = Script((429, {"error": {"message": "slow down"}}, {"Retry-After": "3"}), (200, ok_body()))
    reply = run_ask(script, sleeps)
    assert sleeps == [3.0]
    assert reply.retries == 1 and reply.texts == ["positive"]
    assert [r.headers["Idempotency-Key"] for r in script.requests] == ["k1", "k1"]   # same key on retry


def test_503_with_http_date_retry_after():
    sleeps = []
    when = email.utils.formatdate(__import__("time").time() + 20, usegmt=True)
    script = Script((503, b"busy", {"Retry-After": when}), (200, ok_body()))
    assert run_ask(script, sleeps).retries == 1
    assert 18 <= sleeps[0] <= 20


def test_transient_failures_are_retried_with_backoff():
    sleeps = []
    script = Script((500, b"oops"), (502, b""), httpx.ConnectError("refused"), (200, b"{truncated"),
                    (200, {"choices": []}))
    with pytest.raises(TeacherUnavailable) as e:
        run_ask(script, sleeps, max_retries=4)
    assert len(script.requests) == 5 and len(sleeps) == 4
    assert all(0 <= s <= 30 for s in sleeps)
    assert "5 attempts" in str(e.value) and "no choices" in str(e.value)   # the last reason is named


def test_timeout_and_garbage_then_ok():
    script = Script(httpx.ReadTimeout("slow"), (200, b"\x00<html>"), (200, {"result": 1}), (200, ok_body()))
    reply = run_ask(script, max_retries=3)
    assert reply.retries == 3


def test_auth_error_is_immediate_and_never_leaks_the_key():
    script = Script((401, {"error": {"message": "Incorrect API key"}}), (200, ok_body()))
    with pytest.raises(TeacherAuthError) as e:
        run_ask(script)
    assert len(script.requests) == 1
    assert "$T_KEY" in str(e.value) and KEY not in str(e.value)


def test_other_4xx_is_unavailable_with_server_message():
    script = Script((400, {"error": {"message": "maximum context length is 8192"}}))
    with pytest.raises(TeacherUnavailable, match="maximum context length is 8192"):
        run_ask(script)
    assert len(script.requests) == 1


def test_huge_body_is_a_transport_failure():
    script = Script((200, b"x" * 2000), (200, ok_body()))

    async def go():
        t = OpenAITeacher(spec(), transport=httpx.MockTransport(script), sleep=_nosleep, max_body_bytes=1000)
        try:
            return await t.ask(TeacherRequest(key="k", messages=[{"role": "user", "content": "x"}], kind="classify"))
        finally:
            await t.aclose()

    assert asyncio.run(go()).retries == 1


async def _nosleep(_):
    return None


def test_missing_env_var_names_it(monkeypatch):
    monkeypatch.delenv("T_KEY")
    with pytest.raises(DistillError, match=r"\$T_KEY is not set"):
        OpenAITeacher(spec())


# -- rate limiter (fake clock) --------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    async def sleep(self, s):
        self.t += s


def test_rpm_spaces_requests_evenly_at_the_limit():
    clock = Clock()
    lim = Limiter(rpm=600, clock=clock, sleep=clock.sleep)

    async def go():
        for _ in range(101):
            await lim.acquire()

    asyncio.run(go())
    # 101 requests at 10/s: the first goes at once, the 100 others take exactly 10 s -> 100% of the limit
    assert clock.t == pytest.approx(10.0)


def test_rpm_concurrent_waiters_queue_in_order():
    clock = Clock()
    lim = Limiter(rpm=60, clock=clock, sleep=clock.sleep)
    waits = [lim.rpm.take(1) for _ in range(4)]
    assert waits == pytest.approx([0.0, 1.0, 2.0, 3.0])


def test_tpm_estimate_is_corrected_by_actual_usage():
    clock = Clock()
    bucket = TokenBucket(rate=100.0, capacity=100.0, clock=clock)   # 6000 TPM
    assert bucket.take(100) == 0.0             # the estimate empties the bucket
    assert bucket.take(50) == pytest.approx(0.5)
    bucket.give_back(100 - 20)                 # the first call used 20 tokens, not 100
    assert bucket.level == pytest.approx(30.0)  # -50 + 80
    lim = Limiter(tpm=6000, clock=clock, sleep=clock.sleep)
    lim.settle(100, 40)
    assert lim.tpm.level == pytest.approx(100.0)   # never above capacity


# -- probabilities, cost, ensemble ----------------------------------------------------------------------------

PSPEC = ProjectSpec(name="p", kind="classify", labels=["positive", "negative", "neutral"])


def test_confidence_from_answer_token_logprobs():
    lps = [{"token": "Rationale: ok\nAnswer: ", "logprob": -0.5, "top_logprobs": []},
           {"token": "pos", "logprob": math.log(0.8),
            "top_logprobs": [{"token": "pos", "logprob": math.log(0.8)}, {"token": "neg", "logprob": math.log(0.1)},
                             {"token": "ne", "logprob": math.log(0.1)}]},
           {"token": "itive", "logprob": math.log(0.5), "top_logprobs": []}]
    text = "Rationale: ok\nAnswer: positive"
    assert answer_token_span(lps, "positive") == [1, 2]
    f = label_fields(PSPEC, TeacherReply(texts=[text], logprobs=lps), "positive")
    assert f["confidence"] == pytest.approx(0.4)         # 0.8 * 0.5, the rationale token excluded
    assert f["rationale"] == "ok"
    # 'ne' is a prefix of negative and neutral: its 0.1 is split between them; 'neg' goes to negative
    assert f["probs"] == pytest.approx({"positive": 0.8, "negative": 0.15, "neutral": 0.05})


def test_first_token_distribution_none_when_nothing_matches():
    pos = {"token": "x", "logprob": 0.0, "top_logprobs": [{"token": "x", "logprob": 0.0}]}
    assert first_token_distribution(pos, ["positive", "negative"]) is None


def test_vote_shares_and_agreement_from_samples():
    f = label_fields(PSPEC, TeacherReply(texts=["positive", "positive", "negative", "banana"]), "positive")
    assert f["probs"] == pytest.approx({"positive": 2 / 3, "negative": 1 / 3, "neutral": 0.0})
    assert f["agreement"] == 0.5                        # 2 of 4 samples agree with the first
    assert f["samples"] == ["positive", "positive", "negative", None]


def test_label_probs_win_and_are_renormalised():
    f = label_fields(PSPEC, TeacherReply(texts=["negative"], label_probs={"positive": 0.2, "negative": 0.6,
                                                                          "neutral": 0.2}), "negative")
    assert f["confidence"] == pytest.approx(0.6)


def test_cost_formula():
    t = spec(price={"input_per_1m": 0.15, "output_per_1m": 0.6, "per_hour": 3.6})
    # 1000 in -> 0.00015, 500 out -> 0.0003, 2 s at $3.6/h -> 0.002
    assert cost_of(t, 1000, 500, 2.0) == pytest.approx(0.00015 + 0.0003 + 0.002)


def test_ensemble_majority_tie_break_and_mean_probs():
    m = [MemberAnswer("a", "positive", {"positive": 0.6, "negative": 0.4, "neutral": 0.0}),
         MemberAnswer("b", "negative", {"positive": 0.1, "negative": 0.9, "neutral": 0.0})]
    c = combine(PSPEC, m)
    # 1-1 tie; mean p(negative) = 0.65 > mean p(positive) = 0.35
    assert c.answer == "negative"
    assert c.probs == pytest.approx({"positive": 0.35, "negative": 0.65, "neutral": 0.0})
    assert c.agreement == 0.5 and c.confidence == pytest.approx(0.65)
    m3 = m + [MemberAnswer("c", "positive", None), MemberAnswer("d", None)]
    c3 = combine(PSPEC, m3)
    assert c3.answer == "positive"                     # 2 votes beat 1; d failed and counts as not agreeing
    assert c3.agreement == 0.5
    assert c3.probs["positive"] == pytest.approx((0.6 + 0.1 + 1.0) / 3)   # c counts as one-hot
    assert combine(PSPEC, [MemberAnswer("a", None), MemberAnswer("b", None)]) is None


def test_tpm_waiters_use_returned_over_estimates():
    """Estimates of 300 tokens, real usage 50: settling returns 250 per call, and the queued requests use
    them at once instead of waiting out the over-estimate. Real time: rate 1000 tokens/s."""
    lim = Limiter(tpm=60_000)          # 1000 tokens per second, capacity 1000

    async def call():
        await lim.acquire(300)
        await asyncio.sleep(0.005)     # the request
        lim.settle(300, 50)

    async def go():
        t0 = time.monotonic()
        await asyncio.gather(*(call() for _ in range(60)))
        return time.monotonic() - t0

    elapsed = asyncio.run(go())
    # 60 x 50 real tokens = 3000 = 3 s at the limit, minus the 1000-token start capacity: ~2 s. Charged
    # by the estimate alone it would be 60 x 300 = 18000 tokens = ~17 s.
    assert 1.5 < elapsed < 4.0, elapsed
