"""Start the four simulators (and a control endpoint) and write a client config for them."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from convsync.sandbox import adjustments, datamanager, ga4, google_ads, klaviyo, meta, meta_capi
from convsync.sandbox.control import FAULT_KINDS, Fault, Sandbox
from convsync.sandbox.http import (
    ApiError,
    Handler,
    Request,
    Response,
    RestPlatform,
    serve_rest,
)
from convsync.sandbox.klaviyo_events import KlaviyoEvents
from convsync.sandbox.tls import ensure_certificate
from convsync.sandbox.world import (
    CART,
    CHECKOUT,
    GA4_EVENT_NAMES,
    META_ACTION_TYPES,
    PURCHASE,
    QUALIFIED,
    STEPS,
    VIEW,
    World,
)

SANDBOX_SECRETS = {
    "CONVSYNC_GOOGLE_ACCESS_TOKEN": "sandbox-google-token",
    "CONVSYNC_META_ACCESS_TOKEN": "sandbox-meta-token",
    "CONVSYNC_KLAVIYO_API_KEY": "pk_sandbox_0123456789",
}


@dataclass
class RunningSandbox:
    """The simulators of one sandbox, started; ``endpoints`` are what clients point at."""

    sandbox: Sandbox
    cert: Path
    endpoints: dict[str, str]
    datamanager: datamanager.DataManager | None = None
    meta_capi: meta_capi.ConversionsApi | None = None
    """The Meta Conversions API's counts: ``summary()``, ``counts()``, ``counted_twice()``."""
    klaviyo_events: KlaviyoEvents | None = None
    """Klaviyo's event uploads and their counts: ``summary()``, ``counts()``, ``received()``."""
    _grpc: list[grpc.Server] = field(default_factory=list)
    _http: list[ThreadingHTTPServer] = field(default_factory=list)

    @property
    def world(self) -> World:
        return self.sandbox.world

    def stop(self) -> None:
        for server in self._grpc:
            server.stop(grace=None)
        for http in self._http:
            http.shutdown()
            http.server_close()

    def __enter__(self) -> RunningSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(world: World, state_dir: Path, host: str = "127.0.0.1",
          port_base: int = 0) -> RunningSandbox:
    """Start every simulator; ports are port_base..port_base+6, or ephemeral when 0.

    The Data Manager API (IngestionService) and the Google Ads API's conversion adjustments
    (ConversionAdjustmentUploadService) share the Google Ads gRPC server and port; the Data
    Manager's REST front end has a port of its own."""
    cert, key = ensure_certificate(state_dir)
    sandbox = Sandbox(world)
    dm = datamanager.DataManager(sandbox)
    running = RunningSandbox(sandbox, cert, {}, dm, meta_capi=meta_capi.ConversionsApi(sandbox))
    running.klaviyo_events = KlaviyoEvents(sandbox)

    def port(offset: int) -> int:
        return port_base + offset if port_base else 0

    gads_server, gads_port = google_ads.build_google_ads_server(
        sandbox, cert, key, host, port(0),
        extra_handlers=[datamanager.datamanager_handler(dm),
                        adjustments.adjustments_handler(sandbox, dm)])
    ga4_property = ga4.Ga4Property(world)  # one quota ledger and cache for gRPC and REST
    ga4_server, ga4_port = ga4.build_ga4_grpc_server(sandbox, cert, key, host, port(1),
                                                     ga4=ga4_property)
    running._grpc += [gads_server, ga4_server]
    rest: dict[str, RestPlatform] = {
        "ga4_rest": ga4.Ga4Rest(sandbox, ga4_property),
        "meta": meta.MetaGraph(sandbox, capi=running.meta_capi),
        "klaviyo": klaviyo.KlaviyoApi(sandbox, events=running.klaviyo_events),
        "control": ControlApi(sandbox, dm, capi=running.meta_capi,
                              klaviyo_events=running.klaviyo_events),
        "datamanager_rest": datamanager.DataManagerRest(dm),
    }
    for offset, (name, platform) in enumerate(rest.items(), start=2):
        server = serve_rest(platform, sandbox, host, port(offset))
        running._http.append(server)
        running.endpoints[name] = f"http://{host}:{server.server_port}"
    running.endpoints["google_ads"] = f"localhost:{gads_port}"
    running.endpoints["ga4"] = f"localhost:{ga4_port}"
    running.endpoints["datamanager"] = f"localhost:{gads_port}"
    return running


