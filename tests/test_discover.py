"""End to end: the whole sandbox, a config written by it, and `discover` through the four SDKs."""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convsync import pipeline
from convsync.cli import app
from convsync.model import Kind, Platform, PlatformConversion
from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec
from convsync.settings import check_config, load_config, load_secrets
from convsync.store import Store

EXAMPLE = Path(__file__).parents[1] / "config" / "example.toml"


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    # a world ending yesterday, as `convsync sandbox serve` makes it: "last 30 days" has data
    start = dt.date.today() - dt.timedelta(days=40)
    world = World(WorldSpec(seed=21, start=start, days=40, campaigns=6,
                            micro_upload_action=True))
    with server.start(world, tls_files[0].parent) as sandbox:
        yield sandbox


@pytest.fixture
def config_path(running: server.RunningSandbox, tmp_path: Path) -> Path:
    path = tmp_path / "sandbox.toml"
    server.write_client_config(path, running)
    return path


def test_written_config_is_valid_with_its_secrets(config_path: Path) -> None:
    found = check_config(config_path, require_secrets=True)
    assert [(p.key, p.severity) for p in found] == [("client.store_url", "warning")]
    assert "does not exist yet" in found[0].message  # a new client: its store is made
    secrets_file = config_path.with_name("sandbox.secrets.env")
    assert secrets_file.stat().st_mode & 0o077 == 0  # not readable by others


def test_sandbox_conversions_match_the_example_config(config_path: Path) -> None:
    """config/example.toml documents the names the sandbox world uses."""
    assert load_config(config_path).definitions() == load_config(EXAMPLE).definitions()


def test_discover_finds_every_platform_conversion(config_path: Path,
                                                  running: server.RunningSandbox) -> None:
    config = load_config(config_path)
    world = running.world
    with Store.open(config.store_url()) as store:
        result = pipeline.discover(config, load_secrets(config), store, today=world.end)
        stored = list(store.platform_conversions())
    assert result.failed == []
    by_platform = {o.platform: o for o in result.outcomes}
    actions = {c.name: c for c in by_platform[Platform.GOOGLE_ADS].conversions}
    assert set(actions) == {a.name for a in world.google_ads_actions}
    assert actions["Purchase"].in_column is True and actions["Add to cart"].in_column is False
    assert actions["Purchase"].conversion == "purchase"
    assert actions["Purchase"].kind is Kind.MACRO
    assert actions["Add to cart"].settings["category"] == "ADD_TO_CART"
    ga4_events = {c.name for c in by_platform[Platform.GA4].conversions}
    assert {"purchase", "add_to_cart", "view_item", "generate_lead"} <= ga4_events
    metrics = {c.name for c in by_platform[Platform.KLAVIYO].conversions}
    assert metrics == {m.name for m in world.klaviyo_metrics}
    meta = {c.name: c for c in by_platform[Platform.META].conversions}
    assert meta["offsite_conversion.fb_pixel_purchase"].conversion == "purchase"
    # the other views of the same purchases are kept, marked, and not offered for mapping
    assert meta["omni_purchase"].conversion is None
    assert meta["omni_purchase"].settings["alias_of"] == "purchase"
    unmapped = {c.name for c in by_platform[Platform.META].unmapped}
    assert unmapped == {"link_click", "landing_page_view"}
    assert len(stored) == sum(len(o.conversions) for o in result.outcomes)


def test_discover_command_reports_a_failing_platform_and_goes_on(
        config_path: Path, running: server.RunningSandbox) -> None:
    running.sandbox.inject("klaviyo", "server_error")
    result = CliRunner().invoke(app, ["discover", "--config", str(config_path), "--json"])
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert "503" in summary["platforms"]["klaviyo"]["error"]
    assert summary["platforms"]["google_ads"]["error"] is None
    # the world's ten actions and convsync's micro upload action
    assert summary["platforms"]["google_ads"]["conversions"] == 11
    snippet = summary["snippet"]
    assert '[[conversions]]' in snippet and 'meta = "link_click"' in snippet
    assert "omni_purchase" not in snippet
    # convsync's own upload action is never offered for mapping (it would count the uploads)
    assert "convsync micro value (upload)" not in snippet
    assert "convsync micro value (upload)" not in summary["platforms"]["google_ads"]["unmapped"]
    # no secret leaks into what is printed
    for secret in server.SANDBOX_SECRETS.values():
        assert secret not in result.output


