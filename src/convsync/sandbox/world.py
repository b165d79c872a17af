"""A seeded, deterministic synthetic advertiser: the sandbox's single source of truth.

Visitors arrive from campaigns (Google Ads, Meta, Klaviyo email), climb the ladder
product view -> add to cart -> begin checkout -> purchase, sign up for the newsletter or fill
the lead form, some leads get qualified later (the CRM side). Every step has its own lag, so
purchases trickle in days and weeks after the click.

The world is generated one UTC day at a time (all campaigns at once, vectorized) from a seed
derived from (world seed, day), so any day can be rebuilt on demand: a year x 200 campaigns
costs nothing up front. ``as_of`` is the world's "now": events after it have not happened
yet, which is how late conversions appear on a re-pull.

Each platform sees the world through its own rules (attribution windows, click date vs
conversion date, its account time zone, which campaigns it owns, consent loss for GA4, only
identified people for Klaviyo). The ``*_rows`` methods compute those views; the simulators
serialize them and tests use them as ground truth.

Offline conversions uploaded through the Data Manager API simulator land in ``World.uploads``
(matched to the world's clicks by ``find_clicks`` / ``find_email_clicks``) and show in
``google_ads_stats`` for their UPLOAD_CLICKS action once processed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import re
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np

from convsync.hashing import normalize_email_google
from convsync.model import META_WINDOWS
from convsync.sandbox.uploads import ClickRef, Upload, UploadLedger

DAY = 86_400
MAX_LAG_DAYS = 50
"""Each lagged step comes back at most this many days later, so nothing happens more than
about 110 days after a click (HORIZON_DAYS bounds what a view has to scan)."""
HORIZON_DAYS = 120
CLICK_INDEX_DAYS = 160
"""Days of gclid / email indexes kept for matching uploads (16 bytes a click: a few MB)."""
FAULTS = frozenset({"duplicate_tag", "micro_in_column", "tz_shift", "broken_checkout"})
"""Faults a world can carry: a second primary purchase action counting the same orders, a
micro action (add to cart) counted in column, a GA4 property in a far-away time zone, and a
checkout that stops converting half-way through the world's days."""

SCALES: dict[str, tuple[int, int]] = {
    "small": (60, 6),
    "medium": (180, 40),
    "large": (365, 200),
}
"""Named sizes: (days, campaigns)."""

# The ladder and the side conversions, as world "steps".
STEPS = ("product_view", "add_to_cart", "begin_checkout", "purchase",
         "newsletter_signup", "lead_form", "qualified_lead")
VIEW, CART, CHECKOUT, PURCHASE, SIGNUP, LEAD, QUALIFIED = range(len(STEPS))


@dataclass(frozen=True)
class Campaign:
    index: int
    id: str
    name: str
    platform: str  # google_ads | meta | klaviyo
    source: str
    medium: str
    clicks_per_day: float
    cart_rate: float  # P(add to cart | product view)
    checkout_rate: float  # P(begin checkout | add to cart)
    purchase_rate: float  # P(purchase | begin checkout)
    signup_rate: float
    lead_rate: float
    order_value_median: float


@dataclass(frozen=True)
class GoogleAdsAction:
    id: int
    name: str
    step: int
    category: str  # ConversionActionCategory enum name
    type: str  # ConversionActionType enum name
    origin: str  # ConversionOrigin enum name
    primary_for_goal: bool
    counting_type: str  # ConversionActionCountingType enum name
    default_value: float
    click_through_days: int
    view_through_days: int
    created_ts: float | None = None
    """When the action was created (epoch seconds); None: long before the world began. A new
    action takes about 6 hours before it accepts uploads."""


@dataclass(frozen=True)
class KlaviyoMetric:
    id: str
    name: str
    step: int


@dataclass(frozen=True)
class Accounts:
    google_ads_customer_id: str = "1234567890"
    google_ads_manager_id: str = "9876543210"
    ga4_property_id: str = "123456789"
    meta_ad_account_id: str = "act_1029384756"
    meta_pixel_id: str = "556677889900"
    klaviyo_account_id: str = "SbXkL2"
    currency: str = "USD"
    google_ads_tz: str = "America/New_York"
    ga4_tz: str = "America/New_York"
    meta_tz: str = "America/Los_Angeles"
    klaviyo_tz: str = "UTC"


GA4_EVENT_NAMES = ("view_item", "add_to_cart", "begin_checkout", "purchase",
                   "newsletter_signup", "generate_lead", None)
GA4_KEY_EVENTS = frozenset({"purchase", "generate_lead"})

META_ACTION_TYPES: dict[int, tuple[str, ...]] = {
    # One event, several views of it: never to be added together.
    VIEW: ("offsite_conversion.fb_pixel_view_content", "view_content", "omni_view_content"),
    CART: ("offsite_conversion.fb_pixel_add_to_cart", "add_to_cart", "omni_add_to_cart"),
    CHECKOUT: ("offsite_conversion.fb_pixel_initiate_checkout", "initiate_checkout",
               "omni_initiated_checkout"),
    PURCHASE: ("offsite_conversion.fb_pixel_purchase", "purchase", "omni_purchase",
               "onsite_web_purchase"),
    SIGNUP: ("offsite_conversion.fb_pixel_complete_registration", "complete_registration",
             "omni_complete_registration"),
    LEAD: ("offsite_conversion.fb_pixel_lead", "lead"),
}

KLAVIYO_METRICS = (
    KlaviyoMetric("VwPrd1", "Viewed Product", VIEW),
    KlaviyoMetric("AdCrt2", "Added to Cart", CART),
    KlaviyoMetric("StChk3", "Started Checkout", CHECKOUT),
    KlaviyoMetric("PlOrd4", "Placed Order", PURCHASE),
    KlaviyoMetric("SbLst5", "Subscribed to List", SIGNUP),
)
KLAVIYO_VALUED_STEPS = frozenset({CART, CHECKOUT, PURCHASE})
"""Klaviyo events that carry the order value as ``$value``."""


