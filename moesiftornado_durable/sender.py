"""Send one batch to the Moesif collector, and the retry policy around it.

`Sender.send` makes exactly one HTTP request and either returns or raises one of `errors.py`'s classes:
every moesifapi and transport failure is mapped here. Every request, moesifapi's included (its own client
has no timeout and retries with prints to stdout; `_Client` replaces it), goes through `transport.py`:
no redirects followed, SEND_TIMEOUT for the whole exchange, a capped response body. Only a 2xx to the
request itself is an ack; a 3xx is a `RedirectError`, retried at the slow auth interval, never dead-lettered.
`delivery_policy` is the tenacity policy the flusher wraps around `send`.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlencode, urlsplit

import tenacity
from moesifapi.configuration import Configuration
from moesifapi.controllers.api_controller import ApiController
from moesifapi.exceptions.api_exception import APIException
from moesifapi.http.http_client import HttpClient
from moesifapi.http.http_method_enum import HttpMethodEnum
from moesifapi.http.http_request import HttpRequest
from moesifapi.http.http_response import HttpResponse

from . import __version__
from .errors import AuthError, DeliveryError, PayloadTooLargeError, PermanentError, RedirectError, RetryableError
from .governance import RULES_TAG_HEADER
from .kinds import COMPANY, EVENT, SUBSCRIPTION, USER
from .sampling import CONFIG_ETAG_HEADER
from .transport import ResponseTooLarge, Transport

logger = logging.getLogger("moesiftornado_durable")

USER_AGENT = f"moesiftornado-durable/{__version__}"
_RETRYABLE_STATUSES = frozenset({408, 429})
EVENTS_BATCH_PATH = "/v1/events/batch"
APP_CONFIG_PATH = "/v1/config"
RULES_PATH = "/v1/rules"
GZIP_LEVEL = 1  # cheaper than moesifapi's 9 for a similar size (figures: docs/benchmarks.md, "Replay")
_AUTH_STATUSES = frozenset({401, 402, 403})
# Failures only a configuration change ends: retried every AUTH_RETRY_INTERVAL, logged at ERROR.
_MISCONFIGURED = (AuthError, RedirectError)


class _Client(HttpClient):
    """moesifapi's HTTP client, sending through this sender's `Transport` with its base URI and app id.

    moesifapi keeps the base URI and application id in process-wide globals; the requests it builds are
    re-aimed here, so two senders in one process keep their own.
    """

    def __init__(self, transport: Transport, identity: Mapping[str, str]) -> None:
        self._transport = transport
        self._identity = identity

    def execute_as_string(self, request: HttpRequest) -> HttpResponse:
        path = _path_of(request.query_url)
        if request.query_parameters:
            path += "?" + urlencode(request.query_parameters)
        body = request.parameters
        if isinstance(body, str):
            body = body.encode("utf-8")
        response = self._transport.request(HttpMethodEnum.to_string(request.http_method), path, body,
                                           dict(request.headers or {}, **self._identity))
        return HttpResponse(response.status, response.headers, response.body)

    execute_as_binary = execute_as_string


def _path_of(query_url: str) -> str:
    """The API path of a URL moesifapi built from its global BASE_URI, e.g. '/v1/events/batch'."""
    base = Configuration.BASE_URI.rstrip("/")
    if query_url.startswith(base):
        return query_url[len(base):]
    return urlsplit(query_url).path


class Sender:
    """Sends batches of spooled records to one collector; one HTTP request per `send`."""

    def __init__(self, base_uri: str, application_id: str, timeout: float) -> None:
        self._settings = (base_uri, application_id, timeout)
        self._identity = {"X-Moesif-Application-Id": application_id, "User-Agent": USER_AGENT}
        self._event_headers = {"Content-Type": "application/json; charset=utf-8", "Content-Encoding": "gzip",
                               **self._identity}
        self._transport = Transport(base_uri, timeout)
        self._api = ApiController(http_client=_Client(self._transport, self._identity))
        self._endpoints: Mapping[str, Callable[[List[Any]], Any]] = {  # events go through `_post_events`
            USER: self._api.update_users_batch,
            COMPANY: self._api.update_companies_batch,
            SUBSCRIPTION: self._api.update_subscriptions_batch,
        }

    def send(self, kind: str, records: Sequence[Any],
             while_waiting: Optional[Callable[[], None]] = None) -> Mapping[str, str]:
        """POST one batch of `kind` records; return the response headers or raise a `DeliveryError`.

        `records` are spooled items (with `.json` bytes and `.body`) or plain dicts. Event batches go out
        as the stored JSON bytes, joined and gzipped at level 1: the same request moesifapi builds,
        without parsing and re-encoding every event or its level-9 gzip (most of its cost per batch).
        Profile updates, small and rare, go through moesifapi's client. Only a 2xx answer to this very
        request returns; a redirect is never followed (`RedirectError`). `while_waiting` (which must not
        raise) is called once per call: for events while the collector works on the request, else before it.
        """
        if kind == EVENT:
            return _mapped(self._post_events, [_json_of(record) for record in records], while_waiting)
        if while_waiting is not None:
            while_waiting()
        return _mapped(self._endpoints[kind], [_body_of(record) for record in records])

    def clone(self) -> Sender:
        """Another sender to the same collector, with its own connection (for sending in parallel)."""
        return Sender(*self._settings)

    def get_json(self, path: str) -> Tuple[Any, Mapping[str, str]]:
        """GET `path` (e.g. '/v1/config'): its parsed JSON and headers; raises a `DeliveryError` or ValueError.

        Bounded like every request: no redirects, SEND_TIMEOUT for the whole exchange, a capped body.
        """
        response = _mapped(self._transport.request, "GET", path, None, self._identity)
        if not _is_ack(response.status):
            raise _classify(response.status, response.headers)
        return json.loads(response.body), response.headers

    def fetch_app_config(self) -> Tuple[Any, Optional[str]]:
        """GET /v1/config: the parsed JSON and its X-Moesif-Config-ETag; raises a `DeliveryError` or ValueError."""
        config, headers = self.get_json(APP_CONFIG_PATH)
        return config, headers.get(CONFIG_ETAG_HEADER)

    def fetch_rules(self) -> Tuple[Any, Optional[str]]:
        """GET /v1/rules: the parsed JSON and its X-Moesif-Rules-Tag; raises a `DeliveryError` or ValueError."""
        rules, headers = self.get_json(RULES_PATH)
        return rules, headers.get(RULES_TAG_HEADER)

    def _post_events(self, payloads: List[bytes], while_waiting: Optional[Callable[[], None]]) -> Mapping[str, str]:
        # mtime=0: one zlib call (gzip.compress otherwise adds a CRC pass and a header of its own)
        body = gzip.compress(b"[" + b",".join(payloads) + b"]", compresslevel=GZIP_LEVEL, mtime=0)
        response = self._transport.request("POST", EVENTS_BATCH_PATH, body, self._event_headers, while_waiting)
        if not _is_ack(response.status):
            raise _classify(response.status, response.headers)
        return response.headers

    def close(self) -> None:
        """Close the kept-alive connection."""
        self._transport.close()


def _is_ack(status: int) -> bool:
    """Whether a status acknowledges the request: a 2xx (200 to 208, as moesifapi checks), nothing else."""
    return 200 <= status <= 208


def _mapped(call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)`, with moesifapi's and the transport's exceptions mapped to this library's, in one place."""
    try:
        return call(*args)
    except APIException as exc:
        raise _classify(int(exc.response_code), getattr(exc.context.response, "headers", None)) from exc
    except ResponseTooLarge as exc:
        raise RetryableError(f"the answer was too large: {exc}") from exc
    except (TimeoutError, socket.timeout) as exc:  # the same class since Python 3.10
        raise RetryableError("no complete answer within the send timeout") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise RetryableError(f"connection failed ({exc.__class__.__name__}: {exc})") from exc


