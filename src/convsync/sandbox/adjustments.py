"""The Google Ads API's ``ConversionAdjustmentUploadService.UploadConversionAdjustments`` (v26).

It answers the official ``google-ads`` client on the Google Ads simulator's gRPC + TLS server,
for RETRACTION and RESTATEMENT of the conversions the Data Manager simulator recorded in
``World.uploads`` (``uploads.py``): what Google Ads does with an adjustment, as its reference
and error enums describe it.

- Whole-request failures in the simulator's usual shape (a gRPC status with a serialized
  ``GoogleAdsFailure``, ``google_ads.abort``): the checks every call shares (``begin_call``:
  credentials, customer, ``login-customer-id``, faults, the call counted as
  ``google_ads.UploadConversionAdjustments``), ``partial_failure`` false
  (PARTIAL_FAILURE_MODE_REQUIRED: the service requires it), no adjustments, more than 2,000
  (TOO_MANY_ADJUSTMENTS_IN_REQUEST), a negative ``job_id`` (INVALID_JOB_ID), a manager account
  as ``customer_id`` (CANNOT_BE_EXECUTED_BY_MANAGER_ACCOUNT), a ``conversion_action`` missing or
  not ``customers/{id}/conversionActions/{id}`` (RESOURCE_NAME_MISSING / _MALFORMED).
- Everything else fails one adjustment alone: ``partial_failure_error`` is a ``google.rpc.Status``
  whose details hold one ``GoogleAdsFailure``, each error located at
  ``conversion_adjustments[i]`` (and the field, where one is to blame); ``results`` has one
  entry per adjustment in request order, empty where it failed, else the adjustment echoed.
- A conversion is named by ``order_id`` (the transaction id its Data Manager upload carried) or,
  for one uploaded without a transaction id, by ``gclid_date_time_pair`` (its click id and
  conversion time to the second), within the action (the customer id inside the resource name
  is ignored, as the API says).
- An accepted adjustment takes effect at once on the world's clock (the API processes
  adjustments within hours; the sandbox plays that as no delay): a retraction removes the
  conversion's count and value from the Google Ads stats of its action, on the dates it was
  filed under, from then on; a restatement changes its value from then on. Both are counted per
  transaction id by the Data Manager simulator (``TransactionCounts.retractions`` and
  ``.adjustments``), reported by the control endpoint's ``/datamanager``.

Fidelity decisions are listed in docs/sandbox.md (the fidelity table)."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import re
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.ads.googleads.v26.enums.types.conversion_adjustment_type import (
    ConversionAdjustmentTypeEnum,
)
from google.ads.googleads.v26.services.types.conversion_adjustment_upload_service import (
    ConversionAdjustmentResult,
    UploadConversionAdjustmentsRequest,
    UploadConversionAdjustmentsResponse,
)
from google.protobuf import any_pb2
from google.rpc import status_pb2

from convsync.sandbox.control import Sandbox
from convsync.sandbox.datamanager import DataManager
from convsync.sandbox.google_ads import (
    API_VERSION,
    FAILURE_TYPE_URL,
    AdsError,
    AdsFailure,
    Customer,
    TransportFailure,
    abort,
    begin_call,
    failure_bytes,
    new_request_id,
)
from convsync.sandbox.uploads import AdjustmentKind, Upload
from convsync.sandbox.world import DAY, PURCHASE, GoogleAdsAction, World

log = logging.getLogger(__name__)

SERVICE = f"google.ads.googleads.{API_VERSION}.services.ConversionAdjustmentUploadService"
METHOD = "UploadConversionAdjustments"
MAX_ADJUSTMENTS = 2_000
NEW_ACTION_HOURS = 6
"""A conversion action accepts imports (and adjustments) about 6 hours after its creation."""
MIN_CONVERSION_AGE_HOURS = 24
"""A conversion younger than this cannot be adjusted (TOO_RECENT_CONVERSION)."""
MAX_CONVERSION_AGE_DAYS = 54
"""A conversion older than this cannot be adjusted (CONVERSION_EXPIRED)."""
ADJUSTABLE_TYPES = frozenset({"UPLOAD_CLICKS", "WEBPAGE", "SALESFORCE"})
"""Conversion action types that take RETRACTION and RESTATEMENT (the API's
INVALID_CONVERSION_ACTION_TYPE text)."""
FIRST_JOB_ID = 2**31
"""Job ids the API makes up start here ([2^31, 2^63 - 1]); a caller's own are below."""

