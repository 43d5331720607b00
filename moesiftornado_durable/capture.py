"""Turn a finished Tornado request into a Moesif event (a plain dict in the ingestion API's shape).

`capture_steps` is pure: it reads the handler and asks its driver to call the user's callables (so the
middleware can await async ones), and does no I/O. It fixes what moesiftornado 0.1.4 gets wrong: true
request/response times, repeated headers kept, the response body captured (through
`ResponseBodyCapture`), client IPs incl. IPv6, JSON bodies sent as JSON, and a `transaction_id` assigned
once so Moesif can deduplicate resends. Masking and sampling happen here, before the event reaches the
spool.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import (
    AbstractSet,
    Any,
    Callable,
    Dict,
    Generator,
    List,
    Optional,
    Tuple,
    Type,
)

from moesifapi.models import BaseModel, EventModel
from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.web import OutputTransform

from .codec import JSONReady, RawJSON
from .config import Config, Handler
from .eventbuild import (  # noqa: F401 (re-exported: what capture offered before the build moved out)
    _CLIENT_IP_HEADER_SET,
    _CLIENT_IP_HEADERS,
    _JSON_STARTS,
    _MEASURED_FROM,
    _REPORTED,
    MAX_JSON_DEPTH,
    _as_utf8,
    _client_ip,
    _decoded,
    _deeper_than,
    _fit_event_limit,
    _ip_candidates,
    _json_by_orjson,
    _omit,
    _parse_json,
    _set_body,
    _user_from_token,
    _written_size,
    encode_body,
    format_time,
    joined,
    mask_body,
    mask_headers,
    parse_ip,
)

logger = logging.getLogger("moesiftornado_durable")

Event = Dict[str, Any]

_CAPTURE_ATTRIBUTE = "_moesiftornado_durable_body"
BLOCKED_BY_ATTRIBUTE = "_moesiftornado_durable_blocked_by"  # set on a handler a governance rule blocked

class _Raised:
    """The result of a user callable that raised (logged already); distinct from returning None."""

    def __repr__(self) -> str:
        return "RAISED"


RAISED: Any = _Raised()

UserCall = Tuple[str, Callable[[Any], Any], Any]  # (option name, function, argument)
WeightFor = Callable[[Event], Optional[int]]  # None: sample the event out; else its weight


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What capture made of a request: an event to spool, or the record of its raw parts (`packed`,
    rawcapture.py: the shipper builds the event), or why there is neither."""

    event: Optional[Event]
    dropped: Optional[str] = None  # "skipped", "sampled_out" or "masked_out"
    omitted_bodies: Tuple[str, ...] = ()  # why each body left out of the event was: "too_large", "unmaskable"...
    packed: Optional[bytes] = None  # a `rawrecord.PackedCapture`, spooled as kind CAPTURE


Steps = Generator[List[UserCall], List[Any], Outcome]


