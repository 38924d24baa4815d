"""Dynamic micro-batching: many small concurrent requests become one model call.

Why: an encoder forward over 32 texts costs far less than 32 forwards of one (the matmuls get wide
enough to use the CPU's vector units, and per-call overhead is paid once).

How it adapts to load (no timer by default): the worker takes the first request, then everything already
queued (up to ``max_batch`` texts), and runs one ``fn(texts)`` in a worker thread, so the event loop keeps
accepting requests. While that call runs, new requests queue up and become the next batch. A lone request
therefore waits for nothing (measured: the old fixed 5 ms window was more than half of a single request's
latency), and under load the batch grows by itself to what arrived during one forward pass -- the
continuous batching of TEI and vLLM, for an encoder. ``max_wait_ms > 0`` adds a fixed window after the first
request for users who want fuller batches at the price of latency.

One worker, one model call at a time: two concurrent forwards on a 2-core CPU are slower than two
sequential ones. ``drain()`` waits until every submitted request has its answer, which is what a hot model
swap needs: new requests go to the new model's batcher, the old one finishes what it has.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

Fn = Callable[[list[str]], Sequence[Any]]


class MicroBatcher:
    def __init__(self, fn: Fn, max_batch: int = 32, max_wait_ms: float = 0.0):
        """``fn(texts) -> one result per text`` (a list, or an array whose rows are the texts), called with up
        to ``max_batch`` texts (more when a single request is bigger: requests are never split)."""
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._outstanding = 0       # submitted requests without an answer yet
        self._idle: asyncio.Event | None = None
        self.batches = 0            # model calls made
        self.batched_texts = 0      # texts they covered (batched_texts / batches = mean batch size)
        self.last_batch = 0         # texts in the latest call (a gauge for /metrics)

    async def submit(self, texts: Sequence[str]) -> Sequence[Any]:
        # Counted before the first await: a swap that reads ``outstanding`` right after replacing the batcher
        # sees every request that picked this one.
        self._outstanding += 1
        try:
            if self._worker is None or self._worker.done():
                self._queue = asyncio.Queue()
                self._idle = asyncio.Event()
                self._worker = asyncio.get_running_loop().create_task(self._run())
            fut = asyncio.get_running_loop().create_future()
            self._queue.put_nowait((list(texts), fut))
            return await fut
        finally:
            self._outstanding -= 1
            if self._outstanding == 0 and self._idle is not None:
                self._idle.set()

    @property
    def queued(self) -> int:
        """Requests waiting for a model call (for /metrics)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every submitted request has been answered; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self._outstanding and time.monotonic() < deadline:
            assert self._idle is not None
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        return self._outstanding == 0

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            pending = [first]
            n = len(first[0])
            # everything that is already waiting joins, without waiting for more
            while n < self.max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                pending.append(item)
                n += len(item[0])
            if self.max_wait_s > 0:
                deadline = time.monotonic() + self.max_wait_s
                while n < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                    pending.append(item)
                    n += len(item[0])
            await self._call(pending)

    async def _call(self, pending: list) -> None:
        texts = [t for ts, _ in pending for t in ts]
        try:
            out = await asyncio.to_thread(self.fn, texts)
        except Exception as e:   # every waiting request gets the error; the worker keeps running
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(e)
            return
        self.batches += 1
        self.batched_texts += len(texts)
        self.last_batch = len(texts)
        i = 0
        for ts, fut in pending:
            j = i + len(ts)
            if not fut.done():      # the client may have gone away (cancelled)
                fut.set_result(out[i:j])
            i = j
