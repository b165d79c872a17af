"""The synthetic world: deterministic, generated on demand, and consistent across views."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import numpy as np
import pytest

from convsync.hashing import (
    GMAIL_DOMAINS,
    hash_email,
    normalize_email_google,
    normalize_email_meta,
    sha256_hex,
)
from convsync.sandbox.world import (
    PURCHASE,
    World,
    WorldSpec,
    epoch_day,
    local_day_numbers,
)


def test_same_seed_same_world_other_seed_other_world() -> None:
    a, b = World(WorldSpec(seed=3)), World(WorldSpec(seed=3))
    day = a.first_day + 5
    assert np.array_equal(a.day(day).times, b.day(day).times, equal_nan=True)
    c = World(WorldSpec(seed=4))
    assert not np.array_equal(a.day(day).click_ts, c.day(day).click_ts)


def test_a_day_is_the_same_whichever_order_days_are_built() -> None:
    """On-demand generation: day 40 does not depend on days 0..39 having been built."""
    fresh = World(WorldSpec(seed=5, days=365, campaigns=200))
    late = fresh.first_day + 300
    first = fresh.day(late).order_value.copy()
    other = World(WorldSpec(seed=5, days=365, campaigns=200))
    for d in range(other.first_day, other.first_day + 3):
        other.day(d)
    assert np.array_equal(other.day(late).order_value, first)


def test_large_world_costs_nothing_up_front() -> None:
    world = World(WorldSpec(days=365, campaigns=200))
    assert world._day.cache_info().currsize == 0  # type: ignore[attr-defined]
    assert len(world.campaigns) == 200


def test_clock_hides_the_future_and_reveals_late_conversions() -> None:
    spec = WorldSpec(seed=9, start=dt.date(2026, 9, 1), days=30,
                     as_of=dt.datetime(2026, 9, 20, tzinfo=dt.UTC))
    world = World(spec)
    assert max(s.date for s in world.google_ads_stats(world.start, world.end)) <= dt.date(
        2026, 9, 20)  # nothing after "now", in any time zone
    before = _purchases(world, dt.date(2026, 9, 1), dt.date(2026, 9, 19))
    world.advance(days=10)
    after = _purchases(world, dt.date(2026, 9, 1), dt.date(2026, 9, 19))
    assert after > before  # past click days kept gaining conversions


def _purchases(world: World, start: dt.date, end: dt.date) -> int:
    return sum(s.all_conversions for s in world.google_ads_stats(start, end)
               if s.action.name == "Purchase")


def test_google_ads_counts_equal_the_people_who_did_it(world: World) -> None:
    """The Google view is an aggregation of the people: recount them by hand."""
    start, end = world.start + dt.timedelta(days=3), world.start + dt.timedelta(days=9)
    lo, hi = epoch_day(start), epoch_day(end)
    google = {c.index for c in world.campaigns_on("google_ads")}
    expected: Counter[int] = Counter()
    for number in range(lo - 1, hi + 2):
        day = world.day(number)
        dates = local_day_numbers(day.click_ts, world.accounts.google_ads_tz)
        for i in range(day.size):
            t = day.times[PURCHASE, i]
            if (int(day.campaign[i]) in google and not day.view_through[i] and lo <= dates[i] <= hi
                    and t == t and t <= world.as_of_ts and t - day.click_ts[i] <= 90 * 86_400):
                expected[int(dates[i])] += 1
    got: Counter[int] = Counter()
    for stat in world.google_ads_stats(start, end):
        if stat.action.name == "Purchase":
            got[epoch_day(stat.date)] += stat.all_conversions
    assert got == expected and sum(got.values()) > 10


def test_secondary_actions_are_not_in_column_unless_a_fault_says_so() -> None:
    clean = World(WorldSpec(seed=2, days=10))
    assert [a.name for a in clean.google_ads_actions if a.primary_for_goal] == [
        "Purchase", "Qualified lead (offline)"]
    dup = World(WorldSpec(seed=2, days=10, faults=frozenset({"duplicate_tag"})))
    stats = list(dup.google_ads_stats(dup.start, dup.end))
    tag = sum(s.conversions for s in stats if s.action.name == "Purchase")
    ga4 = sum(s.conversions for s in stats if s.action.name == "GA4 purchase")
    assert tag > 0 and abs(ga4 - tag) <= 0.1 * tag  # the same orders counted twice in column


def test_broken_checkout_stops_purchases_but_not_carts() -> None:
    world = World(WorldSpec(seed=2, days=20, faults=frozenset({"broken_checkout"})))
    second_half = world.start + dt.timedelta(days=10)
    late = list(world.ga4_rows(second_half + dt.timedelta(days=1), world.end))
    by_event = Counter()
    for row in late:
        by_event[row.event_name] += row.event_count
    assert by_event["add_to_cart"] > 50 and by_event["begin_checkout"] > 10
    # only purchases from checkouts begun before the break remain
    assert by_event["purchase"] < 0.2 * by_event["begin_checkout"]


def test_tz_shift_moves_ga4_to_tokyo() -> None:
    assert World(WorldSpec(faults=frozenset({"tz_shift"}))).accounts.ga4_tz == "Asia/Tokyo"


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        WorldSpec(faults=frozenset({"gremlins"}))


def test_local_day_numbers_respect_dst() -> None:
    # 2026-11-01 06:30 UTC is 01:30 EST (after the fall-back at 06:00 UTC): still Nov 1st
    ts = np.array([dt.datetime(2026, 11, 1, 6, 30, tzinfo=dt.UTC).timestamp(),
                   dt.datetime(2026, 11, 1, 3, 59, tzinfo=dt.UTC).timestamp()])
    days = local_day_numbers(ts, "America/New_York")
    assert days.tolist() == [epoch_day(dt.date(2026, 11, 1)), epoch_day(dt.date(2026, 10, 31))]


def test_klaviyo_events_are_in_time_order_and_only_identified_people(world: World) -> None:
    start = dt.datetime.combine(world.start, dt.time(), dt.UTC)
    events = list(world.klaviyo_events(start, start + dt.timedelta(days=5)))
    stamps = [e.timestamp for e in events]
    assert stamps == sorted(stamps) and len(events) > 100
    assert len({e.id for e in events}) == len(events)
    assert all("@" in e.email for e in events)


def test_no_klaviyo_person_key_holds_more_than_one_percent_of_the_events() -> None:
    """The person key is what the Klaviyo source makes of a profile's email, ``email:`` and
    its Google-rule SHA-256: one address shared by many people (Google folds the dots and a
    +tag of a gmail local part away) would make them one person and break per-person figures."""
    world = World(WorldSpec(days=30, campaigns=6))
    start = dt.datetime.combine(world.start, dt.time(), dt.UTC)
    events = list(world.klaviyo_events(start, world.as_of + dt.timedelta(seconds=1)))
    google_of: dict[str, str] = {}
    keys: Counter[str] = Counter()
    for event in events:
        if event.email not in google_of:
            google_of[event.email] = hash_email(event.email)[0]
        keys[f"email:{google_of[event.email]}"] += 1
    assert len(events) > 1000
    most = keys.most_common(1)[0][1]
    assert most <= 0.01 * len(events), f"one person key holds {most} of {len(events)} events"
    # one profile, one address, one key
    assert len(keys) == len({e.profile_id for e in events})


def test_distinct_people_have_distinct_addresses_under_google_and_meta_rules() -> None:
    world = World(WorldSpec(days=30, campaigns=6))
    people = [(d.day, i) for d in world.days_between(world.first_day, world.last_day)
              for i in range(d.size)]
    # small numbers too: digits run together (day 1 index 11, day 11 index 1) must not meet
    people += [(d, i) for d in (0, 1, 10, 11, 101, 110) for i in range(0, 120)]
    emails = [world.email(d, i) for d, i in people]
    assert emails == [world.email(d, i) for d, i in people]  # deterministic
    assert World(WorldSpec(days=30, campaigns=6)).email(*people[5]) == emails[5]
    for rule in (normalize_email_google, normalize_email_meta):
        normalized = [rule(e) for e in emails]
        assert len(set(normalized)) == len(people), rule.__name__
        # gmail.com and googlemail.com are one mailbox: the local parts alone are distinct too
        mailboxes = {n.rpartition("@")[0] if n.rpartition("@")[2] in GMAIL_DOMAINS else n
                     for n in normalized}
        assert len(mailboxes) == len(people), rule.__name__
    for email in emails:  # what the Klaviyo source hashes equals each platform's rule
        assert hash_email(email) == (sha256_hex(normalize_email_google(email)),
                                     sha256_hex(normalize_email_meta(email)))


def test_world_emails_are_messy_the_way_real_ones_are() -> None:
    world = World(WorldSpec(days=30, campaigns=6))
    emails = [world.email(d.day, i) for d in world.days_between(world.first_day, world.last_day)
              for i in range(d.size)]
    gmail: list[str] = []
    others: list[str] = []
    for email in emails:
        domain = email.strip().rpartition("@")[2]
        (gmail if domain.lower() in GMAIL_DOMAINS else others).append(email.strip())
    domains = {e.rpartition("@")[2] for e in gmail + others}
    assert {"gmail.com", "googlemail.com"} <= {d.lower() for d in domains}
    assert any(d != d.lower() for d in domains if d.lower() not in GMAIL_DOMAINS)
    assert any(e.startswith(" ") for e in emails) and any(e.endswith(" ") for e in emails)
    assert any("." in e.partition("@")[0] for e in gmail)
    assert any("+" in e.partition("@")[0] for e in gmail)
    assert any("+" in e.partition("@")[0] for e in others)
    assert any(e != e.lower() for e in gmail) and any(e != e.lower() for e in others)
    # the rules disagree on gmail addresses, so both hashes are exercised
    assert sum(normalize_email_google(e) != normalize_email_meta(e) for e in gmail) > 100
    assert 0.2 < len(gmail) / len(emails) < 0.6
