"""Dynamic micro-batching: many small concurrent requests become one model call.

Why: an encoder forward over 32 texts costs far less than 32 forwards of one (the matmuls get wide
enough to use the CPU's vector units, and per-call overhead is paid once). The batcher waits for the
first request, then keeps gathering for at most ``max_wait_ms`` or until ``max_batch`` texts are queued,
runs one ``fn(texts)`` in a worker thread (so the event loop keeps accepting requests), and hands each
request its rows. With one request in flight it adds at most ``max_wait_ms`` of latency.

One worker, one model call at a time: two concurrent forwards on a 2-core CPU are slower than two
sequential ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Sequence

import numpy as np

Fn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


class MicroBatcher:
    def __init__(self, fn: Fn, max_batch: int = 32, max_wait_ms: float = 5.0):
        """``fn(texts) -> (logits [N, L], features [N, D])``, called with up to ``max_batch`` texts (more
        when a single request is bigger: requests are never split)."""
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0            # model calls made
        self.batched_texts = 0      # texts they covered (batched_texts / batches = mean batch size)

    async def submit(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((list(texts), fut))
        return await fut

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
            logits, feats = await asyncio.to_thread(self.fn, texts)
        except Exception as e:   # every waiting request gets the error; the worker keeps running
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(e)
            return
        self.batches += 1
        self.batched_texts += len(texts)
        i = 0
        for ts, fut in pending:
            j = i + len(ts)
            if not fut.done():      # the client may have gone away (cancelled)
                fut.set_result((logits[i:j], feats[i:j]))
            i = j
