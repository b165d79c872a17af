"""What each micro conversion is worth: the expected macro value within a horizon H.

For every micro conversion and segment (client, campaign or source) the value of one person
who did it is ``P(macro within H) x mean macro value``, estimated better than the textbook
``converted share x average order``:

- **Lag.** A Kaplan-Meier curve of the time from the micro to the first macro, over every
  cohort (recent ones are right-censored at ``as_of``), gives the share ``G(t)`` of the
  within-horizon conversions that have happened ``t`` days after the micro. A person followed
  for ``t < H`` days counts as ``G(t)`` of a person (partial exposure), not as a miss.
- **Shrinkage.** Segment rates get a Beta prior fitted to all segments (Beta-Binomial
  empirical Bayes on the lag-corrected exposure). The prior's own uncertainty is kept: its
  hyperparameters get a posterior on a grid and every interval mixes over it, which is what
  makes the intervals of sparse segments cover.
- **Value per macro.** Log order values are normal within a segment with a common spread;
  segment means are normal around the client's (a hierarchical model, its spread on a grid
  too), which sets how far each segment is pulled toward the client. The pull is done on the
  value scale between two unbiased lognormal means (the client's and the segment's own), so
  no prior moves the level of the total. The mean of a lognormal is far less noisy than a
  raw average, and log values are winsorized far out, so a few huge orders move it little.
- **Diagnostics and guard rails.** Volume, lift over people who did not do it, coverage
  (share of macro converters who did it first), realisation ratio on matured cohorts, an
  optional size scaling checked on held-out cohorts; no value when the evidence is thin.
- **Ladder.** ``ladder_weights`` / ``ladder_credits``: the ladder's total (the expected
  macro value of everyone who entered it) is shared among the steps in proportion to each
  step's log-lift over the one before, and each share spread over the people who reached
  the step, so the credits over all paths add up to the total exactly.

Everything here is pure: it takes columns (``Journeys``) and returns frozen rows; the store
and the command line live elsewhere (``journeys_from_events`` adapts stored events).
"""

from __future__ import annotations

import datetime as dt
import math
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import special

from convsync.model import JourneyEvent

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

DAY = 86_400.0
ALL_SEGMENTS = "*"
"""The segment name of a conversion's row over all segments."""
LADDER_ENTRY = "ladder_entry"
"""The virtual conversion 'first ladder step of a person', whose value is the ladder's total."""
SegmentBy = Literal["client", "campaign", "source"]

_WINSOR_SD = 4.0
"""Log order values further than this many robust SDs from the median are pulled in."""
_WINSOR_MIN = 20
"""Orders needed before any is pulled in: the robust SD of fewer is itself too noisy, and
pulling ordinary orders in would lower the mean (by 4% on three orders, 1% on ten)."""
_SIGMA_PRIOR = (1.0, 1.0)
"""(pseudo degrees of freedom, variance) of a weak prior on the log-value spread."""
_GRID = 41
"""Points per hyperparameter axis of the prior fits' grids."""
_RATE_SPREAD = 0.35
"""Mode of the prior SD of segment rates on the logit scale: the campaigns of one client
typically convert within about 40% of each other (the prior's mean is twice that)."""
_VALUE_SPREAD = 0.15
"""Mode of the prior SD of segment mean log order values: average orders typically differ
by about 15% between the campaigns of one client (the prior's mean is twice that)."""
_VALUE_SPREAD_MAX = 3.0
"""Upper end of that SD's grid: the posterior mean of a lognormal mean grows like
exp(tau^2 / 2), so tau must be bounded for it to exist when the data cannot bound it."""


class Recommendation(StrEnum):
    TRACK_AND_UPLOAD = "track_and_upload"
    ANALYTICS_ONLY = "analytics_only"
    NOT_ENOUGH_EVIDENCE = "not_enough_evidence"
    DROP_NOISE = "drop_noise"


ADVICE = {Recommendation.TRACK_AND_UPLOAD: "upload", Recommendation.ANALYTICS_ONLY: "analytics",
          Recommendation.NOT_ENOUGH_EVIDENCE: "no evidence", Recommendation.DROP_NOISE: "drop"}
"""Each recommendation in one word, as the tables print it."""


@dataclass(frozen=True)
class ValuationSettings:
    """Knobs of the estimator. The defaults are the ones the benchmark scores."""

    min_events: int = 30
    """Guard rail: no value for a segment with fewer micro events than this."""
    max_relative_width: float = 2.0
    """Guard rail: no value when (interval high - low) / value exceeds this."""
    level: float = 0.90
    """Coverage of the intervals kept with values and lifts."""
    noise_lift: float = 1.25
    """A micro conversion whose lift is surely below this does not predict the macro."""
    min_compared: int = 20
    """Fewest matured people on each side of the lift's comparison (did it / did not) before
    the lift decides anything: fewer give "not enough evidence", never "drop"."""
    min_compared_conversions: int = 5
    """Fewest macro conversions over both sides of the comparison before the lift decides."""
    burn_in_share: float = 0.95
    """People first seen before the window's start plus the time by which this share of a
    journey's within-horizon conversions have happened are left out of the comparison: their
    journey may have begun before the pulled window (0.9 left twice as many such journeys in
    the sandbox's comparisons, 0.99 cost a third more days for little gain)."""
    min_cohort_days: float = 30.0
    """Days of cohorts, beyond the burn-in and the horizon, before a lift decides anything:
    on fewer, a handful of people sets the advice and the ladder's shares, and both swing
    from one run to the next."""
    ladder_coverage: float = 0.5
    """A ladder step that at least this share of comparable buyers did first is never dropped
    for a low lift: most sales pass through it, so a low lift says the comparison is off."""
    size_scaling: bool = True
    """Try scaling by the micro event's size (cart value, items); kept only if it predicts
    held-out cohorts better."""
    prior_uncertainty: bool = True
    """False gives plug-in intervals (fitted prior taken as known): for comparison only."""
    draws: int = 1000
    """Monte Carlo draws behind each interval."""
    seed: int = 0


