"""The valuation estimator: its pieces on hand-checkable cases, end to end on small synthetic
journeys with a known truth, and the benchmark's fast form."""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convsync.model import JourneyEvent, Platform
from convsync.valuation import (
    ALL_SEGMENTS,
    BetaPrior,
    Journeys,
    MicroValue,
    Recommendation,
    ValuationSettings,
    completed_share,
    estimate_ladder,
    estimate_values,
    finney_factor,
    fit_beta_prior,
    journeys_from_events,
    kaplan_meier,
    ladder_credits,
    ladder_weights,
    lognormal_mean,
    textbook_values,
)

ROOT = Path(__file__).resolve().parents[1]
AS_OF = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)
DAY = 86_400.0


def _row(rows: list[MicroValue], conversion: str, segment: str = ALL_SEGMENTS) -> MicroValue:
    return next(r for r in rows if r.conversion == conversion and r.segment == segment)


def _journeys(people: int, rate: float, lag_days: float, *, days: float = 180.0, seed: int = 1,
              segments: int = 1, value: float = 100.0,
              sizes: np.ndarray | None = None) -> Journeys:
    """One micro conversion ("signup") at a uniform time over ``days`` before AS_OF; a share
    ``rate`` buys ``lag_days`` later (if that is before AS_OF) for ``value`` (or ``sizes``)."""
    rng = np.random.default_rng(seed)
    start = AS_OF.timestamp() - rng.uniform(0, days, people) * DAY
    buys = rng.random(people) < rate
    bought = start + lag_days * DAY
    seen = buys & (bought <= AS_OF.timestamp())
    values = np.full(people, value) if sizes is None else sizes
    return Journeys(
        conversions=("signup",), segments=tuple(f"c{s}" for s in range(segments)),
        micro_person=np.arange(people), micro_conversion=np.zeros(people, np.int64),
        micro_segment=np.arange(people) % segments, micro_time=start,
        micro_size=np.full(people, np.nan) if sizes is None else sizes,
        macro_person=np.flatnonzero(seen), macro_time=bought[seen], macro_value=values[seen])


# ---------------------------------------------------------------- Kaplan-Meier by hand


def test_kaplan_meier_matches_the_product_limit_by_hand() -> None:
    # at risk 6, 5, 3, 1 at the event times 1, 2, 3, 5; a censoring at 2 counts as at risk at 2
    curve = kaplan_meier(np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0]),
                         np.array([True, True, False, True, False, True]))
    assert curve.times.tolist() == [1.0, 2.0, 3.0, 5.0]
    assert curve.survival == pytest.approx([5 / 6, 2 / 3, 4 / 9, 0.0])
    assert curve.at(np.array([0.5, 2.5, 4.0, 9.0])) == pytest.approx([1.0, 2 / 3, 4 / 9, 0.0])


def test_completed_share_is_the_seen_part_of_the_within_horizon_conversions() -> None:
    curve = kaplan_meier(np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0]),
                         np.array([True, True, False, True, False, True]))
    # F(4) = 5/9; after 2 days F = 1/3 has happened: 0.6 of it; at or past H: all of it
    assert completed_share(curve, np.array([0.0, 2.0, 4.0, 7.0]), 4.0) == pytest.approx(
        [0.0, 0.6, 1.0, 1.0])


# ---------------------------------------------------------------- shrinkage


def test_known_prior_gives_the_beta_binomial_posterior() -> None:
    prior = BetaPrior.known(2.0, 8.0)
    y, n = np.array([0.0, 5.0]), np.array([10.0, 10.0])
    assert prior.posterior_mean(y, n) == pytest.approx([2 / 20, 7 / 20])
    draws = prior.draw(y, n, np.random.default_rng(0), 20_000)
    assert draws.mean(axis=0) == pytest.approx([0.10, 0.35], abs=0.005)


def test_fitted_prior_shrinks_small_segments_toward_the_pooled_rate() -> None:
    rng = np.random.default_rng(3)
    n = np.full(40, 20.0)
    y = rng.binomial(20, 0.1, 40).astype(float)  # every segment truly at 10%
    y[0] = 6.0  # one lucky segment at 30%
    prior = fit_beta_prior(y, n)
    assert prior.mean == pytest.approx(y.sum() / n.sum(), rel=0.1)
    shrunk = prior.posterior_mean(y, n)
    assert 0.1 < shrunk[0] < 0.2  # most of the way back toward 10%
    # big segments with real differences keep them
    big = np.full(40, 5000.0)
    rates = np.linspace(0.05, 0.25, 40)
    y_big = np.round(big * rates)
    assert fit_beta_prior(y_big, big).posterior_mean(y_big, big) == pytest.approx(
        rates, abs=0.003)