_Type = ConversionAdjustmentTypeEnum.ConversionAdjustmentType
RETRACTION, RESTATEMENT, ENHANCEMENT = (int(_Type.RETRACTION), int(_Type.RESTATEMENT),
                                        int(_Type.ENHANCEMENT))
_KIND: dict[int, AdjustmentKind] = {RETRACTION: "RETRACTION", RESTATEMENT: "RESTATEMENT"}
_Request = UploadConversionAdjustmentsRequest.pb()
_Response = UploadConversionAdjustmentsResponse.pb()
_Result = ConversionAdjustmentResult.pb()

_RESOURCE_NAME = re.compile(r"customers/(\d+)/conversionActions/(\d+)")
_DATE_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})([+-])(\d{2}):(\d{2})")
_CURRENCY = re.compile(r"[A-Z]{3}")
_FUTURE_SLACK = 60.0
"""Seconds an adjustment time may run ahead of the world's clock (clock skew)."""

UPLOAD_ERRORS = {
    "TOO_RECENT_CONVERSION_ACTION": "Can't import events to a conversion action that was just "
                                    "created. Try importing again in 6 hours.",
    "CONVERSION_ALREADY_RETRACTED": "The conversion was already retracted. This adjustment was "
                                    "not processed.",
    "CONVERSION_NOT_FOUND": "The conversion for this conversion action and conversion "
                            "identifier can't be found. Make sure your conversion identifiers "
                            "are associated with the correct conversion action and try again.",
    "CONVERSION_EXPIRED": "Adjustment can't be made to a conversion that occurred more than "
                          f"{MAX_CONVERSION_AGE_DAYS} days ago.",
    "ADJUSTMENT_PRECEDES_CONVERSION": "Adjustment has an adjustment_date_time that occurred "
                                      "before the associated conversion. Make sure your "
                                      "adjustment_date_time is correct and try again.",
    "MORE_RECENT_RESTATEMENT_FOUND": "More recent adjustment adjustment_date_time has already "
                                     "been reported for the associated conversion. Make sure "
                                     "your adjustment adjustment_date_time is correct and try "
                                     "again.",
    "TOO_RECENT_CONVERSION": "Adjustment can't be recorded because the conversion occurred too "
                             "recently. Try adjusting a conversion that occurred at least "
                             f"{MIN_CONVERSION_AGE_HOURS} hours ago.",
    "CANNOT_RESTATE_CONVERSION_ACTION_THAT_ALWAYS_USES_DEFAULT_CONVERSION_VALUE":
        "Can't make an adjustment to a conversion that is set up to use the default value. "
        "Check your conversion action value setting and try again.",
    "TOO_MANY_ADJUSTMENTS_IN_REQUEST": f"Try uploading fewer than {MAX_ADJUSTMENTS + 1} "
                                       "adjustments in a single API request.",
    "RESTATEMENT_ALREADY_EXISTS": "The conversion has prior a restatement with the same "
                                  "adjustment_date_time. Make sure your adjustment has the "
                                  "correct and unique adjustment_date_time and try again.",
    "DUPLICATE_ADJUSTMENT_IN_REQUEST": "Imported adjustment has a duplicate conversion "
                                       "adjustment with same adjustment_date_time. Make sure "
                                       "your adjustment has the correct adjustment_date_time "
                                       "and try again.",
    "CONVERSION_ACTION_NOT_ELIGIBLE_FOR_ENHANCEMENT": "Can't use enhanced conversions with the "
                                                      "specified conversion action.",
    "GCLID_DATE_TIME_PAIR_AND_ORDER_ID_BOTH_SET": "Cannot set both gclid_date_time_pair and "
                                                  "order_id. Use only 1 type and try again.",
    "MISSING_ORDER_ID_FOR_WEBPAGE": "Adjustment for website conversion requires Order ID (ie, "
                                    "transaction ID). Make sure your website tags capture Order "
                                    "IDs and you send the same Order IDs with your adjustment.",
    "INVALID_JOB_ID": "The provided job id in the request is not within the allowed range. A "
                      "job ID must be a positive integer in the range [1, 2^31).",
    "NO_CONVERSION_ACTION_FOUND": "The conversion action specified in the adjustment request "
                                  "cannot be found. Make sure it's available in this account.",
    "INVALID_CONVERSION_ACTION_TYPE": "The type of the conversion action specified in the "
                                      "adjustment request isn't supported for uploading "
                                      "adjustments. A conversion adjustment of type RETRACTION "
                                      "or RESTATEMENT is only permitted for conversion actions "
                                      "of type SALESFORCE, UPLOAD_CLICK or WEBPAGE. A conversion "
                                      "adjustment of type ENHANCEMENT is only permitted for "
                                      "conversion actions of type WEBPAGE.",
}