class ControlApi:
    """``/requests``, ``/faults``, ``/clock``, ``/world``, ``/datamanager``: drive a sandbox from
    another process."""

    name = "control"

    def __init__(self, sandbox: Sandbox, dm: datamanager.DataManager | None = None, *,
                 capi: meta_capi.ConversionsApi | None = None,
                 klaviyo_events: KlaviyoEvents | None = None) -> None:
        self.sandbox = sandbox
        self.dm = dm
        self.capi = capi
        self.klaviyo_events = klaviyo_events

    def route(self, request: Request) -> tuple[str, Handler]:
        routes: dict[tuple[str, str], Callable[[Request], Response]] = {
            ("GET", "/requests"): self._requests,
            ("DELETE", "/requests"): self._reset_requests,
            ("POST", "/faults"): self._inject,
            ("DELETE", "/faults"): self._clear_faults,
            ("GET", "/clock"): self._clock,
            ("POST", "/clock"): self._set_clock,
            ("GET", "/world"): self._world,
        }
        if self.dm is not None:
            routes.update({
                ("GET", "/datamanager"): self._dm_summary,
                ("DELETE", "/datamanager"): self._dm_reset,
                ("POST", "/datamanager/config"): self._dm_configure,
                ("DELETE", "/datamanager/quota"): self._dm_reset_quota,
                ("POST", "/datamanager/actions"): self._dm_action,
            })
        if self.capi is not None:
            routes.update({("GET", "/meta/capi"): self._capi_summary,
                           ("DELETE", "/meta/capi"): self._capi_reset})
        if self.klaviyo_events is not None:
            routes.update(self.klaviyo_events.control_routes())
        handler = routes.get((request.method, request.path.rstrip("/")))
        if handler is None:
            raise ApiError(self.error_response(404, f"no route {request.method} {request.path}"))
        return request.path.strip("/"), handler

    def fault_response(self, fault: Fault) -> Response:  # faults never target the control API
        return self.error_response(500, "control API has no faults")

    def error_response(self, status: int, message: str) -> Response:
        return Response(status, {"error": message})

    def _requests(self, request: Request) -> Response:
        return Response(200, self.sandbox.requests(request.arg("platform")))

    def _reset_requests(self, request: Request) -> Response:
        self.sandbox.reset_requests()
        return Response(200, {})

    def _inject(self, request: Request) -> Response:
        body = request.json()
        kind = body.get("kind")
        if kind not in FAULT_KINDS:
            return self.error_response(400, f"kind must be one of {', '.join(FAULT_KINDS)}")
        self.sandbox.inject(str(body["platform"]), kind, int(body.get("count", 1)),
                            retry_after=float(body.get("retry_after", 1.0)),
                            delay=float(body.get("delay", 0.0)))
        return Response(200, {"queued": int(body.get("count", 1))})

    def _clear_faults(self, request: Request) -> Response:
        self.sandbox.clear_faults()
        return Response(200, {})

    def _clock(self, request: Request) -> Response:
        return Response(200, {"as_of": self.sandbox.world.as_of.isoformat()})

    def _set_clock(self, request: Request) -> Response:
        body = request.json()
        world = self.sandbox.world
        if "as_of" in body:
            world.set_as_of(dt.datetime.fromisoformat(body["as_of"]))
        else:
            world.advance(float(body.get("advance_days", 0)))
        return self._clock(request)

    def _world(self, request: Request) -> Response:
        return Response(200, describe(self.sandbox.world))

    def _capi_summary(self, request: Request) -> Response:
        assert self.capi is not None
        return Response(200, self.capi.summary(request.arg("pixel_id"),
                                               with_events=request.arg("events", "1") != "0"))

    def _capi_reset(self, request: Request) -> Response:
        assert self.capi is not None
        self.capi.reset()
        return Response(200, {})

    def _datamanager(self) -> datamanager.DataManager:
        assert self.dm is not None
        return self.dm

    def _dm_summary(self, request: Request) -> Response:
        action = request.arg("action_id")
        if action is not None and not action.isdigit():
            return self.error_response(400, "action_id must be a conversion action id")
        return Response(200, self._datamanager().summary(
            int(action) if action else None,
            with_transactions=request.arg("transactions", "1") != "0"))

    def _dm_configure(self, request: Request) -> Response:
        try:
            config = self._datamanager().configure(**request.json())
        except (TypeError, ValueError) as error:
            return self.error_response(400, str(error))
        return Response(200, asdict(config))

    def _dm_reset(self, request: Request) -> Response:
        self._datamanager().reset()
        return Response(200, {})

    def _dm_reset_quota(self, request: Request) -> Response:
        self._datamanager().reset_quota()
        return Response(200, {})

    def _dm_action(self, request: Request) -> Response:
        """Create an UPLOAD_CLICKS action (as a user does in the Google Ads UI), or re-date one:
        ``created_hours_ago`` (default 0) puts its creation that long before the world's now."""
        body = request.json()
        world = self.sandbox.world
        created = world.as_of - dt.timedelta(hours=float(body.get("created_hours_ago", 0)))
        try:
            if "id" in body:
                action = world.set_action_created(int(body["id"]), created)
            else:
                action = world.add_google_ads_action(
                    str(body["name"]), category=str(body.get("category", "DEFAULT")),
                    primary_for_goal=bool(body.get("primary_for_goal", False)),
                    counting_type=str(body.get("counting_type", "MANY_PER_CLICK")),
                    default_value=float(body.get("default_value", 0.0)),
                    click_through_days=int(body.get("click_through_days", 90)),
                    created=created)
        except KeyError as missing:
            return self.error_response(404 if "id" in body else 400,
                                       f"no such action or missing key: {missing}")
        except ValueError as error:
            return self.error_response(400, str(error))
        return Response(200, asdict(action))


