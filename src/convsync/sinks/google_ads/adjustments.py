"""Retractions through the Google Ads API (``ConversionAdjustmentUploadService``).

The Data Manager API cannot take a conversion back: sending its transaction id again only
restates the value, and the conversion still counts once. The Google Ads API's conversion
adjustments can (``RETRACTION``: count and value removed), but Google closed offline
conversion import through the Google Ads API to new adopters on 2026-06-15, so convsync uses
it only for the accounts the config names in ``[google_ads] retraction_accounts`` (ones that
still may). A retraction names the conversion by its ``order_id``: the transaction id the
Data Manager upload carried. Requests of at most 2,000 adjustments, one account each,
``partial_failure`` on (the service requires it): each adjustment succeeds or fails alone,
with its reason.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Any

from google.ads.googleads.client import GoogleAdsClient
from google.ads.googleads.errors import GoogleAdsException
from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure
from google.api_core import exceptions as api

from convsync.model import Upload
from convsync.retry import retrying
from convsync.sinks import SinkError
from convsync.sources.google_ads import RETRY, error_code_name, explain, failure_of

MAX_ADJUSTMENTS = 2_000
UPLOAD = "UploadConversionAdjustments"
_Failure = GoogleAdsFailure.pb()


class AdjustmentSink:
    """Retracts uploaded conversions of one client. ``on_request(method)`` is called once per
    API call made (each counts against the Cloud project's Google Ads operations)."""

    def __init__(self, client: GoogleAdsClient, *,
                 sleep: Callable[[float], None] = time.sleep,
                 on_request: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.sleep = sleep
        self.on_request = on_request

    def retract(self, uploads: Sequence[Upload], when: dt.datetime) -> dict[str, str]:
        """Retract the conversion each upload made (all of one account, at most
        MAX_ADJUSTMENTS), as of ``when``: per dedupe key, '' when retracted, else why not
        (Google's reason). SinkError when the request failed whole."""
        if not uploads:
            return {}
        accounts = {u.account_id for u in uploads}
        if len(accounts) != 1 or len(uploads) > MAX_ADJUSTMENTS:
            raise ValueError(f"one account and at most {MAX_ADJUSTMENTS:,} adjustments a request")
        (account,) = accounts
        service = self.client.get_service("ConversionAdjustmentUploadService")
        actions = self.client.get_service("ConversionActionService")  # its resource names
        request = self.client.get_type("UploadConversionAdjustmentsRequest")
        request.customer_id = account
        request.partial_failure = True
        stamp = when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")
        retraction = self.client.enums.ConversionAdjustmentTypeEnum.RETRACTION
        for upload in uploads:
            adjustment = request.conversion_adjustments.add()
            adjustment.conversion_action = actions.conversion_action_path(
                account, upload.conversion_action)
            adjustment.adjustment_type = retraction
            adjustment.adjustment_date_time = stamp
            adjustment.order_id = upload.dedupe_key
        response = self._call(lambda: service.upload_conversion_adjustments(request=request))
        refused = _refused(response)
        return {u.dedupe_key: refused.get(i, "") for i, u in enumerate(uploads)}

    def _call(self, call: Callable[[], Any]) -> Any:
        def attempt() -> Any:
            if self.on_request is not None:
                self.on_request(UPLOAD)
            return call()

        try:
            return retrying(RETRY, self.sleep)(attempt)
        except SinkError:  # on_request refused the call (a quota): not made
            raise
        except (GoogleAdsException, api.GoogleAPICallError) as error:
            said = explain(error) or type(error).__name__
            raise SinkError(f"Google refused the retractions: {said}", reason=_reason(error),
                            fix="check that the account still may use the Google Ads API's "
                                "conversion adjustments, or take it out of [google_ads] "
                                "retraction_accounts") from None


def _refused(response: Any) -> dict[int, str]:
    """The adjustments a partly failed request refused: index -> Google's error code."""
    refused: dict[int, str] = {}
    for detail in response.partial_failure_error.details:
        failure = _Failure()
        detail.Unpack(failure)
        for error in failure.errors:
            path = error.location.field_path_elements
            index = next((p.index for p in path if p.field_name == "conversion_adjustments"),
                         None)
            if index is not None:
                refused.setdefault(index, error_code_name(error).rsplit(".", 1)[-1])
    return refused


def _reason(error: BaseException) -> str:
    failure = failure_of(error)
    if failure is not None and failure.errors:
        return str(error_code_name(failure.errors[0])).rsplit(".", 1)[-1]
    return type(error).__name__
