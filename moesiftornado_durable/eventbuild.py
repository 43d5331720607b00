"""Build the Moesif event from a request's raw parts: pure code, no I/O, shared by both sides of capture.

The shipper builds each `rawrecord.RawCapture` that `log_event` journaled into the event (`build_event`)
as it ingests the journals, before the spool stores it (`building`), so the IOLoop only takes the raw
parts. Capture in the app process (capture.py: masks, MASK_EVENT_MODEL, SHIPPER 'thread', outgoing calls)
uses the same helpers, so an event is the same byte for byte whichever side built it: JSON-or-base64
bodies within MAX_BODY_BYTES and Moesif's limit for one event (with the marker Moesif's SDKs use for a body
left out), repeated headers joined, the client's address from proxy headers, ISO times, the user id from
an Authorization header. Nothing here imports the middleware, capture or Tornado.
"""

from __future__ import annotations

import base64
import codecs
import datetime
import ipaddress
import json
import logging
import math
import zlib
from typing import AbstractSet, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import orjson

from . import codec
from .codec import Codec, JSONReady, RawJSON, UndecryptableError
from .config import MOESIF_MAX_EVENT_BYTES
from .kinds import CAPTURE, EVENT
from .rawrecord import NO_BODY, TAG, RawCapture, unpack

logger = logging.getLogger("moesiftornado_durable")

Event = Dict[str, Any]
Row = Tuple[str, bytes, float]  # a journal row: kind, stored bytes, spooled_at

MAX_JSON_DEPTH = 100  # JSON bodies nested deeper are sent as base64 (see encode_body), or omitted under masks
# Bodies that, decoded, hold fewer bytes than this together cannot take an event past Moesif's limit (a JSON
# body rewritten grows at most ~4.5 times, '9E15' -> '9000000000000000.0'): larger ones are measured.
_MEASURED_FROM = MOESIF_MAX_EVENT_BYTES // 8
_JSON_STARTS = (b"{", b"[")

# Headers a proxy may set with the original client address, in the order they are trusted; spelled as
# Tornado's HTTPHeaders writes names (each word capitalized), as `_client_ip` looks them up.
_CLIENT_IP_HEADERS = (
    "X-Client-Ip",
    "X-Forwarded-For",
    "Cf-Connecting-Ip",
    "Fastly-Client-Ip",
    "True-Client-Ip",
    "X-Real-Ip",
    "X-Cluster-Client-Ip",
    "X-Forwarded",
    "Forwarded-For",
    "Forwarded",
)
_CLIENT_IP_HEADER_SET = frozenset(_CLIENT_IP_HEADERS)


def format_time(timestamp: float) -> str:
    """ISO 8601 in UTC without offset, to the microsecond, as Moesif's Python SDKs send it.

    The same text as ``datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="microseconds")``
    (without the offset), at a third of its cost: the microseconds are rounded as datetime rounds them
    (half to even), and the text of the whole second is kept for the next calls.
    """
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        micros -= 1_000_000
        second += 1
    elif micros < 0:
        micros += 1_000_000
        second -= 1
    prefix = _SECOND_TEXT.get(second)
    if prefix is None:
        moment = datetime.datetime.fromtimestamp(second, tz=datetime.timezone.utc).replace(tzinfo=None)
        prefix = moment.isoformat(timespec="seconds")
        if len(_SECOND_TEXT) >= 16:
            _SECOND_TEXT.clear()
        _SECOND_TEXT[second] = prefix
    return f"{prefix}.{micros:06d}"


_SECOND_TEXT: Dict[int, str] = {}  # a whole second (Unix time) -> "YYYY-MM-DDTHH:MM:SS", for a few recent ones

def mask_headers(headers: Dict[str, str], masks: AbstractSet[str]) -> Dict[str, str]:
    """The headers without those named in `masks` (lower-case names; headers match case-insensitively)."""
    if not masks:
        return headers
    return {name: value for name, value in headers.items() if name.lower() not in masks}


