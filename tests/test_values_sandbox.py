"""`convsync values` on the sandbox, end to end: a backfill through the real SDKs, then the
command as a user runs it, judged against the world's truth (nobody buys without viewing a
product, adding it to the cart and beginning the checkout; signing up predicts nothing)."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from convsync.cli import app
from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec
from convsync.settings import load_config
from convsync.store import Store, micro_values

TODAY = dt.date(2026, 10, 31)
LADDER = ("product_view", "add_to_cart", "begin_checkout")
runner = CliRunner()


@pytest.fixture(scope="module")
def backfilled(tls_files: tuple[Path, Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A client whose store holds the last 90 days of a 150-day world's Klaviyo journeys."""
    spec = WorldSpec(seed=7, start=TODAY - dt.timedelta(days=149), days=150, campaigns=6,
                     as_of=dt.datetime(2026, 11, 1, 4, tzinfo=dt.UTC))
    path = tmp_path_factory.mktemp("values") / "client.toml"
    with server.start(World(spec), tls_files[0].parent) as running:
        server.write_client_config(path, running)
        since = TODAY - dt.timedelta(days=89)
        result = runner.invoke(app, ["backfill", "--config", str(path), "--since", str(since),
                                     "--until", str(TODAY), "--platform", "klaviyo", "--json"])
        assert result.exit_code == 0, result.output
        yield path


def _values(path: Path, *extra: str) -> dict[str, object]:
    result = runner.invoke(app, ["values", "--config", str(path), "--as-of", str(TODAY),
                                 "--json", *extra])
    assert result.exit_code == 0, result.output
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def test_a_90_day_backfill_tracks_the_ladder_and_drops_the_signup(backfilled: Path) -> None:
    summary = _values(backfilled)
    rows = {r["conversion"]: r for r in summary["values"]  # type: ignore[attr-defined]
            if r["segment"] == "*"}
    for step in LADDER:
        assert rows[step]["recommendation"] == "track_and_upload", rows[step]["reason"]
        assert rows[step]["lift"] > 1 and rows[step]["lift_interval"][0] > 1
        assert rows[step]["upload_value"] > 0
    assert rows["newsletter_signup"]["recommendation"] != "track_and_upload"
    assert rows["newsletter_signup"]["upload_value"] is None
    # the uploads along the ladder credit each sale once: they add up to what the people
    # who entered the ladder are expected to buy, where the expected values count it 3 times
    entry = rows["product_view"]["volume"] * rows["product_view"]["estimate"]
    uploaded = sum(rows[s]["volume"] * rows[s]["upload_value"] for s in LADDER)
    expected = sum(rows[s]["volume"] * rows[s]["estimate"] for s in LADDER)
    assert uploaded == pytest.approx(entry, rel=0.02)
    assert expected > 2 * entry
    assert summary["history_days"] == pytest.approx(90.0, abs=0.1)
    assert 0 < summary["burn_in_days"] < 28  # type: ignore[operator]


def _stored_upload_values(path: Path) -> dict[tuple[str, str], float | None]:
    with Store.open(load_config(path).store_url()) as store, store.engine.connect() as db:
        return {(r.conversion, r.segment): r.value for r in db.execute(
            sa.select(micro_values.c.conversion, micro_values.c.segment, micro_values.c.value))}


def test_a_run_stores_its_upload_values_and_a_replay_stores_nothing(backfilled: Path) -> None:
    assert _stored_upload_values(backfilled) == {}  # the replays above kept nothing
    result = runner.invoke(app, ["values", "--config", str(backfilled), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["values"]
    assert _stored_upload_values(backfilled) == {
        (r["conversion"], r["segment"]): r["upload_value"] for r in rows}
    future = runner.invoke(app, ["values", "--config", str(backfilled), "--as-of",
                                 "2999-01-01"])
    assert future.exit_code == 2 and "is in the future" in future.output


def test_as_of_is_the_end_of_the_day_in_the_clients_time_zone(backfilled: Path) -> None:
    summary = _values(backfilled)
    assert summary["as_of"] == "2026-11-01T04:00:00+00:00"  # midnight in New York (EDT)


def test_the_table_reads_at_80_columns_and_says_what_it_rests_on(backfilled: Path) -> None:
    result = runner.invoke(app, ["values", "--config", str(backfilled), "--as-of", str(TODAY)],
                           env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    table = [line for line in lines if line.split()[:1] and line.split()[0] in
             (*LADDER, "newsletter_signup")]
    assert [line.split()[0] for line in table] == [*LADDER, "newsletter_signup"]
    assert all(" upload [" in line for line in table[:3]) and " drop [" in table[3]
    text = result.stdout
    assert "History: 2026-08-03 .. 2026-10-31, 90.0 days of journeys (klaviyo " in text
    assert "burn-in" in text and "Horizon 28 days" in text
    assert "who did not" in text  # each reason gives the comparison's group sizes
    assert "lead_form" in text  # mapped, no journeys: said, not silently missing


def test_a_short_history_says_what_to_backfill(backfilled: Path) -> None:
    result = runner.invoke(app, ["values", "--config", str(backfilled), "--as-of",
                                 "2026-08-31"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "History too short for sound comparisons: 29.0 days" in result.stdout
    assert "no one can be compared yet" in result.stdout
    assert re.search(rf"\n  convsync backfill --config {re.escape(str(backfilled))} --since "
                     r"2026-06-\d\d\n", result.stdout)
    assert "no evidence" in result.stdout and " drop " not in result.stdout
