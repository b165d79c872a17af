"""The CRM file source: row validation, hashing on arrival, idempotent and crash-safe imports.

Expected hashes are literals checked by hand against the platforms' published examples: Meta's
customer information parameters page gives the SHA-256 of ``john_smith@gmail.com`` and of
``16505551212``; Google's Data Manager "Format user data" page gives the normalized forms
(``cloudysanfrancisco@gmail.com``, ``user.name+nyc@example.com``, ``+18005550100``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from convsync import hashing
from convsync.model import ConversionDefinition, ConversionMap, JourneyEvent, Kind, PlatformNames
from convsync.settings import load_config
from convsync.sources import crm
from convsync.store import Store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "crm-example.csv"
JANE_GOOGLE = "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69"  # janedoe@
JANE_META = "de8875562f7248a5bbc99b26d972c36201f6836c397f86c9357609bf61039694"  # jane.doe+crm@
PHONE_GOOGLE = "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"  # +16505551212
PHONE_META = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"  # 16505551212
MAPPING = ConversionMap([
    ConversionDefinition(name="qualified_lead", kind=Kind.MACRO,
                         names=PlatformNames(crm=("lead_qualified",))),
    ConversionDefinition(name="deal_won", kind=Kind.MACRO, names=PlatformNames(crm=("deal_won",))),
])
HEADER = "event,time,value,currency,lead_id,email,phone,gclid"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as opened:
        yield opened


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stored(store: Store) -> list[JourneyEvent]:
    return sorted(store.journey_events(), key=lambda e: e.source_event_id)


def many_rows(count: int, bad_every: int = 0) -> list[str]:
    """A CSV with ``count`` outcomes of distinct leads; every ``bad_every``-th has no time."""
    lines = [HEADER]
    for i in range(count):
        time = "" if bad_every and i % bad_every == bad_every - 1 else (
            f"2026-10-{1 + i % 28:02d}T{i % 24:02d}:00:00-04:00")
        lines.append(f"deal_won,{time},{10 + i},EUR,L-{i},p{i}@example.com,,")
    return lines


# -- hashing: the platforms' published rules and examples --------------------------------------

@pytest.mark.parametrize(("raw", "normalized", "digest"), [
    ("cloudy.sanfrancisco+shopping@gmail.com", "cloudysanfrancisco@gmail.com",
     "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"),
    ("user.name+NYC@Example.com", "user.name+nyc@example.com",
     "f109a2a632fbcea5fc82049f50beed3d8621bf9034399f437fb622222acccdac"),
    (" Jane.Doe+crm@GoogleMail.com ", "janedoe@googlemail.com", None),
    ("\tUser@Example.COM\n", "user@example.com", None),
    ("John_Smith@gmail.com", "john_smith@gmail.com",
     "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"),
])
def test_google_email_rule_matches_data_manager_examples(raw: str, normalized: str,
                                                         digest: str | None) -> None:
    assert hashing.normalize_email_google(raw) == normalized
    assert hashing.hash_email(raw)[0] == hashing.sha256_hex(normalized)
    if digest:
        assert hashing.hash_email(raw)[0] == digest


def test_meta_rules_match_published_hashes() -> None:
    assert hashing.normalize_email_meta(" Jane.Doe+CRM@gmail.com ") == "jane.doe+crm@gmail.com"
    assert hashing.hash_email("John_Smith@gmail.com")[1] == (
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f")
    assert hashing.hash_email("Jane.Doe+crm@gmail.com") == (JANE_GOOGLE, JANE_META)
    assert hashing.hash_email("janedoe@gmail.com") == (JANE_GOOGLE, JANE_GOOGLE)
    assert hashing.hash_phone("+1 (650) 555-1212") == (PHONE_GOOGLE, PHONE_META)


@pytest.mark.parametrize(("raw", "e164"), [
    ("+1 (800) 555-0100", "+18005550100"), ("0044 844 412 4653", "+448444124653"),
    (" +33 6.12.34.56.78 ", "+33612345678"),
])
def test_phone_normalized_to_e164(raw: str, e164: str) -> None:
    assert hashing.normalize_phone(raw) == e164


@pytest.mark.parametrize("raw", ["(650) 555-1212", "+1 650 555 12x2", "+0 123 4567", "+12"])
def test_phone_refused_without_repeating_it(raw: str) -> None:
    with pytest.raises(ValueError) as caught:
        hashing.normalize_phone(raw)
    assert raw.strip() not in str(caught.value)


# -- reading: good rows load, bad rows are reported by line -------------------------------------

def test_example_file_loads_good_rows_and_reports_bad_ones() -> None:
    config = load_config(ROOT / "config" / "example.toml")
    events, report = crm.read_file(EXAMPLE, ConversionMap(config.definitions()),
                                   default_currency=config.client.currency)
    loaded = list(events)

    assert (report.rows, report.events, report.error_count) == (8, 6, 2)
    assert [e.line for e in report.errors] == [6, 7]
    assert "value" in report.errors[0].reason and "number" in report.errors[0].reason
    assert report.errors[1].reason.startswith("email: not an email address")
    assert "not-an-email" not in str(report.summary())
    assert report.ignored_columns == {"notes"}
    assert [c.name for c in report.unmapped_conversions()] == ["deal_won", "demo_booked"]

    jane = loaded[0]
    assert jane.identifiers.email_sha256_google == JANE_GOOGLE
    assert jane.identifiers.email_sha256_meta == JANE_META
    assert jane.identifiers.gclid == "Cj0KCQiAexample1001"
    assert jane.identifiers.external_id == "L-1001"
    assert jane.person_key == f"email:{JANE_GOOGLE}"
    assert (jane.conversion, jane.platform_conversion) == ("qualified_lead", "lead_qualified")
    assert jane.time == dt.datetime(2026, 11, 2, 14, 15, tzinfo=dt.UTC)
    deal = loaded[1]
    assert (deal.conversion, deal.value, deal.currency) == (None, 1250.0, "USD")
    by_phone = [e for e in loaded if e.identifiers.phone_sha256_google]
    assert [e.identifiers.phone_sha256_google for e in by_phone] == [PHONE_GOOGLE, PHONE_GOOGLE]
    assert all(e.identifiers.phone_sha256_meta == PHONE_META for e in by_phone)
    assert {e.person_key for e in by_phone} == {f"phone:{PHONE_GOOGLE}"}
    assert by_phone[1].currency == "USD" and by_phone[1].value == 890.0  # "usd" in the file
    assert loaded[-1].identifiers.gbraid == "0AAAAAexampleGbraid"
    assert loaded[-1].person_key == "gbraid:0AAAAAexampleGbraid"


def test_good_rows_stored_and_no_email_or_phone_in_clear(store: Store, tmp_path: Path) -> None:
    report = crm.import_file(store, EXAMPLE, MAPPING, default_currency="USD")

    events = stored(store)
    assert len(events) == report.events == 6
    assert {e.conversion for e in events} == {"qualified_lead", "deal_won", None}
    store.close()
    database = (tmp_path / "store.db").read_bytes().lower()
    for clear in (b"jane.doe", b"janedoe", b"pat.lee", b"555-1212", b"5551212", b"sam@"):
        assert clear not in database


@pytest.mark.parametrize(("row", "reason"), [
    ("lead_qualified,2026-11-02T09:15:00Z,,,,,,", "no identifier"),
    ("deal_won,2026-11-02T09:15:00Z,-5,USD,L-1,,,", "value: Input should be greater than"),
    ("deal_won,2026-11-02T09:15:00Z,5,US$,L-1,,,", "currency: 'US$' is not a three-letter"),
    ("deal_won,2026-11-02T09:15:00Z,5,,L-1,,,", "currency: missing, and the row has a value"),
    ("deal_won,2026-11-02T09:15:00Z,nan,USD,L-1,,,", "value: Input should be a finite number"),
    (",2026-11-02T09:15:00Z,,,L-1,,,", "event: missing"),
    ("lead_qualified,2026-11-02,,,L-1,,,", "time: '2026-11-02' is a date without a time"),
    ("lead_qualified,02/11/2026 09:15,,,L-1,,,", "time: '02/11/2026 09:15' is not an ISO 8601"),
    ("lead_qualified,2026-11-02 09:15,,,L-1,,,", "time: '2026-11-02 09:15' has no UTC offset"),
    ("lead_qualified,2026-11-02T09:15:00Z,,,,,650 555 1212,", "phone: phone number has no "
                                                              "country code"),
    ("lead_qualified,2026-11-02T09:15:00Z,,,L-1,,,,surplus", "9 fields where the header has 8"),
    ("lead_qualified,2026-11-02T09:15:00Z", "2 fields where the header has 8"),
])
def test_bad_row_reported_with_line_and_reason(tmp_path: Path, row: str, reason: str) -> None:
    good = "lead_qualified,2026-11-01T10:00:00Z,,,L-0,,,"
    path = write(tmp_path / "leads.csv", [HEADER, good, "", row, good.replace("L-0", "L-9")])
    events, report = crm.read_file(path, MAPPING)

    assert [e.identifiers.external_id for e in events] == ["L-0", "L-9"]
    assert len(report.errors) == 1
    assert report.errors[0].line == 4
    assert report.errors[0].reason.startswith(reason), report.errors[0].reason


@pytest.mark.parametrize(("row", "reason"), [
    ("lead_qualified,2026-11-02T09:15:00Z,,,jane.doe@gmail.com,,,", "external_id: contains '@'"),
    ("lead_qualified,2026-11-02T09:15:00Z,,,,,,Cj0K@x", "gclid: contains '@'"),
    ("lead_qualified,9999-12-31T23:00:00-05:00,,,L-1,,,", "time: '9999-12-31T23:00:00-05:00' "
                                                           "is out of range"),
    ("lead_qualified,0001-01-01T00:00:00+05:00,,,L-1,,,", "time: '0001-01-01T00:00:00+05:00' "
                                                           "is out of range"),
    ("lead_qualified,1970-01-01T00:00:00Z,,,L-1,,,", "time: '1970-01-01T00:00:00Z' is before"),
    ("lead_qualified,2099-01-01T00:00:00Z,,,L-1,,,", "time: '2099-01-01T00:00:00Z' is before "
                                                      "2000 or in the future"),
    ("deal_won,2026-11-02T09:15:00Z,1e308,USD,L-1,,,", "value: Input should be less than"),
    ("lead_qualified,2026-11-02T09:15:00Z,,,L-" + "9" * 200_000 + ",,,",
     "external_id: longer than 4,096 characters"),
])
def test_absurd_values_and_ids_holding_an_address_are_one_bad_row_each(
        tmp_path: Path, store: Store, row: str, reason: str) -> None:
    """Each is one bad row named by line, the rows around it stored, the value never echoed
    (issue 13, item 9): they used to abort the file with a traceback."""
    good = "lead_qualified,2026-11-01T10:00:00Z,,,L-0,,,"
    path = write(tmp_path / "leads.csv", [HEADER, good, row, good.replace("L-0", "L-9")])
    report = crm.import_file(store, path, MAPPING)
    assert sorted(e.identifiers.external_id or "" for e in stored(store)) == ["L-0", "L-9"]
    assert [(e.line, e.reason.split(":")[0]) for e in report.errors] == [
        (3, reason.split(":")[0])]
    assert report.errors[0].reason.startswith(reason), report.errors[0].reason
    assert "jane.doe" not in report.errors[0].reason and "999999" not in report.errors[0].reason


def test_a_late_bad_byte_refuses_the_file_before_anything_is_stored(
        tmp_path: Path, store: Store) -> None:
    """A latin-1 byte at row 12,001: the file is refused naming its line, and no row of it is
    in the store (it used to be refused after 10,000 were stored; issue 13, item 9)."""
    path = tmp_path / "leads.csv"
    good = [f"lead_qualified,2026-11-01T10:00:00Z,,,L-{i},,," for i in range(12_000)]
    late = "\nlead_qualified,2026-11-01T10:00:00Z,,,Ren\xe9,,,\n".encode("latin-1")
    path.write_bytes("\n".join([HEADER, *good]).encode() + late)
    with pytest.raises(crm.CrmFileError, match=r"line 12002 is not UTF-8.*nothing was stored"):
        crm.import_file(store, path, MAPPING)
    assert stored(store) == []


def test_multiline_csv_record_reported_at_its_first_line(tmp_path: Path) -> None:
    path = write(tmp_path / "leads.csv", [
        "event,time,lead_id,notes", 'lead_qualified,2026-11-01T10:00:00Z,L-1,"two', 'lines"',
        "lead_qualified,yesterday,L-2,"])
    events, report = crm.read_file(path, MAPPING)
    assert [e.identifiers.external_id for e in events] == ["L-1"]
    assert [e.line for e in report.errors] == [4]


def test_naive_times_need_a_configured_zone(tmp_path: Path) -> None:
    path = write(tmp_path / "leads.jsonl", [
        json.dumps({"event": "lead_qualified", "time": "2026-07-01 12:00", "lead_id": 1}),
        json.dumps({"event": "lead_qualified", "time": "2026-12-01T12:00:00", "lead_id": 2}),
        json.dumps({"event": "lead_qualified", "time": "2026-11-01T01:30", "lead_id": 3}),
        json.dumps({"event": "lead_qualified", "time": "2026-12-01T12:00:00+01:00", "lead_id": 4}),
    ])
    events, report = crm.read_file(path, MAPPING)
    assert [e.identifiers.external_id for e in events] == ["4"]
    assert [e.line for e in report.errors] == [1, 2, 3]
    assert all("has no UTC offset" in e.reason for e in report.errors)

    events, report = crm.read_file(path, MAPPING, "America/New_York")
    times = [e.time for e in events]
    assert report.error_count == 0
    assert times == [dt.datetime(2026, 7, 1, 16, 0, tzinfo=dt.UTC),  # EDT, -04:00
                     dt.datetime(2026, 12, 1, 17, 0, tzinfo=dt.UTC),  # EST, -05:00
                     dt.datetime(2026, 11, 1, 5, 30, tzinfo=dt.UTC),  # repeated hour: first
                     dt.datetime(2026, 12, 1, 11, 0, tzinfo=dt.UTC)]  # own offset wins


def test_unknown_time_zone_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        crm.read_file(EXAMPLE, MAPPING, "Mars/Olympus")


def test_jsonl_rows_checked_one_by_one(tmp_path: Path) -> None:
    path = write(tmp_path / "leads.ndjson", [
        json.dumps({"Event Name": "deal_won", "Timestamp": "2026-11-02T09:15:00Z",
                    "Conversion-Value": 12.5, "Currency": "eur", "Email": "A.B@gmail.com",
                    "Owner": "kim"}),
        "{not json",
        "[1, 2]",
        json.dumps({"event": "deal_won", "time": "2026-11-02T09:15:00Z", "lead_id": "L-1",
                    "external_id": "L-1"}),
        json.dumps({"event": "deal_won", "time": 1762074900, "lead_id": "L-2"}),
        json.dumps({"event": "deal_won", "time": "2026-11-02T09:15:00Z", "email": ["x@y.z"]}),
    ])
    events, report = crm.read_file(path, MAPPING)
    loaded = list(events)

    assert len(loaded) == 1
    assert (loaded[0].value, loaded[0].currency, loaded[0].conversion) == (12.5, "EUR",
                                                                          "deal_won")
    assert loaded[0].identifiers.email_sha256_google == hashing.sha256_hex("ab@gmail.com")
    assert report.ignored_columns == {"Owner"}
    assert [(e.line, e.reason.split(":")[0]) for e in report.errors] == [
        (2, "not valid JSON"), (3, "not a JSON object"), (4, "two fields mean 'external_id'"),
        (5, "time"), (6, "email")]


@pytest.mark.parametrize(("name", "lines", "message"), [
    ("leads.csv", ["event,lead_id", "x,1"], "missing column(s) time"),
    ("leads.csv", ["event,time,notes", "x,2026-11-01T00:00:00Z,"], "no identifier column"),
    ("leads.csv", ["event,time,lead_id,External ID"], "two columns mean 'external_id'"),
    ("leads.csv", [], "empty file"),
    ("leads.xlsx", [HEADER], "unknown file type '.xlsx'"),
])
def test_unreadable_file_raises_with_what_to_fix(tmp_path: Path, name: str, lines: list[str],
                                                 message: str) -> None:
    path = tmp_path / name
    path.write_text("\n".join(lines), encoding="utf-8")
    events, _report = crm.read_file(path, MAPPING)
    with pytest.raises(crm.CrmFileError) as caught:
        list(events)
    assert message in str(caught.value)


def test_not_utf8_refused(tmp_path: Path) -> None:
    path = tmp_path / "leads.csv"
    path.write_bytes(b"event,time,email\nlead_qualified,2026-11-01T00:00:00Z,j\xe9@x.fr\n")
    with pytest.raises(crm.CrmFileError, match="not UTF-8"):
        list(crm.read_file(path, MAPPING)[0])


def test_file_is_streamed_not_loaded(tmp_path: Path) -> None:
    path = write(tmp_path / "big.csv", many_rows(5000))
    events, report = crm.read_file(path, MAPPING)
    assert report.rows == 0
    next(events)
    assert report.rows == 1


def test_only_the_first_errors_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crm, "MAX_KEPT_ERRORS", 3)
    path = write(tmp_path / "bad.csv", many_rows(20, bad_every=2))
    events, report = crm.read_file(path, MAPPING)
    assert sum(1 for _ in events) == 10
    assert report.error_count == 10
    assert [e.line for e in report.errors] == [3, 5, 7]


# -- keys: a re-import never doubles -------------------------------------------------------------

def test_reimport_adds_no_duplicates_and_takes_corrections(store: Store, tmp_path: Path) -> None:
    crm.import_file(store, EXAMPLE, MAPPING, default_currency="USD")
    first = stored(store)
    crm.import_file(store, EXAMPLE, MAPPING, default_currency="USD")
    assert stored(store) == first

    corrected = tmp_path / "export.csv"
    corrected.write_text(EXAMPLE.read_text().replace(",1250.00,USD,", ",1300.00,USD,"))
    crm.import_file(store, corrected, MAPPING, default_currency="USD")
    before = {e.source_event_id: e for e in first}
    after = {e.source_event_id: e for e in stored(store)}
    assert after.keys() == before.keys()
    changed = [key for key in after if after[key] != before[key]]
    assert [(before[k].value, after[k].value) for k in changed] == [(1250.0, 1300.0)]


def test_rows_without_lead_id_keyed_by_content_whatever_the_format(tmp_path: Path) -> None:
    rows = [{"event": "deal_won", "time": "2026-11-02T10:15:00+01:00", "value": "99.5",
             "currency": "USD", "email": "A.B+x@gmail.com", "gclid": "G-1"},
            {"event": "deal_won", "time": "2026-11-02T10:15:00+01:00", "value": "99.6",
             "currency": "USD", "email": "A.B+x@gmail.com", "gclid": "G-1"}]
    csv_path = write(tmp_path / "a.csv", ["gclid,email,currency,value,time,event"] + [
        ",".join(r[c] for c in ("gclid", "email", "currency", "value", "time", "event"))
        for r in rows])
    jsonl_path = write(tmp_path / "b.jsonl", [
        json.dumps({**r, "time": "2026-11-02T09:15:00Z", "value": float(r["value"])})
        for r in rows])

    from_csv = list(crm.read_file(csv_path, MAPPING)[0])
    from_jsonl = list(crm.read_file(jsonl_path, MAPPING)[0])
    assert from_csv == from_jsonl
    assert len({e.source_event_id for e in from_csv}) == 2  # another value: another outcome


def test_event_id_column_is_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "deals.csv", [
        "event_id,event,time,value,currency,lead_id",
        "D-7,deal_won,2026-11-02T09:15:00Z,10,USD,L-1",
        "D-7,deal_won,2026-11-03T09:15:00Z,12,USD,L-1"])
    events = list(crm.read_file(path, MAPPING)[0])
    assert [e.source_event_id for e in events] == ["D-7", "D-7"]
    assert events[0].person_key == "external_id:L-1"


def test_an_event_id_coming_back_at_another_time_moves_its_event(store: Store,
                                                                  tmp_path: Path) -> None:
    """The CRM's own id is the event: a corrected time moves it (in one file or the next)."""
    header = "event_id,event,time,value,currency,lead_id"
    first = write(tmp_path / "first.csv", [header, "D-7,deal_won,2026-11-02T09:15:00Z,10,USD,L-1",
                                           "D-7,deal_won,2026-11-03T09:15:00Z,12,USD,L-1"])
    crm.import_file(store, first, MAPPING)
    assert [(e.time.day, e.value) for e in stored(store)] == [(3, 12.0)]
    later = write(tmp_path / "later.csv", [header, "D-7,deal_won,2026-11-04T09:15:00Z,12,USD,L-1"])
    crm.import_file(store, later, MAPPING)
    assert [(e.time.day, e.value) for e in stored(store)] == [(4, 12.0)]