def test_plug_in_prior_is_one_point() -> None:
    y, n = np.array([1.0, 3.0, 2.0, 8.0]), np.array([20.0, 20.0, 20.0, 20.0])
    plug = fit_beta_prior(y, n, plug_in=True)
    assert len(plug.weight) == 1
    assert len(fit_beta_prior(y, n).weight) > 1


# ---------------------------------------------------------------- mean order value


def test_finney_factor_by_hand() -> None:
    # 0F1(; 1/2; z) = cosh(2 sqrt(z)): one degree of freedom, a = 1/4, S = 2 gives cosh(1)
    assert float(finney_factor(0.25, 2.0, 1.0)) == pytest.approx(math.cosh(1.0))
    # 0F1(; 1; z) = sum z^k / k!^2: two degrees of freedom, a = 1/3, S = 2 gives z = 1/3
    series = sum((1 / 3) ** k / math.factorial(k) ** 2 for k in range(12))
    assert float(finney_factor(1 / 3, 2.0, 2.0)) == pytest.approx(series)
    assert finney_factor(np.array([0.0, 0.0]), 5.0, 0.0).tolist() == [1.0, 1.0]


def test_lognormal_mean_by_hand_and_unbiased() -> None:
    # exp(1) cosh(1) = (1 + e^2) / 2: on two values the estimate is their plain average
    assert lognormal_mean(np.array([0.0, 2.0])) == pytest.approx((1 + math.e**2) / 2)
    assert lognormal_mean(np.array([3.0])) == pytest.approx(math.exp(3.0))
    assert lognormal_mean(np.array([])) == 0.0
    logs = np.random.default_rng(0).normal(1.0, 1.0, (20_000, 3))
    estimates = [lognormal_mean(row) for row in logs]
    assert np.mean(estimates) == pytest.approx(math.exp(1.5), rel=0.02)  # exp(mean): +18%


def test_mean_order_value_mixes_unbiased_parts_on_the_value_scale() -> None:
    """Segment "a" bought for 1 and e^2, segment "b" did not buy: the client's mean and
    "a"'s own mean are both (1 + e^2) / 2, so both segments get it whatever the pooling
    weight; no prior on either spread is in it (a posterior mean would add exp(tau^2 / 2))."""
    t = AS_OF.timestamp()
    journeys = Journeys(
        conversions=("signup",), segments=("a", "b"), micro_person=np.arange(6),
        micro_conversion=np.zeros(6, np.int64), micro_segment=np.array([0, 0, 0, 1, 1, 1]),
        micro_time=np.full(6, t - 100 * DAY), micro_size=np.full(6, np.nan),
        macro_person=np.array([0, 1]), macro_time=np.full(2, t - 99 * DAY),
        macro_value=np.array([1.0, math.e**2]))
    rows = estimate_values(journeys, AS_OF, 30.0, ValuationSettings(min_events=1))
    for segment in ("a", "b"):
        assert _row(rows, "signup", segment).mean_macro_value == pytest.approx(
            (1 + math.e**2) / 2)


def test_a_handful_of_orders_is_taken_as_it_is_and_a_huge_order_among_many_pulled_in() -> None:
    settings = ValuationSettings(size_scaling=False, min_events=1)
    few = np.exp([3.0, 3.2, 3.1, 2.9, 9.0])  # one order 400 x the others
    row = _row(estimate_values(_journeys(5, rate=1.0, lag_days=0.0, sizes=few), AS_OF, 90.0,
                               settings), "signup", "c0")
    # one segment: its own mean and the client's are the same unbiased lognormal mean
    assert row.mean_macro_value == pytest.approx(lognormal_mean(np.log(few)))
    many = np.exp(np.append(np.random.default_rng(2).normal(3.0, 0.1, 39), 9.0))
    row = _row(estimate_values(_journeys(40, rate=1.0, lag_days=0.0, sizes=many), AS_OF, 90.0,
                               settings), "signup", "c0")
    assert row.mean_macro_value == pytest.approx(math.exp(3.005), rel=0.05)
    assert lognormal_mean(np.log(many)) > 1.5 * row.mean_macro_value


# ---------------------------------------------------------------- ladder


