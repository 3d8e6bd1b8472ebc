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

from shardinfer.engine.llm import LLM
from shardinfer.engine.request import Request
from shardinfer.engine.sampling import SamplingParams

log = logging.getLogger("shardinfer")


class QueueFull(Exception):
    """More requests are waiting than the server accepts (answered with 429)."""


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


class AsyncEngine:
    def __init__(self, llm: LLM, max_waiting: int = 256):
        self.llm, self.max_waiting = llm, max_waiting
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[int, Handle] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardinfer-engine", daemon=True)
        self._thread.start()

    @property
    def metrics(self):
        return self.llm.metrics

    def waiting(self) -> int:
        return self._inbox.qsize() + len(self.llm.scheduler.waiting)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        """Validates and queues one request (ValueError for bad input, QueueFull when full)."""
        if self.waiting() >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} requests are already waiting")
        request = self.llm.new_request(prompt_ids, params)
        handle = Handle(request, asyncio.Queue(), asyncio.get_running_loop())
        self._inbox.put(("add", handle))
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
        scheduler = self.llm.scheduler
        while not self._stopping.is_set():
            block = not scheduler.has_work()
            try:
                while True:  # take everything that arrived; wait only when idle
                    kind, handle = self._inbox.get(block=block, timeout=0.1 if block else None)
                    block = False
                    if kind == "add":
                        self._handles[id(handle.request)] = handle
                        scheduler.add(handle.request)
                    elif kind == "abort" and id(handle.request) in self._handles:
                        scheduler.abort(handle.request)
                        del self._handles[id(handle.request)]
            except queue.Empty:
                pass
            if not scheduler.has_work():
                continue
            try:
                touched = scheduler.step()
            except Exception:  # a device failure: fail what is in flight, keep serving
                log.exception("engine step failed; failing %d requests", len(self._handles))
                for handle in list(self._handles.values()):
                    scheduler.abort(handle.request)
                    self._emit(handle, Event("", list(handle.request.output_ids), "error"))
                self._handles.clear()
                continue
            for request in touched:
                handle = self._handles.get(id(request))
                if handle is None:
                    continue
                delta = request.take_delta()
                self._emit(handle, Event(delta, list(request.output_ids), request.finish_reason))
                if request.done:
                    del self._handles[id(request)]

    @staticmethod
    def _emit(handle: Handle, event: Event) -> None:
        handle.loop.call_soon_threadsafe(handle.events.put_nowait, event)