class _Refused(Exception):
    """One adjustment refused (its error goes into the partial failure)."""

    def __init__(self, code: str, reason: str, message: str, field: str | None = None,
                 trigger: str | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.field, self.trigger = field, trigger

    def error(self, index: int) -> AdsError:
        path: tuple[tuple[str, int | None], ...] = (("conversion_adjustments", index),)
        if self.field:
            path += tuple((name, None) for name in self.field.split("."))
        return AdsError(self.code, self.reason, self.message, self.trigger, path=path)


def _upload_error(reason: str, field: str | None = None) -> _Refused:
    return _Refused("conversion_adjustment_upload_error", reason, UPLOAD_ERRORS[reason], field)


def _field_error(reason: str, field: str, message: str) -> _Refused:
    return _Refused("field_error", reason, message, field)


def _whole(reason: str, code: str = "conversion_adjustment_upload_error",
           message: str | None = None, *,
           path: tuple[tuple[str, int | None], ...] = (), location: str | None = None,
           trigger: str | None = None) -> AdsError:
    return AdsError(code, reason, message or UPLOAD_ERRORS[reason], trigger, location, path=path)


def parse_date_time(text: str) -> float | None:
    """"yyyy-mm-dd hh:mm:ss+|-hh:mm" as epoch seconds; None when it is not that."""
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, sign, off_h, off_m = match.groups()
    try:
        offset = dt.timedelta(hours=int(off_h), minutes=int(off_m))
        if offset > dt.timedelta(hours=14):
            return None
        zone = dt.timezone(offset if sign == "+" else -offset)
        moment = dt.datetime(int(year), int(month), int(day), int(hour), int(minute),
                             int(second), tzinfo=zone)
    except ValueError:
        return None
    return moment.timestamp()


def always_uses_default_value(action: GoogleAdsAction) -> bool:
    """As ``conversion_action.value_settings.always_use_default_value`` reads in the simulator."""
    return action.step != PURCHASE and not action.type.startswith("UPLOAD")


@dataclass(frozen=True)
class _Accepted:
    """An adjustment that passed every check, ready to apply."""

    kind: AdjustmentKind
    upload: Upload
    adjustment_ts: float
    transaction_id: str | None  # the order id it named, None for a gclid / time pair
    value: float = 0.0
    currency: str = ""


class ConversionAdjustmentUploadService:
    """``UploadConversionAdjustments`` over one sandbox; ``datamanager`` (when given) counts the
    adjustments per transaction id. Thread-safe: requests are applied one at a time."""

    def __init__(self, sandbox: Sandbox, datamanager: DataManager | None = None) -> None:
        self.sandbox = sandbox
        self.datamanager = datamanager
        self._lock = threading.Lock()
        self._job_ids = itertools.count(FIRST_JOB_ID)

    # -- gRPC entry point ------------------------------------------------------------------
    def upload_conversion_adjustments(self, request: Any, context: grpc.ServicerContext) -> Any:
        request_id = new_request_id()
        try:
            customer = begin_call(self.sandbox, context, METHOD, request.customer_id)
            with self._lock:
                response = self._upload(request, customer, request_id)
        except (AdsFailure, TransportFailure) as failure:
            abort(context, failure, request_id)
        except Exception:  # a simulator bug: answer like an API outage, keep the trace
            log.error("sandbox google_ads %s failed\n%s", METHOD, traceback.format_exc())
            abort(context, AdsFailure(grpc.StatusCode.INTERNAL, AdsError(
                "internal_error", "INTERNAL_ERROR", "Internal error encountered.")), request_id)
        context.set_trailing_metadata((("request-id", request_id),))
        return response

    # -- the request -----------------------------------------------------------------------
    def _upload(self, request: Any, customer: Customer, request_id: str) -> Any:
        action_ids = _check_request(request, customer)
        world = self.sandbox.world
        now = world.as_of_ts
        response = _Response(job_id=request.job_id if request.HasField("job_id")
                             else next(self._job_ids))
        errors: list[AdsError] = []
        results: list[Any] = []
        in_request: set[tuple[int, str, float]] = set()
        for i, (adjustment, action_id) in enumerate(zip(request.conversion_adjustments,
                                                        action_ids, strict=True)):
            try:
                accepted = self._check(adjustment, action_id, world, now, in_request)
            except _Refused as refused:
                errors.append(refused.error(i))
                results.append(_Result())
                continue
            if not request.validate_only:
                self._apply(accepted, now)
            results.append(_echo(adjustment))
        if errors:
            response.partial_failure_error.CopyFrom(_partial_failure(errors, request_id))
        if not request.validate_only:
            response.results.extend(results)
        return response

    def _check(self, adjustment: Any, action_id: int, world: World, now: float,
               in_request: set[tuple[int, str, float]]) -> _Accepted:
        """The adjustment checked as the API does, against what Google Ads holds now (and the
        conversions and times the request's earlier adjustments named: ``in_request``)."""
        kind = adjustment.adjustment_type
        if kind == 0:
            raise _field_error("REQUIRED", "adjustment_type",
                               "The required field was not present: adjustment_type.")
        if kind not in (RETRACTION, RESTATEMENT, ENHANCEMENT):
            raise _field_error("INVALID_VALUE", "adjustment_type",
                               "The field's value is invalid: adjustment_type.")
        action = world.google_ads_action(action_id)
        if action is None:
            raise _upload_error("NO_CONVERSION_ACTION_FOUND", "conversion_action")
        if kind == ENHANCEMENT:  # the sandbox account never turned enhanced conversions on
            raise _upload_error("CONVERSION_ACTION_NOT_ELIGIBLE_FOR_ENHANCEMENT",
                                "conversion_action")
        if action.type not in ADJUSTABLE_TYPES:
            raise _upload_error("INVALID_CONVERSION_ACTION_TYPE", "conversion_action")
        if action.created_ts is not None and now - action.created_ts < NEW_ACTION_HOURS * 3600:
            raise _upload_error("TOO_RECENT_CONVERSION_ACTION", "conversion_action")
        if adjustment.user_identifiers or adjustment.HasField("user_agent"):
            field = "user_identifiers" if adjustment.user_identifiers else "user_agent"
            raise _field_error("VALUE_MUST_BE_UNSET", field,
                               f"The field's value must be unset: {field} is for enhancements "
                               "only.")
        value, currency = self._restatement(adjustment, kind, action, world)
        adjustment_ts = _adjustment_time(adjustment, now)
        upload, transaction_id = _conversion(adjustment, action, world)
        if upload is None or upload.created_ts > now:  # not there yet: still processing
            if upload is None:
                raise _upload_error("CONVERSION_NOT_FOUND")
            raise _upload_error("TOO_RECENT_CONVERSION")
        mark = (upload.action_id, upload.key, adjustment_ts)
        if mark in in_request:
            raise _upload_error("DUPLICATE_ADJUSTMENT_IN_REQUEST", "adjustment_date_time")
        in_request.add(mark)
        if upload.retracted_ts is not None:
            raise _upload_error("CONVERSION_ALREADY_RETRACTED")
        if now - upload.conversion_ts < MIN_CONVERSION_AGE_HOURS * 3600:
            raise _upload_error("TOO_RECENT_CONVERSION")
        if now - upload.conversion_ts > MAX_CONVERSION_AGE_DAYS * DAY:
            raise _upload_error("CONVERSION_EXPIRED")
        if int(adjustment_ts) < int(upload.conversion_ts):  # to the second, as sent
            raise _upload_error("ADJUSTMENT_PRECEDES_CONVERSION", "adjustment_date_time")
        if kind == RESTATEMENT:
            earlier = upload.restatement_times()
            if adjustment_ts in earlier:
                raise _upload_error("RESTATEMENT_ALREADY_EXISTS", "adjustment_date_time")
            if any(t > adjustment_ts for t in earlier):
                raise _upload_error("MORE_RECENT_RESTATEMENT_FOUND", "adjustment_date_time")
        return _Accepted(_KIND[kind], upload, adjustment_ts, transaction_id, value, currency)

    @staticmethod
    def _restatement(adjustment: Any, kind: int, action: GoogleAdsAction,
                     world: World) -> tuple[float, str]:
        """(value, currency) of a restatement; checks that a retraction carries none."""
        has_value = adjustment.HasField("restatement_value")
        if kind == RETRACTION:
            if has_value:
                raise _field_error("VALUE_MUST_BE_UNSET", "restatement_value",
                                   "The field's value must be unset: a retraction takes no "
                                   "restatement_value.")
            return 0.0, ""
        restated = adjustment.restatement_value
        if not has_value or not restated.HasField("adjusted_value"):
            raise _field_error("REQUIRED", "restatement_value.adjusted_value",
                               "The required field was not present: "
                               "restatement_value.adjusted_value.")
        if always_uses_default_value(action):
            raise _upload_error(
                "CANNOT_RESTATE_CONVERSION_ACTION_THAT_ALWAYS_USES_DEFAULT_CONVERSION_VALUE",
                "conversion_action")
        currency = restated.currency_code if restated.HasField("currency_code") else ""
        if currency and not _CURRENCY.fullmatch(currency):
            raise _Refused("currency_code_error", "UNSUPPORTED",
                           f"The currency code is not supported: '{currency}'.",
                           "restatement_value.currency_code", currency)
        return restated.adjusted_value, currency or world.accounts.currency

    def _apply(self, accepted: _Accepted, now: float) -> None:
        upload, ledger = accepted.upload, self.sandbox.world.uploads
        if accepted.kind == "RETRACTION":
            done = ledger.retract(upload.action_id, upload.key, accepted.adjustment_ts, now)
        else:
            done = ledger.restate(upload.action_id, upload.key, accepted.value,
                                  accepted.currency, accepted.adjustment_ts, now)
        if done and self.datamanager is not None:
            self.datamanager.record_adjustment(upload.action_id, accepted.transaction_id,
                                               accepted.kind, accepted.value, accepted.currency)


# -- helpers ---------------------------------------------------------------------------------
def _check_request(request: Any, customer: Customer) -> list[int]:
    """The whole-request checks; each adjustment's conversion action id."""
    adjustments = request.conversion_adjustments
    if not request.partial_failure:
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, _whole(
            "PARTIAL_FAILURE_MODE_REQUIRED", "partial_failure_error",
            "The partial failure field was false in the request. This method requires this "
            "field be set to true.", location="partial_failure"))
    if not adjustments:
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, _whole(
            "REQUIRED", "field_error",
            "The required field was not present: conversion_adjustments.",
            location="conversion_adjustments"))
    if len(adjustments) > MAX_ADJUSTMENTS:
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, _whole(
            "TOO_MANY_ADJUSTMENTS_IN_REQUEST", location="conversion_adjustments"))
    if request.HasField("job_id") and request.job_id < 0:
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, _whole(
            "INVALID_JOB_ID", location="job_id", trigger=str(request.job_id)))
    if customer.manager:
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, _whole(
            "CANNOT_BE_EXECUTED_BY_MANAGER_ACCOUNT", "request_error",
            "Manager customers are not supported for this operation: conversion actions and "
            "their conversions belong to the client account.", location="customer_id"))
    action_ids: list[int] = []
    problems: list[AdsError] = []
    for i, adjustment in enumerate(adjustments):
        path: tuple[tuple[str, int | None], ...] = (("conversion_adjustments", i),
                                                    ("conversion_action", None))
        name = adjustment.conversion_action
        match = _RESOURCE_NAME.fullmatch(name)
        if not name:
            problems.append(_whole("RESOURCE_NAME_MISSING", "request_error",
                                   "Resource name is missing.", path=path))
        elif match is None:
            problems.append(_whole("RESOURCE_NAME_MALFORMED", "request_error",
                                   f"Resource name '{name}' is malformed: expected "
                                   "'customers/{customer_id}/conversionActions/"
                                   "{conversion_action_id}'.", path=path, trigger=name))
        action_ids.append(int(match[2]) if match else -1)
    if problems:
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, *problems)
    return action_ids