def test_three_step_ladder_credits_add_up_to_its_value() -> None:
    # view -> cart with q1 = 1/3, cart -> checkout with q2 = 1/2, checkout -> buy 60% of 100
    values, reach = [10.0, 30.0, 60.0], [1000.0, 1000 / 3, 1000 / 6]
    total = 1000 * 10.0  # everyone entered at the view
    weights = ladder_weights(values, entry_value=10.0)
    assert weights == pytest.approx([0.0, math.log(3) / math.log(6), math.log(2) / math.log(6)])
    credits = ladder_credits(weights, reach, total)
    assert credits[1] == pytest.approx(0.6131 * 30, rel=1e-3)  # share x V_k on a pure ladder
    assert sum(r * c for r, c in zip(reach, credits, strict=True)) == pytest.approx(total)
    # plain increments count the purchase 3 - q1 - q2 times
    increments = [10.0, 20.0, 30.0]
    assert sum(r * c for r, c in zip(reach, increments, strict=True)) == pytest.approx(
        (3 - 1 / 3 - 1 / 2) * total)


def test_ladder_credits_move_shares_of_unreached_steps() -> None:
    assert ladder_credits([0.0, 0.5, 0.5], [100.0, 40.0, 0.0], 200.0) == pytest.approx(
        [0.0, 5.0, 0.0])
    # no weight anywhere (every step as good as entering): the deepest reached step takes all
    assert ladder_credits([0.0, 0.0, 0.0], [100.0, 40.0, 0.0], 200.0) == pytest.approx(
        [0.0, 5.0, 0.0])
    assert ladder_weights([5.0, 4.0, 8.0], entry_value=5.0) == pytest.approx([0.0, 0.0, 1.0])


# ---------------------------------------------------------------- end to end


def test_censored_cohorts_count_as_partial_exposure() -> None:
    journeys = _journeys(20_000, rate=0.2, lag_days=30.0)
    row = _row(estimate_values(journeys, AS_OF, 90.0), "signup")
    textbook = textbook_values(journeys, AS_OF, 90.0)["signup", "c0"]
    matured = textbook_values(journeys, AS_OF, 90.0, matured_only=True)["signup", "c0"]
    assert row.estimate == pytest.approx(20.0, rel=0.04)
    assert textbook == pytest.approx(20.0 * (1 - 30 / 180), rel=0.05)  # the last 30 days miss
    assert matured == pytest.approx(20.0, rel=0.08)
    assert row.interval[0] < 20.0 < row.interval[1]
    assert row.customer_share == pytest.approx(0.2, rel=0.04)
    assert row.mean_macro_value == pytest.approx(100.0, rel=1e-3)
    assert row.exposure == pytest.approx(20_000 * (1 - 30 / 180), rel=0.02)
    assert row.conversions == pytest.approx(20_000 * 0.2 * (1 - 30 / 180), rel=0.05)
    assert row.realisation_ratio == pytest.approx(1.0, abs=0.05)
    assert row.as_of == AS_OF and row.horizon_days == 90.0


def test_mean_order_value_is_not_inflated_on_a_handful_of_orders() -> None:
    """Lognormal orders (log SD 1), about three per world: the mean of exp(mu + sigma^2 / 2)
    estimates stays near the truth, where a posterior mean under the flat prior on the
    client's log mean ran about 1.5 x high."""
    truth = math.exp(math.log(80.0) + 0.5)
    settings = ValuationSettings(size_scaling=False, draws=20)
    means: list[float] = []
    for seed in range(300):
        orders = np.exp(math.log(80.0) + np.random.default_rng(seed).standard_normal(30))
        journeys = _journeys(30, rate=0.1, lag_days=0.0, seed=seed, segments=3, sizes=orders)
        rows = [r for r in estimate_values(journeys, AS_OF, 90.0, settings)
                if r.segment != ALL_SEGMENTS and r.conversions > 0]
        means.extend(r.mean_macro_value for r in rows)
    assert np.mean(means) / truth == pytest.approx(1.0, abs=0.1)


def test_events_after_as_of_are_not_seen() -> None:
    journeys = _journeys(5000, rate=0.2, lag_days=5.0, seed=4)
    earlier = AS_OF - dt.timedelta(days=60)
    cut = journeys.micro_time <= earlier.timestamp()
    bought = journeys.macro_time <= earlier.timestamp()
    truncated = Journeys(
        conversions=journeys.conversions, segments=journeys.segments,
        micro_person=journeys.micro_person[cut], micro_conversion=journeys.micro_conversion[cut],
        micro_segment=journeys.micro_segment[cut], micro_time=journeys.micro_time[cut],
        micro_size=journeys.micro_size[cut], macro_person=journeys.macro_person[bought],
        macro_time=journeys.macro_time[bought], macro_value=journeys.macro_value[bought])
    replay = _row(estimate_values(journeys, earlier), "signup")
    assert replay == _row(estimate_values(truncated, earlier), "signup")
    assert replay.volume == int(cut.sum())