def capture_steps(handler: Handler, config: Config, finished_at: float,
                  weight_for: Optional[WeightFor] = None, unsent_body: bytes = b"", *, prepared: bool = True) -> Steps:
    """Capture `handler`'s finished request, step by step, as a generator.

    It yields each group of user callables to call (SKIP; then API_VERSION, IDENTIFY_USER,
    IDENTIFY_COMPANY, GET_SESSION_TOKEN, GET_METADATA; then MASK_EVENT_MODEL) and is sent back their
    results (`RAISED` for one that raised), so a driver may await results that are awaitables (async
    callables) without this code knowing; `run_sync` drives it without awaiting. Each callable is called
    once. Everything else is read from the handler before the second group is yielded. The event is
    sampled (`weight_for`) after identification and before MASK_EVENT_MODEL; it returns an `Outcome`.
    The bodies, read with the rest, are decoded and parsed only once the event is kept.

    `finished_at` is the wall-clock time the response finished (`time.time()` when Tornado calls
    log_function); the request's start is derived from Tornado's own `request_time()`. `unsent_body` is
    the part of the response still in the handler's buffer (strict mode captures before the last flush).

    `prepared` (the middleware's path) gives, when there is no MASK_EVENT_MODEL to show the event to, a
    `JSONReady` event whose JSON bodies and metadata are `RawJSON`: the spool writes it with orjson, with
    the same values. Otherwise, and with `prepared=False`, every value is plain.
    """
    if config.skip is not None:
        [skip] = yield [("SKIP", config.skip, handler)]
        if skip and skip is not RAISED:
            return Outcome(None, "skipped")
    fast = prepared and prepared_form(config)
    event, bodies = _snapshot(handler, config, finished_at, unsent_body, fast)
    results = yield from identity_steps(handler, config)
    if callable(config.api_version):
        event["request"]["api_version"] = _as_text("API_VERSION", results.get("API_VERSION"))
    event["user_id"] = _as_text("IDENTIFY_USER", results.get("IDENTIFY_USER")) or user_from_authorization(
        handler.request.headers, config)
    event["company_id"] = _as_text("IDENTIFY_COMPANY", results.get("IDENTIFY_COMPANY"))
    event["session_token"] = _as_text("GET_SESSION_TOKEN", results.get("GET_SESSION_TOKEN"))
    event["metadata"] = results.get("GET_METADATA")
    return (yield from finish_steps(event, bodies, config, weight_for, fast))


def identity_steps(handler: Any, config: Config) -> Generator[List[UserCall], List[Any], Dict[str, Any]]:
    """Yield API_VERSION (when a callable), IDENTIFY_USER, IDENTIFY_COMPANY, GET_SESSION_TOKEN and
    GET_METADATA as one group of calls, each once; return their answers by option (None for one that raised)."""
    functions = (
        ("API_VERSION", config.api_version if callable(config.api_version) else None),
        ("IDENTIFY_USER", config.identify_user),
        ("IDENTIFY_COMPANY", config.identify_company),
        ("GET_SESSION_TOKEN", config.get_session_token),
        ("GET_METADATA", config.get_metadata),
    )
    calls = [(option, function, handler) for option, function in functions if function is not None]
    if not calls:
        return {}
    answers = yield calls
    return {call[0]: (None if answer is RAISED else answer) for call, answer in zip(calls, answers)}


def finish_steps(event: Event, bodies: List[_Body], config: Config, weight_for: Optional[WeightFor],
                 fast: bool) -> Steps:
    """The end of a capture, shared by incoming (`capture_steps`) and outgoing (outgoing.py) events:
    sample the identified event, set its bodies (decoded, bounded, masked), then MASK_EVENT_MODEL.

    `event` holds everything else, its user callables' answers included; `fast` as in `capture_steps`.
    """
    if weight_for is not None:
        try:
            weight = weight_for(event)
        except Exception:  # a sampling bug must not lose the event: keep it unsampled
            logger.exception("sampling failed; the event is kept")
            weight = 1
        if weight is None:
            return Outcome(None, "sampled_out")
        event["weight"] = weight
    omitted: List[str] = []
    kept: List[str] = []  # the sides whose body is in the event
    kept_bytes = 0  # their bytes, as read and decoded
    for side, part, raw, content_encoding, masks in bodies:
        reason, size = _set_body(side, part, raw, content_encoding, config.max_body_bytes, masks, fast)
        if reason is not None:
            omitted.append(reason)
        elif size:
            kept.append(side)
            kept_bytes += size
    if fast and event["metadata"] is not None:  # as to_json_bytes would write it, one level down the event
        event["metadata"] = RawJSON.of(event["metadata"], depth=1)
    if kept_bytes > _MEASURED_FROM:
        omitted += _fit_event_limit(event, kept)
    if config.mask_event_model is not None:
        [masked] = yield [("MASK_EVENT_MODEL", config.mask_event_model, EventModel.from_dictionary(event))]
        result = apply_mask_result(event, masked)
        return Outcome(result, None, tuple(omitted)) if result is not None else Outcome(None, "masked_out")
    return Outcome(event, None, tuple(omitted)) if omitted else Outcome(event)


