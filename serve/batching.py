"""Dynamic batching: requests that arrive within a short window are decoded together.

One worker thread owns the model. It waits for a first request, then up to ``window`` seconds (or
until ``max_batch_size`` requests are there) for others, routes the ``auto`` requests of the batch
together (each row still routed on its own), makes sure their adapters are loaded, and decodes
the whole batch in one loop with per-row adapters (:mod:`cladapt.serve.engine`).

Admission is bounded: at most ``max_queue`` requests may be admitted and unfinished; one more
gets :class:`QueueFull`, which the server answers with 503 and ``Retry-After`` instead of letting
waits grow without bound. When a batch needs more distinct adapters than the cache holds, it is
split: the requests that do not fit go back to the front of the queue, in order.

With ``continuous`` on (the default), requests that arrive while a batch decodes join it between
two decoding steps, in arrival order, as long as the request at the head of the queue can join:
a text request whose adapter is already loaded (an ``auto`` one is routed first). A request that
needs an adapter loaded, or an image request, stops the joining; the batch then drains and the
next batch starts with it, so nothing waits behind a stream of joiners.

Requests talk to the worker through a :class:`Sink` (thread-safe, bridged to asyncio by the app).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cladapt.errors import CladaptError
from cladapt.serve.engine import Engine, Result, Row, Sampling

logger = logging.getLogger(__name__)


class QueueFull(CladaptError):
    """The server has ``max_queue`` unfinished requests already."""

    http_status = 503


class Sink(Protocol):
    """Where one request's events go (called from the worker thread)."""

    def started(self, job: Job) -> None: ...
    def text(self, delta: str) -> None: ...
    def done(self, result: Result) -> None: ...
    def failed(self, error: BaseException) -> None: ...


@dataclass
class Job:
    """One admitted request.

    ``key`` is the cache key of its adapter (None: the base model); for ``auto`` requests the
    planner fills ``key``, ``label`` and ``route`` before decoding.
    """

    model: str
    prompt_ids: list[int]
    prompt_text: str
    sampling: Sampling
    sink: Sink
    stream: bool = False
    key: str | None = None
    label: str = "base"
    route: dict[str, Any] | None = None
    needs_route: bool = False
    #: an image request: pixel tensors and token-aligned extras from the processor (see Row)
    vision: dict[str, Any] | None = None
    token_extras: dict[str, list[int]] | None = None
    finished: bool = False
    cancelled: bool = False  # set by the app when the client disconnects
    enqueued: float = field(default_factory=time.perf_counter)


class Planner(Protocol):
    """What the batcher needs from the server: routing, capacity, loading."""

    def route(self, jobs: Sequence[Job]) -> None:
        """Fill key/label/route of ``auto`` jobs (raise per batch, or call ``job.sink.failed``)."""
        ...

    def room_for(self, keys: set[str]) -> bool: ...
    def ensure(self, keys: Sequence[str]) -> list[str]: ...

    def loaded_name(self, key: str) -> str | None:
        """The PEFT name of ``key`` when it is loaded already (marked as used), else None."""
        ...


