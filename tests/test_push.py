"""`convsync push` to Google Ads against the sandbox: the plan, the ledger, exactly once."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from convsync import pipeline, planning, push, quotas
from convsync.model import ConversionMap, Identifiers, Platform, Upload
from convsync.planning.google_ads import plan_google_ads
from convsync.reconcile import load_audit
from convsync.sandbox import server
from convsync.sandbox.world import MICRO_UPLOAD_ACTION_ID, World, WorldSpec
from convsync.settings import ClientConfig, load_config, load_secrets
from convsync.sinks.google_ads.datamanager import DataManagerSink, connect
from convsync.sources import crm as crm_source
from convsync.store import Store, quota_calls, uploads

TODAY = dt.date(2026, 10, 31)
NOW = dt.datetime(2026, 11, 1, 4, tzinfo=dt.UTC)
LADDER = ("product_view", "add_to_cart", "begin_checkout")
CONVSYNC = Path(sys.executable).with_name("convsync")


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
        plan, planned = _plan(valued, store)
        _, again = _plan(valued, store)
        rows = {(r["conversion"], r["segment"]): r["upload_value"]
                for r in store.micro_values(valued.client.name)}
        people = {step: len({e.person_key for e in store.journey_events(until=NOW)
                             if e.conversion == step}) for step in LADDER}
    assert [u.dedupe_key for u in planned] == [u.dedupe_key for u in again]
    assert len({u.dedupe_key for u in planned}) == len(planned)
    by_step = {step: [u for u in planned if u.conversion == step] for step in LADDER}
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
    assert all(u.time >= old for u in planned)
    assert any("click-through window" in why for a in plan.actions.values()
               for why in a.refused)
    assert plan.problems == []
    # the sample shows which identifiers an event has, never their values
    sample = plan.actions["add_to_cart"].sample[0]
    assert set(sample["identifiers"]) <= {"gclid", "email_sha256_google"}  # type: ignore[arg-type]
    assert not any(isinstance(v, str) and len(v) == 64 for v in sample.values())


def _plan(config: ClientConfig, store: Store) -> tuple[planning.Plan, list[Upload]]:
    plan, planned = plan_google_ads(config, store, NOW)
    return plan, list(planned)


def _transactions(running: server.RunningSandbox) -> dict[str, tuple[int, int, float]]:
    """What the sandbox counted per transaction id: (events, conversions, value)."""
    assert running.datamanager is not None
    return {key: (c.events, c.conversions, c.value)
            for (_, key), c in running.datamanager.transactions().items()}


def _ledger_sent(store: Store) -> dict[str, float]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(uploads.c.dedupe_key, uploads.c.sent_value).where(
            uploads.c.sent_value.is_not(None))).all()
    return {key: float(value) for key, value in rows}


def test_a_push_sends_each_eligible_event_once_and_a_rerun_sends_nothing(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    assert running.datamanager is not None
    running.datamanager.reset()
    running.datamanager.configure(processing_delay_minutes=0)
    valued = load_config(_copy_client(valued, tmp_path / "once"))
    secrets = load_secrets(valued)
    with Store.open(valued.store_url()) as store:
        plan, planned = _plan(valued, store)
        seen: list[tuple[int, int]] = []
        first = push.push_google_ads(valued, secrets, store, now=NOW, sleep=lambda s: None,
                                     progress=lambda r: seen.append((r.planned_new, r.sent)))
        sent = _ledger_sent(store)
        counted = _transactions(running)
        later = NOW + dt.timedelta(minutes=31)
        second = push.push_google_ads(valued, secrets, store, now=later, sleep=lambda s: None)
        ledger = store.ledger(valued.client.name, Platform.GOOGLE_ADS)
    assert first.errors == [] and first.failed == Counter()
    assert seen == sorted(seen) and seen[-1] == (first.planned_new, first.sent)  # progress
    assert len({sent for _, sent in seen}) == first.requests["IngestEvents"] + 1
    held = {key for key, _, _ in plan.holds}
    assert len(held) > 0  # the world's last clicks are under 6 hours old
    assert first.sent == len(planned) - len(held) > 1000
    assert first.requests["IngestEvents"] == -(-first.sent // 2000)  # the fewest requests
    assert set(counted) == set(sent) == {u.dedupe_key for u in planned} - held
    values = {u.dedupe_key: u.value for u in planned}
    for key, (events, conversions, value) in counted.items():
        assert events == 1 and conversions <= 1 and sent[key] == pytest.approx(values[key])
        if conversions:  # Google's count, at the value the ledger says was sent
            assert value == pytest.approx(sent[key])
    assert sum(c for _, c, _ in counted.values()) > 0.5 * len(counted)
    # the rerun plans the same events and finds them in the ledger: it sends only the held
    # ones whose time has come, and reads back what Google did with the first requests
    due = {key for key, until, _ in plan.holds if until <= later}
    assert (second.sent, second.planned_new, second.resent) == (len(due), 0, 0)
    assert second.requests["IngestEvents"] == (1 if due else 0)
    assert second.requests["RetrieveRequestStatus"] == first.requests["IngestEvents"]
    assert set(_transactions(running)) == set(counted) | due
    # Google said what it did with each request: here, every request partly failed (people
    # known by their email only, who never clicked a Google ad: CLICK_NOT_FOUND)
    assert {s["state"] for s in second.statuses} == {"done"}
    reasons = {r["reason"] for r in ledger if r["status"] == "sent"} - {""}
    assert reasons == {push.PARTLY_FAILED}
    errors = {reason for s in second.statuses for d in s["destinations"] for reason in d["errors"]}
    assert errors == {"CLICK_NOT_FOUND"}  # people known by email only who never clicked
    unread = sum(r["uploads"] for r in ledger if r["status"] == "sent" and not r["reason"])
    assert unread == len(due)  # sent by the rerun: Google has not been asked about them yet
    with Store.open(valued.store_url()) as store:
        pending = store.requests_to_check(valued.client.name, Platform.GOOGLE_ADS,
                                          later + dt.timedelta(days=1))
    assert len(pending) == second.requests["IngestEvents"]  # only the rerun's own request


def _copy_client(config: ClientConfig, folder: Path) -> Path:
    """The client's config and store copied into ``folder``: a push there starts from the
    values and journeys of the fixture, with an empty ledger."""
    assert config.path is not None
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(config.store_url().removeprefix("sqlite:///"))
    shutil.copy(source, folder / "client.db")
    text = config.path.read_text()
    text = re.sub(r'store_url = ".*"', 'store_url = "sqlite:///client.db"', text)
    for name in ("client.secrets.env",):
        shutil.copy(config.path.with_name(name), folder / name)
    path = folder / "client.toml"
    path.write_text(text.replace(config.path.stem + ".secrets.env", "client.secrets.env"))
    return path


def _counts_by_key(running: server.RunningSandbox) -> dict[str, tuple[int, int]]:
    assert running.datamanager is not None
    return {key: (c.events, c.conversions)
            for (_, key), c in running.datamanager.transactions().items()}


def test_a_push_killed_anywhere_and_rerun_counts_each_event_once(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    """SIGKILL at 20 random moments of a push, each time run again: in the end the sandbox
    has every eligible event once at its ledger value, nothing lost, and the resends are
    counted (a resend the sandbox saw twice is never a second conversion)."""
    assert running.datamanager is not None
    running.datamanager.reset()
    running.datamanager.configure(processing_delay_minutes=0)
    path = _copy_client(valued, tmp_path / "killed")
    command = [str(CONVSYNC), "push", "--destination", "google_ads", "--config", str(path),
               "--json"]
    started = time.monotonic()
    clean = subprocess.run(command, capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)  # a whole push into another copy: how long one takes
    took = time.monotonic() - started
    assert clean.returncode in (0, 3), clean.stderr[-2000:]
    plan = json.loads(clean.stdout)["destinations"]["google_ads"]
    expected = plan["sent"]
    running.datamanager.reset()
    running.datamanager.configure(processing_delay_minutes=0)
    path = _copy_client(valued, tmp_path / "again")
    rng = random.Random(11)
    for _ in range(20):
        process = subprocess.Popen([*command[:5], str(path)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, cwd=tmp_path)
        time.sleep(rng.uniform(0.0, took))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    final = subprocess.run([*command[:5], str(path), "--json"], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)
    assert final.returncode in (0, 3), final.stderr[-2000:]
    with Store.open(load_config(path).store_url()) as store:
        sent = _ledger_sent(store)
        with store.engine.connect() as conn:
            resends = conn.execute(sa.select(sa.func.sum(uploads.c.resends))).scalar() or 0
            left = conn.execute(sa.select(sa.func.count()).where(
                uploads.c.status.in_(["planned", "sending"]))).scalar()
    counted = _counts_by_key(running)
    assert left == 0 and len(sent) == expected > 1000  # nothing lost, nothing left behind
    assert set(counted) == set(sent)
    assert all(conversions <= 1 for _, conversions in counted.values())
    duplicates = sum(events - 1 for events, _ in counted.values())
    assert duplicates <= resends  # every second copy the sandbox saw was counted a resend


def test_two_overlapping_pushes_of_one_client_send_nothing_twice(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    assert running.datamanager is not None
    running.datamanager.reset()
    path = _copy_client(valued, tmp_path / "overlap")
    command = [str(CONVSYNC), "push", "--destination", "google_ads", "--config", str(path),
               "--json"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    time.sleep(1.0)  # the first holds the client's lock by now
    second = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    out, _ = first.communicate(timeout=300)
    assert "another push of client 'Sandbox Outdoor' is running" in second.stderr
    assert second.returncode == 0 and second.stdout == ""
    summary = json.loads(out)["destinations"]["google_ads"]
    sent = summary["sent"]
    per_action = {a["conversion"]: a for a in summary["actions"]}
    assert sum(a["sent"] for a in per_action.values()) == sent
    assert all({"sent", "held", "rejected", "resent"} <= set(a) for a in per_action.values())
    counted = _counts_by_key(running)
    assert len(counted) == sent > 1000 and {e for e, _ in counted.values()} == {1}


def _inject(running: server.RunningSandbox, kind: str, count: int = 1) -> None:
    request = urllib.request.Request(
        running.endpoints["control"] + "/faults", method="POST",
        data=json.dumps({"platform": "datamanager", "kind": kind, "count": count}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def test_a_push_under_faults_still_counts_each_event_once_and_a_pull_sees_them(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    """Outages and quota answers on one request in ten or so: retried, each event lands once;
    then a pull of Google Ads finds the uploads in the upload action's stats."""
    assert running.datamanager is not None
    running.datamanager.reset()
    running.datamanager.configure(processing_delay_minutes=0)
    config = load_config(_copy_client(valued, tmp_path / "faults"))
    for kind in ("server_error", "rate_limit"):
        _inject(running, kind)
    slept: list[float] = []
    with Store.open(config.store_url()) as store:
        result = push.push_google_ads(config, load_secrets(config), store, now=NOW,
                                      sleep=slept.append)
        sent = _ledger_sent(store)
        pipeline.pull(config, load_secrets(config), store, platforms=[Platform.GOOGLE_ADS],
                      since=TODAY - dt.timedelta(days=119), until=TODAY, today=TODAY,
                      restart=True)  # the whole world: some clicks came before the journeys
        stats = [s for s in store.stats(platform=Platform.GOOGLE_ADS)
                 if s.platform_conversion == "convsync micro value (upload)"]
        audited = load_audit(config, store)
    assert result.errors == [] and len(slept) == 2  # both faults retried
    assert result.requests["IngestEvents"] == -(-result.sent // 2000) + 2
    counted = _counts_by_key(running)
    assert set(counted) == set(sent) and {e for e, _ in counted.values()} == {1}
    # every event Google matched is one conversion in the stats (an earlier test may have sent
    # the same transaction ids: then this push restated them, and they still count once)
    assert running.datamanager is not None
    matched = sum(1 for c in running.datamanager.transactions().values() if not c.errors)
    assert matched > 1000 and sum(s.count for s in stats if s.basis.value == "click_date") == (
        pytest.approx(matched))
    # the audit sees the ledger's uploads and the conversions they made: nothing missing
    micro = next(r for r in audited.actions if r.name == "convsync micro value (upload)")
    assert micro.uploads >= len(sent) and micro.conversions > 0  # (held ones too)
    assert not [f for f in audited.findings if f.subject == micro.name
                and f.code in ("uploads_not_arriving", "uploads_stopped")]


def test_a_dry_run_asks_google_to_validate_and_leaves_the_ledger_alone(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    assert running.datamanager is not None
    running.datamanager.reset()
    config = load_config(_copy_client(valued, tmp_path / "dry"))
    secrets = load_secrets(config)
    with Store.open(config.store_url()) as store:
        dry = push.push_google_ads(config, secrets, store, dry_run=True, now=NOW)
        assert store.count_rows("uploads") == 0
        assert running.datamanager.transactions() == {}  # validated, nothing kept
        validated = dry.requests["IngestEvents"]
        push.push_google_ads(config, secrets, store, now=NOW, sleep=lambda s: None)
        again = push.push_google_ads(config, secrets, store, dry_run=True, now=NOW)
    assert validated == -(-dry.plan.events // 2000) and dry.errors == []
    first = {a["conversion"]: a for a in dry.summary()["actions"]}
    later = {a["conversion"]: a for a in again.summary()["actions"]}
    for step in LADDER:
        assert first[step]["in_ledger"] == 0 and first[step]["sent"] == 0
        assert later[step]["in_ledger"] == later[step]["events"] > 0


def _redate_action(running: server.RunningSandbox, hours_ago: float) -> None:
    request = urllib.request.Request(
        running.endpoints["control"] + "/datamanager/actions", method="POST",
        data=json.dumps({"id": MICRO_UPLOAD_ACTION_ID, "created_hours_ago": hours_ago}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def test_a_request_google_refuses_whole_loses_nothing_and_a_later_run_sends_it(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    """The upload action was created an hour ago (Google refuses it for about 6 hours): the
    push stops at the first request, its rows and the rest stay planned; once the action is
    old enough, the next push sends every one of them once."""
    assert running.datamanager is not None
    running.datamanager.reset()
    config = load_config(_copy_client(valued, tmp_path / "refused"))
    secrets = load_secrets(config)
    _redate_action(running, 1)
    try:
        with Store.open(config.store_url()) as store:
            refused = push.push_google_ads(config, secrets, store, now=NOW,
                                           sleep=lambda s: None)
            statuses = {r["status"] for r in store.ledger(config.client.name,
                                                          Platform.GOOGLE_ADS)}
            assert refused.sent == 0 and statuses <= {"planned", "held"}
            assert any("CONVERSION_ACTION_TOO_RECENTLY_CREATED" in e for e in refused.errors)
            _redate_action(running, 7)
            later = push.push_google_ads(config, secrets, store, now=NOW, sleep=lambda s: None)
            sent = _ledger_sent(store)
    finally:
        _redate_action(running, 24 * 30)
    assert later.errors == [] and later.sent == len(sent) == refused.plan.events - len(
        refused.plan.holds)
    assert set(_counts_by_key(running)) == set(sent)


def test_a_cloud_projects_spent_day_stops_the_push_and_loses_nothing(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    """Other clients of the Cloud project used its 100,000 writes today: the push writes its
    ledger, sends nothing, says why; the next quota day sends every row once."""
    assert running.datamanager is not None
    running.datamanager.reset()
    config = load_config(_copy_client(valued, tmp_path / "quota"))
    secrets = load_secrets(config)
    assert config.google_ads is not None
    project = quotas.cloud_project(config.google_ads, secrets)
    with Store.open(config.store_url()) as store:
        with store.engine.begin() as conn:
            conn.execute(quota_calls.insert().values(
                project=project, api="datamanager.write", calls=100_000,
                second=quotas.quota_day_start(dt.datetime.now(dt.UTC))))
        spent = push.push_google_ads(config, secrets, store, now=NOW, sleep=lambda s: None)
        statuses = {r["status"] for r in store.ledger(config.client.name, Platform.GOOGLE_ADS)}
        assert (spent.sent, dict(spent.requests)) == (0, {})
        assert not any("QUOTA" in why for why in spent.rejected)  # deferred, not rejected
        assert statuses <= {"planned", "held"} and spent.planned_new == spent.plan.events
        assert any(project in e and "quota for the day is spent" in e for e in spent.errors)
        assert running.datamanager.transactions() == {}
        with store.engine.begin() as conn:  # a new quota day
            conn.execute(quota_calls.delete())
        later = push.push_google_ads(config, secrets, store, now=NOW, sleep=lambda s: None)
    assert later.errors == [] and later.sent == spent.plan.events - len(spent.plan.holds)
    assert set(_counts_by_key(running)) == set(_ledger_sent_keys(config))


def test_a_lead_the_crm_disqualifies_is_restated_to_its_voided_value_never_retracted(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    """A qualified lead sent to Google, then disqualified in the CRM: the next push sends its
    transaction id again at the configured voided value (Google restates, the conversion
    still counts once) and says the Data Manager API cannot retract it; a lead disqualified
    before any push is never sent."""
    assert running.datamanager is not None
    running.datamanager.reset()
    path = _copy_client(valued, tmp_path / "void")
    path.write_text(path.read_text().replace(
        'name = "qualified_lead"\n', 'name = "qualified_lead"\nvoided_by = "lead_disqualified"\n'
        'voided_value = 1.5\n'))
    running.datamanager.configure(processing_delay_minutes=0)
    config = load_config(path)
    secrets = load_secrets(config)
    crm = tmp_path / "void" / "crm.csv"
    mapping = ConversionMap(config.definitions())
    with Store.open(config.store_url()) as store:
        (one, at_one), (two, at_two) = _recent_clicks(store, 2)  # people who clicked an ad
        crm.write_text("event,time,value,currency,gclid\n"
                       f"lead_qualified,{at_one.isoformat()},120,USD,{one}\n"
                       f"lead_qualified,{at_two.isoformat()},80,USD,{two}\n"
                       f"lead_disqualified,{at_two.isoformat()},0,USD,{two}\n")
        crm_source.import_file(store, crm, mapping)
        first = push.push_google_ads(config, secrets, store, now=NOW, sleep=lambda s: None)
        leads = {key: value for key, value in _ledger_sent(store).items()
                 if key in _keys_of(store, "6108")}
        later = NOW + dt.timedelta(hours=1)
        lost = (NOW + dt.timedelta(minutes=30)).isoformat()
        crm.write_text(crm.read_text() + f"lead_disqualified,{lost},0,USD,{one}\n")
        crm_source.import_file(store, crm, mapping)
        second = push.push_google_ads(config, secrets, store, now=later, sleep=lambda s: None)
        after = _ledger_sent(store)
    action = first.plan.actions["qualified_lead"]
    assert list(leads.values()) == [120.0]  # L-2 was disqualified before it could be sent
    assert action.refused["voided by the CRM (lead_disqualified) before it was sent"] == 1
    (key,) = leads
    assert second.plan.actions["qualified_lead"].voided == 1 and second.restated == 1
    assert after[key] == 1.5
    counted = running.datamanager.transactions()[(6108, key)]
    assert (counted.events, counted.conversions, counted.adjustments, counted.value) == (
        2, 1, 1, 1.5)
    shown = subprocess.run([str(CONVSYNC), "push", "--destination", "google_ads", "--config",
                            str(path), "--dry-run"],
                           capture_output=True, text=True, env={"COLUMNS": "80", "PATH": ""})
    assert "cannot retract" in " ".join(shown.stdout.split())


def test_a_lead_voided_in_an_account_that_still_may_is_retracted_through_the_google_ads_api(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    """With the account in retraction_accounts, a sent lead the CRM disqualifies is retracted
    through the Google Ads API's conversion adjustments (count and value taken back), once;
    the ledger says so, and later pushes leave it alone."""
    assert running.datamanager is not None
    running.datamanager.reset()
    running.datamanager.configure(processing_delay_minutes=0)
    path = _copy_client(valued, tmp_path / "retract")
    path.write_text(path.read_text().replace(
        'name = "qualified_lead"\n', 'name = "qualified_lead"\nvoided_by = "lead_disqualified"\n')
        .replace('consent = "granted"\n', 'consent = "granted"\nretraction_accounts = '
                                          '["123-456-7890"]\n'))
    config = load_config(path)
    secrets = load_secrets(config)
    crm = tmp_path / "retract" / "crm.csv"
    mapping = ConversionMap(config.definitions())
    with Store.open(config.store_url()) as store:
        (one, at_one), (two, at_two) = _recent_clicks(store, 2)
        crm.write_text("event,time,value,currency,gclid\n"
                       f"lead_qualified,{at_one.isoformat()},120,USD,{one}\n"
                       f"lead_qualified,{at_two.isoformat()},80,USD,{two}\n")
        crm_source.import_file(store, crm, mapping)
        push.push_google_ads(config, secrets, store, now=NOW, sleep=lambda s: None)
        leads = _keys_of(store, "6108")
        lost = (NOW + dt.timedelta(minutes=30)).isoformat()
        crm.write_text(crm.read_text() + f"lead_disqualified,{lost},0,USD,{one}\n")
        crm_source.import_file(store, crm, mapping)
        later = NOW + dt.timedelta(hours=1)
        running.world.set_as_of(later)  # Google's now: it refuses an adjustment in its future
        try:
            second = push.push_google_ads(config, secrets, store, now=later,
                                          sleep=lambda s: None)
            third = push.push_google_ads(config, secrets, store, now=later,
                                         sleep=lambda s: None)
        finally:
            running.world.set_as_of(NOW)
        statuses = {r["status"]: r["uploads"] for r in store.ledger(
            config.client.name, Platform.GOOGLE_ADS) if r["conversion"] == "qualified_lead"}
    assert len(leads) == 2
    assert second.retracted == 1 and second.errors == [] and second.restated == 0
    assert second.requests["UploadConversionAdjustments"] == 1
    assert statuses.get("retracted") == 1
    assert third.retracted == 0 and "UploadConversionAdjustments" not in third.requests
    counts = {key: running.datamanager.transactions()[(6108, key)] for key in leads}
    assert sorted(c.retractions for c in counts.values()) == [0, 1]
    assert all(c.events == 1 for c in counts.values())  # never restated through Data Manager


class LaxSink(DataManagerSink):
    """A Data Manager sink whose own checks miss a time in the future."""

    def problems(self, upload: Upload, now: dt.datetime) -> str:
        why = super().problems(upload, now)
        return "" if why.startswith("time:") else why


def test_an_event_google_refuses_is_set_aside_and_the_rest_of_its_request_goes(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    """A ledger row Google refuses though convsync's checks let it through (here: a time in
    the future, with the check that would catch it switched off) sinks its whole request: it
    fails alone, with Google's words, and the rest of the request goes at once instead of
    being refused every run."""
    assert running.datamanager is not None
    running.datamanager.reset()
    config = load_config(_copy_client(valued, tmp_path / "aside"))
    secrets = load_secrets(config)
    good = [Upload(Platform.GOOGLE_ADS, "6111", f"aside-{i}", 2.5, "USD",
                   NOW - dt.timedelta(days=1), "1234567890", "add_to_cart",
                   Identifiers(gclid=f"Cj0KCQaside{i:010d}")) for i in range(3)]
    bad = good[0]._replace(dedupe_key="aside-future", time=NOW + dt.timedelta(days=1))
    with Store.open(config.store_url()) as store:
        store.plan_uploads([good[0], bad, good[1], good[2]], client=config.client.name)
        assert config.google_ads is not None
        lax = LaxSink(connect(config.google_ads, secrets), config.google_ads,
                      sleep=lambda s: None)
        result = push.push_google_ads(config, secrets, store, now=NOW, sleep=lambda s: None,
                                      sink=lax)
        failed = {r["reason"]: r["uploads"] for r in store.ledger(
            config.client.name, Platform.GOOGLE_ADS) if r["status"] == "failed"}
        again = push.push_google_ads(config, secrets, store, now=NOW, sleep=lambda s: None,
                                     sink=lax)
        refusals = store.upload_refusals(Platform.GOOGLE_ADS)["6111"]
    (reason,) = failed
    assert refusals[reason] == 1  # what the audit quotes for the action
    assert failed[reason] == 1 and "event_timestamp" in reason and "future" in reason
    assert result.rejected.get(reason) == 1 and result.errors == []
    counted = _counts_by_key(running)
    assert {u.dedupe_key for u in good} <= set(counted) and "aside-future" not in counted
    assert again.sent == 0 and again.errors == []  # the refused row is not tried again


def _recent_clicks(store: Store, count: int) -> list[tuple[str, dt.datetime]]:
    """Gclids of stored people first seen 2 to 20 days before NOW, each with a time a day
    after (a conversion of that click)."""
    found: dict[str, dt.datetime] = {}
    for event in store.journey_events(since=NOW - dt.timedelta(days=20),
                                      until=NOW - dt.timedelta(days=2)):
        gclid = event.identifiers.gclid
        if gclid and gclid not in found:
            found[gclid] = event.time + dt.timedelta(days=1)
        if len(found) == count:
            break
    return list(found.items())


def _keys_of(store: Store, action: str) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(uploads.c.dedupe_key).where(
            uploads.c.conversion_action == action)).scalars())


def _ledger_sent_keys(config: ClientConfig) -> set[str]:
    with Store.open(config.store_url()) as store:
        return set(_ledger_sent(store))


def test_a_request_still_processing_is_looked_at_less_and_less_often() -> None:
    sent = NOW
    looks = [push._next_check(sent + age, sent) - (sent + age) for age in (
        dt.timedelta(minutes=31), dt.timedelta(hours=3), dt.timedelta(days=5))]
    assert looks == [dt.timedelta(minutes=31), dt.timedelta(hours=3), dt.timedelta(days=1)]
    assert push._next_check(sent + dt.timedelta(minutes=5), sent) == sent + dt.timedelta(
        minutes=35)  # never sooner than half an hour


def test_a_waiting_row_the_sink_would_now_refuse_fails_with_the_reason_unsent(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    """A row waiting in the ledger (planned by an earlier run) that convsync's own checks now
    refuse (a time in the future here; an event grown too old for Meta in life) fails with
    the reason and is never sent; the rest go."""
    assert running.datamanager is not None
    running.datamanager.reset()
    config = load_config(_copy_client(valued, tmp_path / "stale"))
    good = Upload(Platform.GOOGLE_ADS, "6111", "stale-good", 2.5, "USD",
                  NOW - dt.timedelta(days=1), "1234567890", "add_to_cart",
                  Identifiers(gclid="Cj0KCQstale0000000001"))
    bad = good._replace(dedupe_key="stale-future", time=NOW + dt.timedelta(days=1))
    with Store.open(config.store_url()) as store:
        store.plan_uploads([good, bad], client=config.client.name)
        result = push.push_google_ads(config, load_secrets(config), store, now=NOW,
                                      sleep=lambda s: None)
        statuses = store.upload_statuses(config.client.name, Platform.GOOGLE_ADS,
                                         ["stale-good", "stale-future"])
    assert statuses["stale-future"] == "failed" and statuses["stale-good"] == "sent"
    assert result.failed == {"time: in the future": 1}
    counted = _counts_by_key(running)
    assert "stale-good" in counted and "stale-future" not in counted
