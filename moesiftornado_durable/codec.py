"""How a record becomes bytes on disk: compact JSON, encrypted when SPOOL_ENCRYPTION_KEY is set.

JSON, never pickle: a spool file is data and must not run code when read. Encryption uses the
`cryptography` package's Fernet (AES-128-CBC with HMAC-SHA256), with several keys for rotation as
`MultiFernet` does: new records use the first key, older ones stay readable with the rest. Encrypted
and plain records can sit side by side in one file (a spool that gains a key keeps its old rows).

The events the middleware captures are written by orjson (a dependency), about ten times faster than by
the json module, and read back as the same values: capture hands them over as `JSONReady` dicts, whose
bodies and metadata are already `RawJSON` (see `to_json_bytes`). Every other record, and every value
orjson refuses or would write differently (NaN, an int past 64 bits, a lone surrogate, a datetime), is
written by the json module.
"""

from __future__ import annotations

import json
import json.encoder
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import orjson

from .errors import ConfigError, MoesifDurableError

KeyInput = Union[str, bytes]
_FERNET_PREFIX = b"gAAAAA"  # every Fernet token starts with version byte 0x80, base64-encoded


class UndecryptableError(MoesifDurableError):
    """A spooled record is encrypted and none of the configured keys opens it (or no key is configured)."""


class Codec:
    """Encodes records for the spool and decodes them back."""

    def __init__(self, keys: Sequence[KeyInput] = ()) -> None:
        self._fernets: List[Any] = _fernets(keys) if keys else []  # one per key, the newest first
        self._cipher: Any = _multi_fernet(self._fernets) if keys else None

    def encode(self, body: Any) -> bytes:
        """`body` as stored: compact JSON (`to_json_bytes`), or as it is when it is bytes already (a packed
        capture record, rawrecord.py); encrypted when a key is set."""
        data = body if isinstance(body, bytes) else to_json_bytes(body)
        return self._cipher.encrypt(data) if self._cipher is not None else data

    def decode(self, data: bytes) -> Any:
        return json.loads(self.decrypt(data))

    def reseal(self, data: bytes, change: Callable[[bytes], bytes]) -> bytes:
        """`data` decrypted, rewritten by `change`, and encrypted again with the key that opened it (plain
        stays plain): a record keeps the key it was written with, as if it had been written changed.
        Raises `UndecryptableError` as `decrypt` does."""
        if not is_encrypted(data):
            return change(bytes(data))
        if self._cipher is None:
            raise UndecryptableError("the record is encrypted and no SPOOL_ENCRYPTION_KEY is set")
        from cryptography.fernet import InvalidToken

        for fernet in self._fernets:  # in MultiFernet's order
            try:
                plain = fernet.decrypt(bytes(data))
            except InvalidToken:
                continue
            return bytes(fernet.encrypt(change(plain)))
        raise UndecryptableError("none of the SPOOL_ENCRYPTION_KEY keys opens the record")

    def decrypt(self, data: bytes) -> bytes:
        """The record's JSON bytes (decrypted if it was encrypted), not parsed."""
        if not is_encrypted(data):
            return bytes(data)
        if self._cipher is None:
            raise UndecryptableError("the record is encrypted and no SPOOL_ENCRYPTION_KEY is set")
        from cryptography.fernet import InvalidToken

        try:
            return bytes(self._cipher.decrypt(bytes(data)))
        except InvalidToken:
            raise UndecryptableError("none of the SPOOL_ENCRYPTION_KEY keys opens the record") from None


class RawJSON:
    """A JSON value already written: compact, strict JSON bytes that a record holds in the value's place.

    `to_json_bytes` writes the bytes as they are; a reader of the record sees the value. Capture makes
    one from a request body that orjson parsed and wrote (no second encode of the body with the event),
    or from a value `to_json_bytes` wrote (the metadata a user callable returned).
    """

    __slots__ = ("json",)

    def __init__(self, json: bytes) -> None:
        self.json = json

    def __repr__(self) -> str:
        return f"RawJSON({self.json!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawJSON) and other.json == self.json

    __hash__ = None  # type: ignore[assignment]

    @property
    def value(self) -> Any:
        """The value, read back from the bytes."""
        return json.loads(self.json)

    @classmethod
    def of(cls, value: Any, depth: int = 0) -> RawJSON:
        """`value` as `to_json_bytes` writes it where it sits `depth` levels down a record."""
        return cls(_json_bytes(value, depth))


class JSONReady(Dict[str, Any]):
    """A record that orjson writes exactly as the json module would: what capture hands the spool.

    The contract, kept by its maker: keys are strings, and values are strings, ints, bools, None,
    `RawJSON`, and lists and dicts of these -- no float (orjson would write NaN as null) and no other
    object (orjson writes datetimes, enums and dataclasses its own way). Whatever orjson refuses all
    the same (a lone surrogate, an int past 64 bits) goes to the json module.
    """


