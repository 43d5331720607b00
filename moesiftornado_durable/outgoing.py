"""Outgoing calls: the HTTP calls the application makes, captured as Moesif events with direction Outgoing.

With CAPTURE_OUTGOING_REQUESTS, the middleware registers here; the first registration wraps, once per
process, `tornado.httpclient.AsyncHTTPClient.fetch` (every Tornado client: simple, curl, and the
blocking `HTTPClient`, which runs on it) and `requests.Session.send` (every `requests` call, also
`requests.get`). After each call that got an HTTP response, the wrapper hands an `OutgoingCall` (plain
values) to each registered recorder, which turns it into an event with `outgoing_steps` and spools it as
incoming events are. A call that got no response (connection refused, timeout) is not an event: its
exception reaches the caller unchanged. The last `unregister` restores the originals.

The library's own calls are never captured: a call carrying an ``X-Moesif-Application-Id`` header (every
Moesif SDK sends one) or addressed to a registered BASE_URI's origin is passed through untouched. The
wrappers never raise because of capture and change nothing the caller sees: the same response or
exception; for `fetch`, a future of the same type with the same outcome.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

import requests
import tornado.httpclient
from tornado.concurrent import Future, chain_future
from tornado.httputil import HTTPHeaders

from .capture import (
    RAISED,
    Body,
    Event,
    Outcome,
    Steps,
    WeightFor,
    _as_text,
    finish_steps,
    format_time,
    join_headers,
    mask_headers,
    new_transaction_id,
    prepared_form,
)
from .codec import JSONReady
from .config import Config

logger = logging.getLogger("moesiftornado_durable")

MOESIF_APPLICATION_HEADER = "x-moesif-application-id"  # on every call a Moesif SDK makes to Moesif


@dataclasses.dataclass(frozen=True)
class OutgoingCall:
    """One finished outgoing HTTP exchange, as plain values, with the client's own objects for the callables.

    `request`/`response` are what the ``*_OUTGOING`` callables receive: requests' `PreparedRequest` and
    `Response`, or Tornado's `HTTPRequest` and `HTTPResponse`. A body is None when it was not readable
    (a streamed request or response): then it is left out of the event.
    """

    request: Any
    response: Any
    method: str
    url: str
    request_headers: Dict[str, str]
    request_body: Optional[bytes]
    status: int
    response_headers: Dict[str, str]
    response_body: Optional[bytes]
    response_encoding: Optional[str]  # the Content-Encoding the response body still has (None: decoded)
    started_at: float
    finished_at: float


def outgoing_steps(call: OutgoingCall, config: Config, weight_for: Optional[WeightFor] = None, *,
                   prepared: bool = True) -> Steps:
    """Capture `call` as an Outgoing event, step by step, as `capture.capture_steps` does an incoming one.

    It yields SKIP_OUTGOING, then IDENTIFY_USER_OUTGOING, IDENTIFY_COMPANY_OUTGOING,
    GET_SESSION_TOKEN_OUTGOING and GET_METADATA_OUTGOING (each called as ``f(request, response)``, as
    moesifwsgi calls them), then shares the end of incoming capture: sampling, the bodies (when
    LOG_BODY_OUTGOING) with the same size limit and masks, and MASK_EVENT_MODEL.
    """
    if config.skip_outgoing is not None:
        [skip] = yield [("SKIP_OUTGOING", functools.partial(config.skip_outgoing, call.request), call.response)]
        if skip and skip is not RAISED:
            return Outcome(None, "skipped")
    fast = prepared and prepared_form(config)
    event: Event = {
        "request": {
            "time": format_time(call.started_at),
            "uri": call.url,
            "verb": call.method,
            "api_version": config.api_version if isinstance(config.api_version, str) else None,
            "headers": mask_headers(call.request_headers, config.request_header_masks),
        },
        "response": {
            "time": format_time(call.finished_at),
            "status": call.status,
            "headers": mask_headers(call.response_headers, config.response_header_masks),
        },
        "user_id": None,
        "company_id": None,
        "session_token": None,
        "metadata": None,
        "direction": "Outgoing",
        "weight": 1,
        "transaction_id": new_transaction_id(),
    }
    if fast:
        event = JSONReady(event)
    fields = (
        ("user_id", "IDENTIFY_USER_OUTGOING", config.identify_user_outgoing),
        ("company_id", "IDENTIFY_COMPANY_OUTGOING", config.identify_company_outgoing),
        ("session_token", "GET_SESSION_TOKEN_OUTGOING", config.get_session_token_outgoing),
        ("metadata", "GET_METADATA_OUTGOING", config.get_metadata_outgoing),
    )
    wanted = [(field, option, function) for field, option, function in fields if function is not None]
    if wanted:
        answers = yield [(option, functools.partial(function, call.request), call.response)
                         for _, option, function in wanted]
        for (field, option, _), answer in zip(wanted, answers):
            if answer is RAISED:
                continue
            event[field] = answer if field == "metadata" else _as_text(option, answer)
    bodies: List[Body] = []
    if config.log_body_outgoing:
        if call.request_body is not None:
            bodies.append(("request", event["request"], call.request_body,
                           _header(call.request_headers, "content-encoding"), config.request_body_masks))
        if call.response_body is not None:
            bodies.append(("response", event["response"], call.response_body, call.response_encoding,
                           config.response_body_masks))
    return (yield from finish_steps(event, bodies, config, weight_for, fast))


# -- the process-wide wrappers ---------------------------------------------------------------------

Recorder = Callable[[OutgoingCall], None]

_lock = threading.Lock()
_recorders: Dict[Any, Tuple[Callable[[], Optional[Recorder]], Tuple[str, str, int]]] = {}
_patches: Dict[str, Tuple[Any, Any]] = {}  # "fetch"/"send" -> (the original, our wrapper), while installed


def register(recorder: Recorder, own_base_uri: str) -> None:
    """Send every outgoing call to `recorder` (held weakly when a bound method), except calls to
    `own_base_uri`; installs the wrappers on the first registration. Idempotent."""
    reference: Callable[[], Optional[Recorder]]
    if hasattr(recorder, "__self__"):  # a middleware's method: a middleware dropped without close() goes away
        reference = weakref.WeakMethod(recorder)
    else:
        def reference() -> Recorder:
            return recorder
    with _lock:
        _forget_collected()
        _recorders[_key(recorder)] = (reference, _origin(own_base_uri))
        _install()


def unregister(recorder: Recorder) -> None:
    """Stop sending calls to `recorder`; the last one out restores the original methods."""
    with _lock:
        _recorders.pop(_key(recorder), None)
        _forget_collected()
        if not _recorders:
            _uninstall()


def _forget_collected() -> None:
    """Under the lock: drop the recorders of middlewares collected without close() (weakly held), so that
    a process making many middlewares does not keep one entry per middleware."""
    for key, (reference, _) in list(_recorders.items()):
        if reference() is None:
            del _recorders[key]


def _key(recorder: Recorder) -> Any:
    owner = getattr(recorder, "__self__", None)
    return (id(owner), getattr(recorder, "__func__", None)) if owner is not None else id(recorder)


def _install() -> None:
    """Wrap what is not wrapped yet. A wrapper records nothing while no recorder is registered."""
    if "fetch" not in _patches:
        fetch = tornado.httpclient.AsyncHTTPClient.fetch

        @functools.wraps(fetch)
        def wrapped_fetch(self: Any, request: Any, raise_error: bool = True, **kwargs: Any) -> Future:
            started_at = time.time()
            inner = fetch(self, request, raise_error=raise_error, **kwargs)
            if not _recorders:
                return inner
            # The caller gets its own future with the same outcome; reading `inner`'s here does not mark an
            # exception of the caller's as retrieved, so asyncio still reports one nobody awaited.
            outer: Future = Future(loop=inner.get_loop())
            chain_future(inner, outer)
            inner.add_done_callback(functools.partial(_fetched, started_at))
            return outer

        tornado.httpclient.AsyncHTTPClient.fetch = wrapped_fetch  # type: ignore[method-assign]
        _patches["fetch"] = (fetch, wrapped_fetch)
    if "send" not in _patches:
        send = requests.Session.send

        @functools.wraps(send)
        def wrapped_send(self: Any, request: Any, **kwargs: Any) -> Any:
            started_at = time.time()
            response = send(self, request, **kwargs)
            if _recorders:
                _sent(request, response, started_at, kwargs.get("stream", self.stream))
            return response

        requests.Session.send = wrapped_send  # type: ignore[method-assign]
        _patches["send"] = (send, wrapped_send)


def _uninstall() -> None:
    """Put the originals back, except where something wrapped ours since: ours then stays (and is reused
    by the next `register`), recording nothing meanwhile."""
    for name, owner, attribute in (("fetch", tornado.httpclient.AsyncHTTPClient, "fetch"),
                                   ("send", requests.Session, "send")):
        if name in _patches and getattr(owner, attribute) is _patches[name][1]:
            setattr(owner, attribute, _patches.pop(name)[0])


def _fetched(started_at: float, future: Future) -> None:
    """A Tornado fetch finished (on its IOLoop): record it if it got an HTTP response (also an error status)."""
    try:
        if future.cancelled():
            return
        error = future.exception()
        response = future.result() if error is None else getattr(error, "response", None)
        if response is None:  # no HTTP response: connection refused, timeout, TLS failure
            return
        request = response.request
        if _is_moesif(request.url, request.headers):
            return
        body = getattr(request, "body", None)
        _deliver(OutgoingCall(
            request=request, response=response, method=request.method, url=request.url,
            request_headers=_headers(request.headers), request_body=body if isinstance(body, bytes) else b"",
            status=response.code, response_headers=_headers(response.headers),
            # a streaming_callback consumed the body: none to capture
            response_body=None if getattr(request, "streaming_callback", None) else response.body,
            # Tornado's simple client gunzips and removes the header; curl's gunzips and keeps it (then
            # capture's gunzip of plain bytes fails and keeps them as they are)
            response_encoding=response.headers.get("Content-Encoding"),
            started_at=started_at, finished_at=time.time(),
        ))
    except Exception:
        logger.exception("could not capture an outgoing AsyncHTTPClient call; the call itself is unaffected")


def _sent(request: Any, response: Any, started_at: float, stream: bool) -> None:
    """A requests call returned: record the exchange of `request` (redirects that followed are their own
    calls to `Session.send`, each recorded there)."""
    try:
        exchange = response.history[0] if response.history else response
        if _is_moesif(request.url, request.headers):
            return
        body = request.body
        _deliver(OutgoingCall(
            request=request, response=exchange, method=request.method or "GET", url=request.url,
            request_headers=_headers(request.headers),
            request_body=body.encode("utf-8") if isinstance(body, str) else body if isinstance(body, bytes)
            else None if body is not None else b"",
            status=exchange.status_code, response_headers=_headers(exchange.headers),
            response_body=None if stream else exchange.content,
            response_encoding=None,  # requests has decoded .content already
            started_at=started_at, finished_at=time.time(),
        ))
    except Exception:
        logger.exception("could not capture an outgoing requests call; the call itself is unaffected")


def _deliver(call: OutgoingCall) -> None:
    for reference, _ in list(_recorders.values()):
        recorder = reference()
        if recorder is None:
            continue
        try:
            recorder(call)
        except Exception:
            logger.exception("an outgoing call's capture failed; the call itself is unaffected")


def _is_moesif(url: str, headers: Any) -> bool:
    """True for a call to Moesif: it carries the application-id header, or goes to a registered BASE_URI."""
    if headers and any(str(name).lower() == MOESIF_APPLICATION_HEADER for name in headers):
        return True
    origin = _origin(url)
    return any(origin == own for _, own in list(_recorders.values()))


def _origin(url: str) -> Tuple[str, str, int]:
    """(scheme, host, port) of a URL, lower case, with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def _headers(headers: Union[None, HTTPHeaders, Mapping[str, Any]]) -> Dict[str, str]:
    """A client's headers as the event's dict: Tornado's with repeated headers joined (`join_headers`);
    requests' (already one value per name) with bytes values decoded."""
    if headers is None:
        return {}
    if isinstance(headers, HTTPHeaders):
        return join_headers(headers)
    return {str(name): value.decode("latin-1") if isinstance(value, bytes) else str(value)
            for name, value in headers.items()}


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    return next((value for key, value in headers.items() if key.lower() == name), None)
