"""AsyncEngine: one thread owns the Engine; the server's event loop reaches it only through this.

Every TVM call, the KV cache and the scheduler stay on that thread, which runs `Engine.step()` while any
request is queued or running, so all clients share continuous batching. Callers send closures (submit,
cancel) through a queue; each step's events go back through the `deliver` callback of their request.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable

from .engine import Engine
from .sampling import SamplingParams
from .scheduler import Event, Request

log = logging.getLogger("gptbc.engine")


class AsyncEngine:
    """Owns the Engine on one thread; everything else reaches it through `call`, `submit` and `cancel`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.sinks: dict[int, Callable[[Event | Exception], None]] = {}  # request id → deliver
        self.gauges: dict[str, int] = engine.status()  # read by other threads: replaced whole, never mutated
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="gptbc-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.commands.put(None)
        self.thread.join(timeout=30)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread, between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def command():
            try:
                fut.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                fut.set_exception(err)

        self.commands.put(command)
        return fut

    def submit(self, ids: list[int], params: SamplingParams, deliver: Callable) -> concurrent.futures.Future:
        """Queue a request on the engine thread; the future gives its Request (or the error that refused it)."""
        def start() -> Request:
            req = self.engine.submit(ids, params=params)
            if req.finish_reason is not None:  # max_tokens 0: nothing to run
                deliver(Event(req, None, "", True))
            else:
                self.sinks[req.id] = deliver
            return req

        return self.call(start)

    def cancel(self, req: Request) -> None:
        def stop():
            self.sinks.pop(req.id, None)
            self.engine.cancel(req)

        self.commands.put(stop)

    def _run(self) -> None:
        while True:
            try:
                command = self.commands.get(block=not self.engine.has_work())
                while True:
                    if command is None:
                        return
                    command()
                    command = self.commands.get_nowait()
            except queue.Empty:
                pass
            if self.engine.has_work():
                self._step()
            self.gauges = self.engine.status()

    def _step(self) -> None:
        engine = self.engine
        try:
            events = engine.step()
        except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
            log.exception("engine step failed")
            for req in engine.cancel_all():
                deliver = self.sinks.pop(req.id, None)
                if deliver is not None:
                    deliver(err)
            return
        self.steps += 1
        for event in events:
            deliver = self.sinks.get(event.request.id)
            if deliver is not None:
                deliver(event)
                if event.finished:
                    del self.sinks[event.request.id]
