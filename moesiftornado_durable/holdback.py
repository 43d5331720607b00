"""Audit mode's wait: a response's last bytes leave only once its event is on stable storage.

`Holdback.hold` puts a stand-in in front of the request's HTTP connection just before the handler's
final flush. The stand-in queues what Tornado then asks of the connection (the headers and body, the
finish) and replays it, in order, when the journal's syncer reports the sync that covers the event
(`JournalWriter.on_synced`, a group commit shared by every response waiting at that moment). Responses
held in one IOLoop iteration wait as one group: one waiter for the syncer, one IOLoop callback to
release them. The IOLoop never blocks: it serves other requests meanwhile, and the connection's own loop
waits for the finish as it waits for a slow client. Bytes flushed before the final flush (a streamed
response) leave at once.

If the event could not be stored, or the sync failed, the client must not get the response as if its
audit record existed: a response whose headers are still queued becomes ``503 Service Unavailable``
(``Connection: close``, ``Retry-After: 1``); one whose headers already left (a streamed response) is
cut off by closing the connection, so the client sees it incomplete.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from tornado.concurrent import Future, future_add_done_callback
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
                    _set_exception(future, exc)
                continue
            if future is not None:
                if result is None:
                    future.set_result(None)
                else:
                    future_add_done_callback(result, functools.partial(_copy_outcome, future=future))

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


def _copy_outcome(real: Future, future: Future) -> None:
    """The outcome of the real connection's write, for the future Tornado got from the stand-in."""
    if future.done():
        return
    exception = real.exception()
    if exception is None:
        future.set_result(None)
    else:
        _set_exception(future, exception)


def _set_exception(future: Future, exception: BaseException) -> None:
    """As the real connection does (a client gone before its response was written is no error to log):
    the exception is there for whoever awaits the write, and never reported as not retrieved."""
    future.set_exception(exception)
    future.exception()


def prompt_switching() -> None:
    """Lower the interpreter's GIL switch interval to `SWITCH_INTERVAL` (if it is higher).

    When an ``fdatasync`` returns, the syncer thread needs the GIL back to release the responses it covered;
    with the default 5 ms interval it waits for a busy IOLoop thread up to 5 ms each time, longer than the
    sync itself, and every held response with it. The interval matters only while two threads want the GIL.
    """
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)


class Holdback:
    """Holds the responses of one middleware until their events are durable, a group per IOLoop iteration.

    `hold` queues the response and its record's sequence number with the IOLoop's current group; the first
    response of an iteration schedules the group's closing for the next one (`IOLoop.add_callback`: after
    every handler that ran meanwhile). A closed group asks `when_durable` once, for the highest sequence in
    it, so the syncer sees one waiter per group, not one per response; the sync that covers it releases
    the whole group with one IOLoop callback. `on_refused` is called, on the IOLoop, for each response
    refused because its event could not be stored.
    """

    def __init__(self, when_durable: Callable[[Optional[int], Callable[[bool], None]], None],
                 on_refused: Callable[[], None]) -> None:
        self._when_durable = when_durable
        self._on_refused = on_refused
        self._groups: Dict[IOLoop, List[Tuple[_HeldConnection, int]]] = {}  # each used on its loop's thread only

    def hold(self, handler: Any, sequence: Optional[int]) -> None:
        """Hold the rest of `handler`'s response until record `sequence` (from the journal; 0: nothing was to
        be stored) is durable; None (the event could not be stored) refuses it. Call it on the IOLoop, just
        before the handler's final flush."""
        held = self._held(handler)
        loop = IOLoop.current()
        if sequence is None:
            self._refuse_later(loop, held)
            return
        group = self._groups.get(loop)
        if group is None:
            group = self._groups[loop] = []
        group.append((held, sequence))
        if len(group) == 1:
            loop.add_callback(self._close_group, loop)

    def hold_until(self, handler: Any, wait: Wait) -> None:
        """Hold the rest of `handler`'s response until `wait` reports its event durable (a capture still
        awaiting a user callable: its sequence number is not known yet)."""
        held = self._held(handler)
        loop = IOLoop.current()
        wait(lambda ok: _schedule(loop, [held], ok))

    def _held(self, handler: Any) -> _HeldConnection:
        request = handler.request
        held = _HeldConnection(request, request.connection, self._on_refused)
        request.connection = held
        return held

    def _refuse_later(self, loop: IOLoop, held: _HeldConnection) -> None:
        request = held._request
        logger.error("moesiftornado_durable: audit mode: the event of %s %s could not be stored; the response "
                     "is refused (%d)", request.method, request.path, REFUSED_STATUS)
        _schedule(loop, [held], False)  # after the final flush has queued the response

    def _close_group(self, loop: IOLoop) -> None:
        group = self._groups.pop(loop, [])
        if group:
            held = [connection for connection, _ in group]
            self._when_durable(max(sequence for _, sequence in group), lambda ok: _schedule(loop, held, ok))


_pending: Dict[IOLoop, List[Tuple[List[_HeldConnection], bool]]] = {}  # released by one IOLoop callback
_pending_lock = threading.Lock()


def _forget_pending_after_fork() -> None:  # the parent's syncer thread may have held the lock at the fork
    global _pending_lock
    _pending_lock = threading.Lock()
    _pending.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pending_after_fork)


def _schedule(loop: IOLoop, held: List[_HeldConnection], ok: bool) -> None:
    """Release `held` on `loop` (from any thread): groups released by one sync wake the IOLoop once."""
    with _pending_lock:
        pending = _pending.setdefault(loop, [])
        pending.append((held, ok))
        if len(pending) > 1:
            return
    loop.add_callback(_release_pending, loop)


def _release_pending(loop: IOLoop) -> None:
    with _pending_lock:
        pending = _pending.pop(loop, [])
    for group, ok in pending:
        for held in group:
            try:
                held.release(ok)
            except Exception:  # one response's trouble must not hold the others
                logger.exception("moesiftornado_durable: could not release a held response")
