"""The HTTP front of the bandit: a Ray Serve deployment (FastAPI ingress) over the named actor.

    POST /decide    {"features": [...]} or {"a": .., "b": .., "task": ..}; optional "arms": [..]
                    -> decision_id, operator, sampled scores, posterior means
    POST /feedback  {"decision_id": .., "reward": ..} -> status counted | duplicate
    POST /arms      {"name": .., "prior": "pooled" | "zero", "prior_var": ..}
    GET  /stats     counters and per-arm plays and mean rewards
    GET  /healthz   the actor answers

Bodies are validated by pydantic (malformed JSON, missing or extra fields, NaN/Inf -> 422);
errors the bandit raises carry their own 4xx status (unknown id or name 404, duplicate arm 409,
wrong feature width 422); an actor that cannot be reached is a 503. Model names are resolved
through the feature table here, in the replica, so the actor only ever sees numbers.
(No `from __future__ import annotations` here: FastAPI must see the request models as classes.)
"""

from pathlib import Path
from typing import Annotated, Any, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from simmerge_ray.bandit.actor import ACTOR_NAME, NAMESPACE, start_bandit_actor
from simmerge_ray.bandit.errors import BanditError
from simmerge_ray.bandit.feature_table import FeatureTable

APP_NAME = "simmerge-bandit"

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class DecideRequest(BaseModel):
    """Either raw pair features, or a pair of model names and a task to look them up."""

    model_config = ConfigDict(extra="forbid")

    features: list[FiniteFloat] | None = None
    a: Name | None = None
    b: Name | None = None
    task: Name | None = None
    arms: list[Name] | None = None  # restrict the choice to these operators

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
    reward: FiniteFloat


class ArmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    prior: Literal["pooled", "zero"] = "pooled"
    prior_var: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None


api = FastAPI(title="simmerge bandit", description=__doc__)


@api.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the offending input, and a NaN there makes the 422 itself fail
    # to serialise (a 500): answer with where and what only.
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": errors})


@api.exception_handler(BanditError)
async def _bandit_error(_: Request, exc: BanditError) -> JSONResponse:
    # Errors raised inside the actor arrive as RayTaskError subclasses of the original class;
    # `cause` is the original exception and carries the plain message.
    cause = getattr(exc, "cause", exc)
    return JSONResponse(status_code=type(exc).http_status, content={"detail": str(cause)})


@api.exception_handler(ray.exceptions.RayActorError)
async def _actor_down(_: Request, exc: ray.exceptions.RayActorError) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": f"bandit actor unavailable: {exc}"})


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class BanditIngress:
    def __init__(self, actor_name: str, namespace: str, feature_table: str | None):
        self.actor = ray.get_actor(actor_name, namespace=namespace)
        settings = ray.get(self.actor.settings.remote())
        names = ray.get(self.actor.feature_names.remote())
        path = feature_table or settings.get("feature_table")
        self.table = FeatureTable.load(Path(path), names) if path else None

    @api.post("/decide")
    async def decide(self, req: DecideRequest) -> dict[str, Any]:
        if req.features is not None:
            return await self.actor.decide.remote(req.features, req.arms)
        if self.table is None:
            raise BanditError("this bandit has no feature table: send 'features' instead of names")
        x = self.table.lookup(req.a, req.b, req.task)
        result = await self.actor.decide.remote(x.tolist(), req.arms)
        return {**result, "pair": {"a": req.a, "b": req.b, "task": req.task}}

    @api.post("/feedback")
    async def feedback(self, req: FeedbackRequest) -> dict[str, Any]:
        return await self.actor.feedback.remote(req.decision_id, req.reward)

    @api.post("/arms")
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
    host: str = "127.0.0.1",
    port: int = 8000,
    feature_table: Path | None = None,
    actor_name: str = ACTOR_NAME,
    namespace: str = NAMESPACE,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
) -> ray.actor.ActorHandle:
    """Start (or join) the bandit actor over `state_dir` and expose it over HTTP on host:port.

    Needs a running Ray (the caller's `ray.init`); returns the actor handle.
    """
    actor = start_bandit_actor(state_dir, name=actor_name, namespace=namespace)
    # One access-log line per request is a measurable share of a few-ms request: keep warnings.
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    app = BanditIngress.bind(actor_name, namespace, str(feature_table) if feature_table else None)
    serve.run(app, name=app_name, route_prefix=route_prefix, logging_config=quiet)
    return actor