def _json_of(record: Any) -> bytes:
    json_bytes = getattr(record, "json", None)
    return json_bytes if isinstance(json_bytes, bytes) else json.dumps(_body_of(record), default=str).encode()


def _body_of(record: Any) -> Any:
    return getattr(record, "body", record)


def _classify(status: int, headers: Optional[Mapping[str, str]]) -> DeliveryError:
    headers = headers or {}
    if 300 <= status < 400:
        return RedirectError(f"HTTP {status} to {headers.get('Location')!r}: not followed; check BASE_URI", status,
                             location=headers.get("Location"))
    if status < 200:
        return RetryableError(f"HTTP {status}: no final answer", status)
    if status in _AUTH_STATUSES:
        return AuthError(f"HTTP {status}: the collector refused the application id", status)
    if status == 413:
        return PayloadTooLargeError(f"HTTP {status}: the batch is too large for the collector", status)
    if status in _RETRYABLE_STATUSES or status >= 500:
        return RetryableError(f"HTTP {status}", status, parse_retry_after(headers.get("Retry-After")))
    return PermanentError(f"HTTP {status}: rejected by the collector", status)


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


class ShutdownRequested(Exception):
    """Raised by the policy's sleep when the flusher is stopping, to end a backoff at once."""


class wait_for_collector(tenacity.wait.wait_base):
    """Backoff that honours the server: Retry-After when sent (capped), a long wait on auth errors and redirects,
    otherwise the `backoff` policy."""

    def __init__(self, backoff: tenacity.wait.wait_base, max_wait: float, auth_wait: float) -> None:
        if max_wait <= 0 or auth_wait <= 0:
            raise ValueError("max_wait and auth_wait must be positive")
        self.backoff = backoff
        self.max_wait = max_wait
        self.auth_wait = auth_wait

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, _MISCONFIGURED):
            return self.auth_wait
        if isinstance(error, RetryableError) and error.retry_after is not None:
            return min(error.retry_after, self.max_wait)
        return min(float(self.backoff(retry_state)), self.max_wait)