def describe(world: World) -> dict[str, Any]:
    """What a person needs to know about a world: its span, clock, accounts and faults."""
    spec = world.spec
    return {
        "seed": spec.seed, "start": world.start.isoformat(), "end": world.end.isoformat(),
        "days": spec.days, "campaigns": len(world.campaigns), "faults": sorted(spec.faults),
        "as_of": world.as_of.isoformat(), "accounts": vars(world.accounts),
    }


def write_client_config(path: Path, running: RunningSandbox, store_url: str = "") -> Path:
    """Write a ready client config for this sandbox, and its secrets file beside it.

    Returns the secrets file path. The secrets are the sandbox's fake credentials; the file is
    written with mode 0600 all the same, as a real one must be."""
    world = running.world
    accounts = world.accounts
    path.parent.mkdir(parents=True, exist_ok=True)
    secrets = path.with_name(path.stem + ".secrets.env")
    secrets.write_text("".join(f"{k}={v}\n" for k, v in SANDBOX_SECRETS.items()))
    secrets.chmod(0o600)
    ep = running.endpoints
    store = store_url or f"sqlite:///{path.stem}.db"
    text = SANDBOX_CONFIG.format(
        name="Sandbox Outdoor", timezone=accounts.google_ads_tz, currency=accounts.currency,
        store_url=store, secrets_file=secrets.name, customer_id=accounts.google_ads_customer_id,
        manager_id=accounts.google_ads_manager_id, gads_endpoint=ep["google_ads"],
        ca_file=json.dumps(str(running.cert)), property_id=accounts.ga4_property_id,
        ga4_endpoint=ep["ga4"], ad_account=accounts.meta_ad_account_id,
        pixel_id=accounts.meta_pixel_id, meta_endpoint=ep["meta"],
        klaviyo_endpoint=ep["klaviyo"], conversions=conversions_toml(world),
        dm_endpoint=ep["datamanager"], upload_actions=upload_actions_toml(world),
        cloud_project=datamanager.PROJECT_NUMBER,
        upload_events=_inline({STEPS[s]: f"convsync_{STEPS[s]}" for s in MICRO_LADDER}),
        upload_metrics=_inline({STEPS[s]: f"convsync {STEPS[s]} value" for s in MICRO_LADDER}))
    path.write_text(text)
    return secrets


