"""The IOLoop's share of capture when the shipper builds the event: take the request's raw parts, pack them.

`capture_steps` here is capture.capture_steps cut in two. On the IOLoop it reads what would be lost once
the request is gone (method, URL, Tornado's header lists, the raw bodies, status, the two times, the peer
address, the transaction id), asks the user's callables (SKIP; API_VERSION, IDENTIFY_USER,
IDENTIFY_COMPANY, GET_SESSION_TOKEN, GET_METADATA), samples the event, and packs it all into a
`rawrecord` record; the shipper builds the Moesif event from it (`eventbuild.build_event`) off the
request path. What sampling must see is resolved here only when the app config's rules look at the
event (the client IP, the user id from a JWT); otherwise the shipper resolves it.

It is used only where the event needs nothing the app alone can do to it (`splits`: no masks, no
MASK_EVENT_MODEL, SHIPPER 'process'), and only for requests whose bodies need no decoding and cannot be
left out (within MAX_BODY_BYTES, not Content-Encoded, small enough together for Moesif's limit): any other
request takes capture.capture_steps, so every omitted body is still counted and logged in the app.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import orjson

from . import capture
from .capture import (
    _CAPTURE_ATTRIBUTE,
    BLOCKED_BY_ATTRIBUTE,
    RAISED,
    Outcome,
    ResponseBodyCapture,
    Steps,
    _as_text,
    logger,
    new_transaction_id,
)
from .codec import RawJSON
from .config import Config, Handler
from .eventbuild import _MEASURED_FROM, build_event, client_ip_of, joined, user_from_headers
from .rawrecord import NO_BODY, Body, RawCapture, Settings, pack_parts
from .sampling import FULL_RATE, AppConfig, Sampler

_IDENTITY = ("", "identity")


def splits(config: Config) -> bool:
    """True when the shipper may build this config's events: no mask must be applied before the disk, and
    a shipper process (not SHIPPER 'thread') ingests the journal."""
    return (config.shipper == "process" and config.mask_event_model is None and not config.request_header_masks
            and not config.response_header_masks and not config.request_body_masks
            and not config.response_body_masks)


def capture_steps(handler: Handler, config: Config, finished_at: float, sampler: Sampler,
                  unsent_body: bytes = b"", *, every_body: bool = False) -> Steps:
    """capture.capture_steps for a config that `splits`: the same callables in the same order, the same
    sampling, ending in an `Outcome` whose `packed` is the record (or, for a request that needs the app's
    full capture, exactly what capture.capture_steps gives). `every_body` packs every request whatever its
    bodies (the build handles them all; the tests compare it with the full capture)."""
    request_headers = _header_lists(handler.request.headers)
    bodies = _raw_bodies(handler, config, request_headers, unsent_body, every_body)
    if bodies is None:
        return (yield from capture.capture_steps(handler, config, finished_at, sampler.weight_for, unsent_body))
    if config.skip is not None:
        [skip] = yield [("SKIP", config.skip, handler)]
        if skip and skip is not RAISED:
            return Outcome(None, "skipped")
    request = handler.request  # everything read before the callables run, which may be awaited: then the
    started_at = finished_at - request.request_time()  # response may go on changing (strict mode's last flush)
    url, method, remote_ip, status = request.full_url(), request.method, request.remote_ip, handler.get_status()
    request_part, request_copy = _snapshot(request_headers)
    response_part, response_copy = _snapshot(_header_lists(getattr(handler, "_headers", None)))
    transaction_id = new_transaction_id()
    blocked_by = getattr(handler, BLOCKED_BY_ATTRIBUTE, None)
    results = yield from capture.identity_steps(handler, config)
    if callable(config.api_version):
        api_version = _as_text("API_VERSION", results.get("API_VERSION"))
    else:
        api_version = config.api_version if isinstance(config.api_version, str) else None
    user_id = _as_text("IDENTIFY_USER", results.get("IDENTIFY_USER"))
    company_id = _as_text("IDENTIFY_COMPANY", results.get("IDENTIFY_COMPANY"))
    session_token = _as_text("GET_SESSION_TOKEN", results.get("GET_SESSION_TOKEN"))
    app_config = sampler.config
    resolved = app_config.reads_events  # sampling looks at the event: resolve here what it reads
    if not resolved and app_config.sample_rate >= FULL_RATE:
        weight: Optional[int] = 1  # what sampling gives every event under such a config
    elif resolved:
        headers = joined(request_headers)
        user_id = user_id or user_from_headers(headers, config.authorization_header_names,
                                               config.authorization_user_id_field)
        weight = _weight(sampler, app_config, {
            "request": {"verb": method, "uri": url, "ip_address": client_ip_of(headers, remote_ip)},
            "response": {"status": status}, "user_id": user_id, "company_id": company_id})
    else:  # what sampling reads of an event under such a config
        weight = _weight(sampler, app_config, {"user_id": None, "company_id": None})
    if weight is None:
        return Outcome(None, "sampled_out")
    metadata = results.get("GET_METADATA")
    metadata_json = None if metadata is None else RawJSON.of(metadata, depth=1).json
    fields = (started_at, finished_at, method, url, remote_ip, status, request_part, response_part, bodies[2],
              api_version, user_id, resolved, company_id, session_token, weight, transaction_id, blocked_by,
              (config.max_body_bytes, config.authorization_header_names, config.authorization_user_id_field))
    try:
        return Outcome(None, packed=pack_parts(fields, bodies[0], bodies[1], metadata_json))
    except TypeError:  # a value orjson does not write (a lone surrogate, an object): build the event here
        return Outcome(build_event(RawCapture(
            started_at, finished_at, method, url, remote_ip, status, _as_dict(request_copy), _as_dict(response_copy),
            bodies[2], api_version, user_id, resolved, company_id, session_token, weight, transaction_id, blocked_by,
            Settings(*fields[17]), bodies[0], bodies[1], metadata_json)))


def _snapshot(headers: Dict[str, List[str]]) -> Tuple[Any, Any]:
    """(what the record holds of `headers`, as they are now: their JSON, an `orjson.Fragment`; the same to
    build the event from here, its bytes) -- or a copy for both when orjson refuses a value."""
    try:
        data = orjson.dumps(headers)
    except TypeError:
        copy = {name: list(values) for name, values in headers.items()}
        return copy, copy
    return orjson.Fragment(data), data


def _as_dict(copy: Any) -> Dict[str, List[str]]:
    return copy if isinstance(copy, dict) else orjson.loads(copy)


def _weight(sampler: Sampler, app_config: AppConfig, view: Dict[str, Any]) -> Optional[int]:
    """`sampler`'s weight for an event that reads as `view` under `app_config`; 1 if sampling fails."""
    try:
        return sampler.weight_under(app_config, view)
    except Exception:  # a sampling bug must not lose the event: keep it unsampled
        logger.exception("sampling failed; the event is kept")
        return 1