def interruptible_sleep(stop: threading.Event) -> Callable[[float], None]:
    """A tenacity sleep that returns early by raising `ShutdownRequested` when `stop` is set."""

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise ShutdownRequested()

    return sleep


def _log_retry(retry_state: tenacity.RetryCallState) -> None:
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
    level = logging.ERROR if isinstance(error, _MISCONFIGURED) else logging.WARNING
    logger.log(
        level,
        "delivery to Moesif failed (%s); events stay spooled, attempt %d, next in %.1f s",
        error,
        retry_state.attempt_number,
        wait,
    )


def delivery_policy(
    stop: threading.Event,
    max_wait: float,
    auth_wait: Optional[float] = None,
    sleep: Optional[Callable[[float], None]] = None,
    attempts: Optional[int] = None,
    retry_auth: bool = True,
) -> tenacity.Retrying:
    """Retry `RetryableError`s with exponential backoff and jitter until `stop` is set (or `attempts`).

    While the application id is refused or the collector redirects, the wait is `auth_wait` (default
    `max_wait`), so the ERROR saying so comes once per interval; `retry_auth=False` gives up on both at once (the replay
    command). `PermanentError`s and anything unexpected propagate at once (reraise=True); a sleep cut
    short by `stop` raises `ShutdownRequested`, so no extra attempt is made during shutdown.
    """
    retryable: tenacity.retry_base = tenacity.retry_if_exception_type(RetryableError)
    if not retry_auth:
        retryable = retryable & tenacity.retry_if_not_exception_type(_MISCONFIGURED)
    give_up: tenacity.stop.stop_base = tenacity.stop_when_event_set(stop)
    if attempts is not None:
        give_up = give_up | tenacity.stop_after_attempt(attempts)
    return tenacity.Retrying(
        retry=retryable,
        wait=wait_for_collector(
            # exponential backoff plus up to 1 s of jitter (composed: stable across tenacity 8.2 to 9.x)
            tenacity.wait_exponential(multiplier=0.5, max=max_wait) + tenacity.wait_random(0, 1.0),
            max_wait,
            auth_wait or max_wait,
        ),
        stop=give_up,
        sleep=sleep or interruptible_sleep(stop),
        before_sleep=_log_retry,
        reraise=True,
    )