def test_guard_rails_withhold_thin_segments_and_say_why() -> None:
    journeys = _journeys(3000, rate=0.1, lag_days=2.0, segments=150, seed=5)
    rows = estimate_values(journeys, AS_OF, 90.0, ValuationSettings(min_events=30))
    thin = _row(rows, "signup", "c7")
    assert thin.volume == 20
    assert thin.value is None and thin.estimate > 0
    assert thin.withheld == "only 20 events (needs 30)"
    whole = _row(rows, "signup")
    assert thin.recommendation == whole.recommendation  # decided over all segments
    if whole.upload_value is not None:  # a thin segment uploads the figure over all of them
        assert thin.upload_value == whole.upload_value
        assert thin.upload_note.startswith("the all-segments figure")
    assert whole.value == whole.estimate and whole.volume == 3000
    wide = estimate_values(journeys, AS_OF, 90.0, ValuationSettings(min_events=1,
                                                                    max_relative_width=0.01))
    assert "interval too wide" in _row(wide, "signup", "c7").withheld
    short = _row(estimate_values(journeys, AS_OF, 200.0), "signup")
    assert short.history_days == pytest.approx(180.0, abs=0.5)
    assert short.withheld == (f"{short.history_days:.1f} days of history, shorter than the "
                              "200-day horizon")
    assert short.value is None and short.upload_value is None


def _hand_made(people: list[tuple[int, str, float, float | None]],
               groups: tuple[str, ...] = ("gclid", "email")) -> Journeys:
    """People as (group, micro conversion, days before AS_OF, purchase days before AS_OF or
    None); "buy" as the micro conversion: a person whose only event is a purchase."""
    t = AS_OF.timestamp()
    micro = [(p, c, d) for p, (_, c, d, _b) in enumerate(people) if c != "buy"]
    conversions = ("signup", "browse")
    return Journeys(
        conversions=conversions, segments=("all",),
        micro_person=np.array([p for p, _, _ in micro]),
        micro_conversion=np.array([conversions.index(c) for _, c, _ in micro]),
        micro_segment=np.zeros(len(micro), np.int64),
        micro_time=np.array([t - d * DAY for _, _, d in micro]),
        micro_size=np.full(len(micro), np.nan),
        macro_person=np.array([p for p, person in enumerate(people) if person[3] is not None]),
        macro_time=np.array([t - person[3] * DAY for person in people if person[3] is not None]),
        macro_value=np.full(sum(person[3] is not None for person in people), 50.0),
        person_group=np.array([g for g, *_ in people]), groups=groups)


def test_the_comparison_by_hand_strata_burn_in_and_people_first_seen_at_their_purchase() -> None:
    gclid, email = 0, 1
    people = [
        (gclid, "signup", 100, 95),  # first of gclid's window: within the burn-in, left out
        *[(gclid, "signup", 60, 55)] * 2, *[(gclid, "signup", 60, None)] * 2,  # doers 2 of 4
        (gclid, "browse", 60, 55), *[(gclid, "browse", 60, None)] * 4,  # others 1 of 5
        (gclid, "buy", 0, 50),  # first seen at the purchase: left out
        (email, "browse", 100, None),  # first of email's window: left out
        (email, "signup", 60, 55), (email, "signup", 60, None),  # doers 1 of 2
        *[(email, "browse", 60, 55)] * 2, *[(email, "browse", 60, None)] * 2,  # others 2 of 4
    ]
    settings = ValuationSettings(min_events=1, min_compared=1, min_compared_conversions=1,
                                 max_relative_width=100.0)
    row = _row(estimate_values(_hand_made(people), AS_OF, 30.0, settings), "signup")
    assert row.burn_in_days == pytest.approx(5.0)  # every purchase came 5 days after
    assert row.history_days == pytest.approx(100.0)
    assert (row.compared_doers, row.compared_doers_converted) == (6, 3)
    assert (row.compared_others, row.compared_others_converted) == (9, 3)
    # Mantel-Haenszel by hand: (2 x 5 / 9 + 1 x 4 / 6) / (1 x 4 / 9 + 2 x 2 / 6) = 1.6; pooled
    # into one group the same people would read (3 / 6) / (3 / 9) = 1.5
    assert row.lift == pytest.approx(1.6)
    assert row.lift_interval is not None and row.lift_interval[0] < 1 < row.lift_interval[1]
    assert row.coverage == pytest.approx(3 / 6)  # buyers seen from their start: 3 signed up
    assert row.recommendation == Recommendation.ANALYTICS_ONLY
    assert "not clearly above 1" in row.reason and row.upload_value is None