def to_json_bytes(value: Any) -> bytes:
    """Compact, strict JSON; values JSON cannot express are written as text.

    A `JSONReady` record is written by orjson, its `RawJSON` values as their bytes. Any other record, or
    one holding a value orjson refuses (a lone surrogate, an int past 64 bits), is written by the json
    module, objects it does not know as their str(). Whatever else would make json.dumps fail -- keys
    that are not strings, a circular reference, nesting too deep, an object whose str() raises, NaN or
    infinity (not JSON: Moesif would reject the whole batch) -- is rewritten as text, so a record is never
    lost for what a user callback put in it. A lone surrogate (a JSON body's ``"\\ud800"``, a callback's
    string) cannot be UTF-8: it is written as its JSON escape, which reads back as the same string.
    """
    if type(value) is JSONReady:
        try:
            return orjson.dumps(value, default=_fragment)
        except orjson.JSONEncodeError:  # a lone surrogate, an int past 64 bits: the json module writes them
            pass
    return _json_bytes(value, 0)


def _json_bytes(value: Any, depth: int) -> bytes:
    try:
        text = _encode(value)
        if _may_nest_deeper(text, depth) and _deeper_than(value, _MAX_RECORD_DEPTH - depth):
            raise RecursionError("nested deeper than the record limit")
    except Exception:  # default=str runs user code: its str() may raise anything
        text = _encode(_as_json(value, depth))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub(_escaped, text).encode("utf-8")


def _fragment(value: Any) -> Any:
    if type(value) is RawJSON:
        return orjson.Fragment(value.json)
    raise TypeError(f"{type(value).__name__} breaks the JSONReady contract")


def _default(value: Any) -> Any:
    """What the json module writes for an object it does not know: a RawJSON's value, else the text."""
    return value.value if type(value) is RawJSON else str(value)


def _encoder(default: Callable[[Any], Any]) -> Callable[[Any], str]:
    """A compact, strict (allow_nan=False), non-ASCII-keeping JSON encoder, built once.

    json.dumps builds an encoder on every call, and tracks every container to detect circular references;
    here a circular reference ends in RecursionError instead, which sends the record to the slow path as
    any other failure does.
    """
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # None without the C accelerator
    if c_make_encoder is not None:
        try:
            c_encode = c_make_encoder(None, default, json.encoder.encode_basestring, None, ":", ",", False, False,
                                      False)
        except TypeError:  # its private signature changed: the public encoder below does the same
            pass
        else:
            return lambda value: "".join(c_encode(value, 0))
    return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False,
                            default=default).encode


_encode = _encoder(_default)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


_MAX_RECORD_DEPTH = 200  # explicit: how deep the json module recurses before it fails differs by Python version


def _may_nest_deeper(text: str, depth: int) -> bool:
    """False when `text` has too few brackets to nest past the limit (the common case, checked in C)."""
    return text.count("[") + text.count("{") > _MAX_RECORD_DEPTH - depth


def _deeper_than(value: Any, limit: int) -> bool:
    """True when containers nest more than `limit` levels in `value` (a RawJSON counts as a leaf)."""
    if isinstance(value, (dict, list, tuple)):
        if limit <= 0:
            return True
        items = value.values() if isinstance(value, dict) else value
        return any(_deeper_than(item, limit - 1) for item in items)
    return False


def _as_json(value: Any, depth: int = 0, parents: Tuple[int, ...] = ()) -> Any:
    """`value` with everything strict JSON cannot hold replaced by text (see `to_json_bytes`)."""
    if value is None or isinstance(value, (bool, int, str, RawJSON)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, (dict, list, tuple)):
        if id(value) in parents:
            return "<circular reference>"
        if depth >= _MAX_RECORD_DEPTH:
            return "<nested too deep>"
        inner = parents + (id(value),)
        if isinstance(value, dict):
            return {key if isinstance(key, str) else _text(key): _as_json(item, depth + 1, inner)
                    for key, item in value.items()}
        return [_as_json(item, depth + 1, inner) for item in value]
    return _text(value)


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def is_encrypted(data: Optional[bytes]) -> bool:
    """True for a Fernet token (plain records are JSON and start with '{' or '[')."""
    return data is not None and bytes(data[:6]) == _FERNET_PREFIX


def _multi_fernet(fernets: List[Any]) -> Any:
    from cryptography.fernet import MultiFernet

    return MultiFernet(fernets)


def _fernets(keys: Sequence[KeyInput]) -> List[Any]:
    try:
        from cryptography.fernet import Fernet
    except ImportError:
        raise ConfigError("SPOOL_ENCRYPTION_KEY", "needs the 'cryptography' package: "
                          "pip install 'moesiftornado-durable[encryption]'") from None
    fernets = []
    for position, key in enumerate(keys):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError):
            raise ConfigError("SPOOL_ENCRYPTION_KEY", f"key #{position + 1} is not a Fernet key "
                              "(32 url-safe base64-encoded bytes, as Fernet.generate_key() makes)") from None
    return fernets