def mask_body(body: Any, masks: AbstractSet[str]) -> Any:
    """A JSON body without the keys named in `masks` (lower case), at any depth, in objects and in lists."""
    if not masks:
        return body
    if isinstance(body, dict):
        return {key: mask_body(value, masks) for key, value in body.items() if str(key).lower() not in masks}
    if isinstance(body, list):
        return [mask_body(item, masks) for item in body]
    return body


def _client_ip(headers: Mapping[str, str], remote_ip: Optional[str]) -> Optional[str]:
    """`client_ip` from the request's headers as `join_headers` returns them (names as Tornado writes them)."""
    if _CLIENT_IP_HEADER_SET.isdisjoint(headers):  # most requests: no proxy header at all
        return remote_ip
    for header in _CLIENT_IP_HEADERS:
        value = headers.get(header)
        if not value:
            continue
        for candidate in _ip_candidates(header, value):
            address = parse_ip(candidate)
            if address is not None:
                return address
    return remote_ip


def _ip_candidates(header: str, value: str) -> Iterator[str]:
    for part in value.split(","):
        if header == "Forwarded":
            for pair in part.split(";"):
                name, _, found = pair.partition("=")
                if name.strip().lower() == "for":
                    yield found
        else:
            yield part


def parse_ip(text: str) -> Optional[str]:
    """An IP address from a header token ('1.2.3.4', '1.2.3.4:80', '[::1]:80', '"[::1]"'), else None."""
    token = text.strip().strip('"').strip()
    if token.startswith("["):
        token = token[1 : token.find("]")] if "]" in token else ""
    elif token.count(":") == 1:
        token = token.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(token))
    except ValueError:
        return None


def encode_body(raw: bytes) -> Tuple[Any, Optional[str]]:
    """A body as Moesif wants it: parsed JSON with 'json', anything else base64 with 'base64'.

    JSON behind a byte-order mark, or in UTF-16 or UTF-32, is JSON too (`_as_utf8`). JSON nested deeper
    than `MAX_JSON_DEPTH` is sent as base64: Python's JSON parser and encoders recurse, so such a body (any
    client can send one) would make the parse, or a later encode on the way to the spool or to Moesif,
    raise RecursionError and lose the event.
    """
    if not raw:
        return None, None
    value, why_not = _parse_json(_as_utf8(raw))
    if why_not is None:
        return value, "json"
    return base64.b64encode(raw).decode("ascii"), "base64"


def _parse_json(raw: bytes) -> Tuple[Any, Optional[str]]:
    """(the JSON object or array `raw` holds, None), or (None, why it holds none that masks can be applied to)."""
    if raw.lstrip()[:1] not in _JSON_STARTS:
        return None, "not JSON"
    try:
        parsed = json.loads(raw)
    except RecursionError:
        return None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    except ValueError:
        return None, "not valid JSON"
    # A body with few brackets cannot be deep: only count-heavy bodies pay for the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(parsed, MAX_JSON_DEPTH):
        return None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    return parsed, None


def _as_utf8(raw: bytes) -> bytes:
    """`raw` without a UTF-8 byte-order mark, or JSON text sent in UTF-16 or UTF-32 re-encoded as UTF-8;
    anything else as it is.

    RFC 8259 asks for UTF-8 without a BOM, but clients send these and json.loads reads them: masks must
    see into them as into any JSON body.
    """
    if raw[:1] in _JSON_STARTS:  # nearly every JSON body
        return raw
    if raw.startswith(codecs.BOM_UTF8):
        return raw[len(codecs.BOM_UTF8):]
    encoding = json.detect_encoding(raw)  # 'utf-16' or 'utf-32' with a BOM (which decoding removes), or -le/-be
    if encoding == "utf-8":
        return raw
    try:
        text = raw.decode(encoding)
        return text.encode("utf-8") if text.lstrip()[:1] in ("{", "[") else raw
    except UnicodeError:
        return raw