def _adjustment_time(adjustment: Any, now: float) -> float:
    if not adjustment.HasField("adjustment_date_time") or not adjustment.adjustment_date_time:
        raise _field_error("REQUIRED", "adjustment_date_time",
                           "The required field was not present: adjustment_date_time.")
    text = adjustment.adjustment_date_time
    ts = parse_date_time(text)
    if ts is None:
        raise _Refused("date_error", "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET",
                       "The string date time's format should be yyyy-mm-dd hh:mm:ss+|-hh:mm.",
                       "adjustment_date_time", text)
    if ts > now + _FUTURE_SLACK:
        raise _Refused("date_error", "LATER_THAN_MAXIMUM_DATE",
                       "The date is later than the maximum allowed: the adjustment is in the "
                       "future.", "adjustment_date_time", text)
    return ts


def _conversion(adjustment: Any, action: GoogleAdsAction,
                world: World) -> tuple[Upload | None, str | None]:
    """The uploaded conversion an adjustment names, and its transaction id (order id)."""
    has_order = adjustment.HasField("order_id") and bool(adjustment.order_id)
    has_pair = adjustment.HasField("gclid_date_time_pair")
    if has_order and has_pair:
        raise _upload_error("GCLID_DATE_TIME_PAIR_AND_ORDER_ID_BOTH_SET")
    if has_order:
        return world.uploads.get(action.id, adjustment.order_id), adjustment.order_id
    if not has_pair:
        raise _field_error("REQUIRED", "order_id",
                           "The required field was not present: order_id (or "
                           "gclid_date_time_pair).")
    if action.type == "WEBPAGE":
        raise _upload_error("MISSING_ORDER_ID_FOR_WEBPAGE", "order_id")
    pair = adjustment.gclid_date_time_pair
    if not pair.gclid:
        raise _field_error("REQUIRED", "gclid_date_time_pair.gclid",
                           "The required field was not present: gclid_date_time_pair.gclid.")
    if not pair.conversion_date_time:
        raise _field_error("REQUIRED", "gclid_date_time_pair.conversion_date_time",
                           "The required field was not present: "
                           "gclid_date_time_pair.conversion_date_time.")
    ts = parse_date_time(pair.conversion_date_time)
    if ts is None:
        raise _Refused("date_error", "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET",
                       "The string date time's format should be yyyy-mm-dd hh:mm:ss+|-hh:mm.",
                       "gclid_date_time_pair.conversion_date_time", pair.conversion_date_time)
    return world.uploads.find(action.id, pair.gclid, int(ts)), None


