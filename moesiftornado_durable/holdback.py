"""Audit mode's wait: a response's last bytes leave only once its event is on stable storage.

`hold_response` puts a stand-in in front of the request's HTTP connection just before the handler's
final flush. The stand-in queues what Tornado then asks of the connection (the headers and body, the
finish) and replays it, in order, when the journal's syncer reports the sync that covers the event
(`JournalWriter.on_synced`, a group commit shared by every response waiting at that moment). The IOLoop
never blocks: it serves other requests meanwhile, and the connection's own loop waits for the finish as
it waits for a slow client.

If the event could not be stored, or the sync failed, the client must not get the response as if its
audit record existed: a response whose headers are still queued becomes ``503 Service Unavailable``
(``Connection: close``, ``Retry-After: 1``); one whose headers already left (a streamed response) is
cut off by closing the connection, so the client sees it incomplete.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from tornado.concurrent import Future, chain_future
from tornado.httputil import HTTPHeaders, ResponseStartLine
from tornado.ioloop import IOLoop

logger = logging.getLogger("moesiftornado_durable")

SWITCH_INTERVAL = 0.0005  # seconds: the GIL switch interval while responses wait for syncs (Python's default: 5 ms)
Wait = Callable[[Callable[[bool], None]], None]  # wait(callback): callback(ok) once durable, on any thread
REFUSED_STATUS = 503


class _HeldConnection:
    """Stands in for `request.connection` until `release`: writes and the finish are queued, everything
    else goes to the real connection."""

    def __init__(self, request: Any, real: Any, on_refused: Callable[[], None]) -> None:
        self._request = request
        self._real = real
        self._on_refused = on_refused
        self._queued: List[Tuple[str, Tuple[Any, ...], Dict[str, Any], Optional[Future]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def write_headers(self, *args: Any, **kwargs: Any) -> Future:
        return self._queue("write_headers", args, kwargs)

    def write(self, *args: Any, **kwargs: Any) -> Future:
        return self._queue("write", args, kwargs)

    def finish(self) -> None:
        self._queued.append(("finish", (), {}, None))

    def _queue(self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Future:
        future: Future = Future()
        self._queued.append((name, args, kwargs, future))
        return future

    def release(self, ok: bool) -> None:
        """On the IOLoop: give the request its connection back and replay what was queued (`ok`), or
        refuse the response (not `ok`)."""
        self._request.connection = self._real
        queued, self._queued = self._queued, []
        if not ok:
            self._on_refused()
            self._refuse(queued)
            return
        for name, args, kwargs, future in queued:
            try:
                result = getattr(self._real, name)(*args, **kwargs)
            except Exception as exc:  # e.g. the client went away meanwhile
                if future is not None and not future.done():
                    future.set_exception(exc)
                continue
            if future is not None:
                if result is None:
                    future.set_result(None)
                else:
                    chain_future(result, future)

    def _refuse(self, queued: List[Tuple[str, Tuple[Any, ...], Dict[str, Any], Optional[Future]]]) -> None:
        for _, _, _, future in queued:
            if future is not None and not future.done():
                future.set_result(None)
        try:
            if queued and queued[0][0] == "write_headers":
                headers = HTTPHeaders({"Content-Length": "0", "Connection": "close", "Retry-After": "1"})
                self._real.write_headers(ResponseStartLine("HTTP/1.1", REFUSED_STATUS, "Service Unavailable"),
                                         headers)
                self._real.finish()
            else:
                self._real.close()  # the headers left already: an incomplete response, never a complete one
        except Exception:
            logger.exception("moesiftornado_durable: could not refuse a response whose event is not stored")
            self._real.close()


def prompt_switching() -> None:
    """Lower the interpreter's GIL switch interval to `SWITCH_INTERVAL` (if it is higher).

    When an ``fdatasync`` returns, the syncer thread needs the GIL back to release the responses it covered;
    with the default 5 ms interval it waits for a busy IOLoop thread up to 5 ms each time, longer than the
    sync itself, and every held response with it. The interval matters only while two threads want the GIL.
    """
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)


_batches: Dict[IOLoop, List[Tuple[_HeldConnection, bool]]] = {}  # released by one IOLoop callback per sync
_batches_lock = threading.Lock()


def _forget_batches_after_fork() -> None:  # the parent's syncer thread may have held the lock at the fork
    global _batches_lock
    _batches_lock = threading.Lock()
    _batches.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_batches_after_fork)


def _schedule(loop: IOLoop, held: _HeldConnection, ok: bool) -> None:
    """Release `held` on `loop`: the responses a sync covered wake the IOLoop once, not once each."""
    with _batches_lock:
        batch = _batches.setdefault(loop, [])
        batch.append((held, ok))
        if len(batch) > 1:
            return
    loop.add_callback(_release_batch, loop)


def _release_batch(loop: IOLoop) -> None:
    with _batches_lock:
        batch = _batches.pop(loop, [])
    for held, ok in batch:
        try:
            held.release(ok)
        except Exception:  # one response's trouble must not hold the others
            logger.exception("moesiftornado_durable: could not release a held response")


def hold_response(handler: Any, stored: bool, wait: Wait, on_refused: Callable[[], None]) -> None:
    """Hold the rest of `handler`'s response until `wait` reports its event durable (`stored`: the event
    was handed to the journal; False refuses the response at once; `on_refused` is called, on the IOLoop,
    for each refused response). Call it on the IOLoop, just before the handler's final flush."""
    request = handler.request
    held = _HeldConnection(request, request.connection, on_refused)
    request.connection = held
    loop = IOLoop.current()

    def durable(ok: bool) -> None:  # the syncer thread, or this one
        _schedule(loop, held, ok)

    if not stored:
        logger.error("moesiftornado_durable: audit mode: the event of %s %s could not be stored; the response "
                     "is refused (%d)", request.method, request.path, REFUSED_STATUS)
        durable(False)
        return
    wait(durable)
