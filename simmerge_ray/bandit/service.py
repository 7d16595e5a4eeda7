"""The HTTP front of the bandit: a Ray Serve deployment (FastAPI ingress) over the named actor.

    POST /decide    {"features": [...]} or {"a": .., "b": .., "task": ..}; optional "arms": [..]
                    -> decision_id, operator, sampled scores, posterior means     (token optional)
    POST /feedback  {"decision_id": .., "reward": ..} -> status counted | duplicate     (token)
    POST /arms      {"name": .., "prior": "pooled" | "zero", "prior_var": ..}           (token)
    GET  /stats     counters and per-arm plays and mean rewards
    GET  /healthz   the actor answers

Bodies over MAX_BODY_BYTES are refused (413) before they are parsed. The two writing endpoints
need `Authorization: Bearer <token>` (401 without it; see auth.py); /decide is open, and a
decision asked for with the token is kept in a pending budget of its own, which anonymous
decisions cannot expire. Bodies are validated by
pydantic against the bounds of limits.py (malformed JSON, missing or extra fields, NaN/Inf, a
value out of bounds -> 422, one line naming the field; a 4,300-digit number -> 400); errors the bandit raises carry their own
4xx status (unknown id or name 404, duplicate arm 409, wrong feature width 422); an actor that
cannot be reached is a 503. Model names are resolved through the feature table here, in the
replica, so the actor only ever sees numbers.
(No `from __future__ import annotations` here: FastAPI must see the request models as classes.)
"""

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import ray
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from simmerge_ray.bandit.actor import ACTOR_NAME, NAMESPACE, start_bandit_actor
from simmerge_ray.bandit.auth import check_authorization, load_token, token_digest
from simmerge_ray.bandit.body_limit import BodyLimit
from simmerge_ray.bandit.errors import BanditError, client_text
from simmerge_ray.errors import CheckpointError
from simmerge_ray.bandit.feature_table import FeatureTable
from simmerge_ray.bandit.limits import FEATURE_BOUND, MAX_BODY_BYTES, MAX_FEATURES, PRIOR_VAR_RANGE, REWARD_BOUND

APP_NAME = "simmerge-bandit"

# strict: a JSON number only (true, "7.5" are refused, not read as 1.0 and 7.5); ints pass.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FEATURE_BOUND, le=FEATURE_BOUND)]
Reward = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-REWARD_BOUND, le=REWARD_BOUND)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class DecideRequest(BaseModel):
    """Either raw pair features, or a pair of model names and a task to look them up."""

    model_config = ConfigDict(extra="forbid")

    # null: a feature undefined for this pair (imputed with the offline mean, as the selector does)
    features: Annotated[list[Feature | None], Field(max_length=MAX_FEATURES)] | None = None
    a: Name | None = None
    b: Name | None = None
    task: Name | None = None
    arms: Annotated[list[Name], Field(min_length=1, max_length=1000)] | None = None  # restrict the choice to these operators

    @model_validator(mode="after")
    def _one_form(self) -> "DecideRequest":
        names = (self.a, self.b, self.task)
        if self.features is not None and any(n is not None for n in names):
            raise ValueError("give either 'features' or 'a', 'b', 'task', not both")
        if self.features is None and any(n is None for n in names):
            raise ValueError("give 'features', or all of 'a', 'b' and 'task'")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision_id: Annotated[str, Field(min_length=1, max_length=64)]
    reward: Reward


class ArmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    prior: Literal["pooled", "zero"] = "pooled"
    prior_var: Annotated[float, Field(strict=True, ge=PRIOR_VAR_RANGE[0], le=PRIOR_VAR_RANGE[1])] | None = None


api = FastAPI(title="simmerge bandit", description=__doc__)
api.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


