"""The middleware's options, parsed once from the user's dict into a typed, validated `Config`.

Every other module reads this object, never the raw dict, so a typo or a wrong type fails here, at
construction, with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from . import spooldir
from .errors import ConfigError

logger = logging.getLogger("moesiftornado_durable")

DEFAULT_BASE_URI = "https://api.moesif.net"
DEFAULT_BATCH_SIZE = 25
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_SEND_TIMEOUT = 10.0
DEFAULT_RETRY_MAX_WAIT = 60.0
DEFAULT_AUTH_RETRY_INTERVAL = 300.0
DEFAULT_EVENT_MAX_AGE = 29 * 86400.0  # Moesif rejects events older than 30 days
DEFAULT_SPOOL_MAX_BYTES = 1024 ** 3
DEFAULT_WHEN_FULL = "drop_newest"
WHEN_FULL_POLICIES = ("drop_newest", "drop_oldest")
MOESIF_MAX_EVENT_BYTES = 1_000_000  # Moesif's ingestion API takes events up to 1 MB (taken as 10**6 bytes)
# Moesif's own size for one body (it cuts a body to 450 KB when an event is over 1 MB): two JSON bodies of
# this size, with headers, fit one event; capture omits the larger body when they would not (base64 grows).
DEFAULT_MAX_BODY_BYTES = 450_000
DEFAULT_SPOOL_SYNC = "normal"
DEFAULT_AUTHORIZATION_HEADER_NAME = "authorization"
DEFAULT_AUTHORIZATION_USER_ID_FIELD = "sub"
MAX_BATCH_SIZE = 10_000
SPOOL_SYNC_MODES = ("normal", "full", "audit")  # see journal.py and README "SPOOL_SYNC"
SHIPPER_MODES = ("process", "thread")
DEFAULT_SHIPPER = "process"

Handler = Any  # a tornado.web.RequestHandler; kept loose so that user callables type-check easily
HandlerCallable = Callable[[Handler], Any]
# An outgoing call's callable, as moesifwsgi's: (request, response) of the HTTP client that made the call.
OutgoingCallable = Callable[[Any, Any], Any]


def default_spool_dir(application_id: str) -> str:
    """Where events are spooled when SPOOL_DIR is not given.

    A persistent per-user state directory (``$XDG_STATE_HOME`` or ``~/.local/state``), never a temp dir
    that a reboot wipes, with one sub-directory per application id so two applications on one host
    never send each other's events.
    """
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    app_key = hashlib.sha256(application_id.encode("utf-8")).hexdigest()[:12]
    return os.path.join(state_home, "moesiftornado-durable", app_key)


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated options. Build it with `Config.from_dict`; field names are the keys in lower case."""

    application_id: str
    spool_dir: str
    skip: Optional[HandlerCallable] = None
    identify_user: Optional[HandlerCallable] = None
    identify_company: Optional[HandlerCallable] = None
    get_metadata: Optional[HandlerCallable] = None
    get_session_token: Optional[HandlerCallable] = None
    mask_event_model: Optional[Callable[[Any], Any]] = None
    api_version: Union[None, str, HandlerCallable] = None
    debug: bool = False
    log_body: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    base_uri: str = DEFAULT_BASE_URI
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    retry_max_wait: float = DEFAULT_RETRY_MAX_WAIT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    spool_sync: str = DEFAULT_SPOOL_SYNC
    shipper: str = DEFAULT_SHIPPER
    auth_retry_interval: float = DEFAULT_AUTH_RETRY_INTERVAL
    event_max_age: float = DEFAULT_EVENT_MAX_AGE
    spool_max_bytes: Optional[int] = DEFAULT_SPOOL_MAX_BYTES
    when_full: str = DEFAULT_WHEN_FULL
    spool_encryption_keys: Tuple[Union[str, bytes], ...] = ()
    dead_letter_retention: Optional[float] = None
    authorization_header_names: Tuple[str, ...] = (DEFAULT_AUTHORIZATION_HEADER_NAME,)
    authorization_user_id_field: str = DEFAULT_AUTHORIZATION_USER_ID_FIELD
    # Names to remove before spooling, all lower case: header names, and JSON keys at any depth of a body.
    request_header_masks: FrozenSet[str] = frozenset()
    response_header_masks: FrozenSet[str] = frozenset()
    request_body_masks: FrozenSet[str] = frozenset()
    response_body_masks: FrozenSet[str] = frozenset()
    # Outgoing calls (outgoing.py): the app's own requests and AsyncHTTPClient calls, captured when enabled.
    capture_outgoing_requests: bool = False
    skip_outgoing: Optional[OutgoingCallable] = None
    identify_user_outgoing: Optional[OutgoingCallable] = None
    identify_company_outgoing: Optional[OutgoingCallable] = None
    get_session_token_outgoing: Optional[OutgoingCallable] = None
    get_metadata_outgoing: Optional[OutgoingCallable] = None
    log_body_outgoing: bool = True

    def __repr__(self) -> str:
        masked = self.application_id[:4] + "…" if len(self.application_id) > 4 else "…"
        return (  # never the encryption keys

            f"Config(application_id={masked!r}, spool_dir={self.spool_dir!r}, base_uri={self.base_uri!r}, "
            f"batch_size={self.batch_size}, flush_interval={self.flush_interval}, "
            f"send_timeout={self.send_timeout}, spool_sync={self.spool_sync!r}, shipper={self.shipper!r})"
        )

    @property
    def audit(self) -> bool:
        """SPOOL_SYNC 'audit': no response leaves before its event is on stable storage."""
        return self.spool_sync == "audit"

    @property
    def sqlite_sync(self) -> str:
        """The spool's ``synchronous`` pragma: FULL for SPOOL_SYNC 'full' and 'audit', else NORMAL."""
        return "normal" if self.spool_sync == "normal" else "full"

    def delivery_options(self) -> Dict[str, Any]:
        """The options the shipper process needs, as a JSON-able dict that `from_dict` reads back.

        Holds the application id and the encryption keys: hand it over a pipe, never in argv or a file.
        """
        keys = [key.decode("ascii") if isinstance(key, bytes) else key for key in self.spool_encryption_keys]
        options: Dict[str, Any] = {
            "APPLICATION_ID": self.application_id, "SPOOL_DIR": self.spool_dir, "BASE_URI": self.base_uri,
            "BATCH_SIZE": self.batch_size, "FLUSH_INTERVAL": self.flush_interval, "SEND_TIMEOUT": self.send_timeout,
            "RETRY_MAX_WAIT": self.retry_max_wait, "SPOOL_SYNC": self.spool_sync, "DEBUG": self.debug,
            "AUTH_RETRY_INTERVAL": self.auth_retry_interval, "EVENT_MAX_AGE": self.event_max_age,
            "SPOOL_MAX_BYTES": self.spool_max_bytes, "WHEN_FULL": self.when_full,
            "DEAD_LETTER_RETENTION": self.dead_letter_retention, "SHIPPER": self.shipper,
        }
        if keys:
            options["SPOOL_ENCRYPTION_KEY"] = keys
        return options

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> Config:
        """Validate the user's option dict; raise `ConfigError` naming the first bad key."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ConfigError("options", f"expected a dict, got {type(options).__name__}")
        for key in options:
            if key in IGNORED_OPTIONS:
                logger.warning("moesiftornado_durable: option %r is ignored: %s", key, IGNORED_OPTIONS[key])
            elif key not in _KNOWN_KEYS:
                logger.warning("moesiftornado_durable: unknown option %r is ignored (a typo?)", key)
        read = _Reader(options)
        application_id = read.string("APPLICATION_ID", required=True)
        base_uri = read.string("BASE_URI") or read.string("LOCAL_MOESIF_BASEURL") or DEFAULT_BASE_URI
        spool_dir = read.string("SPOOL_DIR") or default_spool_dir(application_id)
        config = cls(
            application_id=application_id,
            spool_dir=os.path.abspath(os.path.expanduser(spool_dir)),
            skip=read.callable("SKIP"),
            identify_user=read.callable("IDENTIFY_USER"),
            identify_company=read.callable("IDENTIFY_COMPANY"),
            get_metadata=read.callable("GET_METADATA"),
            get_session_token=read.callable("GET_SESSION_TOKEN"),
            mask_event_model=read.callable("MASK_EVENT_MODEL"),
            api_version=read.string_or_callable("API_VERSION"),
            debug=read.boolean("DEBUG", False),
            log_body=read.boolean("LOG_BODY", True),
            batch_size=read.integer("BATCH_SIZE", DEFAULT_BATCH_SIZE, low=1, high=MAX_BATCH_SIZE),
            base_uri=_validate_base_uri(base_uri),
            flush_interval=_flush_interval(read, options),
            send_timeout=read.number("SEND_TIMEOUT", DEFAULT_SEND_TIMEOUT),
            retry_max_wait=read.number("RETRY_MAX_WAIT", DEFAULT_RETRY_MAX_WAIT),
            max_body_bytes=read.integer("MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, low=0),
            spool_sync=read.choice("SPOOL_SYNC", DEFAULT_SPOOL_SYNC, SPOOL_SYNC_MODES),
            shipper=read.choice("SHIPPER", DEFAULT_SHIPPER, SHIPPER_MODES),
            auth_retry_interval=read.number("AUTH_RETRY_INTERVAL", DEFAULT_AUTH_RETRY_INTERVAL),
            event_max_age=read.number("EVENT_MAX_AGE", DEFAULT_EVENT_MAX_AGE),
            spool_max_bytes=read.optional_integer("SPOOL_MAX_BYTES", DEFAULT_SPOOL_MAX_BYTES, low=1),
            when_full=read.choice("WHEN_FULL", DEFAULT_WHEN_FULL, WHEN_FULL_POLICIES),
            spool_encryption_keys=read.keys("SPOOL_ENCRYPTION_KEY"),
            dead_letter_retention=read.optional_number("DEAD_LETTER_RETENTION"),
            authorization_header_names=tuple(
                name.strip().lower()
                for name in (read.string("AUTHORIZATION_HEADER_NAME") or DEFAULT_AUTHORIZATION_HEADER_NAME).split(",")
                if name.strip()
            ),
            authorization_user_id_field=read.string("AUTHORIZATION_USER_ID_FIELD")
            or DEFAULT_AUTHORIZATION_USER_ID_FIELD,
            request_header_masks=read.names("REQUEST_HEADER_MASKS"),
            response_header_masks=read.names("RESPONSE_HEADER_MASKS"),
            request_body_masks=read.names("REQUEST_BODY_MASKS"),
            response_body_masks=read.names("RESPONSE_BODY_MASKS"),
            capture_outgoing_requests=read.boolean("CAPTURE_OUTGOING_REQUESTS", False),
            skip_outgoing=read.outgoing_callable("SKIP_OUTGOING"),
            identify_user_outgoing=read.outgoing_callable("IDENTIFY_USER_OUTGOING"),
            identify_company_outgoing=read.outgoing_callable("IDENTIFY_COMPANY_OUTGOING"),
            get_session_token_outgoing=read.outgoing_callable("GET_SESSION_TOKEN_OUTGOING"),
            get_metadata_outgoing=read.outgoing_callable("GET_METADATA_OUTGOING"),
            log_body_outgoing=read.boolean("LOG_BODY_OUTGOING", True),
        )
        if config.max_body_bytes > MOESIF_MAX_EVENT_BYTES:
            logger.warning("moesiftornado_durable: MAX_BODY_BYTES %d is over Moesif's %d-byte event limit: a body "
                           "that large is omitted anyway, to keep the event under it", config.max_body_bytes,
                           MOESIF_MAX_EVENT_BYTES)
        if not config.capture_outgoing_requests:
            for key in _OUTGOING_KEYS:
                if options.get(key) is not None:
                    logger.warning("moesiftornado_durable: option %r is ignored: CAPTURE_OUTGOING_REQUESTS is not "
                                   "True", key)
        # the directory it resolves to (SPOOL_DIR may be a link onto another disk), checked safe to write in
        return dataclasses.replace(config, spool_dir=spooldir.prepare(config.spool_dir))


_KNOWN_KEYS = frozenset(
    {
        "APPLICATION_ID", "SKIP", "IDENTIFY_USER", "IDENTIFY_COMPANY", "GET_METADATA", "GET_SESSION_TOKEN",
        "MASK_EVENT_MODEL", "API_VERSION", "DEBUG", "LOG_BODY", "BATCH_SIZE", "BASE_URI", "LOCAL_MOESIF_BASEURL",
        "SPOOL_DIR", "FLUSH_INTERVAL", "SEND_TIMEOUT", "RETRY_MAX_WAIT", "MAX_BODY_BYTES", "SPOOL_SYNC", "SHIPPER",
        "AUTHORIZATION_HEADER_NAME", "AUTHORIZATION_USER_ID_FIELD", "AUTH_RETRY_INTERVAL", "EVENT_MAX_AGE",
        "SPOOL_MAX_BYTES", "WHEN_FULL", "SPOOL_ENCRYPTION_KEY", "DEAD_LETTER_RETENTION", "EVENT_BATCH_TIMEOUT",
        "REQUEST_HEADER_MASKS", "RESPONSE_HEADER_MASKS", "REQUEST_BODY_MASKS", "RESPONSE_BODY_MASKS",
        "CAPTURE_OUTGOING_REQUESTS", "SKIP_OUTGOING", "IDENTIFY_USER_OUTGOING", "IDENTIFY_COMPANY_OUTGOING",
        "GET_SESSION_TOKEN_OUTGOING", "GET_METADATA_OUTGOING", "LOG_BODY_OUTGOING",
    }
)

_OUTGOING_KEYS = ("SKIP_OUTGOING", "IDENTIFY_USER_OUTGOING", "IDENTIFY_COMPANY_OUTGOING", "GET_SESSION_TOKEN_OUTGOING",
                  "GET_METADATA_OUTGOING", "LOG_BODY_OUTGOING")

# Options of the other Moesif Python middlewares that have no meaning here: accepted, with a warning saying why.
IGNORED_OPTIONS: Mapping[str, str] = {
    "EVENT_QUEUE_SIZE": "there is no in-memory queue to bound: events are spooled on disk",
    "EVENT_WORKER_COUNT": "one flusher thread per process sends the spooled batches",
    "DISABLED_TRANSACTION_ID": "every event keeps its transaction_id, on which Moesif deduplicates resends",
}


def _flush_interval(read: _Reader, options: Mapping[str, Any]) -> float:
    """FLUSH_INTERVAL, or EVENT_BATCH_TIMEOUT (moesifwsgi's and moesifasgi's name for it) when only that is given."""
    if "FLUSH_INTERVAL" in options or "EVENT_BATCH_TIMEOUT" not in options:
        if "EVENT_BATCH_TIMEOUT" in options:
            logger.warning("moesiftornado_durable: EVENT_BATCH_TIMEOUT is ignored because FLUSH_INTERVAL is given")
        return read.number("FLUSH_INTERVAL", DEFAULT_FLUSH_INTERVAL)
    return read.number("EVENT_BATCH_TIMEOUT", DEFAULT_FLUSH_INTERVAL)


class _Reader:
    """Typed accessors over the raw option dict; each raises `ConfigError` with the key's name."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._options = options

    def string(self, key: str, required: bool = False) -> str:
        value = self._options.get(key)
        if value is None or value == "":
            if required:
                raise ConfigError(key, "is required (your Moesif Application Id)")
            return ""
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__}")
        return value.strip()

    def callable(self, key: str) -> Optional[HandlerCallable]:
        value = self._options.get(key)
        if value is None:
            return None
        if not callable(value):
            raise ConfigError(key, f"expected a function, got {type(value).__name__}")
        return value

    def outgoing_callable(self, key: str) -> Optional[OutgoingCallable]:
        """A function called as ``function(request, response)``, as moesifwsgi calls its ``*_OUTGOING`` options."""
        function: Any = self.callable(key)
        if function is None:
            return None
        if inspect.iscoroutinefunction(function):
            raise ConfigError(key, "expected a plain function: an outgoing call is captured on the thread that made "
                                   "it, where nothing awaits a coroutine")
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # a builtin or C function without a signature: trust it
            return function
        try:
            signature.bind(None, None)
        except TypeError:
            raise ConfigError(key, f"expected a function of (request, response), got one of {signature}") from None
        return function

    def string_or_callable(self, key: str) -> Union[None, str, HandlerCallable]:
        value = self._options.get(key)
        if value is None or isinstance(value, str) or callable(value):
            return value
        raise ConfigError(key, f"expected a string or a function, got {type(value).__name__}")

    def names(self, key: str) -> FrozenSet[str]:
        """A list of names (headers or JSON keys), lower-cased, for case-insensitive matching."""
        value = self._options.get(key)
        if value is None:
            return frozenset()
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise ConfigError(key, f"expected a list of names such as ['password'], got {type(value).__name__}")
        for name in value:
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(key, f"expected non-empty strings, got {name!r}")
        return frozenset(name.strip().lower() for name in value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._options.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected True or False, got {value!r}")
        return value

    def integer(self, key: str, default: int, low: int, high: Optional[int] = None) -> int:
        value = self._options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(key, f"must be {bounds}, got {value}")
        return value

    def optional_integer(self, key: str, default: Optional[int], low: int) -> Optional[int]:
        """A whole number, or None when the user passes None explicitly (no limit)."""
        if key in self._options and self._options[key] is None:
            return None
        return self.integer(key, default if default is not None else low, low)

    def optional_number(self, key: str) -> Optional[float]:
        """A number of seconds, or None when absent or None (no limit)."""
        return None if self._options.get(key) is None else self.number(key, 0.0)

    def keys(self, key: str) -> Tuple[Union[str, bytes], ...]:
        """One key or a list of keys (newest first, for rotation); each checked by building a cipher."""
        value = self._options.get(key)
        if value is None or value == "" or value == []:
            return ()
        keys = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not all(isinstance(k, (str, bytes)) and k for k in keys):
            raise ConfigError(key, "expected a Fernet key (str or bytes) or a list of them")
        from .codec import Codec

        Codec(keys)  # raises ConfigError naming the key when one is malformed or cryptography is missing
        return keys

    def number(self, key: str, default: float) -> float:
        value = self._options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number of seconds, got {value!r}")
        if not value > 0:
            raise ConfigError(key, f"must be greater than 0, got {value}")
        return float(value)

    def choice(self, key: str, default: str, choices: tuple) -> str:
        value = self._options.get(key, default)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return str(value)


def _validate_base_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError("BASE_URI", f"expected an http(s) URL such as {DEFAULT_BASE_URI!r}, got {uri!r}")
    return uri.rstrip("/")