def prepared_form(config: Config) -> bool:
    """True when capture may hand the spool a `JSONReady` event: no MASK_EVENT_MODEL is to see the event
    (it is given a moesifapi `EventModel`, made of plain values; see `capture_steps`)."""
    return config.mask_event_model is None


def call_user_functions(calls: List[UserCall], on_error: Optional[Callable[[str], None]] = None) -> List[Any]:
    """Call each user function once; one that raises gives `RAISED` and `on_error(option)` is called
    while its exception is being handled (default: `log_user_error`). Never raises."""
    report = on_error or log_user_error
    results = []
    for option, function, argument in calls:
        try:
            results.append(function(argument))
        except Exception:
            report(option)
            results.append(RAISED)
    return results


def log_user_error(option: str, note: str = "") -> None:
    """Log, with the traceback being handled, that the user's `option` callable failed."""
    if option == "MASK_EVENT_MODEL":
        logger.exception("MASK_EVENT_MODEL failed; the event is kept with headers and bodies removed%s", note)
    else:
        logger.exception("%s failed; the field is left empty and the event is still logged%s", option, note)


def run_sync(steps: Steps, on_error: Optional[Callable[[str], None]] = None) -> Outcome:
    """Drive `capture_steps` to the end without awaiting: awaitable results are refused (`refuse_awaitables`).

    `on_error` as in `call_user_functions`."""
    answers: Optional[List[Any]] = None
    try:
        while True:
            calls = steps.send(answers)  # type: ignore[arg-type]  # the first send must be None
            answers = refuse_awaitables(calls, call_user_functions(calls, on_error))
    except StopIteration as stop:
        outcome: Outcome = stop.value
        return outcome


def refuse_awaitables(calls: List[UserCall], answers: List[Any]) -> List[Any]:
    """The answers with each awaitable replaced by `RAISED`, for where no event loop runs to await it.

    A coroutine is closed, so Python does not warn that it was never awaited; each refusal is logged.
    """
    refused = list(answers)
    for index, answer in enumerate(answers):
        if inspect.isawaitable(answer):
            if inspect.iscoroutine(answer):
                answer.close()
            logger.error("%s returned an awaitable but no event loop is running to await it; treated as failed",
                         calls[index][0])
            refused[index] = RAISED
    return refused


def capture_event(handler: Handler, config: Config, finished_at: float,
                  weight_for: Optional[WeightFor] = None, unsent_body: bytes = b"") -> Optional[Event]:
    """The Moesif event for `handler`'s finished request, synchronously; None when skipped or dropped."""
    return run_sync(capture_steps(handler, config, finished_at, weight_for, unsent_body, prepared=False)).event


# A body read from the handler, to be decoded, parsed and set once the event is kept: ("request" or
# "response", the event's dict of that name, the raw bytes (None: over MAX_BODY_BYTES), their
# Content-Encoding, the masks).
_Body = Tuple[str, Dict[str, Any], Optional[bytes], Optional[str], AbstractSet[str]]
Body = _Body  # the name outgoing.py uses


