"""Sampling by the Moesif app config (``GET /v1/config``), as the Moesif Python middlewares sample.

Three parts, kept apart:

- `AppConfig` is one parsed config: the global ``sample_rate``, ``user_sample_rate`` and
  ``company_sample_rate`` (id → rate), and ``regex_config`` rules. It is immutable, so readers on the
  IOLoop never lock; a new config replaces the old one by one reference swap.
- `Sampler` holds the current `AppConfig` and decides per event: keep it with a weight, or drop it.
- `ConfigFetcher` is a small daemon thread that fetches the config at start, again when a batch
  response carries a new ``X-Moesif-Config-ETag``, and at least every `refresh_interval` seconds.
  Another one fetches the governance rules (`governance.RuleSet`) the same way.
  It never runs on the IOLoop, so a slow or dead Moesif never delays a request. A failed fetch keeps
  the last good config (before the first one: everything is kept, rate 100).

The semantics follow moesifapi 1.5.5 (``moesifapi/app_config``), used by moesifwsgi and moesifasgi:
the first ``regex_config`` rule whose conditions all match wins; else the user's rate; else the
company's; else ``sample_rate``; else 100. A kept event gets ``weight = floor(100 / rate)``. A rule
condition is ``{"path": "request.route", "value": "<regex>"}``, searched (``re.search``) in the
event's ``request.verb``, ``request.route`` (the URI's path without the query string, ``/`` when
empty), ``request.ip_address`` or ``response.status``. Where moesifapi fails — an unknown path, a bad
regex or a rule without a rate make it return 100 for every event — this skips only that rule.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Pattern, Tuple
from urllib.parse import urlsplit

from .governance import Cohorts
from .worker import ProcessThread

logger = logging.getLogger("moesiftornado_durable")

CONFIG_ETAG_HEADER = "X-Moesif-Config-ETag"
DEFAULT_REFRESH_INTERVAL = 300.0  # seconds: the config is fetched again at least this often
FULL_RATE = 100.0

Event = Dict[str, Any]

# The event fields a regex_config condition can test, and how to read each from an event.
_CONDITION_FIELDS: Mapping[str, Callable[[Event], Any]] = {
    "request.verb": lambda event: event.get("request", {}).get("verb"),
    "request.route": lambda event: _route(event.get("request", {}).get("uri")),
    "request.ip_address": lambda event: event.get("request", {}).get("ip_address"),
    "response.status": lambda event: event.get("response", {}).get("status"),
}


def _route(uri: Optional[str]) -> Optional[str]:
    if not uri:
        return None
    return urlsplit(uri).path or "/"


@dataclasses.dataclass(frozen=True)
class RegexRule:
    """One ``regex_config`` entry: every condition (field, pattern) must match for `sample_rate` to apply."""

    conditions: Tuple[Tuple[str, Pattern[str]], ...]
    sample_rate: float

    def matches(self, event: Event) -> bool:
        for field, pattern in self.conditions:
            value = _CONDITION_FIELDS[field](event)
            if value is None or value == "" or pattern.search(str(value)) is None:
                return False
        return True


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """A parsed app config. `AppConfig()` is the default before any fetch: every event is kept."""

    sample_rate: float = FULL_RATE
    user_sample_rate: Mapping[str, float] = dataclasses.field(default_factory=dict)
    company_sample_rate: Mapping[str, float] = dataclasses.field(default_factory=dict)
    regex_rules: Tuple[RegexRule, ...] = ()
    cohorts: Cohorts = Cohorts()  # for governance rules: ``user_rules`` and ``company_rules``
    etag: Optional[str] = None

    @classmethod
    def parse(cls, body: Any, etag: Optional[str] = None) -> AppConfig:
        """Parse the JSON of ``GET /v1/config``; a malformed part is logged and left out, never fatal."""
        if not isinstance(body, Mapping):
            raise ValueError(f"the app config is not a JSON object: {type(body).__name__}")
        rate = _rate(body.get("sample_rate", FULL_RATE), "sample_rate")
        return cls(
            sample_rate=FULL_RATE if rate is None else rate,
            user_sample_rate=_rates(body.get("user_sample_rate"), "user_sample_rate"),
            company_sample_rate=_rates(body.get("company_sample_rate"), "company_sample_rate"),
            regex_rules=_rules(body.get("regex_config")),
            cohorts=Cohorts.parse(body),
            etag=etag,
        )

    @property
    def reads_events(self) -> bool:
        """True when `rate_for` depends on the event (regex rules, user or company rates); else every event
        gets `sample_rate`."""
        return bool(self.regex_rules or self.user_sample_rate or self.company_sample_rate)

    def rate_for(self, event: Event) -> float:
        """The sampling rate (0-100) for `event`: regex rule, then user, then company, then global."""
        for rule in self.regex_rules:
            if rule.matches(event):
                return rule.sample_rate
        user_id = event.get("user_id")
        if user_id and user_id in self.user_sample_rate:
            return self.user_sample_rate[user_id]
        company_id = event.get("company_id")
        if company_id and company_id in self.company_sample_rate:
            return self.company_sample_rate[company_id]
        return self.sample_rate


def _rate(value: Any, where: str) -> Optional[float]:
    """A rate clamped to 0-100, or None (logged) when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        logger.warning("app config: %s is not a number (%r); ignored", where, value)
        return None
    return float(min(max(value, 0), FULL_RATE))