_PendingEvent = tuple[float, str, int, int, int, int, bool, float]
"""A Klaviyo event waiting for its turn: (time, id, click day, person, metric index, campaign,
view-through, order value), all it takes to build it once its click day left the day cache."""


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 7
    start: dt.date = dt.date(2026, 8, 1)
    days: int = 60
    campaigns: int = 6
    faults: frozenset[str] = frozenset()
    as_of: dt.datetime | None = None  # None: the end of the last day
    accounts: Accounts = field(default_factory=Accounts)
    micro_upload_action: bool = False
    """Add a second UPLOAD_CLICKS action, "convsync micro value (upload)" (secondary, 90 days),
    for value-weighted micro-conversion uploads."""

    def __post_init__(self) -> None:
        unknown = set(self.faults) - FAULTS
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(FAULTS)}")
        if self.days < 1 or self.campaigns < 1:
            raise ValueError("a world needs at least one day and one campaign")


@dataclass
class Day:
    """Everybody who clicked (or, for Meta, only saw an ad) on one UTC day, and what they did.

    Arrays are aligned per person; ``times[s]`` holds the epoch seconds of step ``s`` (NaN when
    the person never did it)."""

    day: int
    campaign: np.ndarray
    click_ts: np.ndarray
    view_through: np.ndarray  # bool: saw a Meta ad, did not click
    ga4_seen: np.ndarray  # bool: GA4 tag allowed (consent, ad blockers)
    identified: np.ndarray  # bool: known to Klaviyo (an email)
    times: np.ndarray  # (len(STEPS), n) epoch seconds or NaN
    order_value: np.ndarray

    @property
    def size(self) -> int:
        return int(self.campaign.size)


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@lru_cache(maxsize=65_536)
def _offset_for_hour(tz: str, hour: int) -> int:
    moment = dt.datetime.fromtimestamp(hour * 3600, dt.UTC).astimezone(ZoneInfo(tz))
    offset = moment.utcoffset()
    return int(offset.total_seconds()) if offset else 0


def local_day_numbers(ts: np.ndarray, tz: str) -> np.ndarray:
    """Epoch seconds -> days since the epoch of the calendar date in ``tz`` (exact, DST-aware)."""
    if ts.size == 0:
        return ts.astype(np.int64)
    hours = np.floor(ts / 3600).astype(np.int64)
    unique, inverse = np.unique(hours, return_inverse=True)
    offsets = np.array([_offset_for_hour(tz, int(h)) for h in unique], dtype=np.int64)
    return np.floor((ts + offsets[inverse]) / DAY).astype(np.int64)


def epoch_day(day: dt.date) -> int:
    return (day - dt.date(1970, 1, 1)).days


def from_epoch_day(n: int) -> dt.date:
    return dt.date(1970, 1, 1) + dt.timedelta(days=int(n))