class Batcher:
    """The queue and the worker thread that decodes batches."""

    def __init__(
        self,
        engine: Engine,
        planner: Planner,
        *,
        max_batch_size: int = 8,
        window_s: float = 0.01,
        max_queue: int = 64,
        continuous: bool = True,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.planner = planner
        self.max_batch_size = max_batch_size
        self.continuous = continuous
        self.window_s = window_s
        self.max_queue = max_queue
        self._observe = observe or (lambda _name, _value: None)
        self._queue: deque[Job] = deque()
        self._pending = 0  # admitted and not finished (queued + running)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cladapt-batcher", daemon=True)

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job: Job) -> None:
        """Admit ``job`` or raise :class:`QueueFull`."""
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests are in flight (max_queue {self.max_queue})")
            self._pending += 1
            self._queue.append(job)
            self._observe("queue", self._pending)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` between batches (admin: load/unload adapters, reload) and return its value."""
        with self.engine.lock:
            return fn()

    # ------------------------------------------------------------------ worker

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                self._process(batch)
            except Exception as exc:  # a bug must fail the batch's requests, not kill the server
                logger.exception("batch failed")
                for job in batch:
                    self.fail(job, exc)

    def _collect(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop and not self._queue:
                return None
            deadline = self._queue[0].enqueued + self.window_s
            while len(self._queue) < self.max_batch_size and not self._stop:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]

    def _process(self, batch: list[Job]) -> None:
        with self.engine.lock:
            for job in batch:
                if job.cancelled:  # its client left while it waited
                    self.fail(job, CladaptError("the client disconnected"))
            batch = [j for j in batch if not j.finished]
            auto = [j for j in batch if j.needs_route]
            if auto:
                t0 = time.perf_counter()
                try:
                    self.planner.route(auto)
                except Exception as exc:
                    for job in auto:
                        self.fail(job, exc)
                    batch = [j for j in batch if not j.needs_route]
                self._observe("route_seconds", (time.perf_counter() - t0) / max(len(auto), 1))
            batch = [j for j in batch if not j.finished]
            batch = self._fit_capacity(batch)
            if not batch:
                return
            names = self._load(batch)
            batch = [j for j in batch if not j.finished]
            if not batch:
                return
            rows = [self._row(job, names) for job in batch]
            for job in batch:
                job.sink.started(job)
            self._observe("batch_size", len(rows))
            try:
                self.engine.run(rows, join=self._join if self.continuous else None)
            except Exception as exc:
                for job in batch:
                    self.fail(job, exc)
                raise

    def _join(self, live: int) -> list[Row]:
        """Queued requests that join the running batch now (engine hook, between decoding steps).

        Takes from the head of the queue in order and stops at the first request that cannot join
        (its adapter is not loaded, or it has an image), so that request starts the next batch.
        """
        from cladapt.serve.engine import BASE

        rows: list[Row] = []
        while live + len(rows) < self.max_batch_size:
            with self._cond:
                job = self._queue[0] if self._queue else None
            if job is None or job.vision is not None:
                break
            if job.cancelled and not job.finished:
                self.fail(job, CladaptError("the client disconnected"))
            if not job.finished and job.needs_route:
                t0 = time.perf_counter()
                try:
                    with self.engine.plain():  # routing runs the model without the batch's adapter hooks
                        self.planner.route([job])
                except Exception as exc:
                    self.fail(job, exc)
                self._observe("route_seconds", time.perf_counter() - t0)
            if job.finished:
                self._pop(job)
                continue
            name = BASE if job.key is None else self.planner.loaded_name(job.key)
            if name is None:
                break
            self._pop(job)
            job.sink.started(job)
            rows.append(self._row(job, {job.key: name} if job.key else {}))
        if rows:
            self._observe("joined", len(rows))
        return rows

    def _pop(self, job: Job) -> None:
        with self._cond:
            if self._queue and self._queue[0] is job:
                self._queue.popleft()

    def _load(self, batch: list[Job]) -> dict[str, str]:
        """Cache key -> PEFT name for the batch; an adapter that fails to load fails only its own requests."""
        keys = sorted({j.key for j in batch if j.key is not None})
        try:
            return dict(zip(keys, self.planner.ensure(keys), strict=True))
        except Exception:
            logger.warning("loading %s failed; retrying one adapter at a time", keys)
        names: dict[str, str] = {}
        for key in keys:
            try:
                names[key] = self.planner.ensure([*names, key])[-1]
            except Exception as exc:
                for job in batch:
                    if job.key == key:
                        self.fail(job, exc)
        return names

    def _fit_capacity(self, batch: list[Job]) -> list[Job]:
        """The longest prefix-respecting subset whose adapters fit the cache; the rest is re-queued."""
        keep: list[Job] = []
        later: list[Job] = []
        keys: set[str] = set()
        for job in batch:
            wanted = keys | ({job.key} if job.key else set())
            if not later and self.planner.room_for(wanted):
                keep.append(job)
                keys = wanted
            else:
                later.append(job)
        if later:
            with self._cond:
                self._queue.extendleft(reversed(later))
        return keep

    def _row(self, job: Job, names: dict[str, str]) -> Row:
        from cladapt.serve.engine import BASE

        def done(result: Result) -> None:
            self._finish(job)
            self._observe("latency", time.perf_counter() - job.enqueued)
            job.sink.done(result)

        return Row(
            prompt_ids=job.prompt_ids,
            adapter=names[job.key] if job.key else BASE,
            sampling=job.sampling,
            on_done=done,
            on_text=job.sink.text if job.stream else None,
            cancelled=lambda: job.cancelled,
            vision=job.vision,
            token_extras=job.token_extras,
        )

    def _finish(self, job: Job) -> None:
        if job.finished:
            return
        job.finished = True
        with self._cond:
            self._pending -= 1
            self._observe("queue", self._pending)

    def fail(self, job: Job, error: BaseException) -> None:
        """Answer ``job`` with ``error`` (once) and release its admission slot."""
        if job.finished:
            return
        self._finish(job)
        job.sink.failed(error)
