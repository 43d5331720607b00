"""Moesif governance rules: parsed once into typed objects, then a pure decision per request.

``GET /v1/rules`` lists the rules; ``GET /v1/config`` lists, per user and per company id, the cohorts
(rule ids) it belongs to with the values of the rule's merge tags. `RuleSet.parse` and `Cohorts.parse`
turn those into immutable objects (a malformed rule or entry is logged and left out), and `evaluate`
decides for one request: the headers to add, and whether to block it with the rule's status and body.

The semantics are those of moesifapi 1.5.5's ``GovernanceRulesManager`` (used by moesifwsgi), without its
bugs: every cohort entry is considered (it stops at the first one that does not match), a cohort naming
an unknown rule is skipped (it raises KeyError), list bodies stay lists (it returns a ``map`` object).
Regex rules apply first, then company rules, then user rules; every matching rule adds its headers, and
a blocking one sets the response, the last one winning. A rule that fails while being evaluated is
logged once and skipped: a broken rule never breaks a request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from http.client import responses
from typing import Any, Dict, List, Mapping, Optional, Pattern, Set, Tuple

logger = logging.getLogger("moesiftornado_durable")

RULES_TAG_HEADER = "X-Moesif-Rules-Tag"
DEFAULT_RULES_REFRESH_INTERVAL = 60.0  # seconds: the rules are fetched again at least this often
REGEX, USER, COMPANY = "regex", "user", "company"
_KINDS = (REGEX, USER, COMPANY)
_FIELDS = ("request.verb", "request.route", "request.ip")
_BODY_PREFIX = "request.body."
_HEADER_PREFIX = "request.headers."
_MERGE_TAG_DEFAULT = "UNKNOWN"  # what moesifapi puts for a merge tag without a value
_UNSAFE_HEADER = re.compile(r"[\x00-\x1f]")


class RequestView:
    """What a rule condition can test of one request: verb, route (the URI's path), client IP, headers
    (names in lower case) and the JSON body, parsed on first use (only a rule on ``request.body.*`` pays)."""

    def __init__(self, verb: str, route: str, ip: Optional[str], headers: Mapping[str, str],
                 raw_body: bytes = b"") -> None:
        self.verb = verb
        self.route = route
        self.ip = ip
        self.headers = {name.lower(): value for name, value in headers.items()}
        self._raw_body = raw_body
        self._body: Any = None
        self._parsed = False

    @property
    def body(self) -> Any:
        """The body as JSON (a dict, a list, …), or None when it is empty or not JSON."""
        if not self._parsed:
            self._parsed = True
            try:
                self._body = json.loads(self._raw_body) if self._raw_body.strip() else None
            except (ValueError, RecursionError):
                self._body = None
        return self._body

    def value(self, path: str) -> Any:
        """The value a condition's `path` names, or None."""
        if path.startswith(_HEADER_PREFIX):
            return self.headers.get(path[len(_HEADER_PREFIX):].lower())
        if path.startswith(_BODY_PREFIX):
            return _field(self.body, path[len(_BODY_PREFIX):])
        return {"request.verb": self.verb, "request.route": self.route, "request.ip": self.ip}.get(path)


def _field(body: Any, name: str) -> Any:
    """`body[name]`, or, for a dotted name such as ``a.b``, ``body["a"]["b"]``."""
    if not isinstance(body, dict):
        return None
    if name in body:
        return body[name]
    head, dot, rest = name.partition(".")
    return _field(body.get(head), rest) if dot else None


def _as_text(value: Any) -> Optional[str]:
    """A field value as the text a pattern is searched in; None (no match) when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One governance rule, validated. `conditions` is an OR of ANDs; no groups at all matches every request."""

    rule_id: str
    kind: str
    block: bool
    applied_to_matching: bool  # False: the rule applies to those *not* in its cohort
    applied_to_unidentified: bool
    conditions: Tuple[Tuple[Tuple[str, Pattern[str]], ...], ...]
    status: Optional[int]
    headers: Tuple[Tuple[str, str], ...]
    body: Any
    variables: Tuple[str, ...]

    def matches(self, request: RequestView) -> bool:
        if not self.conditions:
            return True
        return any(all(_search(pattern, request.value(path)) for path, pattern in group)
                   for group in self.conditions)

    def render_headers(self, values: Mapping[str, Any]) -> Dict[str, str]:
        return {name: self._render(value, values) for name, value in self.headers}

    def render_body(self, values: Mapping[str, Any]) -> Any:
        return self._render(self.body, values)

    def _render(self, template: Any, values: Mapping[str, Any]) -> Any:
        """`template` with each ``{{name}}`` of the rule's variables replaced, in strings at any depth."""
        if isinstance(template, str):
            for name in self.variables:
                value = values.get(name)
                template = template.replace("{{" + name + "}}", _MERGE_TAG_DEFAULT if value is None else str(value))
            return template
        if isinstance(template, dict):
            return {key: self._render(item, values) for key, item in template.items()}
        if isinstance(template, list):
            return [self._render(item, values) for item in template]
        return template


def _search(pattern: Pattern[str], value: Any) -> bool:
    text = _as_text(value)
    return text is not None and pattern.search(text) is not None


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """The rules in use, by kind, and the ``X-Moesif-Rules-Tag`` they came with. `RuleSet()`: no rules."""

    regex: Tuple[Rule, ...] = ()
    user: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
    company: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
    tag: Optional[str] = None
    _failed: Set[str] = dataclasses.field(default_factory=set, compare=False, repr=False)  # rule ids logged

    def __len__(self) -> int:
        return len(self.regex) + len(self.user) + len(self.company)

    @classmethod
    def parse(cls, body: Any, tag: Optional[str] = None) -> RuleSet:
        """Parse the JSON of ``GET /v1/rules``; a malformed rule is logged and left out, never fatal."""
        if not isinstance(body, list):
            raise ValueError(f"the governance rules are not a JSON list: {type(body).__name__}")
        by_kind: Dict[str, Dict[str, Rule]] = {kind: {} for kind in _KINDS}
        for index, entry in enumerate(body):
            try:
                rule = _rule(entry)
            except (KeyError, TypeError, ValueError, re.error) as exc:
                rule_id = entry.get("_id") if isinstance(entry, Mapping) else None
                logger.warning("governance rule %d (%s) is ignored: %s", index, rule_id, exc)
                continue
            by_kind[rule.kind][rule.rule_id] = rule
        return cls(tuple(by_kind[REGEX].values()), by_kind[USER], by_kind[COMPANY], tag)


def _rule(entry: Any) -> Rule:
    if not isinstance(entry, Mapping):
        raise TypeError("not an object")
    rule_id, kind = entry["_id"], entry["type"]
    if not isinstance(rule_id, str) or not rule_id:
        raise ValueError("_id is not a non-empty string")
    if kind not in _KINDS:
        raise ValueError(f"unknown type {kind!r}")
    response = entry.get("response") or {}
    if not isinstance(response, Mapping):
        raise TypeError("response is not an object")
    block = entry.get("block") is True
    status = response.get("status")
    if block and (isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599):
        raise ValueError(f"a blocking rule needs a response status from 100 to 599, not {status!r}")
    headers = response.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise TypeError("response.headers is not an object")
    for name, value in headers.items():
        if not isinstance(value, str) or not name or _UNSAFE_HEADER.search(name + value):
            raise ValueError(f"response header {name!r} is not a plain text header")
    variables = entry.get("variables") or []
    return Rule(
        rule_id=rule_id,
        kind=kind,
        block=block,
        applied_to_matching=entry.get("applied_to", "matching") != "not_matching",
        applied_to_unidentified=entry.get("applied_to_unidentified") is True,
        conditions=_conditions(entry.get("regex_config")),
        status=status if block else None,
        headers=tuple((str(name), value) for name, value in headers.items()),
        body=response.get("body"),
        variables=tuple(str(variable["name"]) for variable in variables),
    )


def _conditions(regex_config: Any) -> Tuple[Tuple[Tuple[str, Pattern[str]], ...], ...]:
    if not regex_config:
        return ()
    if not isinstance(regex_config, list):
        raise TypeError("regex_config is not a list")
    groups = []
    for group in regex_config:
        conditions = []
        for condition in group.get("conditions") or ():
            path = condition["path"]
            if not isinstance(path, str) or not (path in _FIELDS or path.startswith((_BODY_PREFIX, _HEADER_PREFIX))):
                raise ValueError(f"unknown condition path {path!r}")
            conditions.append((path, re.compile(str(condition["value"]))))
        if conditions:  # a group without conditions never matches (as in moesifapi): leave it out
            groups.append(tuple(conditions))
    if not groups:
        raise ValueError("regex_config has no conditions: it could never match")
    return tuple(groups)


@dataclasses.dataclass(frozen=True)
class Cohorts:
    """From the app config: per user id and per company id, the rule ids of its cohorts and their merge
    tag values (``user_rules`` and ``company_rules``)."""

    users: Mapping[str, Mapping[str, Mapping[str, Any]]] = dataclasses.field(default_factory=dict)
    companies: Mapping[str, Mapping[str, Mapping[str, Any]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> Cohorts:
        return cls(_cohorts(config.get("user_rules"), "user_rules"),
                   _cohorts(config.get("company_rules"), "company_rules"))


def _cohorts(value: Any, where: str) -> Dict[str, Dict[str, Mapping[str, Any]]]:
    if not value:
        return {}
    if not isinstance(value, Mapping):
        logger.warning("app config: %s is not an object; ignored", where)
        return {}
    result: Dict[str, Dict[str, Mapping[str, Any]]] = {}
    for entity_id, entries in value.items():
        memberships: Dict[str, Mapping[str, Any]] = {}
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, Mapping) and isinstance(entry.get("rules"), str):
                values = entry.get("values")
                memberships[entry["rules"]] = values if isinstance(values, Mapping) else {}
            else:
                logger.warning("app config: an entry of %s[%r] is ignored: %r", where, entity_id, entry)
        result[str(entity_id)] = memberships
    return result


@dataclasses.dataclass(frozen=True)
class Block:
    """The response that replaces the application's: status, and the rendered body as JSON bytes."""

    status: int
    body: bytes

    @property
    def reason(self) -> str:
        return responses.get(self.status, "Unknown")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the rules decided for a request: headers to add, and the block (with the rule's id) if any."""

    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    block: Optional[Block] = None
    blocked_by: Optional[str] = None


ALLOW = Decision()


def evaluate(rules: RuleSet, request: RequestView, user_id: Optional[str], company_id: Optional[str],
             cohorts: Cohorts) -> Decision:
    """The decision of `rules` for `request` made by `user_id` of `company_id` (None: unidentified)."""
    if not len(rules):
        return ALLOW
    applicable: List[Tuple[Rule, Mapping[str, Any]]] = [(rule, {}) for rule in rules.regex]
    applicable += _by_identity(rules.company, company_id, cohorts.companies)
    applicable += _by_identity(rules.user, user_id, cohorts.users)
    headers: Dict[str, str] = {}
    block: Optional[Block] = None
    blocked_by: Optional[str] = None
    for rule, values in applicable:
        try:
            if not rule.matches(request):
                continue
            rule_headers = rule.render_headers(values)
            rule_block = Block(rule.status, json.dumps(rule.render_body(values)).encode("utf-8")) \
                if rule.block and rule.status is not None else None
        except Exception:
            _log_failure(rules, rule)
            continue
        headers.update(rule_headers)
        if rule_block is not None:
            block, blocked_by = rule_block, rule.rule_id
    return Decision(headers, block, blocked_by) if headers or block else ALLOW


def _by_identity(rules: Mapping[str, Rule], entity_id: Optional[str],
                 cohorts: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> List[Tuple[Rule, Mapping[str, Any]]]:
    """The user (or company) rules that apply to `entity_id`, each with its merge tag values.

    Unidentified: the rules marked `applied_to_unidentified`. Identified: the 'matching' rules of the
    cohorts it is in, and the 'not_matching' rules of the cohorts it is not in; a cohort naming a rule
    that is not (or no longer) there is skipped.
    """
    if not rules:
        return []
    if not entity_id:
        return [(rule, {}) for rule in rules.values() if rule.applied_to_unidentified]
    memberships = cohorts.get(entity_id, {})
    return [(rule, memberships.get(rule_id, {})) for rule_id, rule in rules.items()
            if (rule_id in memberships) == rule.applied_to_matching]


def _log_failure(rules: RuleSet, rule: Rule) -> None:
    """Log, once per rule and rule set, with the traceback being handled, that a rule failed."""
    if rule.rule_id not in rules._failed:
        rules._failed.add(rule.rule_id)
        logger.exception("governance rule %s failed and is skipped; the request is served normally", rule.rule_id)

