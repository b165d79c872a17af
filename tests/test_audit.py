"""The in-column audit on a sandbox world: double counting found from the account itself
(whatever the mapping), and convsync's own upload actions recognised as such.

The world has the ``duplicate_tag`` fault: 'Purchase' (the tag) and 'GA4 purchase' (the GA4
import) are both primary and count the same orders. It is pulled once (Google Ads and GA4)
through the sandbox; each test audits a copy of that store under its own config, through
``load_audit`` or the command, as a user would. Ground truth comes from the world.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convsync import pipeline
from convsync.cli import app
from convsync.model import Basis, ConversionStat, Kind, Platform, PlatformConversion
from convsync.reconcile import Audit, Finding, audit, load_audit
from convsync.sandbox import server
from convsync.sandbox.world import MICRO_UPLOAD_ACTION_ID, World, WorldSpec
from convsync.settings import ClientConfig, ReconcileSection, load_config, load_secrets
from convsync.store import Store

TODAY = dt.date(2026, 10, 31)
DAYS = 45
START = TODAY - dt.timedelta(days=DAYS - 1)
AS_OF = dt.datetime(2026, 10, 31, 15, tzinfo=dt.UTC)
BOTH_MAPPED = 'google_ads = ["Purchase", "GA4 purchase"]\n'
UPLOAD_ACTION = "convsync micro value (upload)"
PHONE_ORDERS = (18, 11, 16, 21, 12, 17, 14, 9, 19, 15, 13, 18, 14, 16, 12)
"""Daily orders of an unrelated primary purchase action ('Phone order'), repeated: 225 every
15 days, so 450 in any 30-day audit window, about as many as the web orders (whose daily
counts they do not follow)."""
runner = CliRunner()


@dataclass
class Pulled:
    world: World
    directory: Path
    config_text: str


@pytest.fixture(scope="module")
def pulled(tls_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Pulled:
    out = tmp_path_factory.mktemp("audit")
    world = World(WorldSpec(seed=66, start=START, days=DAYS, campaigns=6,
                            faults=frozenset({"duplicate_tag"}), as_of=AS_OF,
                            micro_upload_action=True))
    with server.start(world, tls_files[0].parent) as running:
        path = out / "client.toml"
        server.write_client_config(path, running)
        config = load_config(path)
        with Store.open(config.store_url()) as store:
            result = pipeline.pull(config, load_secrets(config), store,
                                   platforms=[Platform.GOOGLE_ADS, Platform.GA4],
                                   since=START, until=TODAY, today=TODAY)
    assert result.failed == []
    text = path.read_text()
    assert BOTH_MAPPED in text and f'add_to_cart = "{MICRO_UPLOAD_ACTION_ID}"' in text
    return Pulled(world, out, text)


def client(pulled: Pulled, tmp_path: Path, text: str | None = None) -> tuple[ClientConfig, Path]:
    """A config (the sandbox's, or ``text``) over a copy of the pulled store."""
    shutil.copy(pulled.directory / "client.db", tmp_path / "client.db")
    shutil.copy(pulled.directory / "client.secrets.env", tmp_path / "client.secrets.env")
    path = tmp_path / "client.toml"
    path.write_text(text if text is not None else pulled.config_text)
    return load_config(path), path


def audited(config: ClientConfig) -> Audit:
    with Store.open(config.store_url()) as store:
        return load_audit(config, store)


def doubles(found: Audit) -> list[Finding]:
    return [f for f in found.findings if f.code == "double_counting"]


def truth(world: World, window: tuple[dt.date, dt.date] | None, action: str) -> float:
    """All conversions of one Google Ads action by click date in the audit window."""
    assert window is not None
    return sum(s.all_conversions for s in world.google_ads_stats(*window)
               if s.action.name == action)


def ga4_purchases_on_google_campaigns(world: World, window: tuple[dt.date, dt.date]) -> int:
    google = {c.name for c in world.campaigns_on("google_ads")}
    return sum(r.event_count for r in world.ga4_rows(*window)
               if r.event_name == "purchase" and r.campaign_name in google)


def add_phone_orders(config: ClientConfig, *, demote: str | None = None) -> None:
    """Store an unrelated primary action of the purchase category, 'Phone order', with the
    PHONE_ORDERS counts every day of the world; ``demote``: an action made secondary."""
    with Store.open(config.store_url()) as store:
        actions = store.platform_conversions(Platform.GOOGLE_ADS)
        tag = next(a for a in actions if a.name == "Purchase")
        phone = PlatformConversion(
            platform=Platform.GOOGLE_ADS, account_id=tag.account_id, platform_id="6190",
            name="Phone order", in_column=True,
            settings={**tag.settings, "type": "UPLOAD_CALLS", "resource_name": ""})
        changed = [a.model_copy(update={"in_column": False, "settings": {
            **a.settings, "primary_for_goal": False, "include_in_conversions_metric": False}})
            for a in actions if a.name == demote]
        store.save_platform_conversions([phone, *changed])
        web = next(s for s in store.stats(platform=Platform.GOOGLE_ADS)
                   if s.platform_conversion == "Purchase")
        store.upsert_stats(
            ConversionStat(platform=Platform.GOOGLE_ADS, account_id=tag.account_id,
                           date=START + dt.timedelta(days=i), timezone=web.timezone,
                           campaign_id=web.campaign_id, campaign_name=web.campaign_name,
                           platform_conversion="Phone order", count=n, value=80.0 * n,
                           currency=web.currency, basis=Basis.CLICK_DATE, in_column=True)
            for i in range(DAYS) for n in [PHONE_ORDERS[i % len(PHONE_ORDERS)]])


def assert_the_duplicate(found: Audit, world: World, *, reference: bool) -> Finding:
    """One double_counting finding, naming 'Purchase' and 'GA4 purchase' with the world's
    numbers, saying what it does and how to fix it in Google Ads."""
    (finding,) = doubles(found)
    window = found.window
    assert window is not None
    web, ga4 = truth(world, window, "Purchase"), truth(world, window, "GA4 purchase")
    assert finding.severity == "error" and finding.account == "1234567890"
    assert finding.subject == "'Purchase' and 'GA4 purchase'"
    assert finding.evidence["actions"] == {"Purchase": web, "GA4 purchase": ga4}
    assert finding.evidence["column_conversions"] == web + ga4
    assert finding.evidence["times_the_largest"] == round((web + ga4) / max(web, ga4), 2)
    assert 1.9 <= finding.evidence["times_the_largest"] <= 2.0
    assert finding.evidence["category"] == "PURCHASE" and finding.evidence["keep"] == "Purchase"
    assert finding.evidence["daily_correlation"] >= 0.9
    (pair,) = finding.evidence["pairs"]
    assert pair["days"] == DAYS - 7  # every stored day but the 7 unsettled ones
    assert pair["p_separate"] < 0.001 and pair["dispersion"] < 0.2
    assert "the Conversions column, which bidding reads, counts them twice" in finding.message
    assert f"{web + ga4:g} in the window for about {max(web, ga4):g}" in finding.message
    assert ("Google Ads > Goals > Conversions > Summary > 'GA4 purchase' > Edit settings > "
            "Action optimization: Secondary action") in finding.fix
    assert finding.fix.endswith("Keep 'Purchase' primary.")
    if reference:
        count = ga4_purchases_on_google_campaigns(world, window)
        assert finding.evidence["reference"] == {
            "platform": "ga4", "conversion": "purchase", "count": count,
            "events": ["purchase"], "scope": "the account's campaigns"}
        assert f"GA4 counts {count:g} 'purchase' events on the same campaigns" in finding.message
    else:
        assert finding.evidence["reference"] is None
    return finding


# -- double counting, whatever the mapping -------------------------------------------------

def test_both_actions_mapped_to_one_conversion(pulled: Pulled, tmp_path: Path) -> None:
    config, _ = client(pulled, tmp_path)
    found = audited(config)
    assert [f.code for f in found.findings] == ["double_counting"]
    finding = assert_the_duplicate(found, pulled.world, reference=True)
    assert finding.evidence["conversions"] == {"Purchase": "purchase", "GA4 purchase": "purchase"}


def test_double_counting_with_only_one_of_the_two_mapped(pulled: Pulled, tmp_path: Path) -> None:
    """'GA4 purchase' left out of the mapping: it still doubles the Conversions column."""
    text = pulled.config_text.replace(BOTH_MAPPED, 'google_ads = ["Purchase"]\n')
    config, _ = client(pulled, tmp_path, text)
    found = audited(config)
    assert [f.code for f in found.findings] == ["double_counting"]
    finding = assert_the_duplicate(found, pulled.world, reference=True)
    assert finding.evidence["conversions"] == {"Purchase": "purchase", "GA4 purchase": None}


def test_double_counting_with_each_mapped_to_its_own_conversion(pulled: Pulled,
                                                                tmp_path: Path) -> None:
    """Each action its own conversion (what `discover`'s snippet leads to): still one sale
    counted twice in the column."""
    text = pulled.config_text.replace(BOTH_MAPPED, 'google_ads = ["Purchase"]\n') + (
        '\n[[conversions]]\nname = "ga4_purchase"\nkind = "macro"\n'
        'google_ads = ["GA4 purchase"]\n')
    config, _ = client(pulled, tmp_path, text)
    found = audited(config)
    assert [f.code for f in found.findings] == ["double_counting"]
    finding = assert_the_duplicate(found, pulled.world, reference=True)
    assert finding.evidence["conversions"] == {"Purchase": "purchase",
                                               "GA4 purchase": "ga4_purchase"}


def test_double_counting_with_no_mapping_beside_an_unrelated_purchase_action(
        pulled: Pulled, tmp_path: Path) -> None:
    """Neither purchase action mapped, and a third primary action of the purchase category
    ('Phone order': other orders, about as many): the finding names the two that count the
    same orders and leaves the phone orders alone."""
    text = pulled.config_text.replace(BOTH_MAPPED, "")
    config, _ = client(pulled, tmp_path, text)
    add_phone_orders(config)
    found = audited(config)
    assert_the_duplicate(found, pulled.world, reference=False)
    rows = {a.name: a for a in found.actions}
    assert rows["Phone order"].in_column and rows["Phone order"].conversions == 450
    assert not any("Phone order" in f.subject or "Phone order" in f.fix
                   for f in found.findings)


@pytest.mark.parametrize("mapped", [False, True])
def test_two_unrelated_primary_purchase_actions_are_no_double_counting(
        pulled: Pulled, tmp_path: Path, mapped: bool) -> None:
    """'Purchase' and 'Phone order' are both primary purchases, about as many (the column
    about twice the largest), but the phone orders do not follow the web orders from day to
    day: separate sales, nothing to report, mapped to one conversion or not."""
    text = pulled.config_text.replace(
        BOTH_MAPPED, 'google_ads = ["Purchase", "Phone order"]\n' if mapped else "")
    config, _ = client(pulled, tmp_path, text)
    add_phone_orders(config, demote="GA4 purchase")
    found = audited(config)
    rows = {a.name: a for a in found.actions}
    assert found.window is not None
    web = truth(pulled.world, found.window, "Purchase")
    assert rows["Purchase"].in_column and rows["Phone order"].in_column
    assert not rows["GA4 purchase"].in_column
    assert rows["Phone order"].conversions == 450 and 0.5 * web <= 450 <= 2 * web
    assert doubles(found) == [] and found.findings == []


def test_the_command_reports_it_at_80_columns(pulled: Pulled, tmp_path: Path) -> None:
    text = pulled.config_text.replace(BOTH_MAPPED, 'google_ads = ["Purchase"]\n')
    _, path = client(pulled, tmp_path, text)
    human = runner.invoke(app, ["audit", "--config", str(path)], env={"COLUMNS": "80"})
    assert human.exit_code == 3, human.output
    assert max(len(line) for line in human.stdout.splitlines()) <= 80, human.stdout
    words = " ".join(human.stdout.split())
    assert ("error 'Purchase' and 'GA4 purchase' (account 123-456-7890): 'Purchase' and "
            "'GA4 purchase' are both primary (category PURCHASE)") in words
    assert "'GA4 purchase' > Edit settings > Action optimization: Secondary action" in words
    summary = json.loads(runner.invoke(app, ["audit", "--config", str(path), "--json"]).stdout)
    assert [f["code"] for f in summary["findings"]] == ["double_counting"]


# -- convsync's own upload actions ---------------------------------------------------------

def test_convsyncs_upload_action_is_shown_as_such_never_to_map(pulled: Pulled,
                                                               tmp_path: Path) -> None:
    """The micro-value import action of [google_ads] upload_actions (stored by pull, which
    does not mark it): convsync's, its kind what convsync uploads, no guess, no advice to map
    it, in the table, the JSON and the notes."""
    config, path = client(pulled, tmp_path)
    assert config.google_ads is not None
    assert config.google_ads.upload_actions["add_to_cart"] == str(MICRO_UPLOAD_ACTION_ID)
    human = runner.invoke(app, ["audit", "--config", str(path)], env={"COLUMNS": "80"})
    assert "micro?" not in human.stdout and "? kind guessed" not in human.stdout
    assert "map the action" not in human.stdout
    found = audited(config)
    rows = {a.name: a for a in found.actions}
    upload = rows[UPLOAD_ACTION]
    assert upload.upload_of == ("add_to_cart", "begin_checkout", "product_view")
    assert upload.kind is Kind.MICRO and not upload.guessed
    assert upload.label == "convsync upload"
    assert upload.kind_source == ("from config: convsync uploads add_to_cart, begin_checkout, "
                                  "product_view to it ([google_ads] upload_actions)")
    assert rows["Qualified lead (offline)"].upload_of == ("qualified_lead",)
    assert not any(a.guessed for a in found.actions)  # everything else is mapped
    assert any(note.startswith(f"'{UPLOAD_ACTION}' has no conversions in 30 days: it is "
                               "convsync's upload action for add_to_cart") for note in found.notes)
    summary = json.loads(runner.invoke(app, ["audit", "--config", str(path), "--json"]).stdout)
    (entry,) = [a for a in summary["actions"] if a["name"] == UPLOAD_ACTION]
    assert entry["upload_of"] == ["add_to_cart", "begin_checkout", "product_view"]


def test_an_upload_action_discover_marked_is_convsyncs_without_the_config(
        pulled: Pulled, tmp_path: Path) -> None:
    """``audit`` called without upload_actions still knows an action discover marked with
    ``upload_action_of``; made primary, it is convsync's micro uploads counted in column
    (micro_upload_primary, even before anything was uploaded), not a micro conversion to
    map or demote, and the opt-in silences it."""
    config, _ = client(pulled, tmp_path)
    with Store.open(config.store_url()) as store:
        actions = store.platform_conversions(Platform.GOOGLE_ADS)
        stats = list(store.stats(platform=Platform.GOOGLE_ADS))
    marked = [a.model_copy(update={"in_column": True, "settings": {
        **a.settings, "upload_action_of": "add_to_cart, begin_checkout"}})
        if a.name == UPLOAD_ACTION else a for a in actions]
    plain = audit(marked, stats, config.definitions(), ReconcileSection(), as_of=TODAY)
    (finding,) = [f for f in plain.findings if f.subject == UPLOAD_ACTION]
    assert finding.code == "micro_upload_primary"
    assert "([google_ads] upload_actions: add_to_cart, begin_checkout)" in finding.message
    (row,) = [a for a in plain.actions if a.name == UPLOAD_ACTION]
    assert row.upload_of == ("add_to_cart", "begin_checkout") and row.label == "convsync upload"
    opted_in = audit(marked, stats, config.definitions(),
                     ReconcileSection(primary_micro_uploads=True), as_of=TODAY)
    assert not [f for f in opted_in.findings if f.subject == UPLOAD_ACTION]
