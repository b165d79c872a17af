"""Benchmark of convsync.valuation on synthetic worlds whose true values are known.

    python scripts/bench_values.py                 # the full grid, 100 - 400 worlds a cell
    python scripts/bench_values.py --quick         # 3 cells x 12 worlds, 3 upload worlds (tests)
    python scripts/bench_values.py --json          # same table, then one JSON object last
    python scripts/bench_values.py --jobs 2 --replicates 200

A world: 40 segments (campaigns) whose sizes vary (lognormal, sd 0.5 on the log scale) around
the cell's size; people enter a three-step ladder (view -> cart -> checkout) at a uniform time
over 180 days and climb with stage rates drawn per segment (logit-normal around the cell's
base rate ** 1/3, sd 0.4 per stage), checkout -> purchase the third stage; the purchase comes
after a lag (none, Weibull median 3 days shape 0.7, or lognormal median 20 days sigma 1)
with a lognormal value (segment log-means normal, sd 0.2, around log 80; sd 1 within). The
snapshot is taken at day 180, so the last cohorts are censored; the estimator sees only what
happened by then. Truth per step and segment: P(purchase within H=90 days) x mean order value.

Scores, per cell and ladder step (table: the worst step; JSON: every figure):
nRMSE (volume-weighted, normalized by the volume-weighted mean true value; root mean square
over replicates) of the estimator, the textbook rule (converted share x average order) and
the textbook rule on matured cohorts; calibration (sum predicted / sum true over segments,
weighted by volume; mean and 5-95% band over replicates); coverage of the 90% intervals (and
of plug-in intervals); the ladder's path-sum ratio (credits over everyone who entered / true
expected macro value) for the lift-share rule and for plain increments.

The path-sum figure is, per lag, the mean ratio of the lag's worlds, each cell weighing the
same. Cells expecting few conversions run more worlds (they are cheap and the noisiest), and
each cell's mean uses a control variate: the world's seen within-horizon purchase value over
its expectation, which has mean 1 and carries most of a small world's luck. The plain mean
is reported beside it. The estimator never sees the control; only the scoring does.

Upload worlds (a second family, 4 a lag; --quick: 1): what a sink would send, scored against
what the people then bought. Eight campaigns drawn as the sandbox draws its campaigns; people
arrive over 300 days, 60 of them before the pulled 240-day window, and only events inside it
are seen (a journey begun before it shows from its first step inside, or only at the
purchase); a ladder view (92%) -> cart -> checkout (the sandbox's mixed lag) -> purchase (the
lag above); two micro conversions that predict nothing (newsletter_signup, view_promotion:
done at random at rates that vary by campaign); people keyed by click id (half the arrivals)
or by email (of the rest, those who checked out or signed up, and 30% at random), and 200 CRM
buyers seen only at their purchase. Scores: recommendation agreement (a ladder step must be
track_and_upload, an independent one must not) over (world, step) pairs; realisation: over
the people whose first uploaded event is at least H before as_of, the value of their first
purchase within H after it over the upload values of their events (see ``realisation``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from convsync.valuation import (
    ALL_SEGMENTS,
    Journeys,
    MicroValue,
    Recommendation,
    ValuationSettings,
    estimate_ladder,
    estimate_values,
    textbook_values,
)

FloatArray = npt.NDArray[np.float64]

SEGMENTS = 40
DAYS = 180.0
HORIZON = 90.0
DAY = 86_400.0
ORIGIN = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
AS_OF = ORIGIN + dt.timedelta(days=DAYS)
LADDER = ("view_item", "add_to_cart", "begin_checkout")
SIZE_SD, STAGE_SD, VALUE_SD, SEGMENT_VALUE_SD = 0.5, 0.4, 1.0, 0.2
VALUE_MEDIAN = 80.0
LAGS = ("none", "weibull_3d", "lognormal_20d")
SIZES = (10, 100, 1000)
RATES = (0.005, 0.02, 0.2)
QUICK = (("lognormal_20d", 1000, 0.02), ("weibull_3d", 100, 0.2), ("lognormal_20d", 100, 0.02))
CALIBRATION_MIN_CONVERSIONS = 150.0
COVERAGE_MIN_CONVERSIONS = 30.0
MORE_WORLDS_BELOW, MORE_WORLDS_MAX = 30.0, 4
"""A cell expecting E < ``MORE_WORLDS_BELOW`` conversions a world runs ``MORE_WORLDS_BELOW /
E`` times the base number of worlds (rounded, at most ``MORE_WORLDS_MAX`` times): its worlds
are cheap and its path-sum ratios the noisiest."""
WEIBULL_SHAPE, LOGNORMAL_SIGMA = 0.7, 1.0
METHODS = ("estimator", "textbook", "matured")


@dataclass(frozen=True)
class Cell:
    lag: str
    size: int
    rate: float

    @property
    def label(self) -> str:
        return f"{self.lag}/{self.size}/{self.rate:g}"

    @property
    def nominal_conversions(self) -> float:
        """Purchases within the horizon a world expects, at the cell's base rate."""
        return SEGMENTS * self.size * self.rate * float(share_within(self.lag, HORIZON))

    def worlds(self, replicates: int) -> int:
        """How many worlds this cell runs when the grid's base is ``replicates``."""
        factor = round(MORE_WORLDS_BELOW / self.nominal_conversions)
        return replicates * min(max(factor, 1), MORE_WORLDS_MAX)


