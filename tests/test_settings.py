"""Config files: the example is valid, and each kind of mistake is named with its key."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from convsync.model import Kind, Platform
from convsync.settings import ConfigError, Secrets, check_config, load_config, load_secrets

EXAMPLE = Path(__file__).parents[1] / "config" / "example.toml"
NO_SECRETS = Secrets(_env_file=None)  # type: ignore[call-arg]


def variant(tmp_path: Path, old: str, new: str) -> Path:
    text = EXAMPLE.read_text()
    assert old in text, f"example.toml no longer contains {old!r}"
    path = tmp_path / "client.toml"
    path.write_text(text.replace(old, new, 1))
    return path


def errors(path: Path, secrets: Secrets = NO_SECRETS) -> dict[str, str]:
    return {p.key: p.message for p in check_config(path, secrets) if p.severity == "error"}


def test_example_is_valid_and_complete() -> None:
    config = load_config(EXAMPLE)
    assert errors(EXAMPLE) == {}
    assert config.client.timezone == "America/New_York"
    assert config.google_ads is not None and config.google_ads.customer_ids == ["1234567890"]
    assert config.google_ads.login_customer_id == "9876543210"
    assert config.meta is not None and config.meta.ad_account_ids == ["act_1029384756"]
    assert config.enabled_platforms() == [Platform.GOOGLE_ADS, Platform.GA4, Platform.META,
                                          Platform.KLAVIYO]
    purchase = next(d for d in config.definitions() if d.name == "purchase")
    assert purchase.kind is Kind.MACRO and purchase.ladder_position == 4
    assert purchase.names.google_ads == ("Purchase", "GA4 purchase")
    assert purchase.names.ga4 == ("purchase",)
    # a relative SQLite path is relative to the config file, not to the working directory
    assert config.store_url() == f"sqlite:///{EXAMPLE.parent.parent.resolve()}/var/acme-outdoor.db"


def test_every_example_key_is_documented() -> None:
    """Each key in example.toml has a comment line above it (or above its table)."""
    lines = EXAMPLE.read_text().splitlines()
    in_conversions = False
    for i, line in enumerate(lines):
        if line.startswith("[[conversions]]"):
            in_conversions = True
        key = re.match(r"^([a-z_]+) = ", line)
        if key and not in_conversions:
            above = lines[i - 1]
            assert above.startswith("#") or lines[i - 2].startswith("#") or above.startswith(
                "[") or re.match(r"^[a-z_]+ = ", above), f"{key.group(1)} is not documented"


def test_bad_time_zone_names_the_key_and_suggests(tmp_path: Path) -> None:
    found = errors(variant(tmp_path, 'timezone = "America/New_York"',
                           'timezone = "America/NewYork"'))
    assert list(found) == ["client.timezone"]
    assert "America/New_York" in found["client.timezone"]


def test_unknown_key_suggests_the_likely_typo(tmp_path: Path) -> None:
    found = errors(variant(tmp_path, "customer_ids =", "customer_id ="))
    assert "google_ads.customer_id" in found
    assert "did you mean 'customer_ids'" in found["google_ads.customer_id"]
    # the now-missing required key is named too
    assert "google_ads.customer_ids" in found


def test_unknown_kind_is_named_with_its_conversion(tmp_path: Path) -> None:
    found = errors(variant(tmp_path, 'kind = "macro"', 'kind = "makro"'))
    (key, message), = found.items()
    assert key == "conversions[3].kind"
    assert "'macro'" in message and "'micro'" in message


def test_conversion_mapped_to_no_platform(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text(EXAMPLE.read_text() + '\n[[conversions]]\nname = "ebook"\nkind = "micro"\n')
    found = errors(path)
    assert list(found) == ["conversions[7] (ebook)"]
    assert "no platform" in found["conversions[7] (ebook)"]


def test_removed_meta_window_says_why(tmp_path: Path) -> None:
    found = errors(variant(tmp_path, '["7d_click", "1d_view"]', '["7d_click", "28d_view"]'))
    message = found["meta.attribution_windows"]
    assert "28d_view" in message and "2026-01-12" in message


def test_missing_secrets_warn_by_default_and_fail_when_required() -> None:
    problems = check_config(EXAMPLE, NO_SECRETS)
    assert {p.key for p in problems if p.severity == "warning"} >= {"google_ads", "meta",
                                                                     "klaviyo", "ga4"}
    strict = check_config(EXAMPLE, NO_SECRETS, require_secrets=True)
    meta = next(p for p in strict if p.key == "meta")
    assert meta.severity == "error" and "CONVSYNC_META_ACCESS_TOKEN" in meta.message


def test_developer_token_is_never_required(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    for name in ("GOOGLE_REFRESH_TOKEN", "GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET"):
        monkeypatch.setenv(f"CONVSYNC_{name}", f"value-of-{name.lower()}")
    monkeypatch.setenv("CONVSYNC_META_ACCESS_TOKEN", "meta-token-123")
    monkeypatch.setenv("CONVSYNC_KLAVIYO_API_KEY", "pk_abc123")
    monkeypatch.delenv("CONVSYNC_GOOGLE_DEVELOPER_TOKEN", raising=False)
    assert [p for p in check_config(EXAMPLE, require_secrets=True)
            if p.key != "client.store_url"] == []  # (a store not made yet is a warning)


def test_an_empty_secret_is_missing_and_the_google_hint_lists_every_way(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable set to nothing is no credential (issue 13, item 7)."""
    for name in ("GOOGLE_REFRESH_TOKEN", "GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET",
                 "GOOGLE_SERVICE_ACCOUNT_FILE", "GOOGLE_ACCESS_TOKEN"):
        monkeypatch.setenv(f"CONVSYNC_{name}", "")
    monkeypatch.setenv("CONVSYNC_META_ACCESS_TOKEN", "")
    monkeypatch.setenv("CONVSYNC_KLAVIYO_API_KEY", "   ")
    errors = {p.key: p.message for p in check_config(EXAMPLE, require_secrets=True)
              if p.severity == "error"}
    assert {"google_ads", "ga4", "meta", "klaviyo"} <= set(errors)
    for variable in ("CONVSYNC_GOOGLE_REFRESH_TOKEN", "CONVSYNC_GOOGLE_CLIENT_ID",
                     "CONVSYNC_GOOGLE_CLIENT_SECRET", "CONVSYNC_GOOGLE_SERVICE_ACCOUNT_FILE",
                     "CONVSYNC_GOOGLE_ACCESS_TOKEN"):
        assert variable in errors["google_ads"]