def _rates(value: Any, where: str) -> Dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        logger.warning("app config: %s is not an object; ignored", where)
        return {}
    rates: Dict[str, float] = {}
    for key, raw in value.items():
        rate = _rate(raw, f"{where}[{key!r}]")
        if rate is not None:
            rates[str(key)] = rate
    return rates


def _rules(value: Any) -> Tuple[RegexRule, ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        logger.warning("app config: regex_config is not a list; ignored")
        return ()
    rules = []
    for index, entry in enumerate(value):
        try:
            rules.append(_rule(entry))
        except (KeyError, TypeError, ValueError, re.error) as exc:
            logger.warning("app config: regex_config[%d] is ignored: %s", index, exc)
    return tuple(rules)


def _rule(entry: Any) -> RegexRule:
    if not isinstance(entry, Mapping):
        raise TypeError("not an object")
    rate = _rate(entry["sample_rate"], "sample_rate")
    if rate is None:
        raise ValueError("its sample_rate is not a number")
    conditions = []
    for condition in entry.get("conditions") or ():
        field = condition["path"]
        if field not in _CONDITION_FIELDS:
            raise ValueError(f"unknown condition path {field!r}")
        conditions.append((field, re.compile(str(condition["value"]))))
    if not conditions:
        raise ValueError("no conditions")  # moesifapi never matches a rule without conditions either
    return RegexRule(tuple(conditions), rate)


class Sampler:
    """The current app config and the keep-or-drop decision. Safe to read from any thread without a lock."""

    def __init__(self, draw: Callable[[], float] = random.random) -> None:
        self.config = AppConfig()
        self._draw = draw

    def update(self, config: AppConfig) -> None:
        """Use `config` from now on (called by the fetcher thread)."""
        self.config = config

    def weight_for(self, event: Event) -> Optional[int]:
        """None to drop `event`; else the weight it stands for (1 when not sampled)."""
        return self.weight_under(self.config, event)

    def weight_under(self, config: AppConfig, event: Event) -> Optional[int]:
        """`weight_for` under `config` (a caller that read `self.config` once, to look at it first)."""
        rate = config.rate_for(event)
        if rate >= FULL_RATE:
            return 1
        if self._draw() * FULL_RATE >= rate:
            return None
        return 1 if rate == 0 else math.floor(FULL_RATE / rate)


Fetch = Callable[[], Tuple[Any, Optional[str]]]


class ConfigFetcher:
    """Fetches the app config on a daemon thread of its own and hands each good one to `on_config`.

    `fetch()` returns the config JSON and its etag, or raises; `parse(json, etag)` makes the object handed
    on (default `AppConfig.parse`; the governance rules use `RuleSet.parse` and their rules tag).
    `notice_etag` is given every ``X-Moesif-Config-ETag`` a batch response carried; a new one wakes the
    thread at once; `refresh` wakes it too. After a
    failure the thread waits `retry_wait` seconds, whatever wakes it. Fork-safe as the flusher: a thread
    belongs to the process that started it (`is_alive` checks the pid).
    """

    def __init__(self, fetch: Fetch, on_config: Callable[[Any], None],
                 refresh_interval: float = DEFAULT_REFRESH_INTERVAL, retry_wait: float = 60.0, *,
                 parse: Callable[[Any, Optional[str]], Any] = AppConfig.parse, what: str = "app config",
                 thread_name: str = "moesif-durable-config") -> None:
        if refresh_interval <= 0 or retry_wait <= 0:
            raise ValueError("refresh_interval and retry_wait must be positive")
        self._fetch = fetch
        self._on_config = on_config
        self._parse = parse
        self._what = what
        self._refresh_interval = refresh_interval
        self._retry_wait = retry_wait
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._etag: Optional[str] = None  # of the config in use
        self._noticed: Optional[str] = None  # the last batch etag that asked for a fetch
        self._failures = 0
        self.fetches = 0
        self.last_error: Optional[str] = None
        self._worker = ProcessThread(thread_name, self._run)

    def start(self) -> None:
        self._worker.start()

    @property
    def is_alive(self) -> bool:
        return self._worker.is_alive

    def notice_etag(self, etag: Optional[str]) -> None:
        """Called with the config etag of each accepted batch; a new one triggers a fetch (once per etag)."""
        if etag and etag != self._etag and etag != self._noticed:
            self._noticed = etag
            self._wake.set()

    def refresh(self) -> None:
        """Fetch again now (e.g. the rules, when the app config changed)."""
        self._wake.set()

    def close(self, timeout: float) -> None:
        """Stop the thread, waiting at most `timeout` for a fetch in progress."""
        self._stop.set()
        self._wake.set()
        self._worker.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if self._fetch_once():
                deadline = time.monotonic() + self._refresh_interval
                while not self._stop.is_set() and not self._wake.is_set() and time.monotonic() < deadline:
                    self._wake.wait(deadline - time.monotonic())
            else:
                self._stop.wait(self._retry_wait)

    def _fetch_once(self) -> bool:
        self.fetches += 1
        try:
            body, etag = self._fetch()
            config = self._parse(body, etag)
        except Exception as exc:  # a fetch may fail in any way; the last good config stays in use
            self.last_error = repr(exc)
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            logger.log(level, "could not fetch the Moesif %s (%s); keeping the last good one, "
                       "retrying in %g s", self._what, exc, self._retry_wait)
            return False
        self._failures = 0
        self._etag = etag
        self._on_config(config)
        logger.debug("Moesif %s updated (etag %s)", self._what, etag)
        return True
