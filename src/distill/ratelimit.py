"""Client-side rate limits for teacher calls: requests per minute, tokens per minute, and requests in flight.

Why client side: a provider answers requests beyond its limit with 429, and every 429 costs a round trip
plus a Retry-After pause. Spacing requests evenly at the limit gets (almost) the full quota without
tripping it. Each limit is a token bucket that may go into debt: ``acquire`` takes its tokens at once and
sleeps until the bucket would have had them. Taking first and sleeping after makes waiters queue in
arrival order (no thundering herd when a slot frees) and needs no lock: between two ``await`` points an
asyncio coroutine runs alone.

- RPM bucket: capacity 1 request, so requests leave evenly spaced at ``rpm/60`` per second and never burst
  (a burst at the start would count against the provider's window and come back as 429s).
- TPM bucket: charged with an *estimate* before the call (prompt tokens + ``max_tokens`` * n); after the
  call ``settle`` returns the difference to the actual usage, so over-estimates do not waste quota: TPM
  waiters queue in order and the head re-checks the bucket whenever tokens come back (``_acquire_tokens``).
  Capacity is one second of tokens, but a single request larger than that is allowed (it just waits).
- Concurrency: a semaphore of ``concurrency`` slots (``Limiter.slots``) bounds the inputs in flight
  (memory, sockets, and the provider's own concurrency limits). The labeller takes a slot before it
  starts an input and gives it back when the input's work is committed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from distill.task import TeacherSpec


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` saved up; the level may go negative (debt)."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be > 0")
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.level = capacity
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, n: float) -> float:
        """Take ``n`` tokens now; return how many seconds the caller must wait before using them."""
        self._refill()
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def give_back(self, n: float) -> None:
        """Return (n > 0) or charge extra (n < 0) tokens after the fact, e.g. estimate minus actual usage."""
        self._refill()
        self.level = min(self.capacity, self.level + n)


class Limiter:
    """RPM + TPM + concurrency for one teacher. ``None`` limits are off.

    Usage: the labeller holds one of ``limiter.slots`` for each input in flight; the HTTP teacher
    calls ``await limiter.acquire(tokens)`` before *each* HTTP attempt (retries count against the
    provider's limits too) and ``limiter.settle(estimate, actual)`` after a successful one."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, concurrency: int = 8, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.rpm = TokenBucket(rpm / 60.0, 1.0, clock) if rpm else None
        self.tpm = TokenBucket(tpm / 60.0, tpm / 60.0, clock) if tpm else None
        self.concurrency = concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self._sleep = sleep
        self._tpm_lock: asyncio.Lock | None = None     # created on first use, inside the running loop
        self._tpm_returned: asyncio.Event | None = None
        self.waited_s = 0.0          # total time spent waiting for the rate limits (reported by the bench)

    @classmethod
    def from_spec(cls, spec: TeacherSpec) -> "Limiter":
        return cls(rpm=spec.rpm, tpm=spec.tpm, concurrency=spec.concurrency)

    async def acquire(self, tokens: float = 0.0) -> None:
        """Wait until one more request (of about ``tokens`` tokens) fits both limits."""
        if self.rpm is not None:
            wait = self.rpm.take(1.0)
            if wait > 0:
                self.waited_s += wait
                await self._sleep(wait)
        if self.tpm is not None and tokens > 0:
            await self._acquire_tokens(tokens)

    async def _acquire_tokens(self, n: float) -> None:
        """TPM, unlike RPM, cannot compute each waiter's wait up front: the estimates it is charged with are
        worst cases (prompt + max_tokens), and most of them come back in ``settle`` moments later. A wait
        fixed at ``take`` time would ignore what comes back (measured: 0.64 of a 30k TPM limit with
        max_tokens 256 and ~56-token answers). So waiters queue on a FIFO lock; the one at the head waits
        until the bucket is out of debt -- woken early whenever a settle returns tokens -- then takes its
        estimate, possibly into debt again."""
        if self._tpm_lock is None:
            self._tpm_lock, self._tpm_returned = asyncio.Lock(), asyncio.Event()
        async with self._tpm_lock:
            while True:
                self.tpm._refill()
                if self.tpm.level >= 0:
                    self.tpm.level -= n
                    return
                wait = -self.tpm.level / self.tpm.rate
                self._tpm_returned.clear()
                t0 = self.tpm.clock()
                sleeper = asyncio.ensure_future(self._sleep(wait))
                woken = asyncio.ensure_future(self._tpm_returned.wait())
                await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
                for f in (sleeper, woken):
                    f.cancel()
                self.waited_s += self.tpm.clock() - t0

    def settle(self, estimated: float, actual: float) -> None:
        """Correct the TPM bucket once the real usage is known (and wake a waiter if tokens came back)."""
        if self.tpm is not None:
            self.tpm.give_back(estimated - actual)
            if estimated > actual and self._tpm_returned is not None:
                self._tpm_returned.set()


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """A tokenizer-free estimate: ~4 characters per token for English plus a few tokens of chat framing
    per message. Only used for rate limiting and budget checks, both of which are corrected afterwards."""
    return sum(len(m.get("content") or "") // 4 + 4 for m in messages) + 2