def _deeper_than(value: Any, limit: int) -> bool:
    """True if lists and dicts in `value` nest more than `limit` levels (an iterative walk: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _set_body(side: str, part: Dict[str, Any], raw: Optional[bytes], content_encoding: Optional[str], limit: int,
              masks: AbstractSet[str], fast: bool = False) -> Tuple[Optional[str], int]:
    """Set `part`'s body and transfer_encoding from `raw` (None: over `limit` as read), masked by `masks`.

    Returns (why the body was omitted, or None; how many bytes it holds once decoded). A body over
    `limit` is omitted. With masks, so is every body they cannot be applied to -- not JSON, invalid JSON,
    nested too deep, or still encoded -- rather than stored as base64 with the masked field inside
    (fail closed). Without masks such a body is sent as base64, as before.
    """
    plain, still_encoded = (None, None) if raw is None else _decoded(raw, content_encoding, limit)
    if plain is None:
        return _omit(part, "too_large", f"{side}.body.length exceeded MAX_BODY_BYTES of {limit}"), 0
    if not plain:
        return None, 0
    if masks and still_encoded:
        return _unmaskable(side, part, still_encoded), 0
    text = _as_utf8(plain)
    written = _json_by_orjson(text, masks) if fast else None
    if written is not None:
        part["body"], part["transfer_encoding"] = written, "json"
        return None, len(plain)
    value, why_not = _parse_json(text)
    if why_not is None:
        body = mask_body(value, masks)
        if fast:  # as to_json_bytes writes it inside the event: request/response -> body is 2 levels down
            body = RawJSON.of(body, depth=2)
        part["body"], part["transfer_encoding"] = body, "json"
    elif masks:
        return _unmaskable(side, part, why_not), 0
    else:
        part["body"], part["transfer_encoding"] = base64.b64encode(plain).decode("ascii"), "base64"
    return None, len(plain)


def _json_by_orjson(raw: bytes, masks: AbstractSet[str]) -> Optional[RawJSON]:
    """A JSON body parsed, masked and written by orjson, when that gives what `encode_body` and
    `to_json_bytes` would (the same value); None for anything else, which takes their path.

    orjson accepts less than json.loads (no NaN, no lone surrogates, UTF-8 only, nesting up to 1024) and
    refuses it: None. What it reads, it reads as json.loads does, but for one thing: an integer that does
    not fit 64 bits becomes a float; a body that may hold one is left to json.loads.
    """
    if raw.lstrip()[:1] not in (b"{", b"[") or _may_hold_a_long_integer(raw):
        return None
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(parsed, MAX_JSON_DEPTH):
        return None  # encode_body sends it as base64
    try:
        return RawJSON(orjson.dumps(mask_body(parsed, masks)))
    except orjson.JSONEncodeError:  # not expected of what it parsed, but never lose the event
        return None


def _may_hold_a_long_integer(raw: bytes) -> bool:
    """True if `raw` has 20 digits in a row, or a minus and 19 digits: the shortest integers past 64 bits
    (digits inside strings count too: such a body only takes the slower path)."""
    shape = raw.translate(_DIGITS_AND_MINUS)
    return b"0" * 20 in shape or b"-" + b"0" * 19 in shape


# A byte table: each digit becomes b"0", the minus sign stays, anything else becomes a space.
_DIGITS_AND_MINUS = bytes(0x30 if 0x30 <= code <= 0x39 else code if code == 0x2D else 0x20 for code in range(256))


def _decoded(raw: bytes, content_encoding: Optional[str], limit: int) -> Tuple[Optional[bytes], Optional[str]]:
    """(the body, gunzipped when it was sent gzip-encoded, or None if larger than `limit`; why it is still
    encoded, or None when it is not)."""
    if len(raw) > limit:
        return None, None
    if not content_encoding:
        return raw, None
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return raw, None
    if coding in ("gzip", "x-gzip"):
        try:
            plain = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, limit + 1)
        except zlib.error:
            return raw, "gzip-encoded and could not be decoded"
        return (None, None) if len(plain) > limit else (plain, None)
    return raw, f"encoded with Content-Encoding {content_encoding!r}, which is not decoded"


def _unmaskable(side: str, part: Dict[str, Any], why: str) -> str:
    option = f"{side.upper()}_BODY_MASKS"
    return _omit(part, "unmaskable", f"{side}.body omitted: {option} is set and the body is {why}, so the masks "
                                     f"cannot be applied to it")


def _fit_event_limit(event: Event, sides: List[str]) -> List[str]:
    """Omit the bodies of `sides`, the larger first, while the event as written is over Moesif's limit for
    one event (`MOESIF_MAX_EVENT_BYTES`); return the reasons, for the omitted ones."""
    omitted: List[str] = []
    size = len(codec.to_json_bytes(event))
    while size > MOESIF_MAX_EVENT_BYTES and sides:
        _, side = max((_written_size(event[side]["body"]), side) for side in sides)
        sides.remove(side)
        omitted.append(_omit(event[side], "event_too_large",
                             f"{side}.body omitted: with it the event is {size} bytes, over Moesif's limit of "
                             f"{MOESIF_MAX_EVENT_BYTES} bytes for one event"))
        size = len(codec.to_json_bytes(event))
    return omitted


def _written_size(body: Any) -> int:
    """How many bytes `body` takes in the event as written (base64 text, or JSON)."""
    if isinstance(body, RawJSON):
        return len(body.json)
    if isinstance(body, str):
        return len(body) + 2
    return len(codec.to_json_bytes(body))


_REPORTED: Set[str] = set()  # the reasons for an omitted body already logged at WARNING in this process


def _omit(part: Dict[str, Any], reason: str, message: str) -> str:
    """Put the marker Moesif's own SDKs use for a body they leave out, `{"msg": message}`, in the body's
    place; log it (at WARNING the first time for `reason`, then at DEBUG); return `reason`.

    `message` names the side, the option and the sizes, never a byte of the body.
    """
    part["body"], part["transfer_encoding"] = {"msg": message}, "json"
    if reason in _REPORTED:
        logger.debug("%s", message)
    else:
        _REPORTED.add(reason)
        logger.warning("%s (counted in stats() as body_omitted_%s; logged at DEBUG from now on)", message, reason)
    return reason


def _user_from_token(token: str, field: str) -> Optional[str]:
    scheme, _, credentials = token.partition(" ")
    try:
        if scheme.lower() == "basic":
            username = base64.b64decode(credentials.strip() + "==").decode("utf-8").split(":", 1)[0]
            return username.strip() or None
        if scheme.lower() == "bearer":
            parts = credentials.strip().split(".")
            payload = parts[1] if len(parts) >= 3 else ""  # header.payload.signature
        else:  # a custom scheme: a JWT, or the base64 JSON payload alone
            parts = token.split(".")
            payload = parts[1] if len(parts) > 1 else token
        if not payload:
            return None
        # urlsafe_b64decode takes both alphabets: JWTs use '-' and '_', some clients send '+' and '/'
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if not isinstance(claims, dict):
            return None
        value = {str(key).lower(): value for key, value in claims.items()}.get(field.lower())
        return None if value is None or value == "" else str(value)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: a deeply nested JSON payload
        return None


def joined(by_name: Mapping[str, Sequence[str]]) -> Dict[str, str]:
    """Headers as Tornado keeps them (``{name: [values]}``) as one dict; a repeated header keeps every
    value, joined with ', '."""
    return {name: str(values[0]) if len(values) == 1 else ", ".join(map(str, values))
            for name, values in by_name.items() if values}


def user_from_headers(headers: Mapping[str, str], names: Iterable[str], field: str) -> Optional[str]:
    """The user id from the first of `names` present in `headers` (joined, names as Tornado writes them), as
    moesifwsgi reads it (`_user_from_token`)."""
    for name in names:
        value = headers.get(_header_case(name))
        if value:
            return _user_from_token(value.split(",")[0].strip(), field)
    return None


def _header_case(name: str) -> str:
    """A header name as Tornado's HTTPHeaders writes it: each word capitalized."""
    return "-".join([word.capitalize() for word in name.split("-")])