def test_a_bad_credential_is_named_not_leaked(config_path: Path) -> None:
    env = config_path.with_name("sandbox.secrets.env")
    env.write_text(env.read_text().replace("pk_sandbox_0123456789", "sk_wrong_kind_of_key"))
    result = CliRunner().invoke(app, ["discover", "--config", str(config_path), "--json"])
    assert result.exit_code == 3
    error = json.loads(result.stdout)["platforms"]["klaviyo"]["error"]
    assert "401" in error and "sk_wrong_kind_of_key" not in result.output


# -- the snippet ---------------------------------------------------------------------------

def _found(platform: Platform, name: str, account: str = "1",
           category: str = "") -> PlatformConversion:
    return PlatformConversion(platform=platform, account_id=account, platform_id=name, name=name,
                              settings={"category": category} if category else {})


def test_the_snippet_has_one_entry_per_business_event_and_pastes(tmp_path: Path) -> None:
    """Two accounts' 'Purchase', GA4's purchase, Klaviyo's 'Placed Order' and Meta's three
    views of its pixel purchase are one purchase; carts likewise; a name the config already
    defines is shown as names to add to it. Pasted into a config without conversions, it is
    valid and maps no platform name twice (issue 13, item 6)."""
    found = [
        _found(Platform.GOOGLE_ADS, "Purchase", "1111111111", "PURCHASE"),
        _found(Platform.GOOGLE_ADS, "Purchase", "2222222222", "PURCHASE"),
        _found(Platform.GA4, "purchase"), _found(Platform.KLAVIYO, "Placed Order"),
        _found(Platform.META, "purchase"), _found(Platform.META, "omni_purchase"),
        _found(Platform.META, "offsite_conversion.fb_pixel_purchase"),
        _found(Platform.GOOGLE_ADS, "Add to cart", category="ADD_TO_CART"),
        _found(Platform.GA4, "add_to_cart"), _found(Platform.KLAVIYO, "Added to Cart"),
        _found(Platform.META, "offsite_conversion.fb_pixel_add_to_cart"),
        _found(Platform.GA4, "generate_lead"),
    ]
    snippet = pipeline.mapping_snippet(found, {"generate_lead"})
    entries = tomllib.loads(snippet)["conversions"]
    by_name = {e["name"]: e for e in entries}
    assert [e["name"] for e in entries] == ["purchase", "add_to_cart"]
    assert by_name["purchase"] == {
        "name": "purchase", "kind": "macro", "google_ads": "Purchase", "ga4": "purchase",
        "klaviyo": "Placed Order",
        "meta": ["purchase", "omni_purchase", "offsite_conversion.fb_pixel_purchase"]}
    assert by_name["add_to_cart"]["klaviyo"] == "Added to Cart"
    assert "# generate_lead is defined already" in snippet and '# ga4 = "generate_lead"' in snippet
    config = tmp_path / "pasted.toml"
    text = EXAMPLE.read_text()
    config.write_text(text[:text.index("[[conversions]]")] + snippet + "\n")
    assert [p for p in check_config(config) if p.severity == "error"] == []


def test_one_platform_name_mapped_by_two_conversions_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "twice.toml"
    config.write_text(EXAMPLE.read_text() + '\n[[conversions]]\nname = "sale"\nkind = "macro"\n'
                      'ga4 = "purchase"\n')
    errors = [p for p in check_config(config) if p.severity == "error"]
    assert [p.key for p in errors] == ["conversions"]
    assert "ga4 'purchase' is mapped by both 'purchase' and 'sale'" in errors[0].message


def test_the_table_at_80_columns_cuts_no_name_and_names_convsyncs_upload_action(
        config_path: Path) -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["discover", "--config",
                                                          str(config_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    assert "…" not in result.output  # a name cut short cannot be copied into the config
    # Meta's long names fold onto a second line, whole
    text = "".join(line.strip() for line in lines)
    assert "offsite_conversion.fb_pixel_complete" in text and "_registration" in text
    upload = next(i for i, line in enumerate(lines) if "convsync micro value" in line)
    assert "convsync's upload" in lines[upload] and "unmapped" not in lines[upload]


def test_a_pull_never_reports_convsyncs_upload_action_unmapped_and_keeps_its_mark(
        config_path: Path) -> None:
    config = load_config(config_path)
    with Store.open(config.store_url()) as store:
        result = pipeline.pull(config, load_secrets(config), store,
                               platforms=[Platform.GOOGLE_ADS])
        stored = {c.name: c for c in store.platform_conversions(Platform.GOOGLE_ADS)}
    upload = stored["convsync micro value (upload)"]
    assert "upload_action_of" in upload.settings  # as discover marks it
    assert "convsync micro value (upload)" not in result.summary()["platforms"][
        "google_ads"]["unmapped"]
