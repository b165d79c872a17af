"""`convsync push` to Google Ads against the sandbox: the plan, the ledger, exactly once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from convsync import pipeline, planning
from convsync.model import Platform
from convsync.sandbox import server
from convsync.sandbox.world import MICRO_UPLOAD_ACTION_ID, World, WorldSpec
from convsync.settings import ClientConfig, load_config, load_secrets
from convsync.store import Store

TODAY = dt.date(2026, 10, 31)
NOW = dt.datetime(2026, 11, 1, 4, tzinfo=dt.UTC)
LADDER = ("product_view", "add_to_cart", "begin_checkout")


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    spec = WorldSpec(seed=7, start=TODAY - dt.timedelta(days=119), days=120, campaigns=6,
                     as_of=NOW, micro_upload_action=True)
    with server.start(World(spec), tls_files[0].parent) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def valued(running: server.RunningSandbox,
           tmp_path_factory: pytest.TempPathFactory) -> ClientConfig:
    """A client whose store holds the world's Google Ads actions, 100 days of Klaviyo
    journeys and the values computed from them."""
    path = tmp_path_factory.mktemp("push") / "client.toml"
    server.write_client_config(path, running)
    config = load_config(path)
    with Store.open(config.store_url()) as store:
        result = pipeline.pull(config, load_secrets(config), store,
                               platforms=[Platform.GOOGLE_ADS, Platform.KLAVIYO],
                               since=TODAY - dt.timedelta(days=99), until=TODAY, today=TODAY)
        assert result.failed == []
        pipeline.values(config, store, NOW)
    return config


def test_the_sandbox_config_names_the_upload_actions(valued: ClientConfig) -> None:
    section = valued.google_ads
    assert section is not None and section.datamanager_endpoint
    assert section.upload_actions == {"qualified_lead": "6108",
                                      **{step: str(MICRO_UPLOAD_ACTION_ID) for step in LADDER}}


def test_the_plan_uploads_each_persons_first_step_at_its_upload_value(
        valued: ClientConfig) -> None:
    with Store.open(valued.store_url()) as store:
        plan = planning.plan_google_ads(valued, store, NOW)
        again = planning.plan_google_ads(valued, store, NOW)
        rows = {(r["conversion"], r["segment"]): r["upload_value"]
                for r in store.micro_values(valued.client.name)}
        people = {step: len({e.person_key for e in store.journey_events(until=NOW)
                             if e.conversion == step}) for step in LADDER}
    assert [u.dedupe_key for u in plan.uploads] == [u.dedupe_key for u in again.uploads]
    assert len({u.dedupe_key for u in plan.uploads}) == len(plan.uploads)
    by_step = {step: [u for u in plan.uploads if u.conversion == step] for step in LADDER}
    for step in LADDER:
        action = plan.actions[step]
        refused = sum(action.refused.values())
        assert action.events + refused == people[step]  # each person's first event, once
        assert action.events == len(by_step[step]) > 0
        assert {u.value for u in by_step[step]} <= {
            round(v, 2) for (c, _), v in rows.items() if c == step and v is not None}
        assert all(u.account_id == "1234567890" and u.conversion_action == "6111"
                   for u in by_step[step])
    # a conversion over 90 days old is past any click-through window
    old = NOW - dt.timedelta(days=90)
    assert all(u.time >= old for u in plan.uploads)
    assert any("click-through window" in why for a in plan.actions.values()
               for why in a.refused)
    assert plan.problems == []
    # the sample shows which identifiers an event has, never their values
    sample = plan.actions["add_to_cart"].sample[0]
    assert set(sample["identifiers"]) <= {"gclid", "email_sha256_google"}  # type: ignore[arg-type]
    assert not any(isinstance(v, str) and len(v) == 64 for v in sample.values())