def _echo(adjustment: Any) -> Any:
    result = _Result(conversion_action=adjustment.conversion_action,
                     adjustment_date_time=adjustment.adjustment_date_time,
                     adjustment_type=adjustment.adjustment_type)
    if adjustment.HasField("order_id"):
        result.order_id = adjustment.order_id
    if adjustment.HasField("gclid_date_time_pair"):
        result.gclid_date_time_pair.CopyFrom(adjustment.gclid_date_time_pair)
    return result


def _where(error: AdsError) -> str:
    parts = []
    for name, index in error.path:
        parts.append(f"{name}[{index}]" if index is not None else name)
    return ".".join(parts)


def _partial_failure(errors: Sequence[AdsError], request_id: str) -> Any:
    """The ``partial_failure_error`` Status: INVALID_ARGUMENT, one GoogleAdsFailure in details."""
    first = f"{errors[0].message}, at {_where(errors[0])}"
    message = first if len(errors) == 1 else f"Multiple errors in 'details'. First error: {first}"
    return status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=message,
                             details=[any_pb2.Any(type_url=FAILURE_TYPE_URL,
                                                  value=failure_bytes(errors, request_id))])


def adjustments_handler(sandbox: Sandbox,
                        datamanager: DataManager | None = None) -> grpc.GenericRpcHandler:
    """ConversionAdjustmentUploadService's method, to add to the Google Ads gRPC server."""
    service = ConversionAdjustmentUploadService(sandbox, datamanager)
    return grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(
            service.upload_conversion_adjustments, request_deserializer=_Request.FromString,
            response_serializer=_Response.SerializeToString),
    })
