"""The master/worker split for serving: one thread owns the engine, handlers only use queues.

HTTP handlers (on the asyncio loop) `submit` requests and read events back from an asyncio
queue; the engine thread admits them between decode steps, so a new request's first token
never waits for the others to finish. Nothing but the engine thread touches the scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

from shardinfer.engine.core import EngineCore
from shardinfer.engine.llm import LLM
from shardinfer.engine.request import Request
from shardinfer.engine.sampling import SamplingParams

log = logging.getLogger("shardinfer")


class QueueFull(Exception):
    """More requests are waiting than the server accepts (answered with 429)."""


class EngineDown(Exception):
    """The engine cannot run steps any more (a process of its mesh died): answered with 503."""


@dataclasses.dataclass
class Event:
    delta: str  # new text
    token_ids: list[int]  # all generated so far
    finish_reason: str | None  # set on the last event


@dataclasses.dataclass
class Handle:
    request: Request
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    tokens_seen: int = 0


class AsyncEngine:
    def __init__(self, llm: LLM, max_waiting: int = 256, replica: str = "0"):
        self.llm, self.max_waiting, self.replica = llm, max_waiting, replica
        self.observer = None  # a ServingMetrics (serving/prometheus.py) once a server owns us
        self._outstanding = 0  # tokens still to generate for requests queued or in slots
        self._outstanding_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[int, Handle] = {}
        self._stopping = threading.Event()
        self.down: str | None = None  # why the engine can no longer run, once it cannot
        self._thread = threading.Thread(target=self._run, name="shardinfer-engine", daemon=True)
        self._thread.start()

    @property
    def core(self) -> EngineCore:
        return self.llm.core

    @property
    def metrics(self):
        return self.llm.metrics

    @property
    def engines(self) -> list[AsyncEngine]:
        return [self]

    def waiting(self) -> int:
        return self._inbox.qsize() + self.core.num_waiting()

    def free_slots(self) -> int:
        """Slots a new request could take at once (negative: that many are queued for one)."""
        return self.metrics.slots - self.metrics.live_slots - self.waiting()

    def load(self) -> int:
        """Outstanding work: tokens still to generate for everything queued or in a slot."""
        return self._outstanding

    def _owe(self, tokens: int) -> None:
        with self._outstanding_lock:
            self._outstanding += tokens

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        """Validates and queues one request (ValueError for bad input, QueueFull when full)."""
        if self.down is not None:
            raise EngineDown(self.down)
        if self.waiting() >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} requests are already waiting")
        request = self.core.make_request(self.core.prompt_ids(prompt_ids), params)
        handle = Handle(request, asyncio.Queue(), asyncio.get_running_loop(), self)
        self._owe(request.params.max_tokens)
        self._inbox.put(("add", handle))
        if self.down is not None:  # went down while we queued: nobody will take it
            raise EngineDown(self.down)
        return handle

    def abort(self, handle: Handle) -> None:
        """The client went away: free its slot at the next step."""
        self._inbox.put(("abort", handle))

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)

    def busy(self) -> bool:
        return bool(self._handles) or not self._inbox.empty()

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # in a multi-process run, the other processes' `follow` returns
            try:
                self.core.close()
            except Exception:  # they are gone already
                log.warning("could not tell the other processes to stop", exc_info=True)

    def _loop(self) -> None:
        core = self.core
        while not self._stopping.is_set():
            block = not core.has_work()
            try:
                while True:  # take everything that arrived; wait only when idle
                    kind, handle = self._inbox.get(block=block, timeout=0.1 if block else None)
                    block = False
                    if kind == "add":
                        self._handles[id(handle.request)] = handle
                        core.add(handle.request)
                    elif kind == "abort" and id(handle.request) in self._handles:
                        core.abort(handle.request)
                        del self._handles[id(handle.request)]
                        self._settle(handle, "abort")
            except queue.Empty:
                pass
            if not core.has_work():
                try:
                    core.keep_alive()
                except Exception as e:  # a process of the mesh is gone: nothing can run now
                    self._go_down(f"the engine's mesh lost a process: {e}")
                    return
                continue
            try:
                touched = core.step()
            except Exception:  # a device failure: fail what is in flight, keep serving
                log.exception("engine step failed; failing %d requests", len(self._handles))
                for handle in list(self._handles.values()):
                    core.abort(handle.request)
                    self._emit(handle, Event("", list(handle.request.output_ids), "error"))
                    self._settle(handle, "error")
                self._handles.clear()
                continue
            for request in touched:
                handle = self._handles.get(id(request))
                if handle is None:
                    continue
                delta = request.take_delta()
                self._observe_tokens(handle)
                self._emit(handle, Event(delta, list(request.output_ids), request.finish_reason))
                if request.done:
                    del self._handles[id(request)]
                    self._settle(handle, request.finish_reason or "stop")

    def _go_down(self, reason: str) -> None:
        """Fails everything in flight and everything that arrives from now on."""
        log.error("engine down: %s", reason)
        self.down = reason
        while True:
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._handles[id(handle.request)] = handle
        for handle in list(self._handles.values()):
            self._emit(handle, Event("", list(handle.request.output_ids), "error"))
            self._settle(handle, "error")
        self._handles.clear()

    def _observe_tokens(self, handle: Handle) -> None:
        """Latency histograms and outstanding work, as a request's new tokens go out."""
        new = len(handle.request.output_ids) - handle.tokens_seen
        if new <= 0:
            return
        now = time.perf_counter()
        self._owe(-new)
        if self.observer is not None:
            labels = {"replica": self.replica}
            if handle.last_token_at is None:
                self.observer.ttft.labels(**labels).observe(now - handle.submitted)
            else:  # several tokens in one event (stop strings held back): spread the gap
                gap = (now - handle.last_token_at) / new
                for _ in range(new):
                    self.observer.inter_token.labels(**labels).observe(gap)
            self.observer.tokens.labels(**labels).inc(new)
        handle.tokens_seen += new
        handle.last_token_at = now

    def _settle(self, handle: Handle, outcome: str) -> None:
        """The request is over: its unused token budget leaves the load; count the outcome."""
        self._owe(-(handle.request.params.max_tokens - handle.tokens_seen))
        if self.observer is not None:
            self.observer.requests.labels(replica=self.replica, outcome=outcome).inc()

    @staticmethod
    def _emit(handle: Handle, event: Event) -> None:
        handle.loop.call_soon_threadsafe(handle.events.put_nowait, event)
