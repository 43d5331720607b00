"""The one patch this library makes to Tornado, and the governance step it runs before a handler.

Tornado offers no hook before an application's first request: ``log_function`` is called after the
response is sent, and an application's output transforms are instantiated before any handler code runs.
So `install` wraps `RequestHandler._execute` once per process (as sentry-python's Tornado integration
does): at the start of each request it looks for the `ExecuteHook` that owns the application (a
`MoesifMiddleware` whose ``log_event`` is the ``log_function``, or one that `attach` registered) and,
for those applications only, calls its `before_execute` with the request's transforms. Any other
application runs exactly as without this library.

`Governor` applies the governance rules at prepare time: it identifies the user and company (the
user's IDENTIFY_USER / IDENTIFY_COMPANY, sync or async) only when user or company rules exist, asks
`governance.evaluate`, adds the rules' headers, and for a blocked request writes the rule's response
and finishes it, so Tornado never calls the handler's method. A failure anywhere is logged and the
request is served as if there were no rules.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from tornado.web import OutputTransform, RequestHandler

from .capture import (
    BLOCKED_BY_ATTRIBUTE,
    RAISED,
    UserCall,
    call_user_functions,
    client_ip,
    join_headers,
    user_from_authorization,
)
from .config import Config
from .governance import Cohorts, Decision, RequestView, RuleSet, evaluate

logger = logging.getLogger("moesiftornado_durable")

SETTINGS_KEY = "moesiftornado_durable"  # application.settings entry naming the owning middleware (`attach`)
_PATCHED = "_moesiftornado_durable_patched"
_GOVERNED = "_moesiftornado_durable_governed"  # set on a handler whose prepare applies the rules
_install_lock = threading.Lock()

Resolve = Callable[[List[UserCall], List[Any], Callable[[str], None]], Awaitable[List[Any]]]


class ExecuteHook:
    """Owner of an application's requests: `before_execute` runs at the start of each, before `prepare`."""

    def before_execute(self, handler: RequestHandler, transforms: List[OutputTransform]) -> None:
        raise NotImplementedError


def owner_of(application: Any) -> Optional[ExecuteHook]:
    """The `ExecuteHook` that `application` is registered with or whose bound method is its log_function."""
    settings = getattr(application, "settings", None)
    if not settings:
        return None
    found = settings.get(SETTINGS_KEY) or getattr(settings.get("log_function"), "__self__", None)
    return found if isinstance(found, ExecuteHook) else None


def install() -> None:
    """Wrap `RequestHandler._execute` once per process (idempotent, thread-safe)."""
    with _install_lock:
        if getattr(RequestHandler._execute, _PATCHED, False):
            return
        original = RequestHandler._execute

        def _execute(self: RequestHandler, transforms: List[OutputTransform], *args: Any, **kwargs: Any) -> Any:
            owner = owner_of(getattr(self, "application", None))
            if owner is not None:
                try:
                    owner.before_execute(self, transforms)
                except Exception:  # never let this library break a request
                    logger.exception("moesiftornado_durable: the request hook failed; the request is served")
            return original(self, transforms, *args, **kwargs)

        setattr(_execute, _PATCHED, True)
        _execute.__wrapped__ = original  # type: ignore[attr-defined]
        RequestHandler._execute = _execute  # type: ignore[method-assign]


def request_view(handler: RequestHandler, max_body_bytes: int) -> RequestView:
    """What the rules can test of `handler`'s request; a body larger than `max_body_bytes` or
    content-encoded is not looked at."""
    request = handler.request
    headers = join_headers(request.headers)
    body = request.body or b""
    if len(body) > max_body_bytes or headers.get("Content-Encoding", "identity").lower() != "identity":
        body = b""
    return RequestView(request.method or "", request.path or "/", client_ip(request), headers, body)