def test_a_credential_with_a_stray_character_is_a_config_error_not_an_outage(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC answered a non-ASCII token with UNAVAILABLE 'Illegal metadata', retried as an
    outage; it is a credentials error naming the variable, never the value (issue 13, 14)."""
    monkeypatch.setenv("CONVSYNC_GOOGLE_ACCESS_TOKEN", "ya29.t\u00f6k\u00e9n")
    (problem,) = [p for p in check_config(EXAMPLE) if p.severity == "error"]
    assert problem.key == "CONVSYNC_GOOGLE_ACCESS_TOKEN"
    assert "not a credential" in problem.message and "k\u00e9n" not in problem.message
    monkeypatch.setenv("CONVSYNC_GOOGLE_ACCESS_TOKEN", "ya29.a0AfB_byC-ok")
    assert [p for p in check_config(EXAMPLE) if p.severity == "error"] == []


def test_the_store_url_is_checked_without_opening_it(tmp_path: Path) -> None:
    """A URL that cannot be a store is a config error naming client.store_url (issue 13,
    item 7); a good one, even in folders still to make, is none."""
    expected = {
        f"sqlite:///{tmp_path}": "is a directory",
        "nonsense": "not a database URL",
        "mysql://user@host/db": "mysql is not supported",
        "postgresql+asyncpg://user@host/db": "driver is not installed",
        f"sqlite:///{tmp_path / 'new' / 'deeper' / 'c.db'}": "does not exist yet",
        "postgresql+psycopg://user@host/db": "",
    }
    for url, words in expected.items():
        config = tmp_path / "c.toml"
        config.write_text(EXAMPLE.read_text().replace(
            'store_url = "sqlite:///../var/acme-outdoor.db"', f"store_url = {json.dumps(url)}"))
        found = [p for p in check_config(config, NO_SECRETS) if p.key == "client.store_url"]
        severity = "warning" if words == "does not exist yet" else "error"
        if words:  # a new store is made, and said (a typo would start an empty ledger)
            assert len(found) == 1 and found[0].severity == severity and words in found[0].message
        else:
            assert found == []
    assert not (tmp_path / "new").exists()  # checked, never created


def test_secrets_file_is_read_and_missing_one_is_named(tmp_path: Path) -> None:
    secrets_file = tmp_path / "acme.env"
    secrets_file.write_text("CONVSYNC_META_ACCESS_TOKEN=from-file-token\n")
    path = variant(tmp_path, "# secrets_file = ", "secrets_file = ")
    path.write_text(path.read_text().replace('"/etc/convsync/acme.env"', '"acme.env"'))
    secrets = load_secrets(load_config(path))
    assert secrets.meta_access_token is not None
    assert secrets.meta_access_token.get_secret_value() == "from-file-token"
    assert "from-file-token" not in repr(secrets)  # SecretStr hides it
    secrets_file.unlink()
    with pytest.raises(ConfigError) as error:
        load_secrets(load_config(path))
    assert "client.secrets_file" in str(error.value)


def test_a_secrets_file_others_can_read_gets_a_warning(tmp_path: Path) -> None:
    """Issue 13, item 10: a group- or world-readable secrets file is named with its fix."""
    secrets_file = tmp_path / "acme.env"
    secrets_file.write_text("CONVSYNC_META_ACCESS_TOKEN=from-file-token\n")
    path = variant(tmp_path, "# secrets_file = ", "secrets_file = ")
    path.write_text(path.read_text().replace('"/etc/convsync/acme.env"', '"acme.env"'))
    secrets_file.chmod(0o644)
    (warned,) = [p for p in check_config(path) if p.key == "client.secrets_file"]
    assert warned.severity == "warning" and f"chmod 600 {secrets_file}" in warned.message
    secrets_file.chmod(0o600)
    assert [p for p in check_config(path) if p.key == "client.secrets_file"] == []


def test_toml_syntax_error_is_reported(tmp_path: Path) -> None:
    path = variant(tmp_path, 'name = "Acme Outdoor"', 'name = "Acme Outdoor')
    (problem,) = check_config(path, NO_SECRETS)
    assert "not valid TOML" in problem.message and "line" in problem.message


def test_customer_ids_accept_dashes_and_reject_garbage(tmp_path: Path) -> None:
    found = errors(variant(tmp_path, '["123-456-7890"]', '["123-456"]'))
    assert "10 digits" in found["google_ads.customer_ids"]


def test_sandbox_ca_replaces_a_system_roots_path(monkeypatch: pytest.MonkeyPatch,
                                                 tls_files: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    """Machines often set GRPC_DEFAULT_SSL_ROOTS_FILE_PATH to the system bundle already."""
    from convsync import settings

    monkeypatch.setenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setattr(settings, "_trusted_ca", None)
    settings.trust_ca_file(tls_files[0])
    assert os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] == str(tls_files[0])
    other = tmp_path / "other.pem"
    other.write_text("x")
    with pytest.raises(ConfigError, match="already trusts"):
        settings.trust_ca_file(other)


def test_upload_actions_name_conversions_and_action_ids(tmp_path: Path) -> None:
    found = errors(variant(tmp_path, '# upload_actions = { add_to_cart = "7001", ',
                           'upload_actions = { add_to_kart = "7001", '))
    assert list(found) == ["google_ads.upload_actions"]
    assert "'add_to_kart' is no conversion of this config" in found["google_ads.upload_actions"]
    found = errors(variant(tmp_path, '# upload_actions = { add_to_cart = "7001", ',
                           'upload_actions = { add_to_cart = "Add to cart", '))
    assert "must be a conversion action id" in found["google_ads.upload_actions"]


def test_a_conversion_defined_twice_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    text = EXAMPLE.read_text()
    first = text.index("[[conversions]]")
    block = text[first:text.index("[[conversions]]", first + 1)]
    path.write_text(text + "\n" + block)
    found = errors(path)
    assert list(found) == ["conversions"] and "is defined twice" in found["conversions"]


def test_meta_upload_events_are_convsyncs_own_names_for_known_conversions(
        tmp_path: Path) -> None:
    line = '# upload_events = { add_to_cart = "convsync_add_to_cart", '
    standard = errors(variant(tmp_path, line, 'upload_events = { add_to_cart = "AddToCart", '))
    assert list(standard) == ["meta.upload_events"]
    assert "standard event the pixel sends itself" in standard["meta.upload_events"]
    unknown = errors(variant(tmp_path, line, 'upload_events = { add_to_kart = "x", '))
    assert "'add_to_kart' is no conversion of this config" in unknown["meta.upload_events"]
    fine = variant(tmp_path, line, 'upload_events = { add_to_cart = "convsync_add_to_cart", ')
    assert errors(fine) == {}
    fine.write_text(fine.read_text().replace('pixel_id = "556677889900"', ""))
    assert "set meta.pixel_id" in errors(fine)["meta.upload_events"]


def test_klaviyo_upload_metrics_name_known_conversions(tmp_path: Path) -> None:
    found = errors(variant(tmp_path, '# upload_metrics = { add_to_cart = ',
                           'upload_metrics = { add_to_kart = '))
    assert "'add_to_kart' is no conversion of this config" in found["klaviyo.upload_metrics"]