def _snapshot(handler: Handler, config: Config, finished_at: float, unsent_body: bytes = b"",
              fast: bool = False) -> Tuple[Event, List[_Body]]:
    """Everything the event holds that does not come from a user callable, read from the handler now:
    the event without its bodies, and the bodies as read (`_Body`).

    `fast`: a `JSONReady` event, whose JSON bodies will be `RawJSON` written by orjson (see `capture_steps`).
    """
    request: HTTPServerRequest = handler.request
    started_at = finished_at - request.request_time()
    all_request_headers = join_headers(request.headers)
    request_headers = mask_headers(all_request_headers, config.request_header_masks)
    response_headers = mask_headers(join_headers(getattr(handler, "_headers", None)), config.response_header_masks)
    event: Event = {
        "request": {
            "time": format_time(started_at),
            "uri": request.full_url(),
            "verb": request.method,
            "api_version": config.api_version if isinstance(config.api_version, str) else None,
            "ip_address": _client_ip(all_request_headers, request.remote_ip),
            "headers": request_headers,
        },
        "response": {
            "time": format_time(finished_at),
            "status": handler.get_status(),
            "headers": response_headers,
        },
        "user_id": None,
        "company_id": None,
        "session_token": None,
        "metadata": None,
        "direction": "Incoming",
        "weight": 1,
        "transaction_id": new_transaction_id(),
    }
    blocked_by = getattr(handler, BLOCKED_BY_ATTRIBUTE, None)
    if blocked_by:
        event["blocked_by"] = blocked_by
    if fast:
        event = JSONReady(event)
    bodies: List[_Body] = []
    if config.log_body:
        bodies.append(("request", event["request"], request.body or b"", all_request_headers.get("Content-Encoding"),
                       config.request_body_masks))
        captured: Optional[ResponseBodyCapture] = getattr(request, _CAPTURE_ATTRIBUTE, None)
        if captured is not None:  # a handler may write a body it gzipped itself: content_encoding
            bodies.append(("response", event["response"], captured.body(unsent_body), captured.content_encoding,
                           config.response_body_masks))
        elif unsent_body:
            bodies.append(("response", event["response"], unsent_body, None, config.response_body_masks))
    return event, bodies


def apply_mask_result(event: Event, masked: Any) -> Optional[Event]:
    """The event MASK_EVENT_MODEL made of `event` (a moesifapi `EventModel`, as moesiftornado passes it).

    A mask that returned None drops the event (the original's behaviour). A mask that raised (`RAISED`),
    or returned something that is neither an `EventModel` nor a dict, must not let unmasked data reach
    the disk, nor lose the event: it is kept with its headers and bodies removed.
    """
    transaction_id = event["transaction_id"]
    if masked is RAISED:
        return _without_payload(event)
    if masked is None:
        return None
    result = masked.to_dictionary() if isinstance(masked, BaseModel) else masked
    if not isinstance(result, dict):
        logger.error("MASK_EVENT_MODEL returned %s, not an EventModel; the event is kept with headers and bodies "
                     "removed", type(masked).__name__)
        return _without_payload(event)
    result.setdefault("transaction_id", transaction_id)
    result["transaction_id"] = result["transaction_id"] or transaction_id
    return _drop_nulls(result)


def _without_payload(event: Event) -> Event:
    """The event with its request and response headers and bodies removed (masking failed: fail closed)."""
    for part in ("request", "response"):
        for field in ("headers", "body", "transfer_encoding"):
            event[part].pop(field, None)
    return event




_VARIANT_DIGIT = {f"{digit:x}": f"{digit & 0x3 | 0x8:x}" for digit in range(16)}


def new_transaction_id() -> str:
    """A random (version 4) UUID as text: what ``str(uuid.uuid4())`` returns, from the same source, faster."""
    digits = os.urandom(16).hex()
    return (f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{_VARIANT_DIGIT[digits[16]]}{digits[17:20]}-"
            f"{digits[20:]}")


def join_headers(headers: Optional[HTTPHeaders]) -> Dict[str, str]:
    """All headers as a dict; a repeated header keeps every value, joined with ', '."""
    if headers is None:
        return {}
    by_name = getattr(headers, "_as_list", None)  # name -> [values]: Tornado's own store, read directly
    if not isinstance(by_name, dict):
        pairs: Dict[str, str] = {}
        for name, value in headers.get_all():
            pairs[name] = f"{pairs[name]}, {value}" if name in pairs else str(value)
        return pairs
    return {name: str(values[0]) if len(values) == 1 else ", ".join(map(str, values))  # as eventbuild.joined
            for name, values in by_name.items() if values}



def client_ip(request: HTTPServerRequest) -> Optional[str]:
    """The client's address from the usual proxy headers (IPv4 or IPv6), else the peer address."""
    return _client_ip(join_headers(request.headers), request.remote_ip)