MACRO_STEPS = frozenset({PURCHASE, QUALIFIED})
LADDER = (VIEW, CART, CHECKOUT, PURCHASE)
MICRO_LADDER = tuple(step for step in LADDER if step not in MACRO_STEPS)


def _inline(pairs: dict[str, str]) -> str:
    """A TOML inline table of strings."""
    return "{ " + ", ".join(f"{name} = {json.dumps(value)}" for name, value in pairs.items()) + " }"


def upload_actions_toml(world: World) -> str:
    """The ``upload_actions`` inline table: qualified leads to the offline lead action, the
    ladder's micro conversions to the micro-value action when the world has one."""
    actions = {a.step: a for a in world.google_ads_actions if a.type == "UPLOAD_CLICKS"}
    micro = next((a for a in world.google_ads_actions
                  if a.type == "UPLOAD_CLICKS" and a.step not in MACRO_STEPS), None)
    pairs = {STEPS[QUALIFIED]: actions[QUALIFIED].id} if QUALIFIED in actions else {}
    if micro is not None:
        pairs |= {STEPS[step]: micro.id for step in LADDER if step not in MACRO_STEPS}
    return "{ " + ", ".join(f'{name} = "{action}"' for name, action in pairs.items()) + " }"


def conversions_toml(world: World) -> str:
    """``[[conversions]]`` tables mapping each world step to its name on every platform."""
    blocks = []
    for step, name in enumerate(STEPS):
        names = {
            "google_ads": [a.name for a in world.google_ads_actions if a.step == step],
            "ga4": [GA4_EVENT_NAMES[step]] if GA4_EVENT_NAMES[step] else [],
            "meta": list(META_ACTION_TYPES.get(step, ())[:1]),
            "klaviyo": [m.name for m in world.klaviyo_metrics if m.step == step],
            "crm": ["lead_qualified"] if step == QUALIFIED else [],
        }
        lines = ["[[conversions]]", f'name = "{name}"',
                 f'kind = "{"macro" if step in MACRO_STEPS else "micro"}"']
        if step in LADDER:
            lines.append(f"ladder_position = {LADDER.index(step) + 1}")
        lines += [f"{platform} = {json.dumps(values)}" for platform, values in names.items()
                  if values]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


SANDBOX_CONFIG = """\
# Written by `convsync sandbox serve`: a client config pointing at the local sandbox.
# Its secrets (fake sandbox credentials) are in {secrets_file}, beside this file.

[client]
name = "{name}"
timezone = "{timezone}"
currency = "{currency}"
store_url = "{store_url}"
secrets_file = "{secrets_file}"

[google_ads]
customer_ids = ["{customer_id}"]
login_customer_id = "{manager_id}"
endpoint = "{gads_endpoint}"
ca_file = {ca_file}
# both bases, so that reconcile compares Google Ads with GA4 by conversion date
conversion_date_basis = true
# push: the Data Manager API, and the UPLOAD_CLICKS import action each conversion uploads to
datamanager_endpoint = "{dm_endpoint}"
upload_actions = {upload_actions}
consent = "granted"
# the Cloud project whose Data Manager quotas pushes count against (with your own
# credentials it comes from the OAuth client id; name it when several share it)
cloud_project = "{cloud_project}"

[ga4]
property_id = "{property_id}"
endpoint = "{ga4_endpoint}"
ca_file = {ca_file}

[meta]
ad_account_ids = ["{ad_account}"]
pixel_id = "{pixel_id}"
endpoint = "{meta_endpoint}"
# push: the Conversions API event each conversion is sent under (a name of convsync's own:
# under the pixel's event name, Meta would keep the pixel's copy and drop the valued one)
upload_events = {upload_events}

[klaviyo]
endpoint = "{klaviyo_endpoint}"
# push: the metric each conversion's valued events are created under on the profiles
upload_metrics = {upload_metrics}

[valuation]
# the sandbox's world is short: value over Meta's 28 days rather than Google's 90
horizon_days = 28

{conversions}"""