# -- a crash half-way, then the same import again ----------------------------------------------

def test_import_killed_half_way_then_rerun_equals_a_clean_import(tmp_path: Path) -> None:
    path = write(tmp_path / "deals.csv", many_rows(60, bad_every=7))
    with Store.open(f"sqlite:///{tmp_path / 'clean.db'}") as clean:
        report = crm.import_file(clean, path, MAPPING)
        expected = stored(clean)
    assert len(expected) == report.events == 52

    def crash_after(events: Iterator[JourneyEvent], count: int) -> Iterator[JourneyEvent]:
        for i, event in enumerate(events):
            if i == count:
                raise RuntimeError("killed")
            yield event

    with Store.open(f"sqlite:///{tmp_path / 'crashed.db'}") as store:
        events, _report = crm.read_file(path, MAPPING)
        with pytest.raises(RuntimeError, match="killed"):
            store.upsert_journey_events(crash_after(events, 30), batch_size=8)
        partial = stored(store)
        assert len(partial) == 24  # three whole batches, nothing of the fourth
        assert all(e in expected for e in partial)

        crm.import_file(store, path, MAPPING)
        assert stored(store) == expected


def test_import_sigkilled_half_way_then_rerun_equals_a_clean_import(tmp_path: Path) -> None:
    path = write(tmp_path / "deals.csv", many_rows(40))
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    child = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from convsync.model import ConversionMap
        from convsync.sources import crm
        from convsync.store import Store

        def die_after(events, count):
            for i, event in enumerate(events):
                if i == count:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield event

        with Store.open({url!r}) as store:
            events, _ = crm.read_file(Path({str(path)!r}), ConversionMap([]))
            store.upsert_journey_events(die_after(events, 25), batch_size=10)
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()

    with Store.open(url) as store:
        assert len(stored(store)) == 20
        crm.import_file(store, path, MAPPING)
        after_rerun = stored(store)
    with Store.open(f"sqlite:///{tmp_path / 'clean.db'}") as clean:
        crm.import_file(clean, path, MAPPING)
        assert after_rerun == stored(clean)