def user_from_authorization(headers: HTTPHeaders, config: Config) -> Optional[str]:
    """The user id from the first AUTHORIZATION_HEADER_NAME header present, as moesifwsgi reads it.

    `Bearer <JWT>` gives the payload's AUTHORIZATION_USER_ID_FIELD (keys compared case-insensitively),
    without checking the signature; `Basic` gives the username; any other value is read as a JWT, or as
    base64 JSON when it has no dot. Anything malformed gives None, never an exception.
    """
    for name in config.authorization_header_names:
        value = headers.get(name)
        if value:
            return _user_from_token(value.split(",")[0].strip(), config.authorization_user_id_field)
    return None



def _as_text(option: str, value: Any) -> Optional[str]:
    """A callback's result as text; None if there is none or if its str() raises (the event is still logged)."""
    if value is None:
        return None
    try:
        return str(value)
    except Exception:
        logger.exception("%s returned a %s whose str() raised; the field is left empty and the event is still "
                         "logged", option, type(value).__name__)
        return None


def _drop_nulls(event: Event) -> Event:
    """Remove the null keys moesifapi's `to_dictionary` adds, so the spooled JSON stays small."""
    cleaned = {key: value for key, value in event.items() if value is not None}
    for part in ("request", "response"):
        if isinstance(cleaned.get(part), dict):
            cleaned[part] = {key: value for key, value in cleaned[part].items() if value is not None}
    return cleaned


class ResponseBodyCapture(OutputTransform):
    """An output transform that keeps a copy of the response body, up to a size limit.

    Tornado has emptied the handler's write buffer by the time log_function runs, so the body has to be
    seen on its way out. Installed first in `application.transforms`, it sees every chunk before
    Tornado compresses it, and the headers as the handler set them (`content_encoding` is the handler's
    own Content-Encoding, e.g. for a body it gzipped itself). Past the limit it drops what it holds and
    stops copying, so a streaming response (server-sent events, a long poll) never holds more than the
    limit in memory.
    """

    limit = 0

    def __init__(self, request: HTTPServerRequest) -> None:
        super().__init__(request)
        self._chunks: List[bytes] = []
        self._kept = 0
        self._overflow = False
        self.content_encoding: Optional[str] = None
        setattr(request, _CAPTURE_ATTRIBUTE, self)

    @property
    def buffered_bytes(self) -> int:
        """How many bytes of body this capture holds in memory now (never more than `limit`)."""
        return self._kept

    def transform_first_chunk(
        self, status_code: int, headers: HTTPHeaders, chunk: bytes, finishing: bool
    ) -> Tuple[int, HTTPHeaders, bytes]:
        self.content_encoding = headers.get("Content-Encoding")
        self._keep(chunk)
        return status_code, headers, chunk

    def transform_chunk(self, chunk: bytes, finishing: bool) -> bytes:
        self._keep(chunk)
        return chunk

    def _keep(self, chunk: bytes) -> None:
        if self._overflow or not chunk:
            return
        if self._kept + len(chunk) > self.limit:
            self._overflow = True
            self._chunks.clear()
            self._kept = 0
            return
        self._chunks.append(bytes(chunk))
        self._kept += len(chunk)

    def body(self, unsent: bytes = b"") -> Optional[bytes]:
        """The captured body (plus `unsent`, bytes not yet flushed), or None when larger than the limit."""
        if self._overflow or self._kept + len(unsent) > self.limit:
            return None
        return b"".join(self._chunks) + unsent


def body_capture_transform(limit: int) -> Type[ResponseBodyCapture]:
    """A `ResponseBodyCapture` class bound to a size limit (Tornado builds transforms from a class)."""
    return type("MoesifResponseBodyCapture", (ResponseBodyCapture,), {"limit": limit})


def install_body_capture(application: Any, transform: Type[ResponseBodyCapture]) -> bool:
    """Put `transform` first in `application.transforms` unless one is there; True if it was added."""
    transforms = application.transforms
    if any(isinstance(t, type) and issubclass(t, ResponseBodyCapture) for t in transforms):
        return False
    transforms.insert(0, transform)
    return True