def build_event(raw: RawCapture) -> JSONReady:
    """The Moesif event of `raw`: what capture.capture_steps makes of the same request in the app process
    (without masks), key for key, so that `codec.encode` writes the same bytes."""
    request_headers = joined(raw.request_headers)
    settings = raw.settings
    user_id = raw.user_id
    if not raw.user_resolved and not user_id:
        user_id = user_from_headers(request_headers, settings.authorization_header_names,
                                    settings.authorization_user_id_field)
    event = JSONReady({
        "request": {
            "time": format_time(raw.started_at),
            "uri": raw.url,
            "verb": raw.method,
            "api_version": raw.api_version,
            "ip_address": client_ip_of(request_headers, raw.remote_ip),
            "headers": request_headers,
        },
        "response": {
            "time": format_time(raw.finished_at),
            "status": raw.status,
            "headers": joined(raw.response_headers),
        },
        "user_id": user_id,
        "company_id": raw.company_id,
        "session_token": raw.session_token,
        "metadata": None if raw.metadata is None else RawJSON(raw.metadata),
        "direction": "Incoming",
        "weight": raw.weight,
        "transaction_id": raw.transaction_id,
    })
    if raw.blocked_by:
        event["blocked_by"] = raw.blocked_by
    bodies = []
    if raw.request_body != NO_BODY:
        bodies.append(("request", raw.request_body, request_headers.get("Content-Encoding")))
    if raw.response_body != NO_BODY:
        bodies.append(("response", raw.response_body, raw.response_encoding))
    kept: List[str] = []
    kept_bytes = 0
    for side, body, content_encoding in bodies:
        reason, size = _set_body(side, event[side], body,  # type: ignore[arg-type]
                                 content_encoding, settings.max_body_bytes, frozenset(), True)
        if reason is None and size:
            kept.append(side)
            kept_bytes += size
    if kept_bytes > _MEASURED_FROM:
        _fit_event_limit(event, kept)
    return event


