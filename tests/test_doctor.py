"""`convsync doctor` against the sandbox, through the real SDK clients: all well on the sandbox's
own config; each thing the main job would trip on (a missing secret, a wrong account, an upload
action not in the account, an unusable store, a grant without the Data Manager scope, a new
action, refused tokens) named with its fix, exit 2, and the other checks unaffected."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from convsync.cli import app
from convsync.sandbox import datamanager, server
from convsync.sandbox.world import World, WorldSpec
from convsync.store import LATEST_VERSION, Store

CUSTOMER = "1234567890"
QUALIFIED_ACTION = "6108"


def _world(**extra: Any) -> World:
    # a world ending yesterday, as `convsync sandbox serve` makes it
    start = dt.date.today() - dt.timedelta(days=40)
    return World(WorldSpec(seed=21, start=start, days=40, campaigns=6, micro_upload_action=True,
                           **extra))


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    with server.start(_world(), tls_files[0].parent) as sandbox:
        yield sandbox


@pytest.fixture
def config_path(running: server.RunningSandbox, tmp_path: Path) -> Path:
    path = tmp_path / "sandbox.toml"
    server.write_client_config(path, running)
    return path


def _doctor(path: Path) -> tuple[int, dict[str, Any], str]:
    """(exit code, the --json summary, the table as printed at 80 columns)."""
    runner = CliRunner()
    as_json = runner.invoke(app, ["doctor", "--config", str(path), "--json"])
    assert as_json.exception is None or isinstance(as_json.exception, SystemExit), (
        as_json.output)
    table = runner.invoke(app, ["doctor", "--config", str(path)])
    assert table.exit_code == as_json.exit_code
    for secret in server.SANDBOX_SECRETS.values():
        assert secret not in as_json.output and secret not in table.output
    return as_json.exit_code, json.loads(as_json.stdout), table.stdout


def _checks(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in summary["checks"]}


def _problems(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in summary["checks"] if c["status"] == "problem"}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _secrets_file(config: Path) -> Path:
    return config.with_name(config.stem + ".secrets.env")


# -- all well --------------------------------------------------------------------------------

EXPECTED = {
    "secrets", "store", "google_ads credentials", "google_ads account 123-456-7890",
    "google_ads Data Manager", "google_ads upload action 6108", "google_ads upload action 6111",
    "ga4 credentials", "ga4 property 123456789", "meta credentials", "meta access token",
    "meta account act_1029384756", "meta pixel 556677889900", "klaviyo credentials",
    "klaviyo API key", "klaviyo metrics:read", "klaviyo events:read", "klaviyo events:write"}


def test_doctor_on_the_sandbox_exits_0_with_every_check_ok(
        config_path: Path, running: server.RunningSandbox) -> None:
    dm = running.datamanager
    assert dm is not None
    before = dm.summary(with_transactions=False)
    code, summary, table = _doctor(config_path)
    assert code == 0, table
    checks = _checks(summary)
    assert set(checks) == EXPECTED
    assert summary["ok"] is True
    # every check ok, but the one the API cannot answer without writing: said as a note
    assert {n for n, c in checks.items() if c["status"] != "ok"} == {"klaviyo events:write"}
    assert checks["klaviyo events:write"]["status"] == "note"
    assert "not tested" in checks["klaviyo events:write"]["result"]
    assert "UPLOAD_CLICKS, ENABLED, takes uploads" in checks[
        "google_ads upload action 6108"]["result"]
    assert "does not exist yet" in checks["store"]["result"]
    # the Data Manager was asked to validate, once per action a run (_doctor runs twice: the
    # JSON and the table), and kept nothing
    after = dm.summary(with_transactions=False)
    assert after["validate_only_requests"] - before["validate_only_requests"] == 2 * 2
    assert after["ingested_requests"] == before["ingested_requests"]
    assert after["events"] == before["events"]
    # doctor creates nothing: the store is still to be made by the first run
    assert not config_path.with_name("sandbox.db").exists()
    # the table reads at 80 columns and ends with the verdict
    assert max(len(line) for line in table.splitlines()) <= 80
    assert "all well" in table.splitlines()[-1]


def test_an_existing_store_is_opened_written_and_rolled_back(config_path: Path) -> None:
    url = f"sqlite:///{config_path.with_name('sandbox.db')}"
    with Store.open(url) as store:
        versions = store.count_rows("schema_version")
    code, summary, _ = _doctor(config_path)
    assert code == 0
    store_check = _checks(summary)["store"]
    assert store_check["status"] == "ok"
    assert f"schema version {LATEST_VERSION} (current)" in store_check["result"]
    assert "rolled back" in store_check["result"]
    with Store.open(url) as store:  # the probe's write left nothing behind
        assert store.count_rows("schema_version") == versions
    # an older schema is a note (the next run migrates it), a newer one a problem
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM schema_version WHERE version = :v"),
                     {"v": LATEST_VERSION})
    code, summary, _ = _doctor(config_path)
    assert code == 0 and _checks(summary)["store"]["status"] == "note"
    assert "the next run migrates it" in _checks(summary)["store"]["result"]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO schema_version VALUES (:v, '2026-01-01 00:00:00')"),
                     {"v": LATEST_VERSION + 5})
    engine.dispose()
    code, summary, _ = _doctor(config_path)
    assert code == 2
    assert "newer convsync" in _problems(summary)["store"]["result"]


# -- each problem, named with its fix ----------------------------------------------------------

def _missing_secret(path: Path) -> None:
    secrets = _secrets_file(path)
    secrets.write_text("".join(line for line in secrets.read_text().splitlines(keepends=True)
                               if not line.startswith("CONVSYNC_META_ACCESS_TOKEN=")))


def _wrong_account(path: Path) -> None:
    _edit(path, f'customer_ids = ["{CUSTOMER}"]', f'customer_ids = ["{CUSTOMER}", "111-111-1111"]')


def _missing_upload_action(path: Path) -> None:
    _edit(path, f'qualified_lead = "{QUALIFIED_ACTION}"', 'qualified_lead = "424242"')


def _store_is_a_directory(path: Path) -> None:
    folder = path.parent / "stores"
    folder.mkdir()
    _edit(path, 'store_url = "sqlite:///sandbox.db"', f'store_url = "sqlite:///{folder}"')


FAULTS: dict[str, tuple[Callable[[Path], None], str, list[str], list[str]]] = {
    # fault: (how, the check that names it, words of the result, words of the fix)
    "missing secret": (_missing_secret, "meta credentials", ["no access token"],
                       ["set CONVSYNC_META_ACCESS_TOKEN"]),
    "wrong account id": (_wrong_account, "google_ads account 111-111-1111",
                         ["USER_PERMISSION_DENIED"],
                         ["[google_ads] customer_ids", "login_customer_id"]),
    "missing upload action": (_missing_upload_action, "google_ads upload action 424242",
                              ["no conversion action 424242 in account 123-456-7890",
                               "qualified_lead"],
                              ["[google_ads] upload_actions", "Goals > Conversions"]),
    "unreadable store": (_store_is_a_directory, "store", ["is a directory"],
                         ["[client] store_url", "convsync.db"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_problem_is_named_with_its_fix_and_exits_2(config_path: Path, fault: str) -> None:
    make, check, said, fix = FAULTS[fault]
    make(config_path)
    code, summary, table = _doctor(config_path)
    assert code == 2, table
    assert summary["ok"] is False
    problems = _problems(summary)
    assert list(problems) == [check], problems  # that problem alone: the rest is unaffected
    for words in said:
        assert words in problems[check]["result"]
    for words in fix:
        assert words in problems[check]["fix"]
    # the table names it too, and says how many problems there are
    flat = re.sub(r"\s+", " ", table)
    assert "problem:" in flat and "1 problem to fix" in flat


def test_every_problem_at_once_is_named_and_the_other_checks_still_run(
        config_path: Path) -> None:
    for make, *_ in FAULTS.values():
        make(config_path)
    code, summary, _ = _doctor(config_path)
    assert code == 2
    problems = _problems(summary)
    assert set(problems) == {check for _, check, _, _ in FAULTS.values()}
    checks = _checks(summary)
    # what depends on the missing token is skipped, pointing at it; the rest still ran
    assert checks["meta account act_1029384756"]["status"] == "skipped"
    assert "meta credentials" in checks["meta account act_1029384756"]["result"]
    for still in ("google_ads account 123-456-7890", "google_ads Data Manager",
                  "google_ads upload action 6111", "ga4 property 123456789",
                  "klaviyo events:read"):
        assert checks[still]["status"] == "ok", checks[still]


def test_a_grant_without_the_datamanager_scope_is_the_data_managers_problem(
        config_path: Path) -> None:
    _edit(_secrets_file(config_path), server.SANDBOX_SECRETS["CONVSYNC_GOOGLE_ACCESS_TOKEN"],
          datamanager.NO_SCOPE_TOKEN)
    code, summary, _ = _doctor(config_path)
    assert code == 2
    problems = _problems(summary)
    assert list(problems) == ["google_ads Data Manager"]
    assert "ACCESS_TOKEN_SCOPE_INSUFFICIENT" in problems["google_ads Data Manager"]["result"]
    assert "datamanager" in problems["google_ads Data Manager"]["fix"]
    assert "CONVSYNC_GOOGLE_REFRESH_TOKEN" in problems["google_ads Data Manager"]["fix"]
    action = _checks(summary)["google_ads upload action 6108"]
    assert action["status"] == "ok" and "was not asked" in action["result"]


def test_a_new_action_and_an_action_of_another_type_are_refused_with_the_fix(
        tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    world = _world()
    with server.start(world, tls_files[0].parent) as sandbox:
        path = tmp_path / "sandbox.toml"
        server.write_client_config(path, sandbox)
        new = world.add_google_ads_action("convsync new upload action")  # created now
        website = next(a for a in world.google_ads_actions if a.type != "UPLOAD_CLICKS")
        _edit(path, f'qualified_lead = "{QUALIFIED_ACTION}"',
              f'qualified_lead = "{new.id}", purchase = "{website.id}"')
        code, summary, _ = _doctor(path)
        assert code == 2
        problems = _problems(summary)
        assert set(problems) == {f"google_ads upload action {new.id}",
                                 f"google_ads upload action {website.id}"}
        recent = problems[f"google_ads upload action {new.id}"]
        assert "created under 6 hours ago" in recent["result"]
        assert "wait 6 hours" in recent["fix"]
        wrong = problems[f"google_ads upload action {website.id}"]
        assert f"of type {website.type}, not UPLOAD_CLICKS" in wrong["result"]
        assert "Import" in wrong["fix"] and "upload_actions" in wrong["fix"]
        # once 6 hours have passed, the new action takes uploads
        world.set_action_created(new.id, world.as_of - dt.timedelta(hours=7))
        code, summary, _ = _doctor(path)
        assert list(_problems(summary)) == [f"google_ads upload action {website.id}"]
        assert _checks(summary)[f"google_ads upload action {new.id}"]["status"] == "ok"


def test_refused_tokens_and_keys_are_named_once_with_their_fix(config_path: Path) -> None:
    secrets = _secrets_file(config_path)
    _edit(secrets, server.SANDBOX_SECRETS["CONVSYNC_META_ACCESS_TOKEN"], "expired")
    _edit(secrets, server.SANDBOX_SECRETS["CONVSYNC_KLAVIYO_API_KEY"], "sk_wrong_kind_of_key")
    code, summary, table = _doctor(config_path)
    assert code == 2
    problems = _problems(summary)
    assert set(problems) == {"meta access token", "klaviyo API key"}
    assert "190" in problems["meta access token"]["result"]
    assert "CONVSYNC_META_ACCESS_TOKEN" in problems["meta access token"]["fix"]
    assert "401" in problems["klaviyo API key"]["result"]
    assert "CONVSYNC_KLAVIYO_API_KEY" in problems["klaviyo API key"]["fix"]
    checks = _checks(summary)
    for dependent in ("meta account act_1029384756", "meta pixel 556677889900",
                      "klaviyo metrics:read", "klaviyo events:read"):
        assert checks[dependent]["status"] == "skipped", checks[dependent]
    assert "sk_wrong_kind_of_key" not in table and "sk_wrong_kind_of_key" not in json.dumps(
        summary)


def test_a_klaviyo_key_without_accounts_read_is_a_note(config_path: Path) -> None:
    from convsync.sandbox.klaviyo import NO_ACCOUNTS_READ

    key = server.SANDBOX_SECRETS["CONVSYNC_KLAVIYO_API_KEY"]
    _edit(_secrets_file(config_path), key, key + NO_ACCOUNTS_READ)
    code, summary, _ = _doctor(config_path)
    assert code == 0
    key_check = _checks(summary)["klaviyo API key"]
    assert key_check["status"] == "note" and "accounts:read" in key_check["fix"]


def test_a_secrets_file_that_is_gone_is_a_problem_and_every_platform_says_what_it_lacks(
        config_path: Path) -> None:
    _secrets_file(config_path).unlink()
    code, summary, _ = _doctor(config_path)
    assert code == 2
    problems = _problems(summary)
    assert "does not exist" in problems["secrets"]["result"]
    assert {"google_ads credentials", "ga4 credentials", "meta credentials",
            "klaviyo credentials"} <= set(problems)
    assert _checks(summary)["store"]["status"] == "ok"