def draw_lags(lag: str, rng: np.random.Generator, count: int) -> FloatArray:
    """Days from the checkout to the purchase."""
    if lag == "none":
        return np.zeros(count)
    if lag == "weibull_3d":
        scale = 3.0 / math.log(2.0) ** (1.0 / WEIBULL_SHAPE)
        return scale * rng.weibull(WEIBULL_SHAPE, count)
    return np.asarray(np.exp(math.log(20.0) + LOGNORMAL_SIGMA * rng.standard_normal(count)))


def share_within(lag: str, days: FloatArray | float) -> FloatArray:
    """P(lag <= days) of the lag distribution."""
    days = np.asarray(days, dtype=np.float64)
    if lag == "none":
        return np.ones_like(days)
    if lag == "weibull_3d":
        scale = 3.0 / math.log(2.0) ** (1.0 / WEIBULL_SHAPE)
        return np.asarray(1.0 - np.exp(-((days / scale) ** WEIBULL_SHAPE)))
    log_days = np.log(np.maximum(days, 1e-300))
    return np.asarray(stats.norm.cdf((log_days - math.log(20.0)) / LOGNORMAL_SIGMA))


@dataclass(frozen=True, eq=False)
class World:
    journeys: Journeys
    truth: FloatArray  # (steps, segments): true value of one event of each step per segment
    expected_conversions: float
    seen_value: float  # value of the purchases within H seen by the snapshot
    expected_seen_value: float  # its expectation given the world's segments and entry times


def simulate(cell: Cell, seed: Sequence[int]) -> World:
    rng = np.random.default_rng(list(seed))
    weights = np.exp(SIZE_SD * rng.standard_normal(SEGMENTS))
    sizes = rng.poisson(cell.size * weights / weights.mean())
    stage = special.expit(special.logit(cell.rate ** (1 / 3))
                          + STAGE_SD * rng.standard_normal((3, SEGMENTS)))
    log_mean = math.log(VALUE_MEDIAN) + SEGMENT_VALUE_SD * rng.standard_normal(SEGMENTS)
    segment = np.repeat(np.arange(SEGMENTS), sizes)
    people = len(segment)
    start = rng.uniform(0.0, DAYS, people)
    climbs = rng.random((3, people)) < stage[:, segment]
    reach = np.vstack([np.ones(people, bool), climbs[0], climbs[0] & climbs[1]])
    buys = reach[2] & climbs[2]
    bought = start + draw_lags(cell.lag, rng, people)
    value = np.exp(log_mean[segment] + VALUE_SD * rng.standard_normal(people))
    seen = buys & (bought <= DAYS)
    step, person = np.nonzero(reach)
    journeys = Journeys(
        conversions=LADDER, segments=tuple(f"campaign_{s}" for s in range(SEGMENTS)),
        micro_person=person, micro_conversion=step, micro_segment=segment[person],
        micro_time=ORIGIN.timestamp() + start[person] * DAY,
        micro_size=np.full(len(person), np.nan), macro_person=np.flatnonzero(seen),
        macro_time=ORIGIN.timestamp() + bought[seen] * DAY, macro_value=value[seen],
        ladder=LADDER)
    within = float(share_within(cell.lag, HORIZON))
    mean_value = np.exp(log_mean + VALUE_SD**2 / 2)
    rest = np.cumprod(stage[::-1], axis=0)[::-1]  # P(purchase | reached step k)
    truth = rest * within * mean_value
    counted = seen & (bought - start <= HORIZON)
    followed = np.minimum(HORIZON, DAYS - start)
    expected_seen = (rest[0] * mean_value)[segment] * share_within(cell.lag, followed)
    return World(journeys, truth, float(sizes @ (rest[0] * within)),
                 float(value[counted].sum()), float(expected_seen.sum()))


@dataclass(frozen=True)
class StepScore:
    """One world, one ladder step."""

    nrmse: tuple[float, float, float]
    calibration: tuple[float, float, float]
    covered: int
    covered_plug_in: int
    segments: int
    withheld: int


@dataclass(frozen=True)
class WorldScore:
    steps: tuple[StepScore, ...]
    path_sum: float
    path_sum_increments: float
    expected_conversions: float
    control: float
    """Seen value / its expectation: 1 on average, and it moves with the path-sum ratio of
    the world (its luck in purchases and order values), so it is a control variate."""


def score_world(cell: Cell, seed: Sequence[int], settings: ValuationSettings) -> WorldScore:
    world = simulate(cell, seed)
    values = estimate_values(world.journeys, AS_OF, HORIZON, settings)
    plug_in = estimate_values(world.journeys, AS_OF, HORIZON,
                              replace(settings, prior_uncertainty=False))
    textbook = textbook_values(world.journeys, AS_OF, HORIZON)
    matured = textbook_values(world.journeys, AS_OF, HORIZON, matured_only=True)
    rows = _by_key(values)
    plug_rows = _by_key(plug_in)
    steps = tuple(_score_step(world, k, rows, plug_rows, textbook, matured)
                  for k in range(len(LADDER)))
    credits = estimate_ladder(world.journeys, AS_OF, HORIZON, settings, values)
    credited = sum(c.reach * c.credit_estimate for c in credits if c.segment != ALL_SEGMENTS)
    increments = sum(c.reach * c.increment for c in credits if c.segment != ALL_SEGMENTS)
    true_total = _true_total(world, rows)
    return WorldScore(steps, credited / true_total, increments / true_total,
                      world.expected_conversions, world.seen_value / world.expected_seen_value)