def apply_decision(handler: RequestHandler, decision: Decision) -> None:
    """Add the decision's headers; if it blocks, write the rule's response and finish the request."""
    for name, value in decision.headers.items():
        handler.set_header(name, value)
    block = decision.block
    if block is None:
        return
    handler.set_status(block.status, block.reason)
    if not any(name.lower() == "content-type" for name in decision.headers):
        handler.set_header("Content-Type", "application/json; charset=UTF-8")
    setattr(handler, BLOCKED_BY_ATTRIBUTE, decision.blocked_by)
    handler.finish(b"" if block.status in (204, 304) else block.body)


class Governor:
    """Applies the current rules to a handler at prepare time (see the module docstring)."""

    def __init__(self, config: Config, rules: Callable[[], RuleSet], cohorts: Callable[[], Cohorts],
                 on_user_error: Callable[[str], None], resolve: Resolve) -> None:
        self._config = config
        self._rules = rules
        self._cohorts = cohorts
        self._on_user_error = on_user_error
        self._resolve = resolve

    def wrap_prepare(self, handler: RequestHandler) -> None:
        """Make `handler.prepare` (of this one instance) apply the rules first; nothing when there are none."""
        rules = self._rules()
        if not len(rules) or getattr(handler, _GOVERNED, False):
            return
        setattr(handler, _GOVERNED, True)
        original = handler.prepare
        handler.prepare = lambda: self._prepare(handler, original, rules)  # type: ignore[method-assign]

    def _prepare(self, handler: RequestHandler, original: Callable[[], Any], rules: RuleSet) -> Any:
        try:
            calls = self._identify_calls(handler, rules)
            answers = call_user_functions(calls, self._on_user_error)
            if any(inspect.isawaitable(answer) for answer in answers):
                return self._prepare_on_loop(handler, original, rules, calls, answers)
            self._decide_and_apply(handler, rules, calls, answers)
        except Exception:
            logger.exception("moesiftornado_durable: governance failed; the request is served without rules")
        return None if getattr(handler, "_finished", False) else original()

    async def _prepare_on_loop(self, handler: RequestHandler, original: Callable[[], Any], rules: RuleSet,
                               calls: List[UserCall], answers: List[Any]) -> None:
        try:
            answers = await self._resolve(calls, answers, self._on_user_error)
            self._decide_and_apply(handler, rules, calls, answers)
        except Exception:
            logger.exception("moesiftornado_durable: governance failed; the request is served without rules")
        if getattr(handler, "_finished", False):
            return
        result = original()
        if result is not None:
            await result

    def _identify_calls(self, handler: RequestHandler, rules: RuleSet) -> List[UserCall]:
        """IDENTIFY_USER and IDENTIFY_COMPANY, each only when rules of its kind exist."""
        calls: List[UserCall] = []
        if rules.user and self._config.identify_user is not None:
            calls.append(("IDENTIFY_USER", self._config.identify_user, handler))
        if rules.company and self._config.identify_company is not None:
            calls.append(("IDENTIFY_COMPANY", self._config.identify_company, handler))
        return calls

    def _decide_and_apply(self, handler: RequestHandler, rules: RuleSet, calls: List[UserCall],
                          answers: List[Any]) -> None:
        user_id, company_id = _identities(calls, answers)
        if rules.user and user_id is None:
            user_id = user_from_authorization(handler.request.headers, self._config)
        decision = evaluate(rules, request_view(handler, self._config.max_body_bytes), user_id, company_id,
                            self._cohorts())
        try:
            apply_decision(handler, decision)
        except Exception:
            logger.exception("moesiftornado_durable: could not apply governance rule %s; the request is served "
                             "normally", decision.blocked_by)
            if not getattr(handler, "_finished", False):
                handler.clear()
                setattr(handler, BLOCKED_BY_ATTRIBUTE, None)


def _identities(calls: List[UserCall], answers: List[Any]) -> Tuple[Optional[str], Optional[str]]:
    found: Dict[str, Optional[str]] = {"IDENTIFY_USER": None, "IDENTIFY_COMPANY": None}
    for (option, _, _), answer in zip(calls, answers):
        if answer is not None and answer is not RAISED:
            try:
                found[option] = str(answer) or None
            except Exception:
                logger.exception("%s returned a value whose str() raised; taken as unidentified", option)
    return found["IDENTIFY_USER"], found["IDENTIFY_COMPANY"]
