"""A captured request as it leaves the IOLoop: the raw parts, in a compact binary record (kind `CAPTURE`).

`log_event` takes only what would be lost once the request is gone (method, URL, header lists, raw body
bytes, status, the two times, the client's address, the user callables' answers, the transaction id) and
the few capture settings the event's build needs; the shipper turns the record into the Moesif event
(`eventbuild.build_event`) before it reaches the spool. A leaf module: both sides import it.

Layout: a 3-byte tag (``MC`` and format 1; never the start of JSON nor of a Fernet token), four u32
lengths, then the sections: the scalar fields and header lists as one orjson array, the request body,
the response body, the metadata's JSON. A body length of `TOO_LARGE` means the body was over
MAX_BODY_BYTES (not copied), `ABSENT` that there is none to capture (LOG_BODY off, no response capture).
orjson of one array beats any framing written field by field in Python (see docs/design.md).
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import orjson

TAG = b"MC\x01"
_HEAD = struct.Struct("<3sIIII")  # tag, len(fields), len(request body), len(response body), len(metadata)
TOO_LARGE = 0xFFFFFFFF  # a body length: over MAX_BODY_BYTES, not copied
ABSENT = 0xFFFFFFFE  # a body length (or the metadata's): nothing there
Body = Union[bytes, None, str]  # the bytes; None: over MAX_BODY_BYTES; NO_BODY: nothing to capture
NO_BODY = "absent"


class Settings(NamedTuple):
    """The capture options of the app process that wrote the record, which the build needs (app processes with
    different options may share one shipper)."""

    max_body_bytes: int
    authorization_header_names: Tuple[str, ...]
    authorization_user_id_field: str


class RawCapture(NamedTuple):
    """One request's raw parts. `user_id` is final when `user_resolved`; else it is IDENTIFY_USER's answer and
    the build falls back to the Authorization header, as capture does. Header lists are Tornado's own
    ``{name: [values]}``."""

    started_at: float
    finished_at: float
    method: str
    url: str
    remote_ip: Optional[str]
    status: int
    request_headers: Dict[str, List[str]]
    response_headers: Dict[str, List[str]]
    response_encoding: Optional[str]  # the Content-Encoding the response body was captured with
    api_version: Optional[str]
    user_id: Optional[str]
    user_resolved: bool
    company_id: Optional[str]
    session_token: Optional[str]
    weight: int
    transaction_id: str
    blocked_by: Optional[str]
    settings: Settings
    request_body: Body
    response_body: Body
    metadata: Optional[bytes]  # GET_METADATA's answer as JSON, or None


class PackedCapture(bytes):
    """A packed `RawCapture`: the bytes, and the transaction id for logs."""

    transaction_id: str


def pack(raw: RawCapture) -> PackedCapture:
    """The record's bytes. Raises TypeError when a field is not what orjson writes (the caller builds the
    event itself then)."""
    return pack_parts((*raw[:17], tuple(raw.settings)), raw.request_body, raw.response_body, raw.metadata)


def pack_parts(fields: Tuple[Any, ...], request_body: Body, response_body: Body,
               metadata: Optional[bytes]) -> PackedCapture:
    """`pack` from `RawCapture`'s first 18 fields as a plain tuple (the settings too: orjson writes no named
    tuple) and the three byte sections; what the IOLoop calls, without making the named tuples."""
    head = orjson.dumps(fields)
    packed = PackedCapture(b"".join((
        _HEAD.pack(TAG, len(head), _length(request_body), _length(response_body),
                   ABSENT if metadata is None else len(metadata)),
        head,
        request_body if type(request_body) is bytes else b"",
        response_body if type(response_body) is bytes else b"",
        metadata or b"")))
    packed.transaction_id = fields[15]
    return packed


def _length(body: Body) -> int:
    if body is None:
        return TOO_LARGE
    if type(body) is bytes:
        return len(body)
    return ABSENT


def unpack(data: bytes) -> RawCapture:
    """The `RawCapture` in `data`; ValueError if it is not a record of this format."""
    if data[:3] != TAG or len(data) < _HEAD.size:
        raise ValueError("not a capture record of format 1")
    _, fields_length, request_length, response_length, metadata_length = _HEAD.unpack_from(data)
    position = _HEAD.size
    fields = orjson.loads(data[position:position + fields_length])
    position += fields_length
    request_body, position = _section(data, position, request_length)
    response_body, position = _section(data, position, response_length)
    metadata, position = _section(data, position, metadata_length)
    if position != len(data) or not isinstance(fields, list) or len(fields) != 18:
        raise ValueError("a damaged capture record")
    fields[17] = Settings(fields[17][0], tuple(fields[17][1]), fields[17][2])
    return RawCapture(*fields, request_body, response_body, None if metadata == NO_BODY else metadata)  # type: ignore


def _section(data: bytes, position: int, length: int) -> Tuple[Body, int]:
    if length == TOO_LARGE:
        return None, position
    if length == ABSENT:
        return NO_BODY, position
    return data[position:position + length], position + length