@dataclass(frozen=True, eq=False)
class Journeys:
    """Person journeys in columns: micro events, macro events, integer-coded.

    Times are epoch seconds (UTC). ``micro_conversion`` indexes ``conversions``,
    ``micro_segment`` indexes ``segments``; person codes are shared by both tables. A micro
    event's ``micro_size`` (cart value, items) is NaN when it carries none. ``ladder`` lists
    the ladder's micro conversions in climbing order (empty: no ladder). ``person_group``
    gives each person code the way the person is keyed (an index into ``groups``: click id,
    email, ...; people keyed differently are different populations, never compared with each
    other); person codes beyond its length are in group 0.
    """

    conversions: tuple[str, ...]
    segments: tuple[str, ...]
    micro_person: IntArray
    micro_conversion: IntArray
    micro_segment: IntArray
    micro_time: FloatArray
    micro_size: FloatArray
    macro_person: IntArray
    macro_time: FloatArray
    macro_value: FloatArray
    ladder: tuple[str, ...] = ()
    person_group: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    groups: tuple[str, ...] = ("",)

    def __post_init__(self) -> None:
        for name in ("micro_person", "micro_conversion", "micro_segment", "macro_person",
                     "person_group"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        for name in ("micro_time", "micro_size", "macro_time", "macro_value"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        micro = {len(self.micro_person), len(self.micro_conversion), len(self.micro_segment),
                 len(self.micro_time), len(self.micro_size)}
        macro = {len(self.macro_person), len(self.macro_time), len(self.macro_value)}
        if len(micro) != 1 or len(macro) != 1:
            raise ValueError("micro columns and macro columns must each have equal lengths")
        _check_codes("micro_conversion", self.micro_conversion, len(self.conversions))
        _check_codes("micro_segment", self.micro_segment, len(self.segments))
        _check_codes("person_group", self.person_group, len(self.groups))
        if unknown := set(self.ladder) - set(self.conversions):
            raise ValueError(f"ladder steps {sorted(unknown)} are not micro conversions")

    @property
    def persons(self) -> int:
        """Number of person codes in use (one more than the largest)."""
        top = [int(a.max()) for a in (self.micro_person, self.macro_person) if len(a)]
        return max(top, default=-1) + 1

    def groups_of_persons(self) -> IntArray:
        """Each person code's group (0 beyond ``person_group``)."""
        group = np.zeros(self.persons, np.int64)
        known = min(len(self.person_group), len(group))
        group[:known] = self.person_group[:known]
        return group


def _check_codes(name: str, codes: IntArray, count: int) -> None:
    if len(codes) and (codes.min() < 0 or codes.max() >= count):
        raise ValueError(f"{name} holds codes outside 0..{count - 1}")


@dataclass(frozen=True)
class MicroValue:
    """The value of one micro conversion in one segment (``ALL_SEGMENTS``: over all).

    ``estimate`` is the expected macro value of one person who did it (a diagnostic: every
    step of a ladder counts the same sale again); ``value`` is that estimate unless a guard
    rail withholds it (``withheld`` says why). Lift, coverage and the recommendation (with its
    ``reason``) describe the conversion over all segments. ``upload_value`` is what one event
    uploads, the only value a sink sends.
    """

    conversion: str
    segment: str
    as_of: dt.datetime
    horizon_days: float
    volume: int
    conversions: int
    exposure: float
    customer_share: float
    customer_share_interval: tuple[float, float]
    mean_macro_value: float
    estimate: float
    interval: tuple[float, float]
    value: float | None
    withheld: str
    """Why ``value`` is None: the guard rail that withholds it ('' when it is given)."""
    lift: float | None
    lift_interval: tuple[float, float] | None
    coverage: float | None
    realisation_ratio: float | None
    scaled_by_size: bool
    value_per_size_unit: float | None
    size_note: str
    recommendation: Recommendation
    reason: str
    window_start: dt.datetime | None = None
    """First micro event of the journeys (the pulled window's start, as far as seen)."""
    history_days: float = 0.0
    """Days from ``window_start`` to ``as_of``."""
    burn_in_days: float = 0.0
    """People first seen within this many days of the window's start are left out of the
    lift's comparison (their journey may have begun before it)."""
    compared_doers: int = 0
    compared_doers_converted: int = 0
    compared_others: int = 0
    compared_others_converted: int = 0
    upload_value: float | None = None
    """What one event of this conversion in this segment uploads: the ladder credit for a
    ladder step, the value for a micro conversion outside the ladder; None when nothing is
    to be uploaded (``upload_note`` says why)."""
    upload_note: str = ""


@dataclass(frozen=True)
class LadderCredit:
    """What one ladder step uploads per event in one segment.

    ``expected_value`` (V_k) and ``increment`` (V_k - V_k-1) are for reporting; ``credit`` is
    the rule's upload value: ``share`` of the segment's ladder total over the ``reach``
    people who reached the step (None when the ladder total is withheld, see ``reason``).
    """

    conversion: str
    segment: str
    position: int
    reach: int
    expected_value: float
    increment: float
    share: float
    credit_estimate: float
    credit: float | None
    reason: str


# ---------------------------------------------------------------- lag: Kaplan-Meier


@dataclass(frozen=True, eq=False)
class SurvivalCurve:
    """A right-continuous step function: ``survival[i]`` holds on [times[i], times[i+1])."""

    times: FloatArray
    survival: FloatArray

    def at(self, t: FloatArray | float) -> FloatArray:
        t = np.asarray(t, dtype=np.float64)
        if not len(self.times):
            return np.ones_like(t)
        index = np.searchsorted(self.times, t, side="right") - 1
        return np.where(index >= 0, self.survival[np.maximum(index, 0)], 1.0)


def kaplan_meier(durations: FloatArray, events: BoolArray) -> SurvivalCurve:
    """Kaplan-Meier: the share without an event at each event time (events before censoring
    at tied times)."""
    durations = np.asarray(durations, dtype=np.float64)
    order = np.argsort(durations, kind="stable")
    times, first = np.unique(durations[order], return_index=True)
    if not len(times):
        return SurvivalCurve(np.zeros(0), np.zeros(0))
    deaths = np.add.reduceat(np.asarray(events, dtype=np.float64)[order], first)
    at_risk = len(durations) - first
    survival = np.cumprod(1.0 - deaths / at_risk).astype(np.float64)
    happened = deaths > 0
    return SurvivalCurve(times[happened], survival[happened])


def completed_share(curve: SurvivalCurve, follow_up: FloatArray, horizon: float) -> FloatArray:
    """The expected share of within-horizon conversions already seen after ``follow_up`` days:
    F(t) / F(H), with F = 1 - S."""
    done_by_horizon = 1.0 - float(curve.at(horizon))
    if done_by_horizon <= 0:
        return np.ones_like(np.asarray(follow_up, dtype=np.float64))
    share = (1.0 - curve.at(np.minimum(follow_up, horizon))) / done_by_horizon
    return np.asarray(np.clip(share, 0.0, 1.0), dtype=np.float64)


# ---------------------------------------------------------------- rates: Beta-Binomial EB


@dataclass(frozen=True, eq=False)
class BetaPrior:
    """A Beta prior on segment rates: a mixture of Beta(alpha_i, beta_i) with weights.

    One component is a known prior; a fitted one is the posterior over a grid of (mean,
    concentration), so that intervals carry the uncertainty of the fit."""

    alpha: FloatArray
    beta: FloatArray
    weight: FloatArray

    @classmethod
    def known(cls, alpha: float, beta: float) -> BetaPrior:
        return cls(np.array([alpha]), np.array([beta]), np.array([1.0]))

    @property
    def mean(self) -> float:
        return float(self.weight @ (self.alpha / (self.alpha + self.beta)))

    def posterior_mean(self, successes: FloatArray, trials: FloatArray) -> FloatArray:
        """Each segment's posterior mean rate. The weights are used as they are: a fitted
        prior's weights already are the posterior over the hyperparameters."""
        y, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
        means = (self.alpha[:, None] + y) / (self.alpha[:, None] + self.beta[:, None] + n)
        return np.asarray(self.weight @ means, dtype=np.float64)

    def draw(self, successes: FloatArray, trials: FloatArray, rng: np.random.Generator,
             draws: int) -> FloatArray:
        """Posterior draws of each segment's rate, shape (draws, segments)."""
        y, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
        pick = rng.choice(len(self.weight), size=draws, p=self.weight)
        a = self.alpha[pick][:, None] + y
        b = self.beta[pick][:, None] + (n - y)
        return np.asarray(rng.beta(a, b), dtype=np.float64)


def _beta_binomial_log_like(alpha: FloatArray, beta: FloatArray, successes: FloatArray,
                            trials: FloatArray) -> FloatArray:
    """Sum over segments of log P(y | n, alpha, beta) (binomial coefficient dropped), per
    component; trials may be fractional (lag-corrected exposure)."""
    a, b = alpha[:, None], beta[:, None]
    y, n = np.asarray(successes)[None, :], np.asarray(trials)[None, :]
    seen = special.betaln(a + y, b + n - y).sum(axis=1)
    return np.asarray(seen - y.shape[1] * special.betaln(alpha, beta), dtype=np.float64)


def _normalized(log_weight: FloatArray) -> FloatArray:
    w = np.exp(log_weight - np.max(log_weight))
    return np.asarray(w / w.sum(), dtype=np.float64)


def fit_beta_prior(successes: FloatArray, trials: FloatArray, *,
                   plug_in: bool = False) -> BetaPrior:
    """Empirical Bayes prior of segment rates: the posterior over (logit mean, log
    concentration) on a grid, refined once around the mass of a coarse pass.

    Hyperprior: flat on the logit of the mean; ``_spread_prior`` on the logit-scale SD of the
    segment rates. ``plug_in``: the single maximum marginal likelihood point instead, the
    textbook empirical Bayes prior whose intervals ignore the fit's uncertainty."""
    y, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    center = special.logit((y.sum() + 0.5) / (n.sum() + 1.0))
    mu = center + np.linspace(-8.0, 8.0, _GRID)
    kappa = np.linspace(math.log(0.05), math.log(1e7), _GRID)
    weight = _beta_grid_posterior(mu, kappa, y, n, with_prior=not plug_in)
    mu_fine = _refined(mu, weight.sum(axis=1))
    kappa_fine = _refined(kappa, weight.sum(axis=0))
    weight = _beta_grid_posterior(mu_fine, kappa_fine, y, n, with_prior=not plug_in)
    m, k = np.meshgrid(special.expit(mu_fine), np.exp(kappa_fine), indexing="ij")
    alpha, beta, weight = (m * k).ravel(), ((1 - m) * k).ravel(), weight.ravel()
    if plug_in:
        best = int(np.argmax(weight))
        return BetaPrior.known(float(alpha[best]), float(beta[best]))
    keep = weight > 1e-12 * weight.max()
    return BetaPrior(alpha[keep], beta[keep], weight[keep] / weight[keep].sum())


def _beta_grid_posterior(logit_mean: FloatArray, log_kappa: FloatArray, y: FloatArray,
                         n: FloatArray, with_prior: bool) -> FloatArray:
    m, k = np.meshgrid(special.expit(logit_mean), np.exp(log_kappa), indexing="ij")
    alpha, beta = (m * k).ravel(), ((1 - m) * k).ravel()
    log_post = _beta_binomial_log_like(alpha, beta, y, n)
    if with_prior:
        log_post = log_post + _spread_log_prior(alpha, beta)
    return _normalized(log_post).reshape(m.shape)


def _spread_log_prior(alpha: FloatArray, beta: FloatArray) -> FloatArray:
    """log density on log(alpha + beta), at a fixed mean, of the spread prior on the
    logit-scale SD of the rates, s = sqrt(trigamma(alpha) + trigamma(beta))."""
    spread = np.sqrt(special.polygamma(1, alpha) + special.polygamma(1, beta))
    d_spread = np.abs(alpha * special.polygamma(2, alpha) + beta * special.polygamma(2, beta))
    return np.asarray(_spread_prior(spread, _RATE_SPREAD) + np.log(d_spread / (2.0 * spread)),
                      dtype=np.float64)


def _spread_prior(spread: FloatArray, mode: float) -> FloatArray:
    """log Gamma(2, 1 / mode) density of a between-segment SD (up to a constant). It vanishes
    at zero (segments never are exactly alike), which keeps the fit off the no-spread
    boundary where hierarchical intervals under-cover (Chung et al. 2013); above its mode it
    fades slowly (mean twice the mode), so the data decide."""
    return np.asarray(np.log(spread) - spread / mode, dtype=np.float64)


def _refined(grid: FloatArray, weight: FloatArray) -> FloatArray:
    """A finer grid over the part of a coarse grid that holds the posterior mass."""
    mean = float(weight @ grid)
    sd = math.sqrt(max(float(weight @ (grid - mean) ** 2), 0.0))
    half = 6.0 * max(sd, 0.5 * (grid[1] - grid[0]))
    lo, hi = max(grid[0], mean - half), min(grid[-1], mean + half)
    return np.linspace(lo, hi, _GRID)


# ---------------------------------------------------------------- value per macro


@dataclass(frozen=True, eq=False)
class _ValueModel:
    """Log order value ~ N(mu_s, sigma2) in segment s, mu_s ~ N(mu, tau^2); tau on a grid
    with its posterior, mu integrated out (flat prior). Zero-valued orders enter as a pooled
    share of positive ones. ``sigma2 = (resid + prior) / df``, ``resid`` on ``df_data``
    degrees of freedom."""

    tau: FloatArray
    weight: FloatArray
    center: FloatArray
    center_var: FloatArray
    sigma2: float
    df: float
    resid: float
    df_data: float
    positive_share: float
    seg_mean: FloatArray
    seg_count: FloatArray
    client_mean: float

    def _conditional(self, tau: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Per (tau, segment): the weight of the pooled mean and the segment's own variance."""
        own = self.sigma2 / np.maximum(self.seg_count, 1e-12)
        t2 = tau[:, None] ** 2
        pooled = np.where(self.seg_count > 0, own / (own + t2), 1.0)
        var = np.where(self.seg_count > 0, own * t2 / (own + t2), t2)
        return pooled, var

    def mean(self) -> FloatArray:
        """Mean order value per segment: the client's and the segment's own, each unbiased
        whatever the spreads are, mixed on the value scale.

        The weight of the client's mean is the log model's pooling weight, mixed over tau's
        posterior. Weights need not be right for the mix to be unbiased, only the two parts
        (the weights see the values only through the spread of all segments together): so
        tau's prior moves how far a segment is pulled, not the level of the client's total.
        A posterior mean ``exp(loc + var / 2)`` would carry tau's prior in ``exp(tau^2 / 2)``:
        on few orders a few percent too high when the true spread is 0.2, too low at 0.6."""
        if self.positive_share == 0:
            return np.zeros(len(self.seg_mean))
        pooled = self.weight @ self._conditional(self.tau)[0]
        seen = self.seg_count > 0
        a = np.where(seen, (1.0 - 1.0 / np.maximum(self.seg_count, 1.0)) / 2.0, 0.0)
        own = np.where(seen, np.exp(self.seg_mean) * finney_factor(a, self.resid, self.df_data),
                       0.0)
        mixed = pooled * self.client_mean + (1.0 - pooled) * own
        return np.asarray(self.positive_share * mixed, dtype=np.float64)

    def draw(self, rng: np.random.Generator, draws: int) -> FloatArray:
        """Posterior draws of each segment's mean order value, shape (draws, segments)."""
        if self.positive_share == 0:
            return np.zeros((draws, len(self.seg_mean)))
        pick = rng.choice(len(self.weight), size=draws, p=self.weight)
        pooled, var = self._conditional(self.tau[pick])
        center = self.center[pick] + np.sqrt(self.center_var[pick]) * rng.standard_normal(draws)
        loc = pooled * center[:, None] + (1 - pooled) * self.seg_mean
        mu = loc + np.sqrt(var) * rng.standard_normal(loc.shape)
        sigma2 = self.df * self.sigma2 / rng.chisquare(self.df, size=(draws, 1))
        log_mean = np.minimum(mu + sigma2 / 2, 700.0)  # beyond: inf, an unbounded interval
        return np.asarray(self.positive_share * np.exp(log_mean), dtype=np.float64)


def _fit_value_model(values: FloatArray, segment: IntArray, segments: int,
                     plug_in: bool) -> _ValueModel:
    positive = values > 0
    share = float(positive.mean()) if len(values) else 0.0
    logs, seg = _winsorized(np.log(values[positive])), segment[positive]
    count = np.bincount(seg, minlength=segments).astype(np.float64)
    total = np.bincount(seg, weights=logs, minlength=segments)
    seg_mean = np.divide(total, count, out=np.zeros(segments), where=count > 0)
    resid = float(((logs - seg_mean[seg]) ** 2).sum()) if len(logs) else 0.0
    df_data = max(len(logs) - int((count > 0).sum()), 0)
    df = df_data + _SIGMA_PRIOR[0]
    sigma2 = (resid + _SIGMA_PRIOR[0] * _SIGMA_PRIOR[1]) / df
    tau, weight, center, center_var = _tau_posterior(seg_mean, count, sigma2, not plug_in)
    if plug_in:
        best = int(np.argmax(weight))
        tau, weight = tau[best:best + 1], np.ones(1)
        center, center_var = center[best:best + 1], center_var[best:best + 1]
        df = 1e9
    return _ValueModel(tau, weight, center, center_var, sigma2, df, resid, df_data, share,
                       seg_mean, count, lognormal_mean(logs))


def finney_factor(a: FloatArray | float, sum_squares: float, df: float) -> FloatArray:
    """Finney's unbiased estimate of ``exp(a sigma^2)`` from ``sum_squares ~ sigma^2
    chi2_df``: ``0F1(; df / 2; a sum_squares / 2)`` (its expectation sums the series of the
    exponential term by term). ``exp(a sum_squares / df)`` instead runs high on few degrees
    of freedom (Jensen). With no degrees of freedom only ``a = 0`` is estimable: 1."""
    a = np.asarray(a, dtype=np.float64)
    if df <= 0:
        return np.ones_like(a)
    return np.asarray(special.hyp0f1(df / 2.0, a * sum_squares / 2.0), dtype=np.float64)


def lognormal_mean(logs: FloatArray) -> float:
    """The unbiased (UMVU) estimate of ``E[exp(X)]`` from normal draws ``logs`` of X:
    ``exp(mean) x finney_factor((n - 1) / (2 n), S, n - 1)``, since ``exp(mean)`` alone is
    ``exp(mu + sigma^2 / (2 n))`` on average. On two values it is their plain average; on
    the logs of a client's orders, segments and all, it estimates the client's mean order
    (between- and within-segment spread together) with neither spread's prior in it."""
    n = len(logs)
    if not n:
        return 0.0
    centre = float(np.mean(logs))
    sum_squares = float(((logs - centre) ** 2).sum())
    return math.exp(centre) * float(finney_factor((n - 1) / (2.0 * n), sum_squares, n - 1))


def _winsorized(logs: FloatArray) -> FloatArray:
    if len(logs) < _WINSOR_MIN:
        return logs
    median = float(np.median(logs))
    mad = 1.4826 * float(np.median(np.abs(logs - median)))
    if mad == 0:
        return logs
    return np.clip(logs, median - _WINSOR_SD * mad, median + _WINSOR_SD * mad)


def _tau_posterior(seg_mean: FloatArray, count: FloatArray, sigma2: float, with_prior: bool
                   ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Grid posterior of tau with the ``_spread_prior`` (Gelman et al., BDA 5.4; without it,
    the marginal likelihood): returns tau, weights, and the conditional mean and variance of
    the pooled mean."""
    seen = count > 0
    ybar, own = seg_mean[seen], sigma2 / count[seen]
    tau = np.linspace(0.0, _VALUE_SPREAD_MAX, 2 * _GRID + 1)[1:]
    if not len(ybar):
        prior = _normalized(_spread_prior(tau, _VALUE_SPREAD))
        return tau, prior, np.zeros(len(tau)), np.full(len(tau), 1e6)
    total_var = own[None, :] + tau[:, None] ** 2
    precision = 1.0 / total_var
    center_var = 1.0 / precision.sum(axis=1)
    center = center_var * (precision * ybar).sum(axis=1)
    log_like = (0.5 * np.log(center_var) - 0.5 * np.log(total_var).sum(axis=1)
                - 0.5 * (precision * (ybar - center[:, None]) ** 2).sum(axis=1))
    if with_prior:
        log_like = log_like + _spread_prior(tau, _VALUE_SPREAD)
    return tau, _normalized(log_like), center, center_var


# ---------------------------------------------------------------- exposures


@dataclass(frozen=True, eq=False)
class _Exposures:
    """One row per person who did a micro conversion (their first time doing it)."""

    person: IntArray
    segment: IntArray
    time: FloatArray
    age: FloatArray
    follow_up: FloatArray
    converted: BoolArray
    lag: FloatArray
    value: FloatArray
    size: FloatArray

    def __len__(self) -> int:
        return len(self.person)

    def matured(self, horizon: float) -> BoolArray:
        return np.asarray(self.age >= horizon, dtype=np.bool_)


class _Timeline:
    """The events visible at ``as_of``, indexed to find a person's first macro at or after a
    moment (whole seconds)."""

    def __init__(self, journeys: Journeys, as_of: dt.datetime, horizon_days: float,
                 burn_in_share: float = 0.95) -> None:
        self.journeys = journeys
        self.now = as_of.timestamp()
        self.horizon = horizon_days
        self.burn_in_share = burn_in_share
        self.micro = self._first_micro_rows(journeys)
        self.micro_code = journeys.micro_conversion[self.micro]
        macro = np.flatnonzero(journeys.macro_time <= self.now)
        order = macro[np.lexsort((journeys.macro_time[macro], journeys.macro_person[macro]))]
        self.macro_person = journeys.macro_person[order]
        self.macro_time = journeys.macro_time[order]
        self.macro_value = journeys.macro_value[order]
        times = np.concatenate([journeys.micro_time[self.micro], self.macro_time])
        self.origin = int(np.floor(times.min())) if len(times) else 0
        self.span = (int(np.ceil(times.max())) - self.origin + 2) if len(times) else 2
        self.keys = self._key(self.macro_person, self.macro_time)

    def _first_micro_rows(self, journeys: Journeys) -> IntArray:
        """Rows of the visible micro events that are a person's first of their conversion,
        ordered by conversion."""
        rows = np.flatnonzero(journeys.micro_time <= self.now)
        code, person = journeys.micro_conversion[rows], journeys.micro_person[rows]
        rows = rows[np.lexsort((journeys.micro_time[rows], person, code))]
        code, person = journeys.micro_conversion[rows], journeys.micro_person[rows]
        first = np.ones(len(rows), dtype=np.bool_)
        first[1:] = (person[1:] != person[:-1]) | (code[1:] != code[:-1])
        return np.asarray(rows[first], dtype=np.int64)

    def _key(self, person: IntArray, time: FloatArray) -> IntArray:
        seconds = np.floor(time).astype(np.int64) - self.origin
        return np.asarray(person * self.span + seconds, dtype=np.int64)

    def first_macro_from(self, person: IntArray, time: FloatArray
                         ) -> tuple[BoolArray, FloatArray, FloatArray]:
        """For each (person, time): whether a macro follows, when, and its value."""
        if not len(self.keys):
            return np.zeros(len(person), np.bool_), np.full(len(person), np.nan), np.zeros(
                len(person))
        index = np.searchsorted(self.keys, self._key(person, time), side="left")
        inside = np.minimum(index, len(self.keys) - 1)
        found = (index < len(self.keys)) & (self.macro_person[inside] == person)
        return (np.asarray(found, dtype=np.bool_), np.where(found, self.macro_time[inside], np.nan),
                np.where(found, self.macro_value[inside], 0.0))

    def exposures(self, code: int) -> _Exposures:
        j = self.journeys
        lo, hi = np.searchsorted(self.micro_code, [code, code + 1])
        rows = self.micro[lo:hi]
        person, time = j.micro_person[rows], j.micro_time[rows]
        age = (self.now - time) / DAY
        follow_up = np.minimum(age, self.horizon)
        found, when, value = self.first_macro_from(person, time)
        lag = (when - time) / DAY
        converted = found & (lag <= follow_up)
        return _Exposures(person, j.micro_segment[rows], time, age, follow_up, converted,
                          np.where(converted, lag, follow_up), np.where(converted, value, 0.0),
                          j.micro_size[rows])

    @cached_property
    def first_micro(self) -> FloatArray:
        """Each person's first visible micro event (inf: none)."""
        first = np.full(self.journeys.persons, np.inf)
        np.minimum.at(first, self.journeys.micro_person[self.micro],
                      self.journeys.micro_time[self.micro])
        return first

    @cached_property
    def first_macro(self) -> FloatArray:
        """Each person's first visible macro (inf: none)."""
        first = np.full(self.journeys.persons, np.inf)
        np.minimum.at(first, self.macro_person, self.macro_time)
        return first

    @cached_property
    def group(self) -> IntArray:
        return self.journeys.groups_of_persons()

    @cached_property
    def stratum(self) -> IntArray:
        """Each person's stratum of the comparison: their group and the segment of their
        first micro event."""
        j = self.journeys
        rows = self.micro[np.lexsort((j.micro_time[self.micro], j.micro_person[self.micro]))]
        persons, earliest = np.unique(j.micro_person[rows], return_index=True)
        first = np.zeros(j.persons, np.int64)
        first[persons] = j.micro_segment[rows][earliest]
        return np.asarray(self.group * max(len(j.segments), 1) + first, dtype=np.int64)

    @property
    def strata(self) -> int:
        return len(self.journeys.groups) * max(len(self.journeys.segments), 1)

    @cached_property
    def window_start(self) -> FloatArray:
        """Per group, its first visible micro event: where its pulled window starts, as far
        as the journeys show (inf: the group has none)."""
        start = np.full(len(self.journeys.groups), np.inf)
        seen = np.isfinite(self.first_micro)
        np.minimum.at(start, self.group[seen], self.first_micro[seen])
        return start

    @cached_property
    def burn_in(self) -> float:
        """Days from a person's first micro event by which ``burn_in_share`` of their
        within-horizon macro conversions have happened (Kaplan-Meier, censored at ``now``):
        journeys seen to start sooner than this after the window's start may have begun
        before it."""
        persons = np.flatnonzero(np.isfinite(self.first_micro))
        start = self.first_micro[persons]
        found, when, _ = self.first_macro_from(persons, start)
        follow_up = np.minimum((self.now - start) / DAY, self.horizon)
        lag = (when - start) / DAY
        converted = found & (lag <= follow_up)
        curve = kaplan_meier(np.where(converted, lag, follow_up), converted)
        done = 1.0 - curve.survival
        total = 1.0 - float(curve.at(self.horizon))
        if total <= 0:
            return 0.0
        reached = np.flatnonzero(done >= self.burn_in_share * total - 1e-12)
        return float(min(curve.times[reached[0]], self.horizon))

    @cached_property
    def comparable(self) -> BoolArray:
        """People seen from the start of their journey: first seen at a micro event (not at
        the macro, as people known only from their purchase are), after their group's window
        start plus the burn-in."""
        first, start = self.first_micro, self.window_start[self.group]
        return np.asarray(np.isfinite(first) & (first < self.first_macro)
                          & (first >= start + self.burn_in * DAY), dtype=np.bool_)

    @cached_property
    def history_days(self) -> float:
        start = float(self.window_start.min()) if len(self.window_start) else math.inf
        return (self.now - start) / DAY if math.isfinite(start) else 0.0


# ---------------------------------------------------------------- one conversion


@dataclass(frozen=True, eq=False)
class _Fit:
    """One conversion's estimates per segment present (``codes`` into Journeys.segments)."""

    codes: IntArray
    volume: FloatArray
    conversions: FloatArray
    exposure: FloatArray
    share: FloatArray
    macro_value: FloatArray
    estimate: FloatArray
    share_draws: FloatArray
    value_draws: FloatArray


def _fit(exposures: _Exposures, horizon: float, settings: ValuationSettings,
         rng: np.random.Generator) -> _Fit:
    curve = kaplan_meier(exposures.lag, exposures.converted)
    done = completed_share(curve, exposures.follow_up, horizon)
    codes, segment = np.unique(exposures.segment, return_inverse=True)
    volume = np.bincount(segment).astype(np.float64)
    conversions = np.bincount(segment, weights=exposures.converted).astype(np.float64)
    exposure = np.maximum(np.bincount(segment, weights=done), conversions).astype(np.float64)
    prior = fit_beta_prior(conversions, exposure, plug_in=not settings.prior_uncertainty)
    share = prior.posterior_mean(conversions, exposure)
    share_draws = prior.draw(conversions, exposure, rng, settings.draws)
    orders = exposures.converted
    values = _fit_value_model(exposures.value[orders], segment[orders], len(codes),
                              plug_in=not settings.prior_uncertainty)
    macro_value = values.mean()
    return _Fit(codes.astype(np.int64), volume, conversions, exposure, share, macro_value,
                share * macro_value, share_draws, share_draws * values.draw(rng, settings.draws))


def _interval(draws: FloatArray, level: float) -> FloatArray:
    """Central interval per column, shape (2, columns)."""
    tail = (1.0 - level) / 2.0
    return np.asarray(np.quantile(draws, [tail, 1.0 - tail], axis=0), dtype=np.float64)


_LOG_LIFT_MAX = 9.0
"""The lift's likelihood grid spans exp(-9) .. exp(9) (about 1/8,100 .. 8,100): where no one
without the step converts, the upper end is the grid's, and tables print it as 100+."""


@dataclass(frozen=True)
class _Comparison:
    """The lift's two groups, summed over the person groups (strata) that have both."""

    doers: int = 0
    doers_converted: int = 0
    others: int = 0
    others_converted: int = 0
    lift: float | None = None
    interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class _Diagnostics:
    comparison: _Comparison
    coverage: float | None
    scaled: bool
    scale_note: str


def _compare(timeline: _Timeline, exposures: _Exposures, level: float) -> _Comparison:
    """P(macro within H | did it) / P(macro within H | did not), among comparable matured
    people: a doer from the micro event on, anyone else from their first event on.

    People keyed differently (click id, email) are different populations with different base
    rates, and segments (campaigns) differ in how often people do a step and how often they
    buy: a step done more in the campaigns that sell more would read as a lift with nothing
    behind it. So each (group, segment of the person's first event) is a stratum, and the
    lift is Mantel-Haenszel's ratio over the strata. Its interval comes from the likelihood
    of one common ratio given each stratum's conversions (each conversion is a doer's with
    odds ``ratio x n1 / n0``; a grid posterior, flat on the log ratio), which stays honest
    where a side has no conversion at all: 0 of 54 comparable people who never viewed a
    product bought, against 11% of viewers, is strong evidence (6 were expected), while
    log-scale intervals with half a person added per stratum put 1 inside."""
    horizon, comparable = timeline.horizon, timeline.comparable
    did = np.zeros(len(comparable), np.bool_)
    did[exposures.person] = True
    doer = comparable[exposures.person] & exposures.matured(horizon)
    others = comparable & ~did & ((timeline.now - timeline.first_micro) / DAY >= horizon)
    stratum, strata = timeline.stratum, timeline.strata
    n1 = np.bincount(stratum[exposures.person[doer]], minlength=strata).astype(float)
    a = np.bincount(stratum[exposures.person[doer]], weights=exposures.converted[doer],
                    minlength=strata)
    n0 = np.bincount(stratum[others], minlength=strata).astype(float)
    other_lag = (timeline.first_macro[others] - timeline.first_micro[others]) / DAY
    c = np.bincount(stratum[others], weights=other_lag <= horizon, minlength=strata)
    both = (n1 > 0) & (n0 > 0)
    counts = (int(n1[both].sum()), int(a[both].sum()), int(n0[both].sum()), int(c[both].sum()))
    if not both.any():
        return _Comparison(*counts)
    a, c, n1, n0 = a[both], c[both], n1[both], n0[both]
    weight = n1 * n0 / (n1 + n0)
    log_ratio = np.linspace(-_LOG_LIFT_MAX, _LOG_LIFT_MAX, 1601)
    odds = np.exp(log_ratio)[:, None] * n1 / n0
    posterior = _normalized((a * np.log(odds) - (a + c) * np.log1p(odds)).sum(axis=1))
    cdf = np.cumsum(posterior)
    tail = (1.0 - level) / 2.0
    low, high = np.exp(log_ratio[np.searchsorted(cdf, [tail, 1.0 - tail])])
    top, bottom = float(weight @ (a / n1)), float(weight @ (c / n0))
    ratio = top / bottom if top and bottom else float(np.exp(log_ratio[np.searchsorted(
        cdf, 0.5)]))
    return _Comparison(*counts, ratio, (float(low), float(high)))


def _coverage(timeline: _Timeline, exposures: _Exposures) -> float | None:
    """Share of comparable people with a macro conversion who did the micro one at or before
    it (people first seen at their purchase say nothing about the steps before it)."""
    first_macro = timeline.first_macro
    buyers = np.isfinite(first_macro) & timeline.comparable
    if not buyers.any():
        return None
    first_micro = np.full(len(first_macro), np.inf)
    first_micro[exposures.person] = exposures.time
    return float((first_micro[buyers] <= first_macro[buyers]).mean())


def _size_scaling(exposures: _Exposures, horizon: float) -> tuple[bool, str]:
    """Does ``value x size / mean size`` predict the realised macro value of the newest third
    of matured cohorts better than a flat value, both fitted on the older two thirds?"""
    sized = np.isfinite(exposures.size) & (exposures.size > 0)
    if sized.mean() < 0.9:
        return False, ""
    usable = exposures.matured(horizon) & sized
    times = exposures.time[usable]
    if usable.sum() < 30:
        return False, ""
    cut = np.quantile(times, 2 / 3)
    train, test = times <= cut, times > cut
    realised, size = exposures.value[usable], exposures.size[usable]
    if exposures.converted[usable][test].sum() < 30 or size[train].sum() == 0:
        return False, ""
    flat = realised[train].mean()
    per_unit = realised[train].sum() / size[train].sum()
    flat_error = float(np.mean((realised[test] - flat) ** 2))
    scaled_error = float(np.mean((realised[test] - per_unit * size[test]) ** 2))
    if scaled_error >= flat_error:
        return False, ""
    gain = 1 - scaled_error / flat_error
    return True, f"scaled by event size: held-out squared error {gain:.0%} lower than flat"


def _diagnostics(timeline: _Timeline, exposures: _Exposures,
                 settings: ValuationSettings) -> _Diagnostics:
    comparison = _compare(timeline, exposures, settings.level)
    scaled, note = (_size_scaling(exposures, timeline.horizon) if settings.size_scaling
                    else (False, ""))
    return _Diagnostics(comparison, _coverage(timeline, exposures), scaled, note)


def _withheld(volume: float, conversions: float, estimate: float, interval: FloatArray,
              history: float, horizon: float, settings: ValuationSettings) -> str:
    """Why a guard rail withholds the value ('' when none does)."""
    if volume < settings.min_events:
        return f"only {volume:.0f} events (needs {settings.min_events})"
    if history < horizon:
        return f"{history:.1f} days of history, shorter than the {horizon:g}-day horizon"
    if conversions == 0 and estimate == 0:
        return "no macro conversion seen after it"
    width = (interval[1] - interval[0]) / estimate if estimate > 0 else math.inf
    if width > settings.max_relative_width:
        return (f"interval too wide ({width:.1f} x the value, max "
                f"{settings.max_relative_width:g})")
    return ""


def _recommend(value: float | None, withheld: str, diagnostics: _Diagnostics, ladder_step: bool,
               timeline: _Timeline, settings: ValuationSettings) -> tuple[Recommendation, str]:
    """What to do with a micro conversion, from its value over all segments and its lift."""
    c = diagnostics.comparison
    lift, interval = c.lift, c.interval
    described = (_lift_text(lift, *interval) if lift is not None and interval is not None
                 else "")
    if interval is not None and c.others and not c.others_converted:
        described = (f"none of the {c.others:,} comparable people without it bought "
                     f"(lift at least {_ratio(interval[0])})")
    short_history = (timeline.history_days
                     < timeline.burn_in + timeline.horizon + settings.min_cohort_days)
    if (lift is None or interval is None or short_history
            or min(c.doers, c.others) < settings.min_compared
            or c.doers_converted + c.others_converted < settings.min_compared_conversions):
        return Recommendation.NOT_ENOUGH_EVIDENCE, _too_few(c, timeline, settings)
    low, high = interval
    if high < settings.noise_lift:
        coverage = diagnostics.coverage
        if ladder_step and coverage is not None and coverage >= settings.ladder_coverage:
            return Recommendation.ANALYTICS_ONLY, (
                f"{described}, yet {coverage:.0%} of buyers did it "
                "first: a ladder step most sales pass through; the comparison looks off, so "
                "it is not dropped")
        fewer = (": people who did it bought less often than those who did not" if high < 1
                 else "")
        return Recommendation.DROP_NOISE, (
            f"lift {_ratio(lift)} (at most {_ratio(high)}){fewer}; it does not predict the "
            "macro")
    if value is None:
        return Recommendation.ANALYTICS_ONLY, f"value withheld: {withheld}"
    if low <= 1:
        return Recommendation.ANALYTICS_ONLY, (
            f"{described}: not clearly above 1")
    if not ladder_step:
        return Recommendation.ANALYTICS_ONLY, (
            f"{described}: it predicts the macro, but only ladder steps "
            "upload (their credits count each sale once; its own value would count the same "
            "sales again): give it a ladder_position in the config to upload it")
    return Recommendation.TRACK_AND_UPLOAD, described


def _ratio(x: float) -> str:
    """A lift as a reader takes it in: 0.22, 15.4, 2,999."""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def _lift_text(lift: float, low: float, high: float) -> str:
    if low >= 100:
        return f"lift over 100 (at least {_ratio(low)}): nearly nobody who did not do it bought"
    return f"lift {_ratio(lift)} [{_ratio(low)}, {_ratio(high)}]"


def _too_few(c: _Comparison, timeline: _Timeline, settings: ValuationSettings) -> str:
    history, burn_in, horizon = timeline.history_days, timeline.burn_in, timeline.horizon
    if history < burn_in + horizon:
        return (f"not enough evidence: {history:.1f} days of history, less than the burn-in "
                f"({burn_in:.1f} days) plus the horizon ({horizon:g}): no one can be compared "
                "yet")
    if history < burn_in + horizon + settings.min_cohort_days:
        return (f"not enough evidence: {history:.1f} days of history leave under "
                f"{settings.min_cohort_days:g} days of people to compare after the burn-in "
                f"({burn_in:.1f} days) and the horizon ({horizon:g})")
    if c.doers == 0 or c.others == 0:
        missing = "who did it" if c.doers == 0 else "who did not"
        return f"not enough evidence: no comparable people {missing} (lift unknown)"
    short = []
    if min(c.doers, c.others) < settings.min_compared:
        short.append(f"{c.doers:,} comparable people did it and {c.others:,} did not (needs "
                     f"{settings.min_compared} each)")
    if c.doers_converted + c.others_converted < settings.min_compared_conversions:
        short.append(f"{c.doers_converted + c.others_converted} macro conversions between them "
                     f"(needs {settings.min_compared_conversions})")
    return "not enough evidence: " + ", ".join(short)


def _rows(name: str, journeys: Journeys, timeline: _Timeline, exposures: _Exposures,
          fit: _Fit, as_of: dt.datetime, settings: ValuationSettings) -> list[MicroValue]:
    horizon = timeline.horizon
    diagnostics = _diagnostics(timeline, exposures, settings)
    segments = [journeys.segments[c] for c in fit.codes] + [ALL_SEGMENTS]
    weight = fit.volume / fit.volume.sum()
    share_draws = np.column_stack([fit.share_draws, fit.share_draws @ weight])
    value_draws = np.column_stack([fit.value_draws, fit.value_draws @ weight])
    share = np.append(fit.share, fit.share @ weight)
    estimate = np.append(fit.estimate, fit.estimate @ weight)
    macro_value = np.append(fit.macro_value, estimate[-1] / share[-1] if share[-1] > 0
                            else fit.macro_value @ weight)
    volume = np.append(fit.volume, fit.volume.sum())
    conversions = np.append(fit.conversions, fit.conversions.sum())
    exposure = np.append(fit.exposure, fit.exposure.sum())
    share_interval, interval = _interval(share_draws, settings.level), _interval(
        value_draws, settings.level)
    realisation = _realisation(exposures, fit, estimate, horizon)
    sizes = _mean_sizes(exposures, fit.codes)
    history = timeline.history_days
    withheld = [_withheld(volume[i], conversions[i], estimate[i], interval[:, i], history,
                          horizon, settings) for i in range(len(segments))]
    overall = None if withheld[-1] else float(estimate[-1])
    recommendation, reason = _recommend(overall, withheld[-1], diagnostics,
                                        name in journeys.ladder, timeline, settings)
    c = diagnostics.comparison
    starts = timeline.window_start[np.isfinite(timeline.window_start)]
    window_start = (dt.datetime.fromtimestamp(float(starts.min()), dt.UTC) if len(starts)
                    else None)
    return [MicroValue(
        conversion=name, segment=segment, as_of=as_of, horizon_days=horizon,
        volume=int(volume[i]), conversions=int(conversions[i]),
        exposure=float(exposure[i]), customer_share=float(share[i]),
        customer_share_interval=(float(share_interval[0, i]), float(share_interval[1, i])),
        mean_macro_value=float(macro_value[i]), estimate=float(estimate[i]),
        interval=(float(interval[0, i]), float(interval[1, i])),
        value=None if withheld[i] else float(estimate[i]), withheld=withheld[i],
        lift=c.lift, lift_interval=c.interval, coverage=diagnostics.coverage,
        realisation_ratio=realisation[i], scaled_by_size=diagnostics.scaled,
        size_note=diagnostics.scale_note,
        value_per_size_unit=(float(estimate[i] / sizes[i])
                             if diagnostics.scaled and sizes[i] > 0 else None),
        recommendation=recommendation, reason=reason, window_start=window_start,
        history_days=history, burn_in_days=timeline.burn_in, compared_doers=c.doers,
        compared_doers_converted=c.doers_converted, compared_others=c.others,
        compared_others_converted=c.others_converted)
        for i, segment in enumerate(segments)]


def _realisation(exposures: _Exposures, fit: _Fit, estimate: FloatArray,
                 horizon: float) -> list[float | None]:
    """Realised macro value / value the estimate would have credited, on matured cohorts;
    per segment, then over all."""
    matured = exposures.matured(horizon)
    segment = np.searchsorted(fit.codes, exposures.segment[matured])
    count = np.bincount(segment, minlength=len(fit.codes)).astype(np.float64)
    realised = np.bincount(segment, weights=exposures.value[matured], minlength=len(fit.codes))
    count, realised = np.append(count, count.sum()), np.append(realised, realised.sum())
    credited = count * np.append(estimate[:-1], np.nan)
    credited[-1] = credited[:-1].sum()
    return [float(r / c) if c > 0 else None for r, c in zip(realised, credited, strict=True)]


def _mean_sizes(exposures: _Exposures, codes: IntArray) -> FloatArray:
    sized = np.isfinite(exposures.size)
    segment = np.searchsorted(codes, exposures.segment[sized])
    total = np.bincount(segment, weights=exposures.size[sized], minlength=len(codes))
    count = np.bincount(segment, minlength=len(codes)).astype(np.float64)
    total, count = np.append(total, total.sum()), np.append(count, count.sum())
    return np.divide(total, count, out=np.zeros(len(total)), where=count > 0)


# ---------------------------------------------------------------- public entry points


def estimate_values(journeys: Journeys, as_of: dt.datetime, horizon_days: float = 90.0,
                    settings: ValuationSettings | None = None) -> list[MicroValue]:
    """Value every micro conversion per segment, plus one ``ALL_SEGMENTS`` row each, with
    the value each of its events uploads (``upload_values``).

    Only events at or before ``as_of`` are used (a past ``as_of`` replays an earlier run).
    A person's first event of a micro conversion is their exposure; the macro counted is their
    first one at or after it within ``horizon_days``."""
    settings = settings or ValuationSettings()
    rows = _step_values(journeys, as_of, horizon_days, settings)
    return upload_values(journeys, rows, as_of, horizon_days, settings)


def _step_values(journeys: Journeys, as_of: dt.datetime, horizon_days: float,
                 settings: ValuationSettings) -> list[MicroValue]:
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware")
    timeline = _Timeline(journeys, as_of, horizon_days, settings.burn_in_share)
    rows: list[MicroValue] = []
    for code, name in enumerate(journeys.conversions):
        exposures = timeline.exposures(code)
        if not len(exposures):
            continue
        rng = np.random.default_rng([settings.seed, zlib.crc32(name.encode())])
        fit = _fit(exposures, horizon_days, settings, rng)
        rows.extend(_rows(name, journeys, timeline, exposures, fit, as_of, settings))
    return rows


def upload_values(journeys: Journeys, rows: Sequence[MicroValue], as_of: dt.datetime,
                  horizon_days: float, settings: ValuationSettings) -> list[MicroValue]:
    """``rows`` with their upload values: nothing for a conversion not recommended for
    upload (only ladder steps are); a ladder step's credit among the ladder steps that are,
    so that over everyone the uploads add up to the macro value the ladder leads to, once. A
    segment whose own figure is withheld uploads the figure over all segments."""
    tracked = {r.conversion for r in rows if r.segment == ALL_SEGMENTS
               and r.recommendation is Recommendation.TRACK_AND_UPLOAD}
    credits = {(c.conversion, c.segment): c for c in estimate_ladder(
        journeys, as_of, horizon_days, settings, rows, tracked=tracked)}
    own = {(r.conversion, r.segment): _own_upload_value(r, tracked, credits)
           for r in rows}
    uploaded = []
    for row in rows:
        value, note = own[row.conversion, row.segment]
        overall, _ = own.get((row.conversion, ALL_SEGMENTS), (None, ""))
        if value is None and row.conversion in tracked and overall is not None:
            value, note = overall, f"the all-segments figure (here: {note})"
        uploaded.append(replace(row, upload_value=value, upload_note=note))
    return uploaded


def _own_upload_value(row: MicroValue, tracked: Collection[str],
                      credits: dict[tuple[str, str], LadderCredit]) -> tuple[float | None, str]:
    """What one event of ``row`` uploads from its own segment's figures, and why."""
    if row.conversion not in tracked:
        return None, f"not uploaded: the advice is {ADVICE[row.recommendation]}"
    credit = credits.get((row.conversion, row.segment))
    if credit is None or credit.credit is None or row.value is None:
        return None, row.withheld or (credit.reason if credit else "no ladder total")
    if credit.credit <= 0:
        return None, "its ladder credit is 0: the steps after it carry the ladder's value"
    return credit.credit, f"ladder credit: {credit.share:.0%} of the ladder's value"


def textbook_values(journeys: Journeys, as_of: dt.datetime, horizon_days: float = 90.0, *,
                    matured_only: bool = False) -> dict[tuple[str, str], float]:
    """The textbook rule per (conversion, segment): share converted within the horizon (as far
    as seen) x the segment's average order; ``matured_only``: on cohorts older than H only."""
    timeline = _Timeline(journeys, as_of, horizon_days)
    result: dict[tuple[str, str], float] = {}
    for code, name in enumerate(journeys.conversions):
        exposures = timeline.exposures(code)
        keep = exposures.matured(horizon_days) if matured_only else np.ones(len(exposures), bool)
        for s in np.unique(exposures.segment):
            mine = keep & (exposures.segment == s)
            orders = mine & exposures.converted
            if mine.any():
                average = float(exposures.value[orders].mean()) if orders.any() else 0.0
                result[name, journeys.segments[s]] = float(orders.sum() / mine.sum()) * average
    return result


def ladder_weights(values: Sequence[float], entry_value: float) -> list[float]:
    """Each step's share of the ladder's value, proportional to its log-lift over the step
    before (the first step over entering the ladder at all, worth ``entry_value`` per
    person). A step that lowers the value gets no share."""
    reference, raw = entry_value, []
    for value in values:
        gained = reference > 0 and value > reference
        raw.append(math.log(value / reference) if gained else 0.0)
        reference = max(reference, value)
    total = sum(raw)
    return [r / total for r in raw] if total > 0 else [0.0] * len(raw)


def ladder_credits(weights: Sequence[float], reach: Sequence[float], entry_total: float,
                   eligible: Sequence[bool] | None = None) -> list[float]:
    """Per-event credit of each step: ``weights[k] x entry_total / reach[k]``, over the steps
    someone reached, so that ``sum(reach[k] x credit[k]) == entry_total``. When no reached
    step has a weight, the deepest reached step (among the ``eligible`` ones) carries the
    whole total."""
    shares = _shares(weights, reach, eligible)
    return [share * entry_total / r if r > 0 else 0.0
            for share, r in zip(shares, reach, strict=True)]


def _shares(weights: Sequence[float], reach: Sequence[float],
            eligible: Sequence[bool] | None = None) -> list[float]:
    kept = [w if r > 0 else 0.0 for w, r in zip(weights, reach, strict=True)]
    total = sum(kept)
    if total > 0:
        return [w / total for w in kept]
    reached = [k for k, r in enumerate(reach) if r > 0 and (eligible is None or eligible[k])]
    return [1.0 if reached and k == reached[-1] else 0.0 for k in range(len(reach))]


def ladder_entry(journeys: Journeys) -> Journeys:
    """The journeys reduced to one virtual micro conversion, ``LADDER_ENTRY``: each person's
    first ladder step (in that step's segment). Its value times its volume is the ladder's
    total expected macro value."""
    codes = [journeys.conversions.index(step) for step in journeys.ladder]
    rows = np.flatnonzero(np.isin(journeys.micro_conversion, codes))
    rows = rows[np.lexsort((journeys.micro_time[rows], journeys.micro_person[rows]))]
    first = np.ones(len(rows), dtype=np.bool_)
    first[1:] = journeys.micro_person[rows][1:] != journeys.micro_person[rows][:-1]
    rows = rows[first]
    return Journeys(
        conversions=(LADDER_ENTRY,), segments=journeys.segments,
        micro_person=journeys.micro_person[rows], micro_conversion=np.zeros(len(rows), np.int64),
        micro_segment=journeys.micro_segment[rows], micro_time=journeys.micro_time[rows],
        micro_size=np.full(len(rows), np.nan), macro_person=journeys.macro_person,
        macro_time=journeys.macro_time, macro_value=journeys.macro_value,
        person_group=journeys.person_group, groups=journeys.groups)


def estimate_ladder(journeys: Journeys, as_of: dt.datetime, horizon_days: float = 90.0,
                    settings: ValuationSettings | None = None,
                    values: Sequence[MicroValue] | None = None,
                    tracked: Collection[str] | None = None) -> list[LadderCredit]:
    """Credits of the ladder steps per segment (and over all), by the lift-share rule.

    ``values``: the rows of ``estimate_values`` for the same arguments, if already computed.
    ``tracked``: the steps that upload (default: all); the others get no share, so the
    tracked ones carry the whole ladder total."""
    if not journeys.ladder:
        return []
    settings = settings or ValuationSettings()
    if values is None:
        values = _step_values(journeys, as_of, horizon_days, settings)
    by_key = {(v.conversion, v.segment): v for v in values}
    entries = _step_values(ladder_entry(journeys), as_of, horizon_days, settings)
    if not entries or (tracked is not None and not set(tracked) & set(journeys.ladder)):
        return []
    entry_all = next(e for e in entries if e.segment == ALL_SEGMENTS)
    overall = [_estimate_of(by_key.get((step, ALL_SEGMENTS))) for step in journeys.ladder]
    first = by_key.get((journeys.ladder[0], ALL_SEGMENTS))
    weights = ladder_weights(overall, _arrival_value(first, entry_all.estimate))
    eligible = None
    if tracked is not None:
        eligible = [step in tracked for step in journeys.ladder]
        weights = _tracked_weights(weights, eligible)
    credits: list[LadderCredit] = []
    for entry in entries:
        steps = [by_key.get((step, entry.segment)) for step in journeys.ladder]
        credits.extend(_segment_credits(journeys.ladder, entry, steps, weights, eligible))
    return credits


def _arrival_value(first: MicroValue | None, entry_value: float) -> float:
    """What a comparable person is worth before the ladder's first step: the value of those
    who do it and of those who do not, mixed by their shares, ``V1 x (p + (1 - p) / lift)``;
    the ladder's entry value when nobody is seen without the first step (then it tells
    nothing and gets no share)."""
    if first is None or first.lift is None or not first.compared_others or first.lift <= 0:
        return entry_value
    doing = first.compared_doers / (first.compared_doers + first.compared_others)
    return first.estimate * (doing + (1.0 - doing) / first.lift)


def _tracked_weights(weights: Sequence[float], tracked: Sequence[bool]) -> list[float]:
    """The weights of the tracked steps only; when none of them has a weight (say only the
    step everyone does is tracked), equal weights among them."""
    kept = [w if t else 0.0 for w, t in zip(weights, tracked, strict=True)]
    if sum(kept) > 0:
        return kept
    return [1.0 if t else 0.0 for t in tracked]


def _estimate_of(row: MicroValue | None) -> float:
    return row.estimate if row is not None else 0.0


def _segment_credits(ladder: Sequence[str], entry: MicroValue,
                     steps: Sequence[MicroValue | None],
                     weights: Sequence[float],
                     eligible: Sequence[bool] | None) -> list[LadderCredit]:
    reach = [row.volume if row is not None else 0 for row in steps]
    total = entry.volume * entry.estimate
    shares = _shares(weights, reach, eligible)
    per_event = ladder_credits(weights, reach, total, eligible)
    expected = [_estimate_of(row) for row in steps]
    withheld = "" if entry.value is not None else f"ladder total withheld: {entry.withheld}"
    return [LadderCredit(
        conversion=step, segment=entry.segment, position=k + 1, reach=reach[k],
        expected_value=expected[k], increment=expected[k] - (expected[k - 1] if k else 0.0),
        share=shares[k], credit_estimate=per_event[k],
        credit=None if withheld else per_event[k], reason=withheld)
        for k, step in enumerate(ladder)]


def journeys_from_events(events: Iterable[JourneyEvent], macro: Collection[str],
                         ladder: Sequence[str] = (),
                         segment_by: SegmentBy = "campaign") -> Journeys:
    """Columns from stored journey events. Events of a ``macro`` conversion are macro
    events (their value is the order value); other mapped events are micro events, whose
    positive value is their size; unmapped events are skipped. ``segment_by`` picks a micro
    event's segment: its campaign, its source platform, or one segment for the client. A
    person's group is the kind of key they are known by (``email`` in ``email:<hash>``)."""
    persons: dict[str, int] = {}
    groups: dict[str, int] = {}
    person_group: list[int] = []
    conversions: dict[str, int] = {step: k for k, step in enumerate(ladder)}
    segments: dict[str, int] = {}
    micro: list[tuple[int, int, int, float, float]] = []
    macros: list[tuple[int, float, float]] = []
    for event in events:
        if event.conversion is None:
            continue
        person = persons.setdefault(event.person_key, len(persons))
        if person == len(person_group):
            kind = event.person_key.partition(":")[0]
            person_group.append(groups.setdefault(kind, len(groups)))
        moment = event.time.timestamp()
        if event.conversion in macro:
            macros.append((person, moment, event.value))
            continue
        segment = segments.setdefault(segment_of(event, segment_by), len(segments))
        code = conversions.setdefault(event.conversion, len(conversions))
        micro.append((person, code, segment, moment, event.value if event.value > 0 else np.nan))
    micro_columns = list(zip(*micro, strict=True)) if micro else [()] * 5
    macro_columns = list(zip(*macros, strict=True)) if macros else [()] * 3
    return Journeys(
        conversions=tuple(conversions), segments=tuple(segments),
        micro_person=np.array(micro_columns[0], np.int64),
        micro_conversion=np.array(micro_columns[1], np.int64),
        micro_segment=np.array(micro_columns[2], np.int64),
        micro_time=np.array(micro_columns[3], np.float64),
        micro_size=np.array(micro_columns[4], np.float64),
        macro_person=np.array(macro_columns[0], np.int64),
        macro_time=np.array(macro_columns[1], np.float64),
        macro_value=np.array(macro_columns[2], np.float64), ladder=tuple(ladder),
        person_group=np.array(person_group, np.int64), groups=tuple(groups) or ("",))


def segment_of(event: JourneyEvent, segment_by: SegmentBy) -> str:
    """The segment a micro event is valued in (as ``journeys_from_events`` files it)."""
    if segment_by == "campaign":
        return event.campaign_id or "(no campaign)"
    if segment_by == "source":
        return str(event.source_platform)
    return "client"
