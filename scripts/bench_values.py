"""Benchmark of convsync.valuation on synthetic worlds whose true values are known.

    python scripts/bench_values.py                 # the full grid, 100 - 400 worlds a cell
    python scripts/bench_values.py --quick         # 3 cells x 12 worlds (what the tests run)
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


def grid(quick: bool) -> list[Cell]:
    if quick:
        return [Cell(lag, size, rate) for lag, size, rate in QUICK]
    return [Cell(lag, size, rate) for lag in LAGS for size in SIZES for rate in RATES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 cells x 12 replicate worlds")
    parser.add_argument("--replicates", type=int,
                        help="worlds per cell (default 100; quick 12), up to 4 times that in "
                             f"cells under {MORE_WORLDS_BELOW:g} expected conversions a world")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args()
    replicates = args.replicates or (12 if args.quick else 100)
    started = time.perf_counter()
    results = run(grid(args.quick), replicates, args.jobs, ValuationSettings())
    elapsed = time.perf_counter() - started
    for line in table(results):
        print(line)
    figures = headline(results)
    worlds = sum(r.replicates for r in results)
    print(f"\n{len(results)} cells, {replicates} - {max(r.replicates for r in results)} worlds "
          f"each, {worlds} in all, in {elapsed:.0f} s on {args.jobs} process(es)")
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
        print(json.dumps({**figures, "replicates": replicates, "worlds": worlds,
                          "seconds": round(elapsed, 1), "cells": cells}))


if __name__ == "__main__":
    main()
