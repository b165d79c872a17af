"""The valuation benchmark's own statistics: the control variate behind its path-sum figure,
how many worlds each cell runs, and the upload worlds (what the pull sees of them, how their
realisation is counted, and the quick form's figures)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from convsync.valuation import ALL_SEGMENTS, Journeys, MicroValue, Recommendation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_values",
                                                  ROOT / "scripts" / "bench_values.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_values"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_controlled_mean_removes_what_the_control_explains(bench: ModuleType) -> None:
    control = np.random.default_rng(0).lognormal(0.0, 0.5, 200)
    control = control / control.mean() * 1.05  # this sample's luck: 5% above its mean of 1
    x = 1.0 + 2.0 * (control - 1.0)
    plain, controlled = bench.plain_mean(x), bench.controlled_mean(x, control)
    assert plain.value == pytest.approx(1.10)  # twice the control's luck
    assert controlled.value == pytest.approx(1.0) and controlled.se == pytest.approx(0.0)
    assert plain.se > 0.05
    noise = np.random.default_rng(1).normal(0.0, 0.1, 200)
    assert bench.controlled_mean(x + noise, control).se == pytest.approx(0.1 / np.sqrt(200),
                                                                          rel=0.15)


@pytest.mark.parametrize("lag", ["none", "weibull_3d", "lognormal_20d"])
def test_the_control_variate_has_mean_one(bench: ModuleType, lag: str) -> None:
    cell = bench.Cell(lag, 100, 0.2)
    controls = [world.seen_value / world.expected_seen_value
                for world in (bench.simulate(cell, (7, r)) for r in range(200))]
    assert np.mean(controls) == pytest.approx(1.0, abs=0.012)  # about 3 standard errors


def test_cells_with_few_conversions_run_more_worlds(bench: ModuleType) -> None:
    assert bench.Cell("none", 10, 0.005).nominal_conversions == pytest.approx(2.0)
    assert bench.Cell("none", 10, 0.005).worlds(100) == 400  # capped at 4 x
    assert bench.Cell("lognormal_20d", 100, 0.005).worlds(100) == 200  # 30 / 18.7, rounded
    assert bench.Cell("weibull_3d", 10, 0.2).worlds(100) == 100
    assert bench.Cell("none", 1000, 0.2).worlds(12) == 12


# ---------------------------------------------------------------- upload worlds


def test_an_upload_world_shows_only_the_window(bench: ModuleType) -> None:
    journeys = bench.simulate_uploads("lognormal_20d", (bench.UPLOAD_SEED_TAG, 2, 0))
    start = bench.ORIGIN.timestamp()
    end = bench.UPLOAD_AS_OF.timestamp()
    assert start <= journeys.micro_time.min() and journeys.micro_time.max() <= end
    assert start <= journeys.macro_time.min() and journeys.macro_time.max() <= end
    assert journeys.groups == ("gclid", "email") and journeys.ladder == bench.LADDER
    buyers = np.unique(journeys.macro_person)
    unseen = buyers[~np.isin(buyers, journeys.micro_person)]
    # the CRM buyers, and buyers whose journey began before the window (left truncation)
    assert len(unseen) > bench.CRM_BUYERS
    first = np.full(journeys.persons, np.inf)
    np.minimum.at(first, journeys.micro_person, journeys.micro_time)
    at_first = journeys.micro_time == first[journeys.micro_person]
    checkout = journeys.conversions.index("begin_checkout")
    assert (journeys.micro_conversion[at_first] == checkout).sum() > 0  # viewed before it
    seen = len(np.unique(journeys.micro_person))
    assert (journeys.micro_conversion == 0).sum() > 0.8 * seen  # most people view


def _row(conversion: str, segment: str, upload: float | None,
         recommendation: str = "track_and_upload") -> MicroValue:
    """A row with only what an upload reads; the other fields are None (never read)."""
    unread: dict[str, Any] = {f.name: None for f in dataclasses.fields(MicroValue)}
    return MicroValue(**{**unread, "conversion": conversion, "segment": segment,
                         "recommendation": Recommendation(recommendation),
                         "upload_value": upload})


def test_realisation_counts_the_matured_uploaders(bench: ModuleType) -> None:
    day = bench.ORIGIN.timestamp() / bench.DAY
    micro = [  # person, conversion (0 view, 1 cart, 2 promo), segment (0 a, 1 b), day
        (0, 0, 0, 10), (0, 0, 0, 12), (0, 1, 0, 11),  # uploads view a + cart a once each
        (1, 2, 1, 5), (1, 0, 1, 20),  # promo is not uploaded: the clock starts at the view
        (2, 0, 1, 200),  # first upload 40 days before as_of: not matured
        (4, 1, 1, 100),  # cart b uploads nothing
        (5, 0, 0, 8)]  # bought before the view: nothing realised
    macro = [(0, 50, 100.0), (0, 60, 30.0), (1, 115, 40.0), (2, 210, 1000.0), (3, 30, 500.0),
             (4, 101, 20.0), (5, 5, 70.0)]
    person, conversion, segment, days = (np.array(c) for c in zip(*micro, strict=True))
    journeys = Journeys(
        conversions=("view", "cart", "promo"), segments=("a", "b"), micro_person=person,
        micro_conversion=conversion, micro_segment=segment,
        micro_time=(day + days) * bench.DAY, micro_size=np.full(len(person), np.nan),
        macro_person=np.array([m[0] for m in macro]),
        macro_time=(day + np.array([m[1] for m in macro])) * bench.DAY,
        macro_value=np.array([m[2] for m in macro]))
    rows = [_row("view", "a", 2.0), _row("view", "b", 3.0), _row("view", ALL_SEGMENTS, 2.5),
            _row("cart", "a", 5.0), _row("cart", "b", None), _row("cart", ALL_SEGMENTS, 5.0),
            _row("promo", "a", None, "drop_noise"), _row("promo", ALL_SEGMENTS, None,
                                                         "drop_noise")]
    as_of = bench.ORIGIN + dt.timedelta(days=240)
    done = bench.realisation(journeys, rows, as_of, 90.0)
    # person 0: 100 for 2 + 5; 1: 40 comes 95 days after the view, for 3; 4: 20 for 0; 5: 0 for 2
    assert (done.realised, done.uploaded, done.people) == (120.0, 12.0, 4)
    carts = bench.realisation(journeys, rows, as_of, 90.0, uploading=["cart"])
    assert (carts.realised, carts.uploaded, carts.people) == (120.0, 5.0, 2)


def test_quick_form_scores_the_upload_worlds() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_values.py"), "--quick",
                           "--json"], capture_output=True, text=True, check=True, timeout=300)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(figures["upload_worlds"]) == 3 and figures["upload_seeds"] == 1
    assert 0.90 <= figures["realisation_min"] <= figures["realisation_max"] <= 1.10
    assert figures["recommendation_agreement"] >= 0.8
    assert set(figures["realisation_min_by_lag"]) == {"none", "weibull_3d", "lognormal_20d"}
