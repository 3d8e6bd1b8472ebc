"""The embedding twin of async_engine.py: HTTP handlers await `embed(rows)`, worker threads own
the devices.

One worker thread per Embedder (each on its own sub-mesh with `--replicas`) takes the oldest
waiting request and whatever else has queued behind it, up to `max_batch` rows, and embeds
them in one call: requests that arrive together share a batch, and an idle replica takes the
next one (JAX releases the GIL while the devices run). Nothing but a worker touches its
Embedder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import Sequence

import numpy as np

from shardinfer.embedder import Embedder
from shardinfer.serving.async_engine import EngineDown, QueueFull

log = logging.getLogger("shardinfer")


@dataclasses.dataclass
class _Job:
    rows: list[np.ndarray]  # checked token ids, one array per input
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def settle(self, vectors: np.ndarray | None, error: BaseException | None = None) -> None:
        def resolve() -> None:
            if self.future.done():  # the client went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(vectors)

        self.loop.call_soon_threadsafe(resolve)


class AsyncEmbedder:
    def __init__(self, embedders: Embedder | Sequence[Embedder], max_waiting: int = 256):
        self.embedders = [embedders] if isinstance(embedders, Embedder) else list(embedders)
        if not self.embedders:
            raise ValueError("AsyncEmbedder needs at least one Embedder")
        self.max_waiting = max_waiting
        self.observer = None  # a ServingMetrics (serving/prometheus.py) once a server owns us
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._open = 0  # requests queued or being embedded
        self._open_lock = threading.Lock()
        self.down: str | None = None
        self._threads = [
            threading.Thread(target=self._work, args=(e, str(i)), name=f"embedder-{i}", daemon=True)
            for i, e in enumerate(self.embedders)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def embedder(self) -> Embedder:
        """The first replica: its tokenizer, limits and checks are every replica's."""
        return self.embedders[0]

    async def embed(self, rows: list[np.ndarray]) -> np.ndarray:
        """float32 [len(rows), dim] for checked token rows (`Embedder.check_tokens`)."""
        if self.down is not None:
            raise EngineDown(self.down)
        with self._open_lock:
            if self._open >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            self._open += 1
        loop = asyncio.get_running_loop()
        job = _Job(rows, loop.create_future(), loop)
        self._jobs.put(job)
        try:
            return await job.future
        finally:
            with self._open_lock:
                self._open -= 1

    def busy(self) -> bool:
        return self._open > 0

    def stop(self) -> None:
        self.down = "the server is shutting down"
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        while True:  # anything queued after the stop signals: refused, never left waiting
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.settle(None, EngineDown(self.down))

    def _work(self, embedder: Embedder, replica: str) -> None:
        while (job := self._jobs.get()) is not None:
            jobs, rows = [job], len(job.rows)
            while rows < embedder.max_batch:  # what queued behind it joins the batch
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # stopping: leave the signal for this loop's next turn
                    self._jobs.put(None)
                    break
                jobs.append(more)
                rows += len(more.rows)
            try:
                vectors = embedder.embed_tokens([row for j in jobs for row in j.rows])
            except Exception as e:  # a device failure: fail these requests, keep serving
                log.exception("embedding %d rows failed", rows)
                for j in jobs:
                    j.settle(None, RuntimeError(f"embedding failed: {e}"))
                continue
            at = 0
            for j in jobs:
                j.settle(vectors[at : at + len(j.rows)])
                at += len(j.rows)
            if self.observer is not None:
                self.observer.embedded_inputs.labels(replica=replica).inc(rows)
                tokens = sum(len(row) for j in jobs for row in j.rows)
                self.observer.embedded_tokens.labels(replica=replica).inc(tokens)
