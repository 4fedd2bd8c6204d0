"""AsyncEngine: one thread owns the Engine; the server's event loop reaches it only through this.

Every TVM call, the KV cache and the scheduler stay on that thread, which runs `Engine.step()` while any
request is queued or running, so all clients share continuous batching. Callers send closures (submit,
cancel) through a queue; each step's events go back through the `deliver` callback of their request.

Supervision. A failure that belongs to one request (its sampling, scoring, sequence start) is the
scheduler's: that request ends with an "error" event and nothing else changes. A step that raises (a runner
call failing for a batch) is logged; every request that step was running gets the error and is cancelled,
freeing its KV pages, and the loop goes on with the waiting ones: recovered. If `max_consecutive_failures`
steps fail in a row, or anything escapes the loop itself (cancelling failed, a bug), the engine is dead:
every pending request and every later call get `EngineDead`, `healthy` turns False (the server's /health
answers 503) and `on_fatal` runs (the server stops the process with a non-zero exit, so an orchestrator
restarts it). Nothing waits forever on a dead thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable

from gptbc.runtime.engine import Engine
from gptbc.errors import GptbcError
from gptbc.runtime.sampling import SamplingParams
from gptbc.runtime.scheduler import Event, Request

log = logging.getLogger("gptbc.runtime.engine")


class EngineDead(GptbcError):
    """The engine thread stopped after a failure it could not recover from."""


class EngineStepError(GptbcError):
    """A step failed for the batch this request was in (the request was cancelled; the engine goes on)."""


class AsyncEngine:
    """Owns the Engine on one thread; everything else reaches it through `call`, `submit` and `cancel`."""

    def __init__(self, engine: Engine, on_fatal: Callable[[BaseException], None] | None = None,
                 max_consecutive_failures: int = 3):
        self.engine = engine
        self.on_fatal = on_fatal
        self.max_consecutive_failures = max_consecutive_failures
        # (command, future or None); None alone stops the thread
        self.commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future | None] | None] = \
            queue.SimpleQueue()
        self.sinks: dict[int, tuple[Request, Callable[[Event | Exception], None]]] = {}  # id → (request, deliver)
        self.gauges: dict[str, int] = engine.status()  # read by other threads: replaced whole, never mutated
        self.steps = 0
        self.step_failures = 0  # steps that raised (recovered or not)
        self.fatal: BaseException | None = None  # set once the engine is dead
        self._consecutive = 0
        self.thread = threading.Thread(target=self._run, name="gptbc-engine", daemon=True)

    @property
    def healthy(self) -> bool:
        return self.fatal is None and (self.thread.is_alive() or not self.thread.ident)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.commands.put(None)
        self.thread.join(timeout=30)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread, between steps. A dead engine answers EngineDead at once."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.fatal is not None:
            fut.set_exception(self._dead())
            return fut
        self.commands.put((fn, fut))
        if self.fatal is not None:  # died while we queued: the thread will never read it
            self._drain()
        return fut

    def submit(self, ids: list[int], params: SamplingParams, deliver: Callable) -> concurrent.futures.Future:
        """Queue a request on the engine thread; the future gives its Request (or the error that refused it)."""
        def start() -> Request:
            req = self.engine.submit(ids, params=params)
            if req.finish_reason is not None:  # max_tokens 0: nothing to run
                _send(deliver, Event(req, None, "", True, req.finish_reason))
            else:
                self.sinks[req.id] = (req, deliver)
            return req

        return self.call(start)

    def cancel(self, req: Request, keep: bool = False) -> None:
        def stop():
            self.sinks.pop(req.id, None)
            self.engine.cancel(req, keep)

        if self.fatal is None:
            self.commands.put((stop, None))

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - the supervisor: nothing may end this thread silently
            log.critical("engine thread failed; the engine is dead", exc_info=err)
            self._die(err)

    def _loop(self) -> None:
        while True:
            try:
                item = self.commands.get(block=not self.engine.has_work())
                while True:
                    if item is None:
                        return
                    fn, fut = item
                    if fut is None:
                        fn()  # a cancel: if freeing a sequence fails, the KV state is unknown (fatal)
                    elif fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except Exception as err:  # noqa: BLE001 - handed to the caller
                            fut.set_exception(err)
                    item = self.commands.get_nowait()
            except queue.Empty:
                pass
            if self.engine.has_work():
                self._step()
            self.gauges = self.engine.status()

    def _step(self) -> None:
        engine = self.engine
        try:
            events = engine.step()
        except Exception as err:  # noqa: BLE001 - fail the batch it concerned; recover unless it keeps failing
            self.step_failures += 1
            self._consecutive += 1
            log.exception("engine step failed (%d in a row)", self._consecutive)
            # Every request the step may have touched: all but those still waiting for a batch slot (one that
            # finished in the failed step never got its last event, so it is failed here too).
            waiting = {id(r) for r in engine.scheduler.waiting}
            concerned = [(req, deliver) for req, deliver in self.sinks.values() if id(req) not in waiting]
            answer = EngineStepError(f"the engine step running this request failed: {type(err).__name__}: {err}")
            for req, deliver in concerned:
                del self.sinks[req.id]
                _send(deliver, answer)  # answered first: if cancelling fails too, it is not left waiting
                engine.cancel(req)  # raising here escapes to _run: dead
            if self._consecutive >= self.max_consecutive_failures:
                raise EngineDead(f"{self._consecutive} engine steps failed in a row; last: "
                                 f"{type(err).__name__}: {err}") from err
            return
        self._consecutive = 0
        self.steps += 1
        for event in events:
            sink = self.sinks.get(event.request.id)
            if sink is not None:
                if event.finished:
                    del self.sinks[event.request.id]
                _send(sink[1], event)

    def _dead(self) -> EngineDead:
        err = self.fatal
        return err if isinstance(err, EngineDead) else EngineDead(f"the engine failed: {type(err).__name__}: {err}")

    def _die(self, err: BaseException) -> None:
        self.fatal = err
        dead = self._dead()
        sinks, self.sinks = self.sinks, {}
        for _req, deliver in sinks.values():
            _send(deliver, dead)
        self._drain()
        self.gauges = dict(self.gauges)
        if self.on_fatal is not None:
            try:
                self.on_fatal(err)
            except Exception:  # noqa: BLE001
                log.exception("on_fatal failed")

    def _drain(self) -> None:
        """Answer every command still queued (the thread will not run them)."""
        dead = self._dead()
        while True:
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1] is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(dead)


def _send(deliver: Callable, item: Any) -> None:
    """Hand an event or error to its request; a receiver that is gone (its event loop closed) is no failure
    of the engine."""
    try:
        deliver(item)
    except Exception:  # noqa: BLE001
        log.warning("could not deliver an engine event", exc_info=True)