class World:
    """The synthetic advertiser. Cheap to build; days are generated when first asked for."""

    def __init__(self, spec: WorldSpec | None = None) -> None:
        self.spec = spec or WorldSpec()
        accounts = self.spec.accounts
        if "tz_shift" in self.spec.faults:
            accounts = replace(accounts, ga4_tz="Asia/Tokyo")
        self.accounts = accounts
        self.first_day = epoch_day(self.spec.start)
        self.last_day = self.first_day + self.spec.days - 1
        end_of_world = (self.last_day + 1) * DAY
        self.as_of_ts = (self.spec.as_of.timestamp() if self.spec.as_of else float(end_of_world))
        self.campaigns = _make_campaigns(self.spec.seed, self.spec.campaigns)
        self.google_ads_actions = _make_google_ads_actions(self.spec.faults,
                                                           self.spec.micro_upload_action)
        self.klaviyo_metrics = KLAVIYO_METRICS
        self._day = lru_cache(maxsize=48)(self._generate_day)
        self.uploads = UploadLedger()
        """Offline conversions accepted through the Data Manager API (datamanager.py)."""
        self._google = np.array([c.platform == "google_ads" for c in self.campaigns])
        self._click_index: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = (
            OrderedDict())
        self._click_index_lock = threading.Lock()

    # -- time ---------------------------------------------------------------------------
    @property
    def as_of(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.as_of_ts, dt.UTC)

    def advance(self, days: float) -> None:
        """Move "now" forward: conversions that happen meanwhile become visible."""
        self.as_of_ts += days * DAY

    def set_as_of(self, moment: dt.datetime) -> None:
        if moment.tzinfo is None:
            raise ValueError("as_of must be timezone-aware")
        self.as_of_ts = moment.timestamp()

    @property
    def start(self) -> dt.date:
        return from_epoch_day(self.first_day)

    @property
    def end(self) -> dt.date:
        return from_epoch_day(self.last_day)

    def campaigns_on(self, platform: str) -> list[Campaign]:
        return [c for c in self.campaigns if c.platform == platform]

    # -- conversion actions ---------------------------------------------------------------
    def google_ads_action(self, action_id: int) -> GoogleAdsAction | None:
        return next((a for a in self.google_ads_actions if a.id == action_id), None)

    def add_google_ads_action(self, name: str, *, category: str = "DEFAULT",
                              type_: str = "UPLOAD_CLICKS", primary_for_goal: bool = False,
                              counting_type: str = "MANY_PER_CLICK", default_value: float = 0.0,
                              click_through_days: int = 90,
                              created: dt.datetime | None = None) -> GoogleAdsAction:
        """Create a conversion action in the account, as a user does in the Google Ads UI
        (created now on the world's clock unless ``created`` says when)."""
        if not 1 <= click_through_days <= 90:
            raise ValueError("click_through_days must be 1..90")
        action = GoogleAdsAction(
            max(a.id for a in self.google_ads_actions) + 1, name, -1, category, type_, "WEBSITE",
            primary_for_goal, counting_type, default_value, click_through_days, 0,
            created.timestamp() if created else self.as_of_ts)
        self.google_ads_actions = (*self.google_ads_actions, action)
        return action

    def set_action_created(self, action_id: int, created: dt.datetime) -> GoogleAdsAction:
        """Say when an action was created (a recent one refuses uploads for ~6 hours)."""
        action = self.google_ads_action(action_id)
        if action is None:
            raise KeyError(action_id)
        changed = replace(action, created_ts=created.timestamp())
        self.google_ads_actions = tuple(changed if a.id == action_id else a
                                        for a in self.google_ads_actions)
        return changed

    # -- generation -----------------------------------------------------------------------
    def day(self, day_number: int) -> Day:
        """Everybody whose click (or Meta impression) falls on UTC day ``day_number``."""
        return self._day(day_number)

    def _generate_day(self, day_number: int) -> Day:
        if not self.first_day <= day_number <= self.last_day:
            return _empty_day(day_number)
        rng = np.random.default_rng(_seed(self.spec.seed, "day", day_number))
        camps = self.campaigns
        weekday = from_epoch_day(day_number).weekday()
        season = 1.15 if weekday < 5 else 0.8
        means = np.array([c.clicks_per_day for c in camps]) * season
        clicks = rng.poisson(means)
        meta = np.array([c.platform == "meta" for c in camps])
        viewers = rng.poisson(means * 0.25 * meta)  # saw a Meta ad, came back on their own
        campaign = np.concatenate([np.repeat(np.arange(len(camps)), clicks),
                                   np.repeat(np.arange(len(camps)), viewers)])
        n = campaign.size
        view_through = np.zeros(n, dtype=bool)
        view_through[int(clicks.sum()):] = True
        click_ts = day_number * DAY + np.sort(rng.uniform(0, DAY, n))
        rate = {name: np.array([getattr(c, name) for c in camps])[campaign]
                for name in ("cart_rate", "checkout_rate", "purchase_rate", "signup_rate",
                             "lead_rate", "order_value_median")}
        dampen = np.where(view_through, 0.35, 1.0)  # viewers convert less than clickers
        u = rng.uniform(size=(8, n))
        times = np.full((len(STEPS), n), np.nan)
        viewed = u[0] < 0.92
        times[VIEW] = np.where(viewed, click_ts + rng.exponential(40, n), np.nan)
        carted = viewed & (u[1] < rate["cart_rate"] * dampen)
        times[CART] = np.where(carted, times[VIEW] + rng.exponential(600, n), np.nan)
        checked = carted & (u[2] < rate["checkout_rate"])
        times[CHECKOUT] = np.where(checked, times[CART] + _mixed_lag(rng, n, 0.7, 600, 2.0),
                                   np.nan)
        purchase_rate = rate["purchase_rate"]
        broken_since = self.first_day + self.spec.days // 2
        if "broken_checkout" in self.spec.faults and day_number >= broken_since:
            purchase_rate = purchase_rate * 0.0
        bought = checked & (u[3] < purchase_rate)
        times[PURCHASE] = np.where(bought, times[CHECKOUT] + _mixed_lag(rng, n, 0.55, 1200, 5.0),
                                   np.nan)
        signed = u[4] < rate["signup_rate"] * dampen
        times[SIGNUP] = np.where(signed, click_ts + rng.exponential(300, n), np.nan)
        lead = u[5] < rate["lead_rate"] * dampen
        times[LEAD] = np.where(lead, click_ts + rng.exponential(1800, n), np.nan)
        qualified = lead & (u[6] < 0.3)
        times[QUALIFIED] = np.where(
            qualified,
            times[LEAD] + np.minimum(rng.lognormal(np.log(10 * DAY), 0.6, n), MAX_LAG_DAYS * DAY),
            np.nan)
        order_value = np.round(rng.lognormal(np.log(rate["order_value_median"]), 0.6, n), 2)
        identified = checked | signed | lead | (u[7] < 0.3)
        ga4_seen = rng.uniform(size=n) < 0.92
        return Day(day_number, campaign, click_ts, view_through, ga4_seen, identified, times,
                   order_value)

    def days_between(self, first: int, last: int) -> Iterator[Day]:
        for number in range(max(first, self.first_day), min(last, self.last_day) + 1):
            yield self.day(number)

    # -- identifiers (deterministic per person) -------------------------------------------
    def person_id(self, day: int, index: int) -> str:
        return f"p{day}-{index}"

    def gclid(self, day: int, index: int) -> str:
        return "Cj0KCQ" + _token(self.spec.seed, "gclid", day, index, 40)

    def fbclid(self, day: int, index: int) -> str:
        return "IwAR" + _token(self.spec.seed, "fbclid", day, index, 32)

    def email(self, day: int, index: int) -> str:
        """The person's address as they typed it (raw emails exist only inside the world and on
        the Klaviyo wire, as in reality): dots, +tags, capitals and stray spaces, gmail.com and
        googlemail.com among other domains, in the forms of ``_EMAIL_FORMS``.

        Each person has an address of their own by Google's rule and by Meta's: the local part
        before any ``+`` ends in ``d<day>i<index>``, which dropping dots, a +tag, case or
        spaces leaves whole, and which only that person's (day, index) gives."""
        form = _EMAIL_FORMS[(self.spec.seed + day + index) % len(_EMAIL_FORMS)]
        name, title, upper, plain = _EMAIL_NAMES[(day + 3 * index) % len(_EMAIL_NAMES)]
        # positional fields take half the time of named ones, and this runs per Klaviyo event
        return form.format(name, title, upper, plain, day, index)

    # -- finding clicks again (what Google Ads does with an uploaded conversion) -----------
    def find_clicks(self, gclids: Mapping[str, float]) -> dict[str, ClickRef]:
        """The clicks (of Google campaigns, made by ``as_of``) behind these gclids, each given
        with the time of the conversion it comes with; gclids the world never made are absent.

        The days around each conversion (the 91 before it and the next) are searched first,
        then the others back to ``HORIZON_DAYS`` before the earliest conversion (a click after
        its conversion, or too old for any window). Each day's gclids are hashed once into a
        small sorted index (16 bytes a click), a bounded number of days kept."""
        pending = {g: t for g, t in gclids.items() if _WORLD_GCLID.fullmatch(g)}
        found: dict[str, ClickRef] = {}
        if not pending:
            return found
        last = min(self.last_day, int(self.as_of_ts // DAY))
        near: set[int] = set()
        for t in pending.values():
            near.update(range(int(t // DAY) - 91, int(t // DAY) + 2))
        lowest = max(self.first_day, int(min(pending.values()) // DAY) - HORIZON_DAYS)
        days = sorted((d for d in near if lowest <= d <= last), reverse=True)
        days += [d for d in range(last, lowest - 1, -1) if d not in near]
        for number in days:
            if not pending:
                break
            keys, people = self._click_index_of("gclid", number)
            if keys.size == 0:
                continue
            wanted = list(pending)
            targets = np.array([int(g[6:22], 16) for g in wanted], dtype=np.uint64)
            pos = np.minimum(np.searchsorted(keys, targets), keys.size - 1)
            for k in np.nonzero(keys[pos] == targets)[0].tolist():
                gclid, index = wanted[k], int(people[pos[k]])
                if self.gclid(number, index) != gclid:
                    continue
                del pending[gclid]
                click = self._click_ref(number, index)
                if click.ts <= self.as_of_ts:
                    found[gclid] = click
        return found

    def find_email_clicks(self, queries: Sequence[tuple[bytes, float, int]]
                          ) -> list[ClickRef | None]:
        """For each (SHA-256 of an email under Google's rule, conversion time, window days):
        the latest click of a Google campaign by that person within the window before the
        conversion (how enhanced conversions for leads find a click from user data), or None."""
        out: list[ClickRef | None] = [None] * len(queries)
        by_day: defaultdict[int, list[int]] = defaultdict(list)
        for q, (digest, ts, window) in enumerate(queries):
            if len(digest) != 32:
                continue
            for number in range(int(ts // DAY) - window - 1, int(ts // DAY) + 1):
                if self.first_day <= number <= self.last_day:
                    by_day[number].append(q)
        for number in sorted(by_day, reverse=True):
            keys, people = self._click_index_of("email", number)
            if keys.size == 0:
                continue
            asked = [q for q in by_day[number] if out[q] is None]
            targets = np.array([int.from_bytes(queries[q][0][:8], "big") for q in asked],
                               dtype=np.uint64)
            pos = np.minimum(np.searchsorted(keys, targets), keys.size - 1)
            for k in np.nonzero(keys[pos] == targets)[0].tolist():
                q, index = asked[k], int(people[pos[k]])
                digest, ts, window = queries[q]
                if hashlib.sha256(normalize_email_google(self.email(number, index)).encode()
                                  ).digest() != digest:
                    continue
                click = self._click_ref(number, index)
                if click.ts <= min(ts, self.as_of_ts) and ts - click.ts <= window * DAY:
                    out[q] = click
        return out

    def _click_ref(self, number: int, index: int) -> ClickRef:
        day = self.day(number)
        return ClickRef(number, index, int(day.campaign[index]), float(day.click_ts[index]))

    def _click_index_of(self, kind: str, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(sorted 64-bit keys, person indexes) of one day's clickers of Google campaigns: the
        first 8 bytes of their gclid token (``gclid``) or of their email's SHA-256 (``email``)."""
        with self._click_index_lock:
            cached = self._click_index.get((kind, number))
            if cached is not None:
                self._click_index.move_to_end((kind, number))
                return cached
        day = self.day(number)
        people = np.nonzero(self._google[day.campaign] & ~day.view_through)[0]
        seed = self.spec.seed
        if kind == "gclid":  # _token's digest, its tuple's repr written out (4x faster)
            blake = hashlib.blake2b
            raw = (int.from_bytes(blake(f"({seed}, 'gclid', {number}, {i}, 0)".encode(),
                                        digest_size=32).digest()[:8], "big")
                   for i in people.tolist())
        else:
            raw = (int.from_bytes(hashlib.sha256(
                normalize_email_google(self.email(number, i)).encode()).digest()[:8], "big")
                for i in people.tolist())
        keys = np.fromiter(raw, dtype=np.uint64, count=people.size)
        order = np.argsort(keys, kind="stable")
        entry = (keys[order], people[order])
        with self._click_index_lock:
            self._click_index[(kind, number)] = entry
            while len(self._click_index) > CLICK_INDEX_DAYS:
                self._click_index.popitem(last=False)
        return entry

    # -- platform views -------------------------------------------------------------------
    def visible(self, ts: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return ts <= self.as_of_ts

    def google_ads_stats(self, start: dt.date, end: dt.date, *,
                         by_conversion_date: bool = False) -> Iterator[GoogleAdsStat]:
        """Daily conversions per campaign and action as Google Ads reports them.

        Filed under the click date (the default, like ``metrics.conversions``) or the
        conversion date (``metrics.conversions_by_conversion_date``), in the account's time
        zone; only clicks of Google campaigns, only conversions inside the action's click-through
        window and before ``as_of``. Rows with no conversions at all are not returned."""
        tz = self.accounts.google_ads_tz
        lookback = max(a.click_through_days for a in self.google_ads_actions) + 1
        lo, hi = epoch_day(start), epoch_day(end)
        first = lo - 1 - (lookback if by_conversion_date else 0)
        acc = _DatedSums(lo, hi)
        google = self._google
        uploads = self.uploads.has_uploads()
        for day in self.days_between(first, hi + 1):
            mine = google[day.campaign] & ~day.view_through
            click_days = local_day_numbers(day.click_ts, tz)
            if uploads:  # offline imports: only what someone uploaded (and was processed)
                self._add_uploads(acc, day.day, tz, by_conversion_date)
            for action in self.google_ads_actions:
                if action.type.startswith("UPLOAD"):
                    continue
                ts = day.times[action.step]
                in_window = ts - day.click_ts <= action.click_through_days * DAY
                ok = mine & self.visible(ts) & in_window
                idx = np.nonzero(ok)[0]
                if idx.size == 0:
                    continue
                dates = local_day_numbers(ts[idx], tz) if by_conversion_date else click_days[idx]
                values = (day.order_value[idx] if action.step == PURCHASE
                          else np.full(idx.size, action.default_value))
                acc.add(dates, day.campaign[idx], action.id, values)
            yield from (GoogleAdsStat(from_epoch_day(d), self.campaigns[c], self._action(a), n, v)
                        for d, c, a, n, v in acc.flush_before(day.day - 1))
        yield from (GoogleAdsStat(from_epoch_day(d), self.campaigns[c], self._action(a), n, v)
                    for d, c, a, n, v in acc.flush_before(None))

    def _action(self, action_id: int) -> GoogleAdsAction:
        return next(a for a in self.google_ads_actions if a.id == action_id)

    def _add_uploads(self, acc: _DatedSums, click_day: int, tz: str,
                     by_conversion_date: bool) -> None:
        """Uploaded conversions whose click was on ``click_day``, as processed by now: each
        at its latest processed value, on its click (or conversion) date, under its click's
        campaign; a ONE_PER_CLICK action counts one conversion per click (the earliest)."""
        actions = {a.id: a for a in self.google_ads_actions}
        chosen: dict[tuple[int, int | str], tuple[Upload, float]] = {}
        for upload in self.uploads.on_click_day(click_day):
            action = actions.get(upload.action_id)
            current = upload.value_at(self.as_of_ts)
            if action is None or current is None or upload.conversion_ts > self.as_of_ts:
                continue
            key: tuple[int, int | str] = (
                (action.id, upload.click.index) if action.counting_type == "ONE_PER_CLICK"
                else (action.id, upload.key))
            if key in chosen and chosen[key][0].conversion_ts <= upload.conversion_ts:
                continue
            chosen[key] = (upload, current[0])
        by_action: dict[int, list[tuple[Upload, float]]] = defaultdict(list)
        for upload, value in chosen.values():
            by_action[upload.action_id].append((upload, value))
        for action_id, cells in by_action.items():
            when = np.array([u.conversion_ts if by_conversion_date else u.click.ts
                             for u, _ in cells])
            acc.add(local_day_numbers(when, tz), np.array([u.click.campaign for u, _ in cells]),
                    action_id, np.array([v for _, v in cells]))

    def google_ads_delivery(self, start: dt.date, end: dt.date) -> Iterator[GoogleAdsDelivery]:
        """Clicks per account-time-zone day and Google campaign (``metrics.clicks``), with
        impressions and cost derived from them; days without clicks are not returned.

        The clicks are exactly those ``google_ads_clicks`` lists, counted without making gclids."""
        tz = self.accounts.google_ads_tz
        lo, hi = epoch_day(start), epoch_day(end)
        acc = _DatedSums(lo, hi)
        google = np.array([c.platform == "google_ads" for c in self.campaigns])
        for day in self.days_between(lo - 1, hi + 1):
            idx = np.nonzero(google[day.campaign] & ~day.view_through
                             & self.visible(day.click_ts))[0]
            acc.add(local_day_numbers(day.click_ts[idx], tz), day.campaign[idx], 0,
                    np.zeros(idx.size))
            yield from (_google_delivery(from_epoch_day(d), self.campaigns[c], n)
                        for d, c, _, n, _v in acc.flush_before(day.day - 1))
        yield from (_google_delivery(from_epoch_day(d), self.campaigns[c], n)
                    for d, c, _, n, _v in acc.flush_before(None))

    def google_ads_clicks(self, date: dt.date) -> Iterator[Click]:
        """Clicks of Google campaigns on one account-time-zone day (``click_view``)."""
        tz = self.accounts.google_ads_tz
        target = epoch_day(date)
        google = np.array([c.platform == "google_ads" for c in self.campaigns])
        for day in self.days_between(target - 1, target + 1):
            days = local_day_numbers(day.click_ts, tz)
            mine = google[day.campaign] & ~day.view_through & (days == target)
            mine &= self.visible(day.click_ts)
            for i in np.nonzero(mine)[0]:
                yield Click(date, self.campaigns[int(day.campaign[i])], self.gclid(day.day, int(i)),
                            float(day.click_ts[i]))

    def ga4_rows(self, start: dt.date, end: dt.date, *,
                 by_gclid: bool = False) -> Iterator[Ga4Row]:
        """Event counts per property-time-zone day, session source / medium / campaign, event.

        GA4 files events under the day they happened; it misses people who block its tag;
        people who only saw a Meta ad arrive as (direct) / (none).

        ``by_gclid``: the property also has an event-scoped custom dimension ``gclid`` (the
        landing page's click id, kept as an event parameter): Google campaigns' events come one
        row per gclid, event and day (a count of 1: each person does each step once); the
        other rows carry gclid "(not set)". Summed over gclids, the rows are the same."""
        tz = self.accounts.ga4_tz
        lo, hi = epoch_day(start), epoch_day(end)
        acc = _DatedSums(lo, hi)
        steps = [s for s, name in enumerate(GA4_EVENT_NAMES) if name]
        direct = len(self.campaigns)
        google = np.array([c.platform == "google_ads" for c in self.campaigns])
        for day in self.days_between(lo - 1 - HORIZON_DAYS, hi + 1):
            seen = day.ga4_seen
            source_index = np.where(day.view_through, direct, day.campaign)
            if by_gclid:
                source_index = np.where(google[day.campaign],
                                        _gclid_code(day.day, day.campaign, len(self.campaigns)),
                                        source_index)
            for step in steps:
                ts = day.times[step]
                idx = np.nonzero(seen & self.visible(ts))[0]
                if idx.size == 0:
                    continue
                values = day.order_value[idx] if step == PURCHASE else np.zeros(idx.size)
                acc.add(local_day_numbers(ts[idx], tz), source_index[idx], step, values)
            for d, c, s, n, v in acc.flush_before(day.day - 1):
                yield self._ga4_row(d, c, s, n, v)
        for d, c, s, n, v in acc.flush_before(None):
            yield self._ga4_row(d, c, s, n, v)

    def _ga4_row(self, d: int, c: int, step: int, n: int, v: float) -> Ga4Row:
        event = GA4_EVENT_NAMES[step] or ""
        gclid = "(not set)"
        if c < 0:  # one person of a Google campaign (ga4_rows by_gclid)
            click_day, index, c = _gclid_person(c, len(self.campaigns))
            gclid = self.gclid(click_day, index)
        if c == len(self.campaigns):
            source, medium, name = "(direct)", "(none)", "(not set)"
        else:
            camp = self.campaigns[c]
            source, medium, name = camp.source, camp.medium, camp.name
        key = n if event in GA4_KEY_EVENTS else 0
        return Ga4Row(from_epoch_day(d), source, medium, name, event, n, key, v, gclid)

    def meta_insights(self, start: dt.date, end: dt.date, *,
                      report_time: str = "impression") -> Iterator[MetaInsight]:
        """Per ad-account-time-zone day and Meta campaign: delivery and actions per window.

        ``report_time="impression"`` (Meta's default) files a conversion under the day of the
        click or impression that led to it; ``"conversion"`` under the day it happened."""
        tz = self.accounts.meta_tz
        lo, hi = epoch_day(start), epoch_day(end)
        by_conversion = report_time == "conversion"
        first = lo - 1 - (29 if by_conversion else 0)
        meta = np.array([c.platform == "meta" for c in self.campaigns])
        acc = _DatedSums(lo, hi)
        delivery = _DatedSums(lo, hi)
        for day in self.days_between(first, hi + 1):
            mine = meta[day.campaign]
            click_days = local_day_numbers(day.click_ts, tz)
            clicked = mine & ~day.view_through & self.visible(day.click_ts)
            idx = np.nonzero(clicked)[0]
            delivery.add(click_days[idx], day.campaign[idx], 0, np.zeros(idx.size))
            for step in META_ACTION_TYPES:
                ts = day.times[step]
                lag = ts - day.click_ts
                for w, window in enumerate(META_WINDOWS):
                    ok = mine & self.visible(ts) & _in_window(window, lag, day.view_through)
                    idx = np.nonzero(ok)[0]
                    if idx.size == 0:
                        continue
                    dates = (local_day_numbers(ts[idx], tz) if by_conversion else click_days[idx])
                    values = day.order_value[idx] if step == PURCHASE else np.zeros(idx.size)
                    acc.add(dates, day.campaign[idx], step * 10 + w, values)
            yield from self._meta_flush(acc, delivery, day.day - 1)
        yield from self._meta_flush(acc, delivery, None)

    def _meta_flush(self, acc: _DatedSums, delivery: _DatedSums,
                    before: int | None) -> Iterator[MetaInsight]:
        cells: dict[tuple[int, int], MetaInsight] = {}
        for d, c, _, n, _v in delivery.flush_before(before):
            cells[(d, c)] = _new_insight(from_epoch_day(d), self.campaigns[c], n)
        for d, c, key, n, v in acc.flush_before(before):
            cell = cells.get((d, c))
            if cell is None:
                cell = cells[(d, c)] = _new_insight(from_epoch_day(d), self.campaigns[c], 0)
            step, window = divmod(key, 10)
            cell.actions.setdefault(step, {})[META_WINDOWS[window]] = n
            cell.values.setdefault(step, {})[META_WINDOWS[window]] = v
        yield from (cells[k] for k in sorted(cells))

    def klaviyo_events(self, start: dt.datetime, end: dt.datetime,
                       metric: KlaviyoMetric | None = None) -> Iterator[KlaviyoEvent]:
        """Events of identified people with ``start <= time < end``, in time order per day."""
        lo_ts, hi_ts = self._klaviyo_span(start, end)
        metrics = [metric] if metric else list(self.klaviyo_metrics)
        pending: list[_PendingEvent] = []
        for day in self.days_between(int(lo_ts // DAY) - HORIZON_DAYS, int(hi_ts // DAY)):
            for m, metric_ in enumerate(metrics):
                idx = self._klaviyo_people(day, metric_, lo_ts, hi_ts)
                for i, ts, c, vt, v in zip(
                        idx.tolist(), day.times[metric_.step, idx].tolist(),
                        day.campaign[idx].tolist(), day.view_through[idx].tolist(),
                        day.order_value[idx].tolist(), strict=True):
                    heapq.heappush(pending, (ts, self._event_id(day.day, i, metric_), day.day,
                                             i, m, c, vt, v))
            # later days only hold events after their own start: what is before is final
            while pending and pending[0][0] < (day.day + 1) * DAY:
                yield self._klaviyo_event(heapq.heappop(pending), metrics)
        while pending:
            yield self._klaviyo_event(heapq.heappop(pending), metrics)

    def klaviyo_event_times(self, metric: KlaviyoMetric, start: dt.datetime,
                            end: dt.datetime) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(times, values) of the events ``klaviyo_events(start, end, metric)`` returns, one
        click day at a time and unordered, without building them: for aggregates."""
        lo_ts, hi_ts = self._klaviyo_span(start, end)
        for day in self.days_between(int(lo_ts // DAY) - HORIZON_DAYS, int(hi_ts // DAY)):
            idx = self._klaviyo_people(day, metric, lo_ts, hi_ts)
            if idx.size:
                values = (day.order_value[idx] if metric.step in KLAVIYO_VALUED_STEPS
                          else np.zeros(idx.size))
                yield day.times[metric.step, idx], values

    def _klaviyo_span(self, start: dt.datetime, end: dt.datetime) -> tuple[float, float]:
        return start.timestamp(), min(end.timestamp(), self.as_of_ts + 1e-6)

    @staticmethod
    def _klaviyo_people(day: Day, metric: KlaviyoMetric, lo_ts: float,
                        hi_ts: float) -> np.ndarray:
        """Indexes of the identified people of ``day`` whose ``metric`` falls in [lo, hi)."""
        ts = day.times[metric.step]
        with np.errstate(invalid="ignore"):
            return np.nonzero(day.identified & (ts >= lo_ts) & (ts < hi_ts))[0]

    def _event_id(self, day: int, index: int, metric: KlaviyoMetric) -> str:
        return _token(self.spec.seed, "kev", day, index, 20, metric.step)

    def _klaviyo_event(self, pending: _PendingEvent,
                       metrics: list[KlaviyoMetric]) -> KlaviyoEvent:
        ts, event_id, day, i, m, campaign, view_through, order_value = pending
        metric, camp = metrics[m], self.campaigns[campaign]
        props: dict[str, object] = {"$event_id": f"{day}-{i}-{metric.step}",
                                    "utm_source": camp.source, "utm_campaign": camp.name}
        if camp.platform == "google_ads":
            props["gclid"] = self.gclid(day, i)
        elif camp.platform == "meta" and not view_through:
            props["fbclid"] = self.fbclid(day, i)
        value = order_value if metric.step in KLAVIYO_VALUED_STEPS else 0.0
        if value:
            props["$value"] = value
        return KlaviyoEvent(
            id=event_id, metric=metric, timestamp=ts, value=value, properties=props,
            profile_id="01" + _token(self.spec.seed, "prof", day, i, 24),
            email=self.email(day, i))

    def klaviyo_daily(self, metric: KlaviyoMetric, start: dt.date, end: dt.date,
                      tz: str) -> dict[dt.date, tuple[int, float]]:
        """Count and sum of value per day in ``tz`` (what metric aggregates return)."""
        lo = dt.datetime.combine(start, dt.time(), ZoneInfo(tz))
        hi = dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), ZoneInfo(tz))
        out: dict[dt.date, tuple[int, float]] = {}
        for event in self.klaviyo_events(lo, hi, metric):
            date = dt.datetime.fromtimestamp(event.timestamp, ZoneInfo(tz)).date()
            n, v = out.get(date, (0, 0.0))
            out[date] = (n + 1, v + event.value)
        return out


@dataclass(frozen=True)
class GoogleAdsDelivery:
    date: dt.date
    campaign: Campaign
    clicks: int
    impressions: int
    cost_micros: int


@dataclass(frozen=True)
class GoogleAdsStat:
    date: dt.date
    campaign: Campaign
    action: GoogleAdsAction
    all_conversions: int
    all_conversions_value: float

    @property
    def conversions(self) -> int:
        return self.all_conversions if self.action.primary_for_goal else 0

    @property
    def conversions_value(self) -> float:
        return self.all_conversions_value if self.action.primary_for_goal else 0.0


@dataclass(frozen=True)
class Click:
    date: dt.date
    campaign: Campaign
    gclid: str
    timestamp: float


@dataclass(frozen=True)
class Ga4Row:
    date: dt.date
    source: str
    medium: str
    campaign_name: str
    event_name: str
    event_count: int
    key_events: int
    event_value: float
    gclid: str = "(not set)"


@dataclass
class MetaInsight:
    date: dt.date
    campaign: Campaign
    clicks: int
    impressions: int
    spend: float
    actions: dict[int, dict[str, int]] = field(default_factory=dict)
    values: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class KlaviyoEvent:
    id: str
    metric: KlaviyoMetric
    timestamp: float
    value: float
    properties: dict[str, object]
    profile_id: str
    email: str


class _DatedSums:
    """Counts and value sums keyed by (day, campaign, key), emitted in day order once complete.

    Only days in [lo, hi] are kept; ``flush_before(d)`` yields every day < d (all of them for
    None) sorted, so a caller streaming cohorts in day order emits finished days as it goes."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.cells: dict[int, dict[tuple[int, int], list[float]]] = defaultdict(dict)

    def add(self, days: np.ndarray, campaigns: np.ndarray, key: int, values: np.ndarray) -> None:
        keep = (days >= self.lo) & (days <= self.hi)
        for d, c, v in zip(days[keep].tolist(), campaigns[keep].tolist(), values[keep].tolist(),
                           strict=True):
            cell = self.cells[d].setdefault((c, key), [0, 0.0])
            cell[0] += 1
            cell[1] += v

    def flush_before(self, before: int | None) -> Iterable[tuple[int, int, int, int, float]]:
        ready = sorted(d for d in self.cells if before is None or d < before)
        for d in ready:
            cells = self.cells.pop(d)
            for (c, key), (n, v) in sorted(cells.items()):
                yield d, c, key, int(n), round(v, 2)


def _in_window(window: str, lag: np.ndarray, view_through: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        if window.endswith("_click"):
            days = int(window.split("d_")[0])
            return ~view_through & (lag <= days * DAY)
        if window == "1d_view":
            return view_through & (lag <= DAY)
        return np.zeros(lag.shape, dtype=bool)  # 1d_ev: no engaged-view video ads here


def _google_delivery(date: dt.date, campaign: Campaign, clicks: int) -> GoogleAdsDelivery:
    return GoogleAdsDelivery(date, campaign, clicks, int(clicks * 18 + 60), clicks * 1_150_000)


def _new_insight(date: dt.date, campaign: Campaign, clicks: int) -> MetaInsight:
    impressions = int(clicks * 55 + 100)
    return MetaInsight(date, campaign, clicks, impressions, round(clicks * 0.85, 2))


def _mixed_lag(rng: np.random.Generator, n: int, quick_share: float, quick_mean_s: float,
               slow_median_days: float) -> np.ndarray:
    """Most people act within the session; the rest come back days or weeks later."""
    quick = rng.exponential(quick_mean_s, n)
    slow = np.minimum(rng.lognormal(np.log(slow_median_days * DAY), 1.1, n), MAX_LAG_DAYS * DAY)
    return np.where(rng.uniform(size=n) < quick_share, quick, slow)


_PEOPLE_PER_DAY = 1 << 24
_WORLD_GCLID = re.compile(r"Cj0KCQ[0-9a-f]{40}")
"""How the world's gclids look (``World.gclid``): others are none of its clicks."""


def _gclid_code(day: int, campaign: np.ndarray, campaigns: int) -> np.ndarray:
    """A negative cell code naming each person of a day (and their campaign) for _DatedSums,
    whose cells are otherwise keyed by campaign index (>= 0)."""
    person = day * _PEOPLE_PER_DAY + np.arange(campaign.size, dtype=np.int64)
    return -1 - (person * campaigns + campaign)


def _gclid_person(code: int, campaigns: int) -> tuple[int, int, int]:
    """(click day, person index, campaign index) of a _gclid_code."""
    person, campaign = divmod(-1 - code, campaigns)
    day, index = divmod(person, _PEOPLE_PER_DAY)
    return day, index, campaign


_EMAIL_NAMES = tuple((n, n.title(), n.upper(), n.replace(".", "")) for n in (
    "jane.doe", "sam.lee", "maria.garcia", "wei.zhang", "amara.okafor", "lars.nilsson",
    "priya.patel"))
"""(as is, Title Case, UPPER CASE, without the dot) of the names people's addresses start with."""
_EMAIL_FORMS = (
    "{1}.d{4}i{5}+news@gmail.com",  # Google: janedoed<day>i<index>@gmail.com
    " {3}d{4}i{5}@gmail.com",  # a leading space
    "{2}.D{4}I{5}+SHOP@GoogleMail.com ",  # capitals throughout and a trailing space
    "{0}.d{4}i{5}@Example.com",
    "  {1}_d{4}i{5}+promo@Outlook.COM ",  # outside gmail a +tag is part of the address
    "{0}.d{4}i{5}@yahoo.co.UK",
    "{3}d{4}i{5}@example.org",
    "{1}.d{4}i{5}@Example.com",
)
"""How people write their addresses, formatted with a name's four ``_EMAIL_NAMES`` forms
({0} as is, {1} Title, {2} UPPER, {3} without the dot), the day {4} and the index {5}: 3 in 8
at Gmail (2 at gmail.com, 1 at googlemail.com)."""


def _token(seed: int, kind: str, day: int, index: int, length: int, extra: int = 0) -> str:
    """A deterministic hex identifier for one person (and step) of the world."""
    digest = hashlib.blake2b(repr((seed, kind, day, index, extra)).encode(), digest_size=32)
    return digest.hexdigest()[:length]


def _empty_day(day_number: int) -> Day:
    empty = np.zeros(0)
    return Day(day_number, empty.astype(np.int64), empty, empty.astype(bool), empty.astype(bool),
               empty.astype(bool), np.zeros((len(STEPS), 0)), empty)


CAMPAIGN_KINDS = (
    ("google_ads", "google", "cpc", "Search"),
    ("google_ads", "google", "cpc", "Shopping"),
    ("meta", "facebook", "paid_social", "Prospecting"),
    ("google_ads", "google", "cpc", "PMax"),
    ("meta", "instagram", "paid_social", "Retargeting"),
    ("klaviyo", "klaviyo", "email", "Newsletter"),
)


def _make_campaigns(seed: int, count: int) -> list[Campaign]:
    rng = np.random.default_rng(_seed(seed, "campaigns"))
    out = []
    for i in range(count):
        platform, source, medium, label = CAMPAIGN_KINDS[i % len(CAMPAIGN_KINDS)]
        out.append(Campaign(
            index=i, id=str(20_000_000_000 + i * 7919), name=f"{label} {i + 1:03d}",
            platform=platform, source=source, medium=medium,
            clicks_per_day=float(np.round(rng.lognormal(np.log(40), 0.5), 1)),
            cart_rate=float(np.clip(rng.beta(4, 12), 0.05, 0.6)),
            checkout_rate=float(np.clip(rng.beta(6, 6), 0.15, 0.9)),
            purchase_rate=float(np.clip(rng.beta(6, 5), 0.15, 0.9)),
            signup_rate=float(np.clip(rng.beta(2, 40), 0.005, 0.2)),
            lead_rate=float(np.clip(rng.beta(2, 60), 0.002, 0.1)),
            order_value_median=float(np.round(rng.lognormal(np.log(70), 0.3), 2)),
        ))
    return out


MICRO_UPLOAD_ACTION_ID = 6_111


def _make_google_ads_actions(faults: frozenset[str],
                             micro_upload: bool = False) -> tuple[GoogleAdsAction, ...]:
    dup = "duplicate_tag" in faults
    micro = "micro_in_column" in faults
    a = GoogleAdsAction
    extra = (a(MICRO_UPLOAD_ACTION_ID, "convsync micro value (upload)", -1, "DEFAULT",
               "UPLOAD_CLICKS", "WEBSITE", False, "MANY_PER_CLICK", 0.0, 90, 0),
             ) if micro_upload else ()
    return (
        a(6_101, "Purchase", PURCHASE, "PURCHASE", "WEBPAGE", "WEBSITE", True, "MANY_PER_CLICK",
          0.0, 90, 1),
        a(6_102, "GA4 purchase", PURCHASE, "PURCHASE", "GOOGLE_ANALYTICS_4_PURCHASE", "WEBSITE",
          dup, "MANY_PER_CLICK", 0.0, 30, 1),
        a(6_103, "Add to cart", CART, "ADD_TO_CART", "WEBPAGE", "WEBSITE", micro,
          "MANY_PER_CLICK", 5.0, 30, 1),
        a(6_104, "Begin checkout", CHECKOUT, "BEGIN_CHECKOUT", "WEBPAGE", "WEBSITE", False,
          "ONE_PER_CLICK", 10.0, 30, 1),
        a(6_105, "Product view", VIEW, "PAGE_VIEW", "WEBPAGE", "WEBSITE", False, "ONE_PER_CLICK",
          0.0, 30, 1),
        a(6_106, "Newsletter signup", SIGNUP, "SIGNUP", "WEBPAGE", "WEBSITE", False,
          "ONE_PER_CLICK", 2.0, 30, 1),
        a(6_107, "Lead form", LEAD, "SUBMIT_LEAD_FORM", "WEBPAGE", "WEBSITE", False,
          "ONE_PER_CLICK", 0.0, 30, 1),
        a(6_108, "Qualified lead (offline)", QUALIFIED, "QUALIFIED_LEAD", "UPLOAD_CLICKS",
          "WEBSITE", True, "ONE_PER_CLICK", 150.0, 90, 0),
        a(6_109, "GA4 add to cart", CART, "ADD_TO_CART", "GOOGLE_ANALYTICS_4_CUSTOM", "WEBSITE",
          False, "MANY_PER_CLICK", 0.0, 30, 1),
        a(6_110, "GA4 sign up", SIGNUP, "SIGNUP", "GOOGLE_ANALYTICS_4_CUSTOM", "WEBSITE", False,
          "ONE_PER_CLICK", 0.0, 30, 1),
        *extra,
    )