def test_too_few_people_to_compare_is_not_enough_evidence_never_drop() -> None:
    people = [(0, "browse", 100, None), *[(0, "signup", 60, None)] * 40,
              *[(0, "browse", 60, 55)] * 10]
    rows = estimate_values(_hand_made(people, ("email",)), AS_OF, 30.0,
                           ValuationSettings(min_events=1))
    row = _row(rows, "signup")
    assert row.lift is not None and row.lift_interval is not None
    assert row.lift_interval[1] < 1.25  # on its own it would read "drop"
    assert row.recommendation == Recommendation.NOT_ENOUGH_EVIDENCE
    assert "10 did not (needs 20 each)" in row.reason
    assert row.upload_value is None
    assert row.upload_note == "not uploaded: the advice is no evidence"


def test_a_strong_micro_conversion_is_tracked_and_a_useless_one_dropped() -> None:
    rng = np.random.default_rng(8)
    people, t = 6000, AS_OF.timestamp()
    start = t - rng.uniform(60, 180, people) * DAY
    signup = rng.random(people) < 0.5
    noise = rng.random(people) < 0.5  # unrelated to buying
    buys = rng.random(people) < np.where(signup, 0.3, 0.03)
    persons = np.concatenate([np.flatnonzero(signup), np.flatnonzero(noise)])
    journeys = Journeys(
        conversions=("signup", "scroll"), segments=("all",), micro_person=persons,
        micro_conversion=np.repeat([0, 1], [signup.sum(), noise.sum()]),
        micro_segment=np.zeros(len(persons), np.int64), micro_time=start[persons],
        micro_size=np.full(len(persons), np.nan), macro_person=np.flatnonzero(buys),
        macro_time=start[buys] + 3 * DAY, macro_value=np.full(buys.sum(), 80.0))
    rows = estimate_values(journeys, AS_OF, 30.0)
    strong, useless = _row(rows, "signup"), _row(rows, "scroll")
    # outside a ladder it predicts, but its value would count the ladder's sales again
    assert strong.recommendation == Recommendation.ANALYTICS_ONLY
    assert "give it a ladder_position" in strong.reason and strong.upload_value is None
    on_ladder = Journeys(**{**journeys.__dict__, "ladder": ("signup",)})
    strong = _row(estimate_values(on_ladder, AS_OF, 30.0), "signup")
    assert strong.recommendation == Recommendation.TRACK_AND_UPLOAD
    assert strong.upload_value == pytest.approx(strong.estimate)  # a one-step ladder
    assert strong.lift is not None and strong.lift > 5
    assert useless.recommendation == Recommendation.DROP_NOISE
    assert "does not predict" in useless.reason


def test_a_ladder_step_most_buyers_pass_through_is_not_dropped_without_saying_why() -> None:
    rng = np.random.default_rng(12)
    t = AS_OF.timestamp()
    did = np.repeat([True, False], [2000, 1000])  # 10% of doers buy, 15% of the others
    buys = rng.random(3000) < np.where(did, 0.10, 0.15)
    start = t - rng.uniform(40, 200, 3000) * DAY
    persons = np.arange(3000)
    journeys = Journeys(
        conversions=("view", "browse"), segments=("all",), micro_person=persons,
        micro_conversion=np.where(did, 0, 1), micro_segment=np.zeros(3000, np.int64),
        micro_time=start, micro_size=np.full(3000, np.nan), macro_person=persons[buys],
        macro_time=start[buys] + 2 * DAY, macro_value=np.full(buys.sum(), 80.0),
        ladder=("view",))
    row = _row(estimate_values(journeys, AS_OF, 30.0), "view")
    assert row.lift_interval is not None and row.lift_interval[1] < 1.25
    assert row.coverage is not None and row.coverage > 0.5
    assert row.recommendation == Recommendation.ANALYTICS_ONLY
    assert "of buyers did it first" in row.reason and "not dropped" in row.reason
    assert row.upload_value is None


