"""Subscription updates: validated like moesifdjango's, spooled durably, sent to /v1/subscriptions/batch."""

from __future__ import annotations

import datetime
from typing import Any, Callable

import pytest
from conftest import wait_until
from moesifapi.models import SubscriptionModel

from moesiftornado_durable import MoesifMiddleware
from moesiftornado_durable.kinds import SUBSCRIPTION
from moesiftornado_durable.locks import spool_path
from moesiftornado_durable.spool import Spool
from moesiftornado_durable.testing import Collector


def test_subscription_updates_are_spooled_while_down_and_delivered_to_the_batch_path(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    collector.go_down()
    middleware = make_middleware()
    middleware.update_subscription({"subscription_id": "sub-1", "company_id": "c-1", "status": "active",
                                    "metadata": {"plan": "pro"}})
    middleware.update_subscription(SubscriptionModel(subscription_id="sub-2", company_id="c-2", status="past_due",
                                                     current_period_start=datetime.datetime(2024, 1, 2, 3, 4, 5)))
    middleware.update_subscription('{"subscription_id": "sub-3", "company_id": "c-3", "status": "cancelled"}')
    middleware.update_subscriptions_batch([
        {"subscription_id": "sub-4", "company_id": "c-4", "status": "active",
         "current_period_end": datetime.datetime(2025, 1, 1)},
        SubscriptionModel(subscription_id="sub-5", company_id="c-5", status="active"),
    ])
    # the shipper may hold a batch in flight, and spools the journal within a moment
    assert wait_until(lambda: middleware.stats()["ready"] + middleware.stats()["in_flight"] == 5, timeout=5)
    collector.come_up()
    assert middleware.flush(10)
    received = {s["subscription_id"]: s for s in collector.subscriptions}
    assert sorted(received) == ["sub-1", "sub-2", "sub-3", "sub-4", "sub-5"]
    assert received["sub-1"]["metadata"] == {"plan": "pro"}
    assert received["sub-2"]["status"] == "past_due"
    assert received["sub-2"]["current_period_start"] == "2024-01-02T03:04:05"
    assert received["sub-4"]["current_period_end"] == "2025-01-01T00:00:00"
    paths = {r.path for r in collector.requests if r.status == 201}
    assert paths == {"/v1/subscriptions/batch"}
    assert collector.users == [] and collector.companies == [] and collector.events == []


def test_a_subscription_spooled_by_one_process_is_sent_by_the_next(
    collector: Collector, spool_dir: str, make_middleware: Callable[..., MoesifMiddleware]
) -> None:
    spool = Spool(spool_path(spool_dir, 0))  # as if an earlier run had spooled it and died
    spool.put({"subscription_id": "left-over", "company_id": "c", "status": "active"}, SUBSCRIPTION)
    spool.close()
    middleware = make_middleware()
    assert middleware.flush(10)
    assert [s["subscription_id"] for s in collector.subscriptions] == ["left-over"]


@pytest.mark.parametrize(
    "call, argument, field",
    [
        ("update_subscription", {"company_id": "c", "status": "active"}, "subscription_id"),
        ("update_subscription", {"subscription_id": "s", "status": "active"}, "company_id"),
        ("update_subscription", {"subscription_id": "s", "company_id": "c"}, "status"),
        ("update_subscription", {"subscription_id": "s", "company_id": "c", "status": ""}, "status"),
        ("update_subscription", SubscriptionModel(subscription_id="s", status="active"), "company_id"),
        ("update_subscription", '{"subscription_id": "s", "company_id": "c"}', "status"),
        ("update_subscriptions_batch",
         [{"subscription_id": "ok", "company_id": "c", "status": "active"}, {"subscription_id": "s"}], "company_id"),
    ],
)
def test_subscription_updates_without_a_required_field_raise_naming_it(
    make_middleware: Callable[..., MoesifMiddleware], call: str, argument: Any, field: str
) -> None:
    middleware = make_middleware()
    with pytest.raises(ValueError, match=field):
        getattr(middleware, call)(argument)
    assert middleware.stats()["ready"] == 0  # a bad batch queues nothing


def test_subscription_updates_reject_wrong_types_and_bad_json(make_middleware: Callable[..., MoesifMiddleware]) -> None:
    middleware = make_middleware()
    for bad in (None, 42, "{not json", ["subscription_id"]):
        with pytest.raises(ValueError):
            middleware.update_subscription(bad)
    for bad_batch in ({"subscription_id": "s"}, 42, "[{]"):
        with pytest.raises(ValueError):
            middleware.update_subscriptions_batch(bad_batch)
