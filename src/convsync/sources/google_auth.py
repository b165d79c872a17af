"""Google credentials shared by the Google Ads and GA4 sources and the Google Ads sink."""

from __future__ import annotations

from google.auth.credentials import Credentials
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from convsync.model import Platform
from convsync.settings import Secrets

ADWORDS_SCOPE = "https://www.googleapis.com/auth/adwords"
ANALYTICS_SCOPE = "https://www.googleapis.com/auth/analytics.readonly"
DATAMANAGER_SCOPE = "https://www.googleapis.com/auth/datamanager"
"""The Data Manager API (Google Ads uploads): a sensitive scope of its own, so a grant made
for the Google Ads scope alone does not cover it."""
TOKEN_URI = "https://oauth2.googleapis.com/token"


def google_credentials(secrets: Secrets, scopes: list[str]) -> Credentials:
    """OAuth user credentials (refresh token), a service account, or a ready access token.

    A ready access token wins: it is what the sandbox hands out, and what
    ``gcloud auth print-access-token`` gives for a one-off run."""
    if secrets.google_access_token is not None:
        return user_credentials.Credentials(token=secrets.google_access_token.get_secret_value())
    if secrets.google_refresh_token is not None and secrets.google_client_secret is not None:
        return user_credentials.Credentials(
            token=None, refresh_token=secrets.google_refresh_token.get_secret_value(),
            client_id=secrets.google_client_id,
            client_secret=secrets.google_client_secret.get_secret_value(),
            token_uri=TOKEN_URI, scopes=scopes)
    if secrets.google_service_account_file is not None:
        return service_account.Credentials.from_service_account_file(
            str(secrets.google_service_account_file), scopes=scopes)
    raise ValueError(secrets.missing_for(Platform.GOOGLE_ADS) or "no Google credentials")