def _by_key(values: Sequence[MicroValue]) -> dict[tuple[str, str], MicroValue]:
    return {(v.conversion, v.segment): v for v in values}


def _true_total(world: World, rows: dict[tuple[str, str], MicroValue]) -> float:
    """True expected macro value of everyone who entered the ladder (did its first step)."""
    return sum(rows[LADDER[0], name].volume * world.truth[0, s]
               for s, name in enumerate(world.journeys.segments)
               if (LADDER[0], name) in rows)


def _score_step(world: World, k: int, rows: dict[tuple[str, str], MicroValue],
                plug_rows: dict[tuple[str, str], MicroValue],
                textbook: dict[tuple[str, str], float],
                matured: dict[tuple[str, str], float]) -> StepScore:
    keys = [(LADDER[k], name) for name in world.journeys.segments]
    present = [s for s, key in enumerate(keys) if key in rows]
    truth = world.truth[k, present]
    volume = np.array([rows[keys[s]].volume for s in present], dtype=np.float64)
    estimates = [np.array([rows[keys[s]].estimate for s in present]),
                 np.array([textbook[keys[s]] for s in present]),
                 np.array([matured.get(keys[s], 0.0) for s in present])]
    lo, hi = np.array([rows[keys[s]].interval for s in present]).T
    plo, phi = np.array([plug_rows[keys[s]].interval for s in present]).T
    scale = volume @ truth / volume.sum()
    nrmse = [math.sqrt(volume @ (e - truth) ** 2 / volume.sum()) / scale for e in estimates]
    calibration = [float(volume @ e / (volume @ truth)) for e in estimates]
    return StepScore((nrmse[0], nrmse[1], nrmse[2]),
                     (calibration[0], calibration[1], calibration[2]),
                     int(((lo <= truth) & (truth <= hi)).sum()),
                     int(((plo <= truth) & (truth <= phi)).sum()), len(present),
                     sum(rows[keys[s]].value is None for s in present))


def _score_chunk(task: tuple[int, Cell, int, int, ValuationSettings]) -> list[WorldScore]:
    index, cell, first, count, settings = task
    return [score_world(cell, (index, r), settings) for r in range(first, first + count)]


@dataclass(frozen=True)
class Mean:
    """A Monte Carlo estimate of an expectation and its standard error."""

    value: float
    se: float


