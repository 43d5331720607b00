"""Governance rules (issue 12, item 1) and the one-import drop-in (item 3), against the real local collector
and a real Tornado app on loopback."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import tornado.web
from conftest import serve, wait_logged, wait_until

from moesiftornado_durable import MoesifMiddleware
from moesiftornado_durable.governance import Cohorts, RequestView, RuleSet, evaluate
from moesiftornado_durable.testing import Collector

CALLS: Dict[str, int] = {}


class CountingHandler(tornado.web.RequestHandler):
    """Counts the calls of its methods, so a test sees whether a blocked request reached it."""

    def prepare(self) -> None:
        CALLS["prepare"] = CALLS.get("prepare", 0) + 1

    def get(self) -> None:
        CALLS["get"] = CALLS.get("get", 0) + 1
        self.write({"served": True})

    def post(self) -> None:
        CALLS["post"] = CALLS.get("post", 0) + 1
        self.write({"served": True})


ROUTES = [(r"/login", CountingHandler), (r"/items", CountingHandler)]


def regex_rule(rule_id: str, *groups: List[Tuple[str, str]], block: bool = True, status: int = 403,
               headers: Optional[Dict[str, str]] = None, body: Any = None, **extra: Any) -> Dict[str, Any]:
    rule: Dict[str, Any] = {
        "_id": rule_id, "type": "regex", "block": block,
        "regex_config": [{"conditions": [{"path": path, "value": value} for path, value in group]}
                         for group in groups],
        "response": {"status": status, "headers": headers or {}, "body": body if body is not None else
                     {"error": f"blocked by {rule_id}"}},
    }
    rule.update(extra)
    return rule


def cohort_rule(rule_id: str, kind: str, applied_to: str = "matching", unidentified: bool = False,
                **extra: Any) -> Dict[str, Any]:
    rule = regex_rule(rule_id, **extra)
    rule.update(type=kind, applied_to=applied_to, applied_to_unidentified=unidentified, regex_config=[])
    return rule


def request(base: str, path: str, method: str = "GET", body: Optional[bytes] = None,
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(autouse=True)
def reset_calls() -> Iterator[None]:
    CALLS.clear()
    yield


@pytest.fixture
def governed(collector: Collector, make_middleware: Callable[..., MoesifMiddleware]
             ) -> Callable[..., Tuple[MoesifMiddleware, tornado.web.Application]]:
    """A middleware whose rules (and app config) are those set on the collector, fetched before it returns."""

    def make(rules: List[Dict[str, Any]], app_config: Optional[Dict[str, Any]] = None,
             **options: Any) -> Tuple[MoesifMiddleware, tornado.web.Application]:
        if app_config is not None:
            collector.app_config = app_config
        collector.set_rules(rules)
        middleware = make_middleware(**options)
        assert wait_until(lambda: middleware.stats()["rules_tag"] == collector.rules_tag, 10)
        if app_config is not None:
            assert wait_until(lambda: middleware.stats()["app_config_etag"] == collector.config_etag, 10)
        return middleware, tornado.web.Application(ROUTES, log_function=middleware.log_event)

    return make


def events_by_uri(collector: Collector, middleware: MoesifMiddleware, count: int) -> List[Dict[str, Any]]:
    assert middleware.flush(10)
    assert collector.wait_for_events(count, 10)
    return collector.events


# -- regex rules ----------------------------------------------------------------------------------------


def test_regex_rule_blocks_post_login_by_verb_and_route(governed: Any, collector: Collector) -> None:
    middleware, app = governed([regex_rule("no-login", [("request.verb", "POST"), ("request.route", "^/login$")],
                                           status=429, headers={"Retry-After": "60"})])
    with serve(app) as base:
        status, headers, body = request(base, "/login", "POST", b"{}")
        assert (status, headers["Retry-After"], json.loads(body)) == (429, "60", {"error": "blocked by no-login"})
        assert headers["Content-Type"].startswith("application/json")
        assert request(base, "/login")[0] == 200  # GET: the verb does not match
        assert request(base, "/items", "POST", b"{}")[0] == 200  # the route does not match
    assert CALLS == {"prepare": 2, "get": 1, "post": 1}  # the blocked request's handler did not run
    events = events_by_uri(collector, middleware, 3)
    blocked = [event for event in events if event.get("blocked_by")]
    assert [(e["blocked_by"], e["request"]["verb"], e["response"]["status"]) for e in blocked] == \
        [("no-login", "POST", 429)]
    assert blocked[0]["response"]["body"] == {"error": "blocked by no-login"}


def test_header_and_body_field_conditions(governed: Any) -> None:
    _, app = governed([
        regex_rule("bad-client", [("request.headers.X-Client", "^evil")]),
        regex_rule("bad-plan", [("request.body.plan", "^free$"), ("request.verb", "POST")]),
        regex_rule("nested", [("request.body.account.tier", "^trial$")]),
    ])
    with serve(app) as base:
        assert request(base, "/items", headers={"x-client": "evil-bot"})[0] == 403
        assert request(base, "/items", headers={"X-Client": "good"})[0] == 200
        assert request(base, "/items", "POST", b'{"plan": "free"}')[0] == 403
        assert request(base, "/items", "POST", b'{"plan": "pro"}')[0] == 200
        assert request(base, "/items", "POST", b'{"account": {"tier": "trial"}}')[0] == 403
        assert request(base, "/items", "POST", b"not json")[0] == 200
    assert CALLS == {"prepare": 3, "get": 1, "post": 2}


def test_client_ip_condition_uses_the_address_the_event_records(governed: Any, collector: Collector) -> None:
    middleware, app = governed([regex_rule("bad-net", [("request.ip", r"^203\.0\.113\.")])])
    with serve(app) as base:
        assert request(base, "/items", headers={"X-Forwarded-For": "203.0.113.9"})[0] == 403
        assert request(base, "/items", headers={"X-Forwarded-For": "198.51.100.4"})[0] == 200
        assert request(base, "/items")[0] == 200  # 127.0.0.1, the peer address
    assert CALLS == {"prepare": 2, "get": 2}
    events = events_by_uri(collector, middleware, 3)
    assert sorted((e["request"]["ip_address"], str(e.get("blocked_by"))) for e in events) == \
        [("127.0.0.1", "None"), ("198.51.100.4", "None"), ("203.0.113.9", "bad-net")]


def test_or_of_condition_groups_and_a_list_body(governed: Any) -> None:
    listed = [{"code": "blocked"}, "{{reason}}"]
    _, app = governed([regex_rule("either", [("request.route", "^/login$")], [("request.headers.x-ban", "1")],
                                  body=listed, variables=[{"name": "reason", "path": "x"}])])
    with serve(app) as base:
        first = request(base, "/login")
        second = request(base, "/items", headers={"X-Ban": "1"})
        assert request(base, "/items")[0] == 200
    assert first[0] == second[0] == 403
    assert json.loads(first[2]) == [{"code": "blocked"}, "UNKNOWN"]  # a list stays a list; no value: UNKNOWN


def test_non_blocking_rule_adds_headers(governed: Any, collector: Collector) -> None:
    middleware, app = governed([regex_rule("tag-it", [("request.route", "^/items")], block=False,
                                           headers={"X-Plan-Notice": "upgrade soon"})])
    with serve(app) as base:
        status, headers, body = request(base, "/items")
    assert (status, headers.get("X-Plan-Notice"), json.loads(body)) == (200, "upgrade soon", {"served": True})
    assert CALLS == {"prepare": 1, "get": 1}
    [event] = events_by_uri(collector, middleware, 1)
    assert "blocked_by" not in event and event["response"]["headers"]["X-Plan-Notice"] == "upgrade soon"


# -- user and company rules -------------------------------------------------------------------------------


def identify_user(handler: tornado.web.RequestHandler) -> Optional[str]:
    return handler.request.headers.get("X-User")


def identify_company(handler: tornado.web.RequestHandler) -> Optional[str]:
    return handler.request.headers.get("X-Company")


async def identify_user_async(handler: tornado.web.RequestHandler) -> Optional[str]:
    return handler.request.headers.get("X-User")


@pytest.mark.parametrize("identify", [identify_user, identify_user_async], ids=["sync", "async"])
def test_user_rules_matching_and_not_matching(governed: Any, identify: Any) -> None:
    rules = [cohort_rule("banned", "user"), cohort_rule("vip-only", "user", applied_to="not_matching",
                                                        status=402)]
    config = {"user_rules": {"u-banned": [{"rules": "banned"}, {"rules": "vip-only"}],
                             "u-vip": [{"rules": "vip-only"}]}}
    middleware, app = governed(rules, config, IDENTIFY_USER=identify)
    with serve(app) as base:
        assert request(base, "/items", headers={"X-User": "u-banned"})[0] == 403  # in the cohort of "banned"
        assert request(base, "/items", headers={"X-User": "u-vip"})[0] == 200  # in vip-only's cohort: not applied
        assert request(base, "/items", headers={"X-User": "u-other"})[0] == 402  # not in vip-only's cohort
        assert request(base, "/items")[0] == 200  # unidentified: neither rule applies to them
        wait_logged(middleware, 4)  # async captures finish on this loop
    assert CALLS == {"prepare": 2, "get": 2}


def test_applied_to_unidentified(governed: Any) -> None:
    _, app = governed([cohort_rule("anonymous", "user", unidentified=True, status=401)], {"user_rules": {}},
                      IDENTIFY_USER=identify_user)
    with serve(app) as base:
        assert request(base, "/items")[0] == 401
        assert request(base, "/items", headers={"X-User": "someone"})[0] == 200  # identified, not in its cohort
    assert CALLS == {"prepare": 1, "get": 1}


def test_company_rule_with_merge_tags_in_body_and_headers(governed: Any, collector: Collector) -> None:
    rule = cohort_rule("quota", "company", status=429, headers={"X-Quota": "{{limit}} per {{period}}"},
                       body={"error": "{{company_name}} is over its quota of {{limit}}", "period": "{{period}}"},
                       variables=[{"name": "limit", "path": "a"}, {"name": "period", "path": "b"},
                                  {"name": "company_name", "path": "c"}])
    config = {"company_rules": {"acme": [{"rules": "quota", "values": {"limit": 100, "company_name": "Acme"}}]}}
    middleware, app = governed([rule], config, IDENTIFY_COMPANY=identify_company)
    with serve(app) as base:
        status, headers, body = request(base, "/items", headers={"X-Company": "acme"})
        assert request(base, "/items", headers={"X-Company": "other"})[0] == 200
    assert (status, headers["X-Quota"]) == (429, "100 per UNKNOWN")
    assert json.loads(body) == {"error": "Acme is over its quota of 100", "period": "UNKNOWN"}
    events = events_by_uri(collector, middleware, 2)
    assert sorted(str(event.get("blocked_by")) for event in events) == ["None", "quota"]


def test_a_cohort_naming_an_unknown_rule_is_skipped(governed: Any) -> None:
    """moesifapi raises KeyError on the unknown id, so no user rule applies at all."""
    config = {"user_rules": {"u1": [{"rules": "deleted-rule", "values": {}}, {"rules": "banned"}]}}
    _, app = governed([cohort_rule("banned", "user", status=451)], config, IDENTIFY_USER=identify_user)
    with serve(app) as base:
        assert request(base, "/items", headers={"X-User": "u1"})[0] == 451
    assert CALLS == {}


def test_every_cohort_entry_is_considered(governed: Any) -> None:
    """moesifapi stops (`break`) at the first cohort entry whose rule does not match the request."""
    posts_only = cohort_rule("posts-only", "user")
    posts_only["regex_config"] = [{"conditions": [{"path": "request.verb", "value": "^POST$"}]}]
    config = {"user_rules": {"u1": [{"rules": "posts-only"}, {"rules": "banned"}]}}
    _, app = governed([posts_only, cohort_rule("banned", "user", status=451)], config, IDENTIFY_USER=identify_user)
    with serve(app) as base:
        assert request(base, "/items", headers={"X-User": "u1"})[0] == 451
    assert CALLS == {}


def test_identify_user_raising_counts_as_unidentified(governed: Any) -> None:
    def broken(handler: tornado.web.RequestHandler) -> str:
        raise RuntimeError("identify failed")

    middleware, app = governed([cohort_rule("anonymous", "user", unidentified=True, status=401)],
                               IDENTIFY_USER=broken)
    with serve(app) as base:
        assert request(base, "/items")[0] == 401
    assert middleware.stats()["callable_errors"] >= 1


# -- failures ---------------------------------------------------------------------------------------------


def test_broken_rule_is_logged_and_the_request_served(governed: Any, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="moesiftornado_durable")
    _, app = governed([regex_rule("broken", [("request.route", "([unclosed")]),
                       regex_rule("fine", [("request.route", "^/login$")])])
    with serve(app) as base:
        assert request(base, "/items")[0] == 200
        assert request(base, "/login")[0] == 403
    assert any("broken" in record.getMessage() and "ignored" in record.getMessage() for record in caplog.records)


def test_a_rule_failing_at_evaluation_is_skipped_and_logged_once(caplog: Any) -> None:
    rules = RuleSet.parse([regex_rule("odd"), regex_rule("fine")])
    odd = rules.regex[0]
    object.__setattr__(odd, "variables", None)  # a rule that will raise while rendering (not iterable)
    object.__setattr__(odd, "body", "{{x}}")
    view = RequestView("GET", "/", None, {})
    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        decisions = [evaluate(rules, view, None, None, Cohorts()) for _ in range(3)]
    assert {decision.blocked_by for decision in decisions} == {"fine"}
    assert len([record for record in caplog.records if "odd" in record.getMessage()]) == 1


def test_no_rules_before_the_first_fetch(collector: Collector, make_middleware: Any) -> None:
    collector.set_rules([regex_rule("all")])
    collector.go_down()
    try:
        middleware = make_middleware()
        app = tornado.web.Application(ROUTES, log_function=middleware.log_event)
        with serve(app) as base:
            assert request(base, "/items")[0] == 200
            assert middleware.stats()["rules"] == 0
            collector.come_up()
            assert wait_until(lambda: middleware.stats()["rules"] == 1, 10)  # the next attempt gets them
            assert request(base, "/items")[0] == 403
    finally:
        collector.come_up()


def test_collector_down_keeps_the_last_good_rules(governed: Any, collector: Collector) -> None:
    middleware, app = governed([regex_rule("all", [("request.route", "^/items$")])])
    runtime = middleware._runtime_here()
    assert runtime is not None
    before = runtime.rules_fetcher.fetches
    collector.go_down()
    try:
        runtime.rules_fetcher.refresh()
        assert wait_until(lambda: runtime.rules_fetcher.fetches > before and middleware.stats()["rules_error"], 10)
        with serve(app) as base:
            assert request(base, "/items")[0] == 403
    finally:
        collector.come_up()


def test_new_rules_are_fetched_when_the_app_config_changes(governed: Any, collector: Collector) -> None:
    middleware, app = governed([], {"sample_rate": 100})
    collector.set_rules([regex_rule("later", [("request.route", "^/items$")])])
    collector.app_config = {"sample_rate": 100, "user_rules": {}}  # a batch response carries its new etag
    with serve(app) as base:
        assert request(base, "/login")[0] == 200
        wait_logged(middleware, 1)  # what the flush below waits for
        assert middleware.flush(10)
        assert wait_until(lambda: middleware.stats()["rules_tag"] == collector.rules_tag, 10)
        assert request(base, "/items")[0] == 403


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_new_rules_are_fetched_when_a_batch_carries_a_new_rules_tag(governed: Any, collector: Collector,
                                                                     shipper: str) -> None:
    middleware, app = governed([], SHIPPER=shipper)
    collector.set_rules([regex_rule("later", [("request.route", "^/items$")])])  # the app config stays the same
    with serve(app) as base:
        assert request(base, "/login")[0] == 200
        wait_logged(middleware, 1)  # what the flush below waits for
        assert middleware.flush(10)  # the batch response carries the new X-Moesif-Rules-Tag
        assert wait_until(lambda: middleware.stats()["rules_tag"] == collector.rules_tag, 10)
        assert request(base, "/items")[0] == 403


# -- item 3: the drop-in is one import ----------------------------------------------------------------------


def test_first_request_body_captured_without_attach(collector: Collector, make_middleware: Any) -> None:
    middleware = make_middleware()
    app = tornado.web.Application(ROUTES, log_function=middleware.log_event)  # the original README's usage
    other = tornado.web.Application(ROUTES)  # an application without the middleware, same process
    other_transforms = list(other.transforms)
    with serve(app) as base, serve(other) as other_base:
        assert request(base, "/items")[0] == 200
        assert request(other_base, "/items")[0] == 200
    [event] = events_by_uri(collector, middleware, 1)
    assert event["response"]["body"] == {"served": True}
    assert other.transforms == other_transforms
    assert "moesiftornado_durable" not in other.settings


def test_rules_apply_only_to_the_middlewares_application(governed: Any) -> None:
    _, app = governed([regex_rule("items", [("request.route", "^/items$")])])  # no attach: the hook finds it
    other = tornado.web.Application(ROUTES)
    with serve(app) as base, serve(other) as other_base:
        assert request(base, "/items")[0] == 403
        assert request(other_base, "/items")[0] == 200
    assert CALLS == {"prepare": 1, "get": 1}


def test_attach_applies_rules_to_an_app_whose_own_log_function_calls_log_event(
    governed: Any, collector: Collector
) -> None:
    middleware, _ = governed([regex_rule("items", [("request.route", "^/items$")], status=451)])
    logged: List[int] = []

    def own_log_function(handler: tornado.web.RequestHandler) -> None:
        logged.append(handler.get_status())
        middleware.log_event(handler)

    app = middleware.attach(tornado.web.Application(ROUTES, log_function=own_log_function))
    with serve(app) as base:
        status, _, body = request(base, "/items")
        assert request(base, "/login")[0] == 200
    assert (status, json.loads(body)) == (451, {"error": "blocked by items"})
    assert CALLS == {"prepare": 1, "get": 1} and sorted(logged) == [200, 451]
    events = events_by_uri(collector, middleware, 2)
    assert sorted(str(event.get("blocked_by")) for event in events) == ["None", "items"]


def test_thread_mode_applies_rules_too(governed: Any, collector: Collector) -> None:
    middleware, app = governed([regex_rule("items", [("request.route", "^/items$")])], SHIPPER="thread")
    with serve(app) as base:
        assert request(base, "/items")[0] == 403
    [event] = events_by_uri(collector, middleware, 1)
    assert event["blocked_by"] == "items"


def test_collector_serves_rules_with_a_tag_in_every_answer(collector: Collector) -> None:
    headers = {"X-Moesif-Application-Id": "test-app-id"}
    empty_tag = collector.rules_tag
    status, answer_headers, body = request(collector.base_uri, "/v1/rules", headers=headers)
    assert (status, json.loads(body), answer_headers["X-Moesif-Rules-Tag"]) == (200, [], empty_tag)
    collector.set_rules([regex_rule("r1", [("request.verb", "GET")])])
    assert collector.rules_tag != empty_tag and collector.rules[0]["_id"] == "r1"
    status, answer_headers, body = request(collector.base_uri, "/v1/rules", headers=headers)
    assert json.loads(body)[0]["_id"] == "r1" and answer_headers["X-Moesif-Rules-Tag"] == collector.rules_tag
    assert request(collector.base_uri, "/v1/config", headers=headers)[1]["X-Moesif-Rules-Tag"] == collector.rules_tag
    batch = request(collector.base_uri, "/v1/events/batch", "POST", b"[]",
                    dict(headers, **{"Content-Type": "application/json"}))
    assert batch[1]["X-Moesif-Rules-Tag"] == collector.rules_tag
    status, _, body = request(collector.base_uri, "/_control/rules", "POST", b"[]")
    assert status == 200 and json.loads(body)["tag"] == empty_tag and collector.rules == []
    assert request(collector.base_uri, "/_control/rules", "POST", b'{"not": "a list"}')[0] == 400
    with pytest.raises(TypeError):
        collector.set_rules({"not": "a list"})  # type: ignore[arg-type]
