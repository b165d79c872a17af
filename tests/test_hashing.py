"""Hashing against the platforms' own published examples.

Google, Data Manager API:
- "Format user data" (developers.google.com/data-manager/api/devguides/concepts/formatting):
  ``cloudy.sanfrancisco+shopping@gmail.com`` -> ``cloudysanfrancisco@gmail.com``,
  ``user.name+NYC@Example.com`` -> ``user.name+nyc@example.com``, the US number
  ``(800)555-0100`` -> ``+18005550100``; whitespace trimmed "leading, trailing and
  intermediate" in an email, at the ends of a phone number.
- "Send audience members" (developers.google.com/data-manager/api/devguides/audiences/
  send-audience-members), which formats its sample members by that guide and publishes each
  one's normalized text and hex SHA-256.

Meta, Conversions API, "Customer information parameters" (developers.facebook.com/docs/
marketing-api/conversions-api/parameters/customer-information-parameters): ``em``
``John_Smith@gmail.com`` -> ``john_smith@gmail.com`` -> ``62a14e44...``; ``ph`` the US number
``(650)555-1212`` -> ``16505551212`` -> ``e323ec62...``."""

from __future__ import annotations

import pytest

from convsync.hashing import (
    hash_email,
    hash_phone,
    normalize_email_google,
    normalize_email_meta,
    normalize_phone,
    sha256_hex,
)

GOOGLE_EMAILS = [
    # (as typed, Google's normalized text, its SHA-256 as Google publishes it)
    ("dana@example.com", "dana@example.com",
     "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3"),
    ("DanaM@example.com", "danam@example.com",
     "1df6b43bc68dd38eca94e6a65b4f466ae537b796c81a526918b40ac4a7b906c7"),
    ("ALEXF@example.com", "alexf@example.com",
     "19de0a9906ebee29fe82087be5ec44f3c01e40730bc808b663c71f19dd6b12f2"),
    ("AlexF@cymbalgroup.com", "alexf@cymbalgroup.com",
     "7d2d80e240594dcee2e57f57885ee286c4b232dd142234d7a0af6d31cc86679b"),
    ("alexF@altostrat.com", "alexf@altostrat.com",
     "063c45291827d4994f98357b72862b25885834fd53cf8f0e4af359916fc03c62"),
    ("quinn@CYMBALGROUP.com", "quinn@cymbalgroup.com",
     "05bb62526f091b45d20e243d194766cca8869137421047dc53fa4876d111a6f0"),
    ("baklavainthebalkans@gmail.com", "baklavainthebalkans@gmail.com",
     "f1fcde379f31f4d446b76ee8f34860eca2288adc6b6d6c0fdc56d9eee75a2fa5"),
    ("rosario@example.org", "rosario@example.org",
     "83a834cc5327bc4dee7c5408988040dc5813c7662611cd93b707aff72bf7d33f"),
    ("cloudySanFrancisco@GMAIL.com", "cloudysanfrancisco@gmail.com",
     "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"),
    # the formatting guide's gmail example: the same mailbox, so the same published digest
    ("cloudy.sanfrancisco+shopping@gmail.com", "cloudysanfrancisco@gmail.com",
     "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"),
]
GOOGLE_PHONES = [
    ("+1-800-555-0100", "+18005550100",
     "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"),
    ("+1 800-555-0101", "+18005550101",
     "61d6c2976b5d92b1ad63073a12fddd26040cd980067d03a93dd1cc50f1a3ac68"),
    ("+1 800-555-0102", "+18005550102",
     "c5383c2eeada28210d27f011bc127d4f9562cf38ff0c9bba33dd45ae79b9fe7c"),
    ("+1-800-555-0110", "+18005550110",
     "525c2390a4e2a9766fa8ddc341dd10414603baebefa401f5a5e29f55e176525d"),
]
META_EMAIL = ("John_Smith@gmail.com", "john_smith@gmail.com",
              "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f")
META_PHONE = ("(650)555-1212", "16505551212",
              "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176")