def _field(loc: tuple | list) -> str:
    """('body', 'features', 3) -> 'features[3]': the field as the client wrote it."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    # One line naming each field at fault. FastAPI's default echoes the offending input, and a
    # NaN there makes the 422 itself fail to serialise (a 500): say where and what only.
    lines = []
    kind = request.headers.get("content-type", "")
    for e in exc.errors():
        loc = e.get("loc", ())
        if e.get("type") == "json_invalid":  # loc is ('body', character position)
            lines.append(f"body: JSON decode error at character {loc[-1]}")
        elif tuple(loc) == ("body",) and isinstance(e.get("input"), bytes):  # FastAPI parses only a JSON type
            lines.append(f"body: not sent as JSON (Content-Type {kind or 'missing'}; send application/json)")
        else:
            lines.append(f"{_field(loc)}: {e.get('msg', '')}")
    return JSONResponse(status_code=422, content={"detail": "; ".join(lines).replace("\n", " ")})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # FastAPI answers a body json.loads raises on with anything but a decode error (a number of
    # more digits than Python converts) as a bare "error parsing the body": say what it was.
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, ValueError) and "digits" in str(cause):
        return JSONResponse(status_code=400, content={
            "detail": f"body: a number has more than {sys.get_int_max_str_digits()} digits"})
    if exc.status_code == 400 and isinstance(cause, (UnicodeDecodeError, RecursionError)):  # malformed JSON: a 422
        what = "not UTF-8 text" if isinstance(cause, UnicodeDecodeError) else "JSON nested deeper than Python parses"
        return JSONResponse(status_code=422, content={"detail": f"body: {what}"})
    return await http_exception_handler(request, exc)


@api.exception_handler(BanditError)
async def _bandit_error(_: Request, exc: BanditError) -> JSONResponse:
    # Errors raised inside the actor arrive as RayTaskError subclasses of the original class;
    # `cause` is the original exception and carries the plain message.
    cause = getattr(exc, "cause", exc)
    status = type(exc).http_status
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(status_code=status, content={"detail": client_text(str(cause))}, headers=headers)


async def _require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    """Dependency of the writing endpoints: it runs before their body is validated against its
    fields, so a caller without the token learns nothing but 401 (a body that is not JSON at all
    is a 422 first: FastAPI reads JSON before it solves dependencies)."""
    check_authorization(authorization, serve.get_replica_context().servable_object.token_digest)


async def _holds_token(authorization: Annotated[str | None, Header()] = None) -> bool:
    """/decide: no Authorization header is an anonymous caller; one that is there must be right."""
    if authorization is None:
        return False
    await _require_token(authorization)
    return True


@api.exception_handler(CheckpointError)
async def _state_unavailable(_: Request, exc: CheckpointError) -> JSONResponse:
    # The actor is up but its state folder does not load (it tries again on every call).
    return JSONResponse(status_code=503, content={
        "detail": f"bandit state unavailable: {client_text(str(getattr(exc, 'cause', exc)))}"})


@api.exception_handler(ray.exceptions.RayActorError)
async def _actor_down(_: Request, exc: ray.exceptions.RayActorError) -> JSONResponse:
    # Ray's message holds the actor's node address, pid and a traceback of server paths: the
    # replica's log gets it, the client one line.
    print(f"bandit actor unavailable: {exc}", file=sys.stderr)
    return JSONResponse(status_code=503, content={"detail": "bandit actor unavailable (the server's log says why); "
                                                            "retry later"})


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(api)
class BanditIngress:
    def __init__(self, actor_name: str, namespace: str, feature_table: str | None, token_sha256: str,
                 state_dir: str | None = None):
        """`state_dir` set (a Serve config deploy, no driver): get or start the detached actor."""
        self.token_digest = token_sha256
        if state_dir is not None:
            start_bandit_actor(Path(state_dir), name=actor_name, namespace=namespace, detached=True)
        self.actor = ray.get_actor(actor_name, namespace=namespace)
        described = ray.get(self.actor.describe.remote())
        path = feature_table or described.get("feature_table")
        self.table = FeatureTable.load(Path(path), described["feature_names"]) if path else None

    @api.post("/decide")
    async def decide(self, req: DecideRequest, trusted: Annotated[bool, Depends(_holds_token)]) -> dict[str, Any]:
        if req.features is not None:
            return await self.actor.decide.remote(req.features, req.arms, trusted)
        if self.table is None:
            raise BanditError("this bandit has no feature table: send 'features' instead of names")
        x = self.table.lookup(req.a, req.b, req.task)
        result = await self.actor.decide.remote(x.tolist(), req.arms, trusted)
        return {**result, "pair": {"a": req.a, "b": req.b, "task": req.task}}

    @api.post("/feedback", dependencies=[Depends(_require_token)])
    async def feedback(self, req: FeedbackRequest) -> dict[str, Any]:
        return await self.actor.feedback.remote(req.decision_id, req.reward)

    @api.post("/arms", dependencies=[Depends(_require_token)])
    async def add_arm(self, req: ArmRequest) -> dict[str, Any]:
        return await self.actor.add_arm.remote(req.name, req.prior, req.prior_var)

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        return await self.actor.stats.remote()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        stats = await self.actor.stats.remote()
        return {"status": "ok", "arms": [a["name"] for a in stats["arms"]], "decisions": stats["decisions"]}


def serve_bandit(
    state_dir: Path,
    *,
    token: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    feature_table: Path | None = None,
    actor_name: str = ACTOR_NAME,
    namespace: str = NAMESPACE,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
) -> ray.actor.ActorHandle:
    """Start (or join) the bandit actor over `state_dir` and expose it over HTTP on host:port;
    writes need `token`. Needs a running Ray (the caller's `ray.init`); returns the actor handle.
    """
    actor = start_bandit_actor(state_dir, name=actor_name, namespace=namespace)
    # One access-log line per request is a measurable share of a few-ms request: keep warnings.
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    app = BanditIngress.bind(actor_name, namespace, str(feature_table) if feature_table else None,
                             token_digest(token))
    serve.run(app, name=app_name, route_prefix=route_prefix, logging_config=quiet)
    return actor


def stop_serving(actor: ray.actor.ActorHandle | None = None, *, timeout_s: float = 30.0) -> None:
    """Shut Serve down (its handles, then the controller, which removes the replicas and proxies
    first), then the bandit actor; the caller then shuts Ray down.

    `serve.shutdown()` asks the controller to shut down through a handle that retries forever
    (Serve creates the controller with `max_task_retries=-1`); the controller ends by killing
    itself, so the call fails once and Ray prints a "(raylet) Task
    ServeController.graceful_shutdown failed ... will be retried" line. The same call without
    retries shuts down the same way, silently.
    """
    from ray.serve.context import _disconnect, _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        client.shutdown_cached_handles()
        try:
            ray.get(client._controller.graceful_shutdown.options(max_task_retries=0).remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            pass  # the controller is gone: the expected end of a graceful shutdown
        client._shutdown = True
        _disconnect()
    if actor is not None:
        ray.kill(actor, no_restart=True)


def app(args: dict[str, str]) -> serve.Application:
    """Application builder for a Serve config (the RayService's `import_path`).

    args: `state` (the state folder), optional `feature_table`, `token_file`, `actor_name`,
    `namespace`; without `token_file` the token comes from SIMMERGE_BANDIT_TOKEN (the manifest
    sets it from a Secret). The actor is detached: no driver owns it there.
    """
    unknown = set(args) - {"state", "feature_table", "token_file", "actor_name", "namespace"}
    if "state" not in args or unknown:
        raise ValueError(f"bandit app args: need 'state', unknown {sorted(unknown)}")
    token = load_token(Path(args["token_file"]) if args.get("token_file") else None)
    return BanditIngress.bind(args.get("actor_name", ACTOR_NAME), args.get("namespace", NAMESPACE),
                              args.get("feature_table"), token_digest(token), str(args["state"]))