def _two_populations(seed: int, predictive: bool) -> Journeys:
    """Click-id people (a third) buy at 20% and most sign up; email people buy at 2% and few
    sign up. With ``predictive``, signing up doubles the odds to buy within each population;
    without, signing up says nothing within either (pooled together, it would seem to)."""
    rng = np.random.default_rng(seed)
    people, t = 9000, AS_OF.timestamp()
    group = (rng.random(people) < 2 / 3).astype(np.int64)  # 0: gclid, 1: email
    start = t - rng.uniform(0, 240, people) * DAY
    signup = rng.random(people) < np.where(group == 0, 0.8, 0.2)
    base = np.where(group == 0, 0.2, 0.02)
    buys = rng.random(people) < np.where(predictive & signup, 2 * base, base)
    persons = np.concatenate([np.flatnonzero(signup), np.flatnonzero(~signup)])
    bought = start + rng.exponential(3.0, people) * DAY
    seen = buys & (bought <= t)
    return Journeys(
        conversions=("signup", "browse"), segments=("all",), micro_person=persons,
        micro_conversion=np.repeat([0, 1], [signup.sum(), (~signup).sum()]),
        micro_segment=np.zeros(people, np.int64), micro_time=start[persons],
        micro_size=np.full(people, np.nan), macro_person=np.flatnonzero(seen),
        macro_time=bought[seen], macro_value=np.full(seen.sum(), 80.0),
        person_group=group, groups=("gclid", "email"), ladder=("signup",))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_people_keyed_differently_are_never_pooled_into_one_comparison(seed: int) -> None:
    useless = _row(estimate_values(_two_populations(seed, predictive=False), AS_OF), "signup")
    assert useless.lift is not None and 0.75 < useless.lift < 1.3
    assert useless.recommendation != Recommendation.TRACK_AND_UPLOAD
    assert useless.upload_value is None
    pooled = _two_populations(seed, predictive=False)
    pooled = Journeys(**{**pooled.__dict__, "person_group": np.zeros(0, np.int64),
                         "groups": ("",)})
    assert _row(estimate_values(pooled, AS_OF), "signup").lift > 2  # what pooling would say
    useful = _row(estimate_values(_two_populations(seed, predictive=True), AS_OF), "signup")
    assert useful.recommendation == Recommendation.TRACK_AND_UPLOAD
    assert useful.lift_interval is not None and useful.lift_interval[0] > 1


def test_a_step_done_more_in_the_campaigns_that_sell_more_is_no_lift() -> None:
    """Campaign B's people view the promotion more and buy more, for reasons of their own;
    within each campaign viewing it says nothing."""
    rng = np.random.default_rng(13)
    people, t = 12_000, AS_OF.timestamp()
    campaign = (rng.random(people) < 0.5).astype(np.int64)
    start = t - rng.uniform(0, 240, people) * DAY
    promo = rng.random(people) < np.where(campaign == 1, 0.6, 0.1)
    buys = rng.random(people) < np.where(campaign == 1, 0.2, 0.04)
    persons = np.concatenate([np.flatnonzero(promo), np.flatnonzero(~promo)])
    bought = start + rng.exponential(3.0, people) * DAY
    seen = buys & (bought <= t)
    journeys = Journeys(
        conversions=("view_promotion", "browse"), segments=("A", "B"), micro_person=persons,
        micro_conversion=np.repeat([0, 1], [promo.sum(), (~promo).sum()]),
        micro_segment=campaign[persons], micro_time=start[persons],
        micro_size=np.full(people, np.nan), macro_person=np.flatnonzero(seen),
        macro_time=bought[seen], macro_value=np.full(seen.sum(), 80.0))
    row = _row(estimate_values(journeys, AS_OF), "view_promotion")
    assert row.lift is not None and 0.8 < row.lift < 1.2  # pooled over campaigns: 1.96
    assert row.recommendation != Recommendation.TRACK_AND_UPLOAD


