"""The HTTP router's view of its backends: which are healthy, which models each serves, how
busy each is and how fast it generates.

One asyncio task polls every backend each `interval` seconds: GET /health (and, while
healthy, /metrics; /v1/models when it comes up). A backend that refuses the connection (its
process is gone) leaves the pool at that poll, within `interval` (1 s by default), or sooner
when a request cannot connect to it; one that fails or does not answer within `timeout` two
polls in a row leaves at the second, within 2 x (interval + timeout) (4 s by default): a
loaded backend may miss one poll. It comes back at the first poll that succeeds.

Load is what the router has in flight there (tokens still to come: max_tokens less the chunks
already passed on), or what the backend reports, whichever is larger (the report includes the
router's own requests, but lags by up to one poll). Free slots are the backend's
`shardinfer_slots - shardinfer_live_slots - shardinfer_queue_length`, less what the router sent
since; a backend that does not report them (a vLLM server) has free slots unknown. Speed is the
growth of its generated-tokens counter (`vllm:generation_tokens_total`, which shardinfer and
vLLM both expose) between two polls while it had work, smoothed: under sustained load that is
its throughput, so a backend twice as fast shows twice the speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shardinfer.serving.balance import Load, ewma

log = logging.getLogger("shardinfer")


@dataclasses.dataclass
class Backend:
    url: str
    healthy: bool = False
    models: tuple[str, ...] = ()
    in_flight: int = 0  # requests the router has open there
    in_flight_tokens: float = 0.0  # tokens still to come for them
    sent_since_poll: int = 0
    reported_free: int | None = None
    reported_waiting: int = 0
    reported_outstanding: float = 0.0
    speed: float | None = None  # generated tokens/s
    error: str | None = None  # why it is out of the pool
    failed_polls: int = 0  # in a row
    _generated: tuple[float, float] | None = None  # (time, counter) at the last poll
    _busy_at_poll: bool = False

    def load(self) -> Load:
        free = None
        if self.reported_free is not None:
            free = self.reported_free - self.sent_since_poll
        outstanding = max(self.in_flight_tokens, self.reported_outstanding)
        return Load(free, outstanding, self.reported_waiting, self.speed)

    def mark_down(self, why: str) -> None:
        if self.healthy:
            log.warning("backend %s left the pool: %s", self.url, why)
        self.healthy, self.error = False, why

    def read_metrics(self, text: str, now: float) -> None:
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in _WANTED:
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
        if "shardinfer_slots" in values:
            self.reported_free = int(
                values["shardinfer_slots"]
                - values.get("shardinfer_live_slots", 0)
                - values.get("shardinfer_queue_length", 0)
            )
        self.reported_waiting = int(values.get("vllm:num_requests_waiting", 0))
        self.reported_outstanding = values.get("shardinfer_outstanding_tokens", 0.0)
        running = values.get("vllm:num_requests_running", 0) + self.reported_waiting
        busy = running > 0 or self.in_flight > 0
        counter = values.get("vllm:generation_tokens_total")
        if counter is not None:
            if self._generated is not None and (busy and self._busy_at_poll):
                then, before = self._generated
                if now > then and counter >= before:
                    self.speed = ewma(self.speed, (counter - before) / (now - then))
            self._generated = (now, counter)
        self._busy_at_poll = busy
        self.sent_since_poll = 0


_WANTED = {
    "shardinfer_slots",
    "shardinfer_live_slots",
    "shardinfer_queue_length",
    "shardinfer_outstanding_tokens",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:generation_tokens_total",
}


class Pool:
    """The backends and the task that polls them."""

    def __init__(self, urls: list[str], client: httpx.AsyncClient, headers: dict[str, str],
                 interval: float = 1.0, timeout: float = 1.0):  # fmt: skip
        if not urls:
            raise ValueError("the router needs at least one --backend URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"backend {url!r} is not an http:// or https:// URL")
        if len(set(urls)) != len(urls):
            raise ValueError("a backend URL is given twice")
        self.backends = [Backend(url.rstrip("/")) for url in urls]
        self.client, self.headers = client, headers
        self.interval, self.timeout = interval, timeout
        self._task: asyncio.Task | None = None

    def healthy(self, model: str | None = None) -> list[Backend]:
        return [b for b in self.backends if b.healthy and (model is None or model in b.models)]

    def models(self) -> list[str]:
        return sorted({m for b in self.backends if b.healthy for m in b.models})

    async def start(self) -> None:
        await self.poll_all()  # the first look before the first request
        self._task = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.poll_all()

    async def poll_all(self) -> None:
        await asyncio.gather(*(self._poll(b) for b in self.backends))

    async def _poll(self, backend: Backend) -> None:
        timeout = httpx.Timeout(self.timeout)
        try:
            health = await self.client.get(backend.url + "/health", timeout=timeout)
            if health.status_code != 200:
                raise _Unhealthy(f"/health answered {health.status_code}")
            if not backend.healthy or not backend.models:
                models = await self.client.get(backend.url + "/v1/models", headers=self.headers,
                                               timeout=timeout)  # fmt: skip
                models.raise_for_status()
                backend.models = tuple(card["id"] for card in models.json()["data"])
            metrics = await self.client.get(backend.url + "/metrics", timeout=timeout)
            if metrics.status_code == 200:
                backend.read_metrics(metrics.text, time.monotonic())
        except (httpx.HTTPError, _Unhealthy, ValueError, KeyError) as e:
            backend.failed_polls += 1
            # Refused: the process is gone, out at once. Slow or odd: a loaded backend may miss
            # one poll, so out at the second in a row.
            if isinstance(e, httpx.ConnectError) or backend.failed_polls >= 2:
                backend.mark_down(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            return
        backend.failed_polls = 0
        if not backend.healthy:
            log.info("backend %s is in the pool (models %s)", backend.url, backend.models)
        backend.healthy, backend.error = True, None


class _Unhealthy(Exception):
    pass