def client_ip_of(headers: Mapping[str, str], remote_ip: Optional[str]) -> Optional[str]:
    """The client's address: from the usual proxy headers (`headers` joined, names as Tornado writes them),
    else the peer's address."""
    return _client_ip(headers, remote_ip)


def build_rows(rows: Sequence[Row], coder: Codec) -> List[Row]:
    """Journal rows as the spool stores them: each `CAPTURE` record built into its event and encoded (and
    encrypted) by `coder`; every other row as it is.

    An event is encrypted with the key that opened its record (`Codec.reseal`): as if the app had written
    it. A record no key opens is stored as it is, as an event the spool sets aside as undecryptable until a
    key opens it; the spool then builds it as it claims it (`built`). One that cannot be read or built
    (damage the journal's checks missed, or a bug) is logged and stored as it is, never dropped: Moesif
    refuses it, alone, into dead letters."""
    if not any(kind == CAPTURE for kind, _, _ in rows):
        return list(rows)
    stored: List[Row] = []
    for kind, data, spooled_at in rows:
        if kind == CAPTURE:
            try:
                data = coder.reseal(data, built)
            except UndecryptableError:
                pass
            except Exception:
                logger.exception("moesiftornado_durable shipper: could not build the event of a journaled capture "
                                 "record; it is spooled as it was")
            kind = EVENT
        stored.append((kind, data, spooled_at))
    return stored


def built(plain: bytes) -> bytes:
    """The event's JSON bytes, from the decrypted bytes of a capture record (raises ValueError if it is not one)."""
    return codec.to_json_bytes(build_event(unpack(plain)))


def is_capture_record(plain: bytes) -> bool:
    """True for the decrypted bytes of a capture record (kept undecryptable in a spool, say)."""
    return plain[:len(TAG)] == TAG


def building(commit: Callable[[List[Row], str, int], None], coder: Codec) -> Callable[[List[Row], str, int], None]:
    """`commit` (the spool's journal ingest) with each capture record built into its event first."""

    def commit_built(rows: List[Row], segment: str, offset: int) -> None:
        commit(build_rows(rows, coder), segment, offset)

    return commit_built