@pytest.mark.parametrize(("typed", "normalized", "digest"), GOOGLE_EMAILS,
                         ids=[e[0] for e in GOOGLE_EMAILS])
def test_google_email_examples(typed: str, normalized: str, digest: str) -> None:
    assert normalize_email_google(typed) == normalized
    assert sha256_hex(normalized) == digest
    assert hash_email(typed)[0] == digest


def test_google_keeps_dots_and_plus_outside_gmail() -> None:
    assert normalize_email_google("user.name+NYC@Example.com") == "user.name+nyc@example.com"
    assert hash_email("user.name+NYC@Example.com")[0] == sha256_hex("user.name+nyc@example.com")
    # googlemail.com is gmail too, and keeps its own domain
    assert normalize_email_google("Cloudy.SF+x@GoogleMail.com") == "cloudysf@googlemail.com"


@pytest.mark.parametrize("typed", [" dana@example.com", "dana@example.com  ",
                                   "\tDana@Example.com\n", "dana @example.com",
                                   "da na@exam ple.com"])
def test_google_trims_leading_trailing_and_intermediate_whitespace(typed: str) -> None:
    digest = GOOGLE_EMAILS[0][2]
    assert normalize_email_google(typed) == "dana@example.com"
    assert hash_email(typed)[0] == digest


@pytest.mark.parametrize(("typed", "normalized", "digest"), GOOGLE_PHONES,
                         ids=[p[0] for p in GOOGLE_PHONES])
def test_google_phone_examples(typed: str, normalized: str, digest: str) -> None:
    assert normalize_phone(typed) == normalized
    assert hash_phone(typed)[0] == digest
    assert hash_phone(f"  {typed} ")[0] == digest


def test_a_national_number_with_its_country_given() -> None:
    """The formatting guide's "(800)555-0100 in the US" and Meta's "(650)555-1212": written
    without a country code, which the caller must know; refused otherwise."""
    assert normalize_phone("(800)555-0100", country_code="1") == "+18005550100"
    assert hash_phone("(800)555-0100", country_code="1")[0] == GOOGLE_PHONES[0][2]
    assert normalize_phone("06 12 34 56 78", country_code="33") == "+33612345678"
    assert normalize_phone("06 6982 3456", country_code="39") == "+390669823456"
    assert normalize_phone("0033 6 12 34 56 78") == "+33612345678"
    with pytest.raises(ValueError, match="no country code") as refused:
        normalize_phone("(800)555-0100")
    assert "0100" not in str(refused.value)
    with pytest.raises(ValueError, match="calling code"):
        normalize_phone("(800)555-0100", country_code="+1")


def test_meta_email_example() -> None:
    typed, normalized, digest = META_EMAIL
    assert normalize_email_meta(typed) == normalized
    assert hash_email(typed)[1] == digest
    assert hash_email(f"  {typed} ")[1] == digest


def test_meta_phone_example() -> None:
    typed, normalized, digest = META_PHONE
    assert sha256_hex(normalized) == digest
    assert hash_phone(typed, country_code="1")[1] == digest
    assert hash_phone("+1 (650) 555-1212") == (sha256_hex("+16505551212"), digest)


def test_the_two_rules_differ_only_on_gmail() -> None:
    google, meta = hash_email("Cloudy.SanFrancisco+shopping@gmail.com")
    assert google == GOOGLE_EMAILS[-1][2]
    assert meta == sha256_hex("cloudy.sanfrancisco+shopping@gmail.com") != google
    google, meta = hash_email(" ALEXF@example.com ")
    assert google == meta == GOOGLE_EMAILS[2][2]
    # inner whitespace: Google removes it, Meta only trims the ends
    google, meta = hash_email("dana @example.com")
    assert (google, meta) == (GOOGLE_EMAILS[0][2], sha256_hex("dana @example.com"))


@pytest.mark.parametrize("typed", ["", "dana", "dana@", "@example.com", "dana@example",
                                   "dana@@example.com"])
def test_not_an_email_is_refused_without_repeating_it(typed: str) -> None:
    with pytest.raises(ValueError) as refused:
        hash_email(typed)
    assert not typed or typed not in str(refused.value)