def test_unrelated_buyers_in_the_store_change_no_comparison() -> None:
    journeys = _two_populations(4, predictive=True)
    t = AS_OF.timestamp()
    rng = np.random.default_rng(4)
    extra = journeys.persons + np.arange(200)  # CRM rows: people seen only at their purchase
    crowded = Journeys(**{
        **journeys.__dict__,
        "macro_person": np.concatenate([journeys.macro_person, extra]),
        "macro_time": np.concatenate([journeys.macro_time,
                                      t - rng.uniform(0, 240, 200) * DAY]),
        "macro_value": np.concatenate([journeys.macro_value, np.full(200, 500.0)]),
        "person_group": np.concatenate([journeys.groups_of_persons(), np.ones(200, np.int64)])})
    for alone, crowd in zip(estimate_values(journeys, AS_OF), estimate_values(crowded, AS_OF),
                            strict=True):
        assert (crowd.lift, crowd.lift_interval, crowd.coverage, crowd.recommendation) == (
            alone.lift, alone.lift_interval, alone.coverage, alone.recommendation)
        assert crowd.compared_others == alone.compared_others


def _signups(lagged: bool) -> Journeys:
    """1,000 signups, every tenth of whom buys for $500 within 30 days. ``lagged``: signups
    evenly over the last 93.75 days and lags evenly over 1.5 .. 28.5 days, so that 16 of the
    100 purchases are still to come; else all signups 100 days old, all purchases seen."""
    t = AS_OF.timestamp()
    days = np.linspace(93.75, 0.0, 1000) if lagged else np.full(1000, 100.0)
    start = t - days * DAY
    buyers = np.arange(0, 1000, 10)
    lag = (np.arange(100) * 7 % 10) * 3.0 + 1.5  # 1.5 .. 28.5 days, mixed over time
    bought = start[buyers] + lag * DAY
    seen = bought <= t
    return Journeys(
        conversions=("signup",), segments=("all",), micro_person=np.arange(1000),
        micro_conversion=np.zeros(1000, np.int64), micro_segment=np.zeros(1000, np.int64),
        micro_time=start, micro_size=np.full(1000, np.nan), macro_person=buyers[seen],
        macro_time=bought[seen], macro_value=np.full(seen.sum(), 500.0))


def test_the_seed_example_a_signup_is_worth_fifty_dollars_lag_or_not() -> None:
    matured = _row(estimate_values(_signups(lagged=False), AS_OF, 30.0), "signup")
    assert matured.estimate == pytest.approx(50.0, rel=0.02)
    assert matured.interval[0] < 50.0 < matured.interval[1]
    lagged_journeys = _signups(lagged=True)
    assert len(lagged_journeys.macro_person) == 84  # 16 purchases still to come
    textbook = textbook_values(lagged_journeys, AS_OF, 30.0)["signup", "all"]
    assert textbook == pytest.approx(42.0)
    lagged = _row(estimate_values(lagged_journeys, AS_OF, 30.0), "signup")
    assert lagged.estimate == pytest.approx(50.0, rel=0.05)
    assert lagged.interval[0] < 50.0 < lagged.interval[1]


def test_size_scaling_is_kept_only_when_it_predicts_better() -> None:
    rng = np.random.default_rng(9)
    sizes = np.exp(rng.normal(3.0, 0.8, 20_000))
    scaled = _journeys(20_000, rate=0.3, lag_days=2.0, sizes=sizes, seed=9)
    row = _row(estimate_values(scaled, AS_OF), "signup")
    assert row.scaled_by_size and "scaled by event size" in row.size_note
    assert row.value_per_size_unit == pytest.approx(row.estimate / sizes.mean(), rel=1e-6)
    flat_sizes = _journeys(20_000, rate=0.3, lag_days=2.0, seed=9)
    unrelated = Journeys(**{**flat_sizes.__dict__, "micro_size": sizes})
    row = _row(estimate_values(unrelated, AS_OF), "signup")
    assert not row.scaled_by_size and row.value_per_size_unit is None