def _raw_bodies(handler: Handler, config: Config, request_headers: Dict[str, List[str]], unsent_body: bytes,
                every_body: bool = False) -> Optional[Tuple[Body, Body, Optional[str]]]:
    """(request body, response body, the response's Content-Encoding) as read, or None when the request
    needs the app's full capture: a body over MAX_BODY_BYTES or Content-Encoded (to be decoded, maybe left
    out, counted and logged here), or bodies large enough together to be measured against Moesif's limit."""
    if not config.log_body:
        return NO_BODY, NO_BODY, None
    if every_body:
        return _every_body(handler, config, unsent_body)
    request = handler.request
    request_body = request.body or b""
    limit = min(config.max_body_bytes, _MEASURED_FROM)
    if len(request_body) > limit or (request_body and ", ".join(request_headers.get("Content-Encoding", ()))
                                     .strip().lower() not in _IDENTITY):
        return None
    captured: Optional[ResponseBodyCapture] = getattr(request, _CAPTURE_ATTRIBUTE, None)
    response_body: Body = NO_BODY
    encoding = None
    if captured is not None:
        response_body = captured.body(unsent_body)
        encoding = captured.content_encoding
        if response_body is None or (response_body and (encoding or "").strip().lower() not in _IDENTITY):
            return None
    elif unsent_body:
        response_body = unsent_body
    if isinstance(response_body, bytes) and len(request_body) + len(response_body) > limit:
        return None
    return request_body, response_body, encoding


def _every_body(handler: Handler, config: Config, unsent_body: bytes) -> Tuple[Body, Body, Optional[str]]:
    """The bodies as capture.capture_steps reads them, whatever they need."""
    request = handler.request
    request_body = request.body or b""
    captured: Optional[ResponseBodyCapture] = getattr(request, _CAPTURE_ATTRIBUTE, None)
    if captured is not None:
        return request_body, captured.body(unsent_body), captured.content_encoding
    return request_body, unsent_body or NO_BODY, None


def _header_lists(headers: Any) -> Dict[str, List[str]]:
    """Headers as Tornado keeps them, ``{name: [values]}`` (read, not copied: they no longer change)."""
    if headers is None:
        return {}
    by_name = getattr(headers, "_as_list", None)
    if isinstance(by_name, dict):
        return by_name
    lists: Dict[str, List[str]] = {}
    for name, value in headers.get_all():
        lists.setdefault(name, []).append(value)
    return lists