def plain_mean(x: FloatArray) -> Mean:
    se = float(np.std(x, ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return Mean(float(np.mean(x)), se)


def controlled_mean(x: FloatArray, control: FloatArray) -> Mean:
    """The mean of ``x`` with a control variate whose expectation is 1: ``mean(x) -
    b (mean(control) - 1)``, ``b`` the least-squares slope of ``x`` on ``control``. It
    estimates the same expectation as ``mean(x)``; the part of the noise that ``control``
    explains is gone from its standard error (from the residuals, one more degree of
    freedom spent on ``b``)."""
    if len(x) < 3 or np.var(control) == 0:
        return plain_mean(x)
    centred = control - control.mean()
    slope = float(centred @ (x - x.mean()) / (centred @ centred))
    residual = x - slope * centred
    se = math.sqrt(float(residual.var()) / (len(x) - 2))
    return Mean(float(x.mean() - slope * (control.mean() - 1.0)), se)


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    replicates: int
    expected_conversions: float
    calibration: list[float]  # per step, mean over replicates
    calibration_band: list[tuple[float, float]]  # per step, 5% and 95% over replicates
    textbook_calibration: list[float]
    matured_calibration: list[float]
    nrmse: list[tuple[float, float, float]]  # per step: estimator, textbook, matured
    coverage: list[float]
    coverage_plug_in: list[float]
    path_sum: Mean  # mean over worlds, with the control variate
    path_sum_plain: Mean  # plain mean over worlds
    path_sum_increments: Mean
    withheld: float  # share of segment values the default guard rails withhold

    @property
    def nrmse_ratio(self) -> float:
        """Worst step's estimator nRMSE over the textbook rule's."""
        return max(e / t for e, t, _ in self.nrmse)

    @property
    def nrmse_ratio_matured(self) -> float:
        return max(e / m for e, _, m in self.nrmse)


def summarize(cell: Cell, scores: Sequence[WorldScore]) -> CellResult:
    steps = range(len(LADDER))
    calibration = np.array([[w.steps[k].calibration for k in steps] for w in scores])
    nrmse = np.array([[w.steps[k].nrmse for k in steps] for w in scores])
    covered = np.array([[w.steps[k].covered for k in steps] for w in scores]).sum(axis=0)
    plugged = np.array([[w.steps[k].covered_plug_in for k in steps] for w in scores]).sum(axis=0)
    segments = np.array([[w.steps[k].segments for k in steps] for w in scores]).sum(axis=0)
    withheld = sum(step.withheld for w in scores for step in w.steps)
    band = np.quantile(calibration[:, :, 0], [0.05, 0.95], axis=0)
    rms = np.sqrt((nrmse**2).mean(axis=0))
    path_sum = np.array([w.path_sum for w in scores])
    return CellResult(
        cell=cell, replicates=len(scores),
        expected_conversions=float(np.mean([w.expected_conversions for w in scores])),
        calibration=calibration[:, :, 0].mean(axis=0).tolist(),
        calibration_band=[(float(band[0, k]), float(band[1, k])) for k in steps],
        textbook_calibration=calibration[:, :, 1].mean(axis=0).tolist(),
        matured_calibration=calibration[:, :, 2].mean(axis=0).tolist(),
        nrmse=[(float(rms[k, 0]), float(rms[k, 1]), float(rms[k, 2])) for k in steps],
        coverage=(covered / segments).tolist(), coverage_plug_in=(plugged / segments).tolist(),
        path_sum=controlled_mean(path_sum, np.array([w.control for w in scores])),
        path_sum_plain=plain_mean(path_sum),
        path_sum_increments=plain_mean(np.array([w.path_sum_increments for w in scores])),
        withheld=withheld / float(segments.sum()))


def run(cells: Sequence[Cell], replicates: int, jobs: int,
        settings: ValuationSettings) -> list[CellResult]:
    chunk = max(1, min(10, replicates))
    tasks = [(i, cell, first, min(chunk, cell.worlds(replicates) - first), settings)
             for i, cell in enumerate(cells)
             for first in range(0, cell.worlds(replicates), chunk)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(_score_chunk, tasks))
    per_cell: dict[int, list[WorldScore]] = {}
    for (i, *_), scores in zip(tasks, results, strict=True):
        per_cell.setdefault(i, []).extend(scores)
    return [summarize(cell, per_cell[i]) for i, cell in enumerate(cells)]


def headline(results: Sequence[CellResult]) -> dict[str, float | dict[str, float]]:
    """The figures the issue's targets are stated on (see the module docstring)."""
    big = [r for r in results if r.expected_conversions >= CALIBRATION_MIN_CONVERSIONS]
    mid = [r for r in results if r.expected_conversions >= COVERAGE_MIN_CONVERSIONS]
    lagged = [r for r in results if r.cell.lag != "none"]
    path, path_se = _per_lag(results, lambda r: r.path_sum)
    plain, plain_se = _per_lag(results, lambda r: r.path_sum_plain)
    path_big, _ = _per_lag(big, lambda r: r.path_sum)
    increments, _ = _per_lag(big, lambda r: r.path_sum_increments)
    figures: dict[str, float | dict[str, float]] = {
        "calibration_min": min((c for r in big for c in r.calibration), default=math.nan),
        "calibration_max": max((c for r in big for c in r.calibration), default=math.nan),
        "nrmse_ratio_vs_textbook_max": max((r.nrmse_ratio for r in lagged), default=math.nan),
        "nrmse_ratio_vs_matured_max": max((r.nrmse_ratio_matured for r in lagged),
                                          default=math.nan),
        "coverage90_min": min((c for r in mid for c in r.coverage), default=math.nan),
        "coverage90_max": max((c for r in mid for c in r.coverage), default=math.nan),
        "coverage90_plug_in_min": min((c for r in mid for c in r.coverage_plug_in),
                                      default=math.nan),
        "coverage90_plug_in_max": max((c for r in mid for c in r.coverage_plug_in),
                                      default=math.nan),
        "path_sum_ratio_min": min(path.values(), default=math.nan),
        "path_sum_ratio_max": max(path.values(), default=math.nan),
        "path_sum_ratio_by_lag": path,
        "path_sum_ratio_se_by_lag": path_se,
        "path_sum_ratio_plain_by_lag": plain,
        "path_sum_ratio_plain_se_by_lag": plain_se,
        "path_sum_ratio_150_min": min(path_big.values(), default=math.nan),
        "path_sum_ratio_150_max": max(path_big.values(), default=math.nan),
        "path_sum_ratio_150_by_lag": path_big,
        "path_sum_ratio_increments_by_lag": increments,
    }
    return figures


def _per_lag(results: Sequence[CellResult], mean: Callable[[CellResult], Mean]
             ) -> tuple[dict[str, float], dict[str, float]]:
    """Per lag, the mean over its worlds with every cell weighing the same (as with the same
    number of worlds in each: a cell running more worlds sharpens its own mean, it does not
    weigh more), and its standard error."""
    value: dict[str, float] = {}
    se: dict[str, float] = {}
    for lag in dict.fromkeys(r.cell.lag for r in results):
        mine = [mean(r) for r in results if r.cell.lag == lag]
        value[lag] = sum(m.value for m in mine) / len(mine)
        se[lag] = math.sqrt(sum(m.se**2 for m in mine)) / len(mine)
    return value, se


def table(results: Sequence[CellResult]) -> Iterator[str]:
    yield ("| lag | size | base rate | E[conv]/world | worlds | calibration (worst step) "
           "| 5-95% band | textbook calib. | nRMSE est. / textbook / matured | ratio "
           "| coverage 90% | plug-in coverage | path-sum (lift shares) +- SE | plain mean +- SE "
           "| path-sum (increments) | withheld |")
    yield "|" + "---|" * 16
    for r in results:
        worst = int(np.argmax([abs(c - 1) for c in r.calibration]))
        band = r.calibration_band[worst]
        e, t, m = max(r.nrmse, key=lambda x: x[0] / x[1])
        yield (f"| {r.cell.lag} | {r.cell.size} | {r.cell.rate:.1%} | "
               f"{r.expected_conversions:,.0f} | {r.replicates} | {r.calibration[worst]:.3f} | "
               f"{band[0]:.2f}-{band[1]:.2f} | {min(r.textbook_calibration):.3f} | "
               f"{e:.3f} / {t:.3f} / {m:.3f} | {r.nrmse_ratio:.2f} | "
               f"{min(r.coverage):.3f}-{max(r.coverage):.3f} | "
               f"{min(r.coverage_plug_in):.3f}-{max(r.coverage_plug_in):.3f} | "
               f"{r.path_sum.value:.3f} +- {r.path_sum.se:.3f} | "
               f"{r.path_sum_plain.value:.3f} +- {r.path_sum_plain.se:.3f} | "
               f"{r.path_sum_increments.value:.2f} | {r.withheld:.0%} |")


# ---------------------------------------------------------------- upload worlds


UPLOAD_CAMPAIGNS = 8
UPLOAD_LEAD_IN, UPLOAD_WINDOW = 60.0, 240.0
"""People arrive over the lead-in and the window; only the window's events are pulled."""
UPLOAD_AS_OF = ORIGIN + dt.timedelta(days=UPLOAD_WINDOW)
UPLOAD_CLICKS_MEDIAN = 100.0
"""Median arrivals a day of a campaign (lognormal, SD 0.5 on the log scale, as in the sandbox
with 40): about 900 a day in all, so that a world's figures are not its luck."""
INDEPENDENT = ("newsletter_signup", "view_promotion")
"""Micro conversions that predict nothing: done at random, whatever the person buys."""
UPLOAD_STEPS = LADDER + INDEPENDENT
UPLOAD_GROUPS = ("gclid", "email")
GCLID_SHARE, EMAIL_RANDOM_SHARE = 0.5, 0.3
"""Arrivals keyed by click id; of the rest, the share identified by email at random (checking
out or signing up identifies anyone)."""
VIEW_SHARE, UPLOAD_VALUE_SD = 0.92, 0.6
CRM_BUYERS = 200
"""Buyers whose only visible event is their purchase (a CRM import)."""
UPLOAD_SEEDS, UPLOAD_SEEDS_QUICK = 4, 1
"""Worlds per lag: the full run, --quick."""
UPLOAD_SEED_TAG = 1
"""First entry of an upload world's seed (three entries; a cell's world has two)."""
QUICK_SHARE, QUICK_MEAN_S, SLOW_MEDIAN_DAYS, SLOW_SIGMA, MAX_LAG_DAYS = 0.7, 600.0, 2.0, 1.1, 50.0
"""Cart -> checkout, the sandbox's mixed lag: most within the session, the rest days later."""


@dataclass(frozen=True, eq=False)
class CampaignRates:
    """Per campaign, drawn as the sandbox draws its campaigns."""

    clicks_per_day: FloatArray
    cart: FloatArray
    checkout: FloatArray
    purchase: FloatArray
    signup: FloatArray
    promotion: FloatArray
    order_value_median: FloatArray

    @classmethod
    def draw(cls, rng: np.random.Generator) -> CampaignRates:
        n = UPLOAD_CAMPAIGNS
        return cls(clicks_per_day=rng.lognormal(math.log(UPLOAD_CLICKS_MEDIAN), 0.5, n),
                   cart=np.clip(rng.beta(4, 12, n), 0.05, 0.6),
                   checkout=np.clip(rng.beta(6, 6, n), 0.15, 0.9),
                   purchase=np.clip(rng.beta(6, 5, n), 0.15, 0.9),
                   signup=np.clip(rng.beta(2, 40, n), 0.005, 0.2),
                   promotion=np.clip(rng.beta(3, 12, n), 0.02, 0.5),
                   order_value_median=rng.lognormal(math.log(70.0), 0.3, n))


def mixed_lag(rng: np.random.Generator, count: int) -> FloatArray:
    """Days from the cart to the checkout."""
    quick = rng.exponential(QUICK_MEAN_S / DAY, count)
    slow = np.minimum(rng.lognormal(math.log(SLOW_MEDIAN_DAYS), SLOW_SIGMA, count), MAX_LAG_DAYS)
    return np.asarray(np.where(rng.random(count) < QUICK_SHARE, quick, slow))


@dataclass(frozen=True, eq=False)
class Arrivals:
    """Everyone who arrived, pulled or not: campaign, step times in days from the window's
    start (NaN: never), purchase time and value, and how they are keyed."""

    campaign: npt.NDArray[np.int64]
    times: FloatArray  # (UPLOAD_STEPS, people)
    bought: FloatArray
    value: FloatArray
    gclid: npt.NDArray[np.bool_]
    email: npt.NDArray[np.bool_]


def arrivals(lag: str, rng: np.random.Generator) -> Arrivals:
    """A sandbox-like day of every campaign, over the lead-in and the window at once (the
    quick steps follow the click by the sandbox's mean seconds: view 40, cart 600 after the
    view, signup 300; a promotion view 120)."""
    rates = CampaignRates.draw(rng)
    counts = rng.poisson(rates.clicks_per_day * (UPLOAD_LEAD_IN + UPLOAD_WINDOW))
    campaign = np.repeat(np.arange(UPLOAD_CAMPAIGNS), counts)
    n = len(campaign)
    arrived = rng.uniform(-UPLOAD_LEAD_IN, UPLOAD_WINDOW, n)
    u = rng.random((6, n))
    times = np.full((len(UPLOAD_STEPS), n), np.nan)
    viewed = u[0] < VIEW_SHARE
    times[0] = np.where(viewed, arrived + rng.exponential(40.0 / DAY, n), np.nan)
    carted = viewed & (u[1] < rates.cart[campaign])
    times[1] = np.where(carted, times[0] + rng.exponential(600.0 / DAY, n), np.nan)
    checked = carted & (u[2] < rates.checkout[campaign])
    times[2] = np.where(checked, times[1] + mixed_lag(rng, n), np.nan)
    buys = checked & (u[3] < rates.purchase[campaign])
    bought = np.where(buys, times[2] + draw_lags(lag, rng, n), np.nan)
    signed = u[4] < rates.signup[campaign]
    times[3] = np.where(signed, arrived + rng.exponential(300.0 / DAY, n), np.nan)
    times[4] = np.where(u[5] < rates.promotion[campaign],
                        arrived + rng.exponential(120.0 / DAY, n), np.nan)
    value = rng.lognormal(np.log(rates.order_value_median[campaign]), UPLOAD_VALUE_SD)
    gclid = rng.random(n) < GCLID_SHARE
    email = ~gclid & (checked | signed | (rng.random(n) < EMAIL_RANDOM_SHARE))
    return Arrivals(campaign, times, bought, value, gclid, email)


def simulate_uploads(lag: str, seed: Sequence[int]) -> Journeys:
    """An upload world as the pull sees it: the keyed people's events inside the window (a
    journey begun before it shows from its first step inside), and the CRM buyers."""
    rng = np.random.default_rng(list(seed))
    people = arrivals(lag, rng)
    with np.errstate(invalid="ignore"):  # NaN: no such event
        inside = (people.times >= 0.0) & (people.times <= UPLOAD_WINDOW)
        bought = (people.bought >= 0.0) & (people.bought <= UPLOAD_WINDOW)
    seen = np.flatnonzero((people.gclid | people.email) & (inside.any(axis=0) | bought))
    code = np.full(len(people.campaign), -1, np.int64)
    code[seen] = np.arange(len(seen))
    step, index = np.nonzero(inside[:, seen])
    person, buyers = seen[index], seen[bought[seen]]
    crm = len(seen) + np.arange(CRM_BUYERS)
    crm_time = rng.uniform(0.0, UPLOAD_WINDOW, CRM_BUYERS)
    crm_value = rng.lognormal(math.log(70.0), UPLOAD_VALUE_SD, CRM_BUYERS)
    group = np.concatenate([np.where(people.gclid[seen], 0, 1), np.ones(CRM_BUYERS, np.int64)])
    return Journeys(
        conversions=UPLOAD_STEPS,
        segments=tuple(f"campaign_{c}" for c in range(UPLOAD_CAMPAIGNS)),
        micro_person=code[person], micro_conversion=step,
        micro_segment=people.campaign[person],
        micro_time=ORIGIN.timestamp() + people.times[step, person] * DAY,
        micro_size=np.full(len(step), np.nan),
        macro_person=np.concatenate([code[buyers], crm]),
        macro_time=ORIGIN.timestamp() + np.concatenate([people.bought[buyers], crm_time]) * DAY,
        macro_value=np.concatenate([people.value[buyers], crm_value]),
        ladder=LADDER, person_group=group, groups=UPLOAD_GROUPS)


@dataclass(frozen=True)
class Realised:
    """Matured uploaded people of one world: what they bought within H of their first
    uploaded event, and what their events uploaded."""

    realised: float
    uploaded: float
    people: int

    @property
    def ratio(self) -> float:
        return self.realised / self.uploaded if self.uploaded > 0 else math.nan


def realisation(journeys: Journeys, rows: Sequence[MicroValue], as_of: dt.datetime,
                horizon: float, uploading: Sequence[str] | None = None) -> Realised:
    """Realised / uploaded over the people whose first uploaded event is at least H old.

    A person uploads their first event of each conversion (``uploading``: default, every
    conversion whose row over all segments says track_and_upload) at the ``upload_value`` of
    their segment's row; nothing where it is None. What they realise is their first macro
    within H after their first uploaded event."""
    by_key = _by_key(rows)
    if uploading is None:
        uploading = [name for name in journeys.conversions if (name, ALL_SEGMENTS) in by_key
                     and by_key[name, ALL_SEGMENTS].recommendation
                     is Recommendation.TRACK_AND_UPLOAD]
    per_event = np.zeros((len(journeys.conversions), len(journeys.segments)))
    for (name, segment), row in by_key.items():
        if segment != ALL_SEGMENTS and row.upload_value is not None and name in uploading:
            per_event[journeys.conversions.index(name),
                      journeys.segments.index(segment)] = row.upload_value
    now = as_of.timestamp()
    events = _first_events(journeys, now)
    codes = [journeys.conversions.index(name) for name in uploading]
    events = events[np.isin(journeys.micro_conversion[events], codes)]
    person = journeys.micro_person[events]
    first = np.full(journeys.persons, np.inf)
    np.minimum.at(first, person, journeys.micro_time[events])
    matured = np.flatnonzero(first <= now - horizon * DAY)
    realised = _first_macro_value(journeys, matured, first[matured], horizon, now)
    uploaded = np.bincount(person, minlength=journeys.persons, weights=per_event[
        journeys.micro_conversion[events], journeys.micro_segment[events]])
    return Realised(float(realised.sum()), float(uploaded[matured].sum()), len(matured))


def _first_events(journeys: Journeys, now: float) -> npt.NDArray[np.int64]:
    """Rows of each person's first visible event of each micro conversion."""
    rows = np.flatnonzero(journeys.micro_time <= now)
    person, code = journeys.micro_person[rows], journeys.micro_conversion[rows]
    rows = rows[np.lexsort((journeys.micro_time[rows], code, person))]
    person, code = journeys.micro_person[rows], journeys.micro_conversion[rows]
    first = np.ones(len(rows), np.bool_)
    first[1:] = (person[1:] != person[:-1]) | (code[1:] != code[:-1])
    return np.asarray(rows[first], np.int64)


def _first_macro_value(journeys: Journeys, person: npt.NDArray[np.int64], start: FloatArray,
                       horizon: float, now: float) -> FloatArray:
    """Value of each person's first visible macro at or after ``start`` within H (0: none)."""
    seen = np.flatnonzero(journeys.macro_time <= now)
    if not len(seen) or not len(person):
        return np.zeros(len(person))
    who, when = journeys.macro_person[seen], journeys.macro_time[seen]
    origin = min(float(when.min()), float(start.min()))
    span = math.ceil((max(float(when.max()), float(start.max())) - origin) / DAY) + 2.0
    key = who * span + (when - origin) / DAY  # person, then days: exact to a millisecond
    order = np.argsort(key, kind="stable")
    index = np.searchsorted(key[order], person * span + (start - origin) / DAY, side="left")
    inside = order[np.minimum(index, len(order) - 1)]
    found = ((index < len(order)) & (who[inside] == person)
             & (when[inside] - start <= horizon * DAY))
    return np.where(found, journeys.macro_value[seen][inside], 0.0)


@dataclass(frozen=True)
class UploadScore:
    """One upload world: the recommendation over all segments per step ('' when the step has
    no row) and the realisation of its uploads (all of them; the ladder's alone)."""

    lag: str
    seed: int
    people: int
    recommendations: tuple[str, ...]
    realised: Realised
    ladder_only: Realised

    @property
    def agreement(self) -> tuple[bool, ...]:
        """Per step: a ladder step is tracked and uploaded, an independent one is not."""
        return tuple((rec == Recommendation.TRACK_AND_UPLOAD) == (step in LADDER)
                     for step, rec in zip(UPLOAD_STEPS, self.recommendations, strict=True))


def score_upload_world(task: tuple[str, int, ValuationSettings]) -> UploadScore:
    lag, seed, settings = task
    journeys = simulate_uploads(lag, (UPLOAD_SEED_TAG, LAGS.index(lag), seed))
    rows = estimate_values(journeys, UPLOAD_AS_OF, HORIZON, settings)
    overall = {r.conversion: str(r.recommendation) for r in rows if r.segment == ALL_SEGMENTS}
    tracked_ladder = [s for s in LADDER if overall.get(s) == Recommendation.TRACK_AND_UPLOAD]
    return UploadScore(lag, seed, journeys.persons,
                       tuple(overall.get(step, "") for step in UPLOAD_STEPS),
                       realisation(journeys, rows, UPLOAD_AS_OF, HORIZON),
                       realisation(journeys, rows, UPLOAD_AS_OF, HORIZON, tracked_ladder))


def run_uploads(lags: Sequence[str], seeds: int, jobs: int,
                settings: ValuationSettings) -> list[UploadScore]:
    tasks = [(lag, seed, settings) for lag in lags for seed in range(seeds)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(score_upload_world, tasks))


def upload_headline(scores: Sequence[UploadScore]) -> dict[str, float | dict[str, float]]:
    """Realisation (min and max over worlds, and per lag) and the share of (world, step)
    pairs whose recommendation agrees with the truth."""
    ratios = [s.realised.ratio for s in scores]
    agree = np.array([s.agreement for s in scores], dtype=np.float64).reshape(-1, len(UPLOAD_STEPS))
    lags = dict.fromkeys(s.lag for s in scores)
    return {
        "realisation_min": min(ratios, default=math.nan),
        "realisation_max": max(ratios, default=math.nan),
        "recommendation_agreement": float(agree.mean()) if agree.size else math.nan,
        "realisation_min_by_lag": {lag: min(s.realised.ratio for s in scores if s.lag == lag)
                                   for lag in lags},
        "realisation_max_by_lag": {lag: max(s.realised.ratio for s in scores if s.lag == lag)
                                   for lag in lags},
        "realisation_ladder_only_min": min((s.ladder_only.ratio for s in scores),
                                           default=math.nan),
        "realisation_ladder_only_max": max((s.ladder_only.ratio for s in scores),
                                           default=math.nan),
        "recommendation_agreement_by_step": dict(zip(UPLOAD_STEPS, agree.mean(axis=0).tolist(),
                                                     strict=True)) if agree.size else {},
    }


def upload_table(scores: Sequence[UploadScore]) -> Iterator[str]:
    yield ("| lag | seed | people | " + " | ".join(UPLOAD_STEPS)
           + " | matured uploaded people | realised / uploaded | ladder uploads alone |")
    yield "|" + "---|" * (len(UPLOAD_STEPS) + 6)
    for s in scores:
        recommendations = " | ".join(rec if ok else f"**{rec or 'no row'}**"
                                     for rec, ok in zip(s.recommendations, s.agreement,
                                                        strict=True))
        yield (f"| {s.lag} | {s.seed} | {s.people:,} | {recommendations} | "
               f"{s.realised.people:,} | {s.realised.ratio:.3f} | {s.ladder_only.ratio:.3f} |")


def grid(quick: bool) -> list[Cell]:
    if quick:
        return [Cell(lag, size, rate) for lag, size, rate in QUICK]
    return [Cell(lag, size, rate) for lag in LAGS for size in SIZES for rate in RATES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 cells x 12 replicate worlds, 3 upload worlds")
    parser.add_argument("--replicates", type=int,
                        help="worlds per cell (default 100; quick 12), up to 4 times that in "
                             f"cells under {MORE_WORLDS_BELOW:g} expected conversions a world")
    parser.add_argument("--upload-seeds", type=int,
                        help=f"upload worlds per lag (default {UPLOAD_SEEDS}; quick "
                             f"{UPLOAD_SEEDS_QUICK})")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args()
    replicates = args.replicates or (12 if args.quick else 100)
    seeds = args.upload_seeds or (UPLOAD_SEEDS_QUICK if args.quick else UPLOAD_SEEDS)
    settings = ValuationSettings()
    started = time.perf_counter()
    results = run(grid(args.quick), replicates, args.jobs, settings)
    cells_done = time.perf_counter()
    uploads = run_uploads(LAGS, seeds, args.jobs, settings)
    elapsed = time.perf_counter() - started
    upload_seconds = time.perf_counter() - cells_done
    for line in table(results):
        print(line)
    print()
    for line in upload_table(uploads):
        print(line)
    figures = {**headline(results), **upload_headline(uploads)}
    worlds = sum(r.replicates for r in results)
    print(f"\n{len(results)} cells, {replicates} - {max(r.replicates for r in results)} worlds "
          f"each, {worlds} in all, and {len(uploads)} upload worlds ({upload_seconds:.0f} s), "
          f"in {elapsed:.0f} s on {args.jobs} process(es)")
    for key, figure in figures.items():
        print(f"{key}: {json.dumps(figure)}" if isinstance(figure, dict) else
              f"{key}: {figure:.3f}")
    if args.json:
        cells = [{"lag": r.cell.lag, "size": r.cell.size, "rate": r.cell.rate,
                  "expected_conversions": r.expected_conversions,
                  "calibration": r.calibration, "calibration_band": r.calibration_band,
                  "textbook_calibration": r.textbook_calibration,
                  "matured_calibration": r.matured_calibration, "nrmse": r.nrmse,
                  "nrmse_ratio": r.nrmse_ratio, "coverage90": r.coverage,
                  "coverage90_plug_in": r.coverage_plug_in, "worlds": r.replicates,
                  "path_sum_ratio": r.path_sum.value, "path_sum_ratio_se": r.path_sum.se,
                  "path_sum_ratio_plain": r.path_sum_plain.value,
                  "path_sum_ratio_plain_se": r.path_sum_plain.se,
                  "path_sum_ratio_increments": r.path_sum_increments.value,
                  "withheld": r.withheld} for r in results]
        upload_worlds = [{"lag": s.lag, "seed": s.seed, "people": s.people,
                          "recommendations": dict(zip(UPLOAD_STEPS, s.recommendations,
                                                      strict=True)),
                          "realisation": s.realised.ratio, "realised": s.realised.realised,
                          "uploaded": s.realised.uploaded,
                          "matured_uploaded_people": s.realised.people,
                          "realisation_ladder_only": s.ladder_only.ratio} for s in uploads]
        print(json.dumps({**figures, "replicates": replicates, "worlds": worlds,
                          "upload_seeds": seeds, "seconds": round(elapsed, 1),
                          "upload_seconds": round(upload_seconds, 1), "cells": cells,
                          "upload_worlds": upload_worlds}))


if __name__ == "__main__":
    main()