def test_ladder_credits_over_everyone_add_up_to_the_entry_value() -> None:
    rng = np.random.default_rng(10)
    people, t = 30_000, AS_OF.timestamp()
    start = t - rng.uniform(0, 180, people) * DAY
    segment = rng.integers(0, 5, people)
    cart = rng.random(people) < 0.3
    checkout = cart & (rng.random(people) < 0.5)
    buys = checkout & (rng.random(people) < 0.4)
    bought = start + rng.exponential(5.0, people) * DAY
    seen = buys & (bought <= t)
    step, person = np.nonzero(np.vstack([np.ones(people, bool), cart, checkout]))
    journeys = Journeys(
        conversions=("view", "cart", "checkout"), segments=tuple("abcde"),
        micro_person=person, micro_conversion=step, micro_segment=segment[person],
        micro_time=start[person], micro_size=np.full(len(person), np.nan),
        macro_person=np.flatnonzero(seen), macro_time=bought[seen],
        macro_value=np.full(seen.sum(), 100.0), ladder=("view", "cart", "checkout"))
    values = estimate_values(journeys, AS_OF)
    credits = estimate_ladder(journeys, AS_OF, values=values)
    per_segment = [c for c in credits if c.segment != ALL_SEGMENTS]
    view = {v.segment: v for v in values if v.conversion == "view"}
    entry_total = sum(view[s].volume * view[s].estimate for s in "abcde")
    assert sum(c.reach * c.credit_estimate for c in per_segment) == pytest.approx(entry_total)
    assert entry_total == pytest.approx(people * 0.3 * 0.5 * 0.4 * 100, rel=0.05)
    assert all(c.credit is not None and c.credit >= 0 for c in per_segment)
    first = [c for c in per_segment if c.position == 1]
    assert all(c.share == 0.0 for c in first)  # everyone viewed: viewing tells nothing
    increments = sum(c.reach * c.increment for c in per_segment)
    assert increments / entry_total == pytest.approx(3 - 0.3 - 0.5, rel=0.05)
    before = AS_OF - dt.timedelta(days=400)  # nobody on the ladder yet
    assert estimate_ladder(journeys, before) == []


def test_journeys_from_events_codes_people_conversions_and_segments() -> None:
    t0 = dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)

    def event(person: str, conversion: str | None, hours: float, value: float = 0.0,
              campaign: str = "") -> JourneyEvent:
        return JourneyEvent(person_key=person, conversion=conversion,
                            platform_conversion=conversion or "page_scroll",
                            time=t0 + dt.timedelta(hours=hours), value=value,
                            source_platform=Platform.GA4, source_event_id=f"{person}{hours}",
                            campaign_id=campaign)

    events = [event("p1", "view_item", 0, campaign="111"),
              event("p1", "add_to_cart", 1, 35.0, campaign="111"),
              event("p2", "newsletter_signup", 2, campaign="222"),
              event("p1", "purchase", 30, 70.0), event("p3", None, 3)]
    journeys = journeys_from_events(events, {"purchase"}, ladder=("view_item", "add_to_cart"))
    assert journeys.conversions == ("view_item", "add_to_cart", "newsletter_signup")
    assert journeys.segments == ("111", "222")
    assert journeys.micro_person.tolist() == [0, 0, 1]
    assert journeys.micro_conversion.tolist() == [0, 1, 2]
    assert np.isnan(journeys.micro_size[0]) and journeys.micro_size[1] == 35.0
    assert journeys.macro_person.tolist() == [0] and journeys.macro_value.tolist() == [70.0]
    assert journeys.macro_time[0] == (t0 + dt.timedelta(hours=30)).timestamp()
    assert journeys.ladder == ("view_item", "add_to_cart")
    by_source = journeys_from_events(events, {"purchase"}, segment_by="source")
    assert by_source.segments == ("ga4",)
    assert journeys_from_events(events, {"purchase"}, segment_by="client").segments == ("client",)


def test_journeys_reject_bad_codes() -> None:
    with pytest.raises(ValueError, match="micro_segment"):
        Journeys(conversions=("a",), segments=("s",), micro_person=np.array([0]),
                 micro_conversion=np.array([0]), micro_segment=np.array([3]),
                 micro_time=np.array([0.0]), micro_size=np.array([np.nan]),
                 macro_person=np.array([], np.int64), macro_time=np.array([]),
                 macro_value=np.array([]))


# ---------------------------------------------------------------- the benchmark, fast form


def test_benchmark_quick_form_meets_the_targets_loosely() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_values.py"), "--quick",
                           "--json"], capture_output=True, text=True, check=True, timeout=300)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.95 <= figures["calibration_min"] <= figures["calibration_max"] <= 1.05
    assert figures["nrmse_ratio_vs_textbook_max"] <= 0.90
    assert 0.80 <= figures["coverage90_min"] <= figures["coverage90_max"] <= 0.97
    assert figures["coverage90_plug_in_min"] < figures["coverage90_min"]
    assert 0.97 <= figures["path_sum_ratio_150_min"] <= figures["path_sum_ratio_150_max"] <= 1.03
    assert 0.90 <= figures["path_sum_ratio_min"] <= figures["path_sum_ratio_max"] <= 1.10  # +-2 SE
    assert min(figures["path_sum_ratio_increments_by_lag"].values()) > 1.5
    assert len(figures["cells"]) == 3 and figures["replicates"] == 12
